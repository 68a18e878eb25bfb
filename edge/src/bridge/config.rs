//! A bridge's settings, read from JSON (the `bridges` setting: a file's path, or the JSON
//! itself). Every field is checked; a bad one is a [`ConfigError`] naming it, e.g.
//! `bridges[0].out[1].qos`.
//!
//! ```json
//! [{"name": "cloud", "address": "iot.example.com:8883", "protocol": "5.0",
//!   "clientId": "site-7", "username": "site-7", "password": "...", "keepAlive": 30,
//!   "tls": {"ca": "ca.pem", "cert": "site-7.pem", "key": "site-7.key"},
//!   "out": [{"filter": "fleet/#", "qos": 1, "remotePrefix": "site-7/"}],
//!   "in": [{"filter": "cmd/#", "qos": 1, "localPrefix": "from-cloud/"}]}]
//! ```

use crate::protocol::Version;
use serde_json::{Map, Value};
use std::path::PathBuf;
use wharf_ops::config::ConfigError;
use wharf_shared::Qos;

/// Client ids under this prefix are the bridges' local sessions; no client may use them.
pub const SESSION_PREFIX: &str = "$bridge/";

/// One bridge to a remote broker.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeConfig {
    /// Unique among the bridges; names the local session (`$bridge/<name>`).
    pub name: String,
    /// `host:port` of the remote broker.
    pub address: String,
    /// 3.1.1 or 5.0.
    pub version: Version,
    /// The client id on the remote (one for the whole cluster: its session there is the
    /// bridge's, whichever host runs it).
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u16,
    pub tls: Option<BridgeTls>,
    /// Local messages to forward to the remote.
    pub out: Vec<Topic>,
    /// Remote messages to publish here.
    pub inbound: Vec<Topic>,
    /// QoS 1 messages unacknowledged at once in each direction (also bounded by the remote's
    /// Receive Maximum).
    pub max_inflight: u16,
}

/// TLS towards the remote: the CA its certificate must chain to, and the bridge's own
/// certificate where the remote asks for one (AWS IoT Core does).
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name checked against the remote's certificate; the address's host by default.
    pub server_name: Option<String>,
}

/// A topic pattern and its prefixes, as Mosquitto's `topic` line: the subscription is
/// `<this side's prefix><filter>`, and a message's topic gets the other side's prefix in
/// place of this side's.
#[derive(Debug, Clone, PartialEq)]
pub struct Topic {
    pub filter: String,
    pub qos: Qos,
    pub local_prefix: String,
    pub remote_prefix: String,
}

impl Topic {
    /// The filter subscribed to on the local side.
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.filter)
    }

    /// The filter subscribed to on the remote side.
    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.filter)
    }

    /// The remote topic of a local message this pattern forwards; `None` when it does not
    /// match the pattern.
    pub fn to_remote(&self, local: &str) -> Option<String> {
        let rest = local.strip_prefix(self.local_prefix.as_str())?;
        wharf_shared::topic::matches(rest, &self.filter)
            .then(|| format!("{}{rest}", self.remote_prefix))
    }

    /// The local topic of a remote message this pattern takes in.
    pub fn to_local(&self, remote: &str) -> Option<String> {
        let rest = remote.strip_prefix(self.remote_prefix.as_str())?;
        wharf_shared::topic::matches(rest, &self.filter)
            .then(|| format!("{}{rest}", self.local_prefix))
    }
}

/// The bridges of a `bridges` setting: JSON text (starting with `[`), or the path of a file
/// holding it; empty for none.
pub fn load(key: &str, value: &str) -> Result<Vec<BridgeConfig>, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let text = if value.starts_with('[') {
        value.to_owned()
    } else {
        std::fs::read_to_string(value)
            .map_err(|e| ConfigError::new(key, value, format!("cannot read: {e}")))?
    };
    parse(key, &text)
}

pub fn parse(key: &str, text: &str) -> Result<Vec<BridgeConfig>, ConfigError> {
    let json: Value = serde_json::from_str(text)
        .map_err(|e| ConfigError::new(key, "(JSON)", format!("not JSON: {e}")))?;
    let Value::Array(items) = json else {
        return Err(ConfigError::new(key, "(JSON)", "must be a list of bridges"));
    };
    let mut bridges: Vec<BridgeConfig> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let bridge = bridge(&at, item)?;
        if bridges.iter().any(|b| b.name == bridge.name) {
            return Err(ConfigError::new(
                format!("{at}.name"),
                bridge.name,
                "two bridges have this name",
            ));
        }
        bridges.push(bridge);
    }
    Ok(bridges)
}

/// Reads the fields of one JSON object, refusing any it does not know (a misspelt key
/// would otherwise be ignored silently).
struct Fields<'a> {
    at: &'a str,
    map: &'a Map<String, Value>,
    known: &'static [&'static str],
}

impl<'a> Fields<'a> {
    fn new(
        at: &'a str,
        value: &'a Value,
        known: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        let Value::Object(map) = value else {
            return Err(ConfigError::new(at, value.to_string(), "must be an object"));
        };
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ConfigError::new(
                format!("{at}.{unknown}"),
                "",
                format!("unknown setting (known: {})", known.join(", ")),
            ));
        }
        Ok(Fields { at, map, known })
    }

    fn key(&self, name: &str) -> String {
        debug_assert!(self.known.contains(&name));
        format!("{}.{name}", self.at)
    }

    fn string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ConfigError::new(
                self.key(name),
                other.to_string(),
                "must be a string",
            )),
        }
    }

    fn required(&self, name: &str) -> Result<String, ConfigError> {
        match self.string(name)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(ConfigError::new(self.key(name), "", "required")),
        }
    }

    fn number(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ConfigError::new(
                    self.key(name),
                    v.to_string(),
                    format!("must be a whole number from {min} to {max}"),
                )),
            },
        }
    }

    fn list(&self, name: &str) -> Result<&'a [Value], ConfigError> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(ConfigError::new(
                self.key(name),
                other.to_string(),
                "must be a list",
            )),
        }
    }
}

fn bridge(at: &str, value: &Value) -> Result<BridgeConfig, ConfigError> {
    let f = Fields::new(
        at,
        value,
        &[
            "name",
            "address",
            "protocol",
            "clientId",
            "username",
            "password",
            "keepAlive",
            "tls",
            "out",
            "in",
            "maxInflight",
        ],
    )?;
    let name = f.required("name")?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || name.len() > 64
    {
        return Err(ConfigError::new(
            f.key("name"),
            name,
            "letters, digits, '-', '_' and '.' only, at most 64",
        ));
    }
    let address = f.required("address")?;
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
        _ => {
            return Err(ConfigError::new(
                f.key("address"),
                address,
                "expected host:port",
            ))
        }
    }
    let version = match f.string("protocol")?.as_deref() {
        None | Some("5.0") | Some("5") => Version::V5,
        Some("3.1.1") | Some("4") => Version::V3_1_1,
        Some(other) => {
            return Err(ConfigError::new(
                f.key("protocol"),
                other,
                "expected 3.1.1 or 5.0",
            ))
        }
    };
    let client_id = f
        .string("clientId")?
        .unwrap_or_else(|| format!("wharf-bridge-{name}"));
    if client_id.is_empty() || client_id.len() > 23 * 10 {
        return Err(ConfigError::new(
            f.key("clientId"),
            client_id,
            "must be 1 to 230 bytes",
        ));
    }
    let username = f.string("username")?;
    let password = f.string("password")?;
    if password.is_some() && username.is_none() && version == Version::V3_1_1 {
        return Err(ConfigError::new(
            f.key("password"),
            "(hidden)",
            "MQTT 3.1.1 sends a password only with a user name",
        ));
    }
    let keep_alive = f.number("keepAlive", 5, 65_535)?.unwrap_or(30) as u16;
    let max_inflight = f.number("maxInflight", 1, 65_535)?.unwrap_or(100) as u16;
    let tls = match f.map.get("tls") {
        None | Some(Value::Null) => None,
        Some(v) => Some(tls(&f.key("tls"), v)?),
    };
    let topics = |side: &str| -> Result<Vec<Topic>, ConfigError> {
        f.list(side)?
            .iter()
            .enumerate()
            .map(|(i, t)| topic(&format!("{}[{i}]", f.key(side)), t))
            .collect()
    };
    let out = topics("out")?;
    let inbound = topics("in")?;
    if out.is_empty() && inbound.is_empty() {
        return Err(ConfigError::new(
            f.key("out"),
            "[]",
            "a bridge needs at least one topic, out or in",
        ));
    }
    Ok(BridgeConfig {
        name,
        address,
        version,
        client_id,
        username,
        password,
        keep_alive,
        tls,
        out,
        inbound,
        max_inflight,
    })
}

fn tls(at: &str, value: &Value) -> Result<BridgeTls, ConfigError> {
    let f = Fields::new(at, value, &["ca", "cert", "key", "serverName"])?;
    let path = |name: &str| -> Result<Option<PathBuf>, ConfigError> {
        let Some(p) = f.string(name)? else {
            return Ok(None);
        };
        let path = PathBuf::from(&p);
        if !path.is_file() {
            return Err(ConfigError::new(f.key(name), p, "no such file"));
        }
        Ok(Some(path))
    };
    let Some(ca) = path("ca")? else {
        return Err(ConfigError::new(
            f.key("ca"),
            "",
            "required: the CA the remote's certificate chains to",
        ));
    };
    let cert = path("cert")?;
    let key = path("key")?;
    if cert.is_some() != key.is_some() {
        return Err(ConfigError::new(
            f.key(if cert.is_some() { "key" } else { "cert" }),
            "",
            "a client certificate needs both cert and key",
        ));
    }
    // Read now, so that a bad certificate or key stops the start, naming the setting.
    crate::tls::client_config(at, &ca, cert.as_ref(), key.as_ref())?;
    Ok(BridgeTls {
        ca,
        cert,
        key,
        server_name: f.string("serverName")?,
    })
}

fn topic(at: &str, value: &Value) -> Result<Topic, ConfigError> {
    let f = Fields::new(at, value, &["filter", "qos", "localPrefix", "remotePrefix"])?;
    let filter = f.required("filter")?;
    if !wharf_shared::topic::valid_filter(&filter) || filter.starts_with("$share/") {
        return Err(ConfigError::new(
            f.key("filter"),
            filter,
            "not a topic filter",
        ));
    }
    let qos = match f.number("qos", 0, 2)?.unwrap_or(1) {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => {
            return Err(ConfigError::new(
                f.key("qos"),
                "2",
                "the bridge forwards at QoS 0 or 1 (QoS 1 loses nothing; duplicates only after a reconnect)",
            ))
        }
    };
    let prefix = |name: &str| -> Result<String, ConfigError> {
        let p = f.string(name)?.unwrap_or_default();
        if p.contains(['+', '#']) || p.starts_with('$') {
            return Err(ConfigError::new(
                f.key(name),
                p,
                "a prefix has no wildcards and does not start with $",
            ));
        }
        Ok(p)
    };
    Ok(Topic {
        filter,
        qos,
        local_prefix: prefix("localPrefix")?,
        remote_prefix: prefix("remotePrefix")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bridge_reads() {
        let text = r#"[{"name": "cloud", "address": "127.0.0.1:1884", "protocol": "3.1.1",
            "username": "u", "password": "p", "keepAlive": 20,
            "out": [{"filter": "fleet/#", "remotePrefix": "site/"}],
            "in": [{"filter": "cmd/+", "qos": 0, "localPrefix": "in/"}]}]"#;
        let b = &parse("bridges", text).expect("parses")[0];
        assert_eq!(b.name, "cloud");
        assert_eq!(b.version, Version::V3_1_1);
        assert_eq!(b.client_id, "wharf-bridge-cloud");
        assert_eq!(b.keep_alive, 20);
        assert_eq!(b.out[0].qos, Qos::AtLeastOnce);
        assert_eq!(
            b.out[0].to_remote("fleet/a/b").as_deref(),
            Some("site/fleet/a/b")
        );
        assert_eq!(b.out[0].to_remote("other/a"), None);
        assert_eq!(b.inbound[0].remote_filter(), "cmd/+");
        assert_eq!(b.inbound[0].local_filter(), "in/cmd/+");
        assert_eq!(b.inbound[0].to_local("cmd/x").as_deref(), Some("in/cmd/x"));
        assert_eq!(b.inbound[0].qos, Qos::AtMostOnce);
    }

    #[test]
    fn each_bad_setting_is_named() {
        let bad = [
            (r#"{"name": "a"}"#, "bridges", "list"),
            (
                r#"[{"address": "h:1", "out": [{"filter": "a"}]}]"#,
                "bridges[0].name",
                "required",
            ),
            (
                r#"[{"name": "a b", "address": "h:1", "out": [{"filter": "a"}]}]"#,
                "bridges[0].name",
                "letters",
            ),
            (
                r#"[{"name": "a", "address": "h", "out": [{"filter": "a"}]}]"#,
                "bridges[0].address",
                "host:port",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "protocol": "3", "out": [{"filter": "a"}]}]"#,
                "bridges[0].protocol",
                "3.1.1",
            ),
            (
                r#"[{"name": "a", "address": "h:1"}]"#,
                "bridges[0].out",
                "at least one",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "out": [{"filter": "a/#/b"}]}]"#,
                "bridges[0].out[0].filter",
                "filter",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "out": [{"filter": "a", "qos": 2}]}]"#,
                "bridges[0].out[0].qos",
                "QoS 0 or 1",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "out": [{"filter": "a", "qos": "1"}]}]"#,
                "bridges[0].out[0].qos",
                "whole number",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "in": [{"filter": "a", "remotePrefix": "x/#"}]}]"#,
                "bridges[0].in[0].remotePrefix",
                "wildcards",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "out": [{"filter": "a"}], "tls": {}}]"#,
                "bridges[0].tls.ca",
                "required",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "out": [{"filter": "a"}], "tls": {"ca": "/nonexistent"}}]"#,
                "bridges[0].tls.ca",
                "no such file",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "out": [{"filter": "a"}], "keepalive": 3}]"#,
                "bridges[0].keepalive",
                "unknown",
            ),
            (
                r#"[{"name": "a", "address": "h:1", "out": [{"filter": "a"}]}, {"name": "a", "address": "h:2", "out": [{"filter": "b"}]}]"#,
                "bridges[1].name",
                "two bridges",
            ),
            ("[", "bridges", "not JSON"),
        ];
        for (text, key, reason) in bad {
            let e = parse("bridges", text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn an_empty_setting_is_no_bridge() {
        assert_eq!(load("bridges", " ").expect("empty"), Vec::new());
        assert_eq!(load("bridges", "[]").expect("empty list"), Vec::new());
        let e = load("bridges", "/nonexistent/bridges.json").expect_err("no file");
        assert!(e.reason.contains("cannot read"), "{e}");
    }
}
