//! Typed configuration from layered sources: command-line flags, then environment variables
//! (both through clap), then etcd keys under a prefix (default `/iot/mqtt`), then defaults.
//!
//! A value is read through [`ConfigSource`], implemented for etcd snapshots and for literal
//! maps (tests). Every bad value becomes a [`ConfigError`] naming the key and the value; the
//! binaries exit with code 64 ([`EX_USAGE`]) before binding any port.

use clap::parser::ValueSource;
use clap::ArgMatches;
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// Exit code for unusable configuration (BSD `EX_USAGE`).
pub const EX_USAGE: i32 = 64;

/// The etcd prefix of the original design.
pub const DEFAULT_PREFIX: &str = "/iot/mqtt";

/// A value that cannot be used, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key} = {value:?}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// Where configuration values come from, by key (the part after the prefix, e.g. `tls`).
pub trait ConfigSource: Send + Sync {
    fn get(&self, key: &str) -> Option<String>;
}

impl ConfigSource for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// No configuration store: flags, environment and defaults only.
pub struct NoSource;

impl ConfigSource for NoSource {
    fn get(&self, _key: &str) -> Option<String> {
        None
    }
}

/// The etcd flags both binaries take.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints (comma-separated URLs); without them etcd is not read.
    #[arg(long = "etcd", env = "WHARF_ETCD", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// etcd key prefix.
    #[arg(long = "etcd-prefix", env = "WHARF_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
}

impl EtcdArgs {
    /// Every key under the prefix, read once; `None` without endpoints.
    pub async fn snapshot(&self) -> Result<Option<HashMap<String, String>>, ConfigError> {
        if self.endpoints.is_empty() {
            return Ok(None);
        }
        etcd::load(&self.endpoints, &self.prefix).await.map(Some)
    }
}

/// The source to layer under flags: the etcd snapshot if there is one.
pub fn source(snapshot: &Option<HashMap<String, String>>) -> &dyn ConfigSource {
    match snapshot {
        Some(s) => s,
        None => &NoSource,
    }
}

/// Parses the process's arguments, keeping the matches for layering (which values came
/// from flags or environment, and which are defaults).
pub fn parse_with_matches<T: clap::Parser>() -> (T, ArgMatches) {
    let matches = T::command().get_matches();
    match T::from_arg_matches(&matches) {
        Ok(args) => (args, matches),
        Err(e) => e.exit(),
    }
}

/// Parses a value, or names the key and value that failed.
pub fn parse<T: FromStr>(key: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| ConfigError::new(key, value, e.to_string()))
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`).
pub fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(key, value, "expected true or false")),
    }
}

/// Milliseconds as a whole number.
pub fn parse_ms(key: &str, value: &str) -> Result<Duration, ConfigError> {
    parse::<u64>(key, value).map(Duration::from_millis)
}

/// Seconds as a whole number.
pub fn parse_secs(key: &str, value: &str) -> Result<Duration, ConfigError> {
    parse::<u64>(key, value).map(Duration::from_secs)
}

/// Flags and environment first, then a source, then the flag's default.
pub struct Layers<'a> {
    matches: &'a ArgMatches,
    source: &'a dyn ConfigSource,
}

impl<'a> Layers<'a> {
    pub fn new(matches: &'a ArgMatches, source: &'a dyn ConfigSource) -> Self {
        Layers { matches, source }
    }

    /// Whether the flag `arg` was given on the command line or in the environment.
    pub fn explicit(&self, arg: &str) -> bool {
        matches!(
            self.matches.value_source(arg),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }

    /// The value of flag `arg` (already parsed by clap into `current`), unless it came from its
    /// default and the source has `key`, which is then parsed with `parse`.
    pub fn pick<T>(
        &self,
        arg: &str,
        key: &str,
        current: T,
        parse: impl Fn(&str, &str) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        if self.explicit(arg) {
            return Ok(current);
        }
        match self.source.get(key) {
            Some(value) => parse(key, &value),
            None => Ok(current),
        }
    }

    /// Like `pick`, for a flag without a default.
    pub fn pick_opt<T>(
        &self,
        arg: &str,
        key: &str,
        current: Option<T>,
        parse: impl Fn(&str, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        if self.explicit(arg) {
            return Ok(current);
        }
        match self.source.get(key) {
            Some(value) => parse(key, &value).map(Some),
            None => Ok(current),
        }
    }

    /// Like `pick` with `FromStr`.
    pub fn value<T: FromStr>(&self, arg: &str, key: &str, current: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.pick(arg, key, current, parse::<T>)
    }

    pub fn value_opt<T: FromStr>(
        &self,
        arg: &str,
        key: &str,
        current: Option<T>,
    ) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.pick_opt(arg, key, current, parse::<T>)
    }
}

/// Reading from and watching etcd.
pub mod etcd {
    use super::ConfigError;
    use etcd_client::{Client, EventType, GetOptions, WatchOptions};
    use std::collections::HashMap;
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// A change under the prefix: the key (without the prefix) and its new value (`None` when
    /// deleted).
    pub type Change = (String, Option<String>);

    fn key_of(prefix: &str, full: &[u8]) -> Option<String> {
        let full = std::str::from_utf8(full).ok()?;
        full.strip_prefix(prefix)
            .map(|k| k.trim_start_matches('/').to_owned())
    }

    async fn connect(endpoints: &[String]) -> Result<Client, ConfigError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| ConfigError::new("etcd", endpoints.join(","), format!("unreachable: {e}")))
    }

    /// Every key under `prefix`, read once at start-up.
    pub async fn load(
        endpoints: &[String],
        prefix: &str,
    ) -> Result<HashMap<String, String>, ConfigError> {
        let mut client = connect(endpoints).await?;
        let response = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| {
                ConfigError::new("etcd", endpoints.join(","), format!("read {prefix}: {e}"))
            })?;
        let mut out = HashMap::new();
        for kv in response.kvs() {
            if let (Some(key), Ok(value)) = (key_of(prefix, kv.key()), kv.value_str()) {
                out.insert(key, value.to_owned());
            }
        }
        Ok(out)
    }

    /// Streams changes under `prefix` to `changes` until it is closed, reconnecting as needed.
    pub async fn watch(endpoints: Vec<String>, prefix: String, changes: mpsc::Sender<Change>) {
        loop {
            let result: Result<(), String> = async {
                let mut client = connect(&endpoints).await.map_err(|e| e.to_string())?;
                let mut stream = client
                    .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
                    .await
                    .map_err(|e| e.to_string())?;
                while let Some(response) = stream.message().await.map_err(|e| e.to_string())? {
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let Some(key) = key_of(&prefix, kv.key()) else {
                            continue;
                        };
                        let value = match event.event_type() {
                            EventType::Put => kv.value_str().ok().map(str::to_owned),
                            EventType::Delete => None,
                        };
                        if changes.send((key, value)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                Err("watch stream ended".into())
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "etcd watch lost; retrying in 1 s");
                    if changes.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn matches(args: &[&str]) -> ArgMatches {
        Command::new("t")
            .arg(Arg::new("max").long("max").default_value("5"))
            .try_get_matches_from(args)
            .expect("args")
    }

    #[test]
    fn flags_beat_the_source_which_beats_defaults() {
        let source: HashMap<String, String> = [("max".to_owned(), "9".to_owned())].into();
        let m = matches(&["t"]);
        let layers = Layers::new(&m, &source);
        assert_eq!(layers.value("max", "max", 5u32), Ok(9));
        let m = matches(&["t", "--max", "7"]);
        let layers = Layers::new(&m, &source);
        assert_eq!(layers.value("max", "max", 7u32), Ok(7));
        let m = matches(&["t"]);
        let layers = Layers::new(&m, &NoSource);
        assert_eq!(layers.value("max", "max", 5u32), Ok(5));
    }

    #[test]
    fn bad_values_name_the_key_and_the_value() {
        let source: HashMap<String, String> = [("max".to_owned(), "lots".to_owned())].into();
        let m = matches(&["t"]);
        let err = Layers::new(&m, &source)
            .value("max", "max", 5u32)
            .expect_err("invalid");
        assert_eq!((err.key.as_str(), err.value.as_str()), ("max", "lots"));
        assert!(parse_bool("tls", "maybe").is_err());
        assert_eq!(parse_bool("tls", "TRUE"), Ok(true));
    }
}
