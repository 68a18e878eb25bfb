//! The edge's typed configuration, validated before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the edge needs to run; `main.rs` fills it from flags and environment.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Plain MQTT listener; `None` turns it off.
    pub listen: Option<SocketAddr>,
    /// The TLS listener and the certificates of every TLS listener, if any.
    pub tls: Option<crate::tls::TlsSettings>,
    /// The WebSocket listeners.
    pub web: WebListeners,
    /// The listeners on which every connection must start with a PROXY protocol header.
    pub proxy: ProxyListeners,
    /// The store-worker's Unix socket.
    pub worker_socket: PathBuf,
    /// This broker's host name, stored as `host` with every message.
    pub host: String,
    pub limits: Limits,
    /// How long shutdown waits for sessions to finish.
    pub shutdown_grace: Duration,
    /// Authentication and authorization.
    pub auth: crate::auth::AuthSettings,
    /// `--publisher-identity`: the User Property keys under which every message carries its
    /// publisher's identity; `None` (the default) adds nothing.
    pub publisher_identity: Option<IdentityKeys>,
    /// Bridges to other brokers (`bridges`).
    pub bridges: Vec<crate::bridge::config::BridgeConfig>,
}

/// The User Property keys of a publisher's identity (see [`EdgeConfig::publisher_identity`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityKeys {
    pub client_id: String,
    pub username: String,
    pub certificate: String,
}

impl IdentityKeys {
    pub fn contains(&self, key: &str) -> bool {
        key == self.client_id || key == self.username || key == self.certificate
    }
}

impl Default for IdentityKeys {
    fn default() -> Self {
        IdentityKeys {
            client_id: "wharf-client-id".into(),
            username: "wharf-username".into(),
            certificate: "wharf-certificate".into(),
        }
    }
}

/// MQTT over WebSocket: plain, and secure with the TLS settings' certificates and client
/// certificate policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebListeners {
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    /// The HTTP path of the upgrade (`/mqtt`).
    pub path: String,
}

impl Default for WebListeners {
    fn default() -> Self {
        WebListeners {
            ws: None,
            wss: None,
            path: "/mqtt".to_owned(),
        }
    }
}

/// The kinds of listener, for settings per listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    Mqtt,
    Tls,
    Ws,
    Wss,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 4] = [
        ListenerKind::Mqtt,
        ListenerKind::Tls,
        ListenerKind::Ws,
        ListenerKind::Wss,
    ];

    /// Whether connections start with TLS (and so a client certificate policy applies).
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Mqtt => "mqtt",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }
}

/// Which listeners require a PROXY protocol (v1 or v2) header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyListeners(u8);

impl ProxyListeners {
    pub fn with(self, kind: ListenerKind) -> Self {
        ProxyListeners(self.0 | 1 << kind as u8)
    }

    pub fn requires(self, kind: ListenerKind) -> bool {
        self.0 & 1 << kind as u8 != 0
    }
}

impl std::str::FromStr for ProxyListeners {
    type Err = String;

    /// `off`, or a comma-separated list of `mqtt`, `tls`, `ws`, `wss`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut set = ProxyListeners::default();
        for name in value.split(',').map(str::trim) {
            if name.is_empty() || name == "off" {
                continue;
            }
            let kind = ListenerKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or("expected off or a list of mqtt, tls, ws, wss")?;
            set = set.with(kind);
        }
        Ok(set)
    }
}

/// Limits with documented behaviour when reached (docs/mqtt.md, "Limits").
#[derive(Clone, Debug)]
pub struct Limits {
    /// A connection that sends no CONNECT within this time is closed.
    pub connect_timeout: Duration,
    /// Largest accepted packet (remaining length); a larger one closes the connection.
    pub max_packet_size: usize,
    /// Unacknowledged QoS 1/2 messages towards one client.
    pub max_inflight: u16,
    /// Messages queued for one client; past it QoS 0 is dropped and counted, QoS 1/2 is
    /// left in the store and fetched again once the client catches up.
    pub max_queued: usize,
    /// Concurrent client connections; past it new connections are closed at once.
    pub max_connections: usize,
    /// QoS 1/2 publishes of one client waiting for the store at once; past it the edge stops
    /// reading from that client.
    pub max_pending_persists: usize,
    /// QoS 1/2 publishes waiting for the store across the edge (held while the worker is
    /// away); past it publishers are not read from.
    pub max_held_persists: usize,
    /// Bytes waiting to be written to one client before the edge stops queueing more.
    pub write_high_water: usize,
    /// 5.0 Receive Maximum: QoS 2 PUBLISHes a 5.0 client may have unreleased; more closes the
    /// connection (0x93). QoS 1 is bounded by `max_pending_persists`. 65,535 is not sent (the
    /// default).
    pub receive_maximum: u16,
    /// 5.0 Topic Alias Maximum: aliases a client may set; 0 accepts none.
    pub topic_alias_max: u16,
    /// Most topic aliases the server gives a 5.0 client (at most what it allows); 0 gives none.
    pub topic_alias_max_out: u16,
    /// Longest a session outlives its connection, in seconds (bounds 5.0 Session Expiry
    /// Intervals and 3.1/3.1.1 persistent sessions); `u32::MAX`: no bound.
    pub max_session_expiry: u32,
    /// 5.0 Server Keep Alive: the longest keepalive a 5.0 client may use; one asking for more,
    /// or for none, is told to use this.
    pub server_keep_alive: Option<u16>,
    /// New connections accepted per second from one source address; 0: no limit.
    pub max_connection_rate: u32,
    /// PUBLISHes accepted per second from one client; 0: no limit. Past it QoS 0 is
    /// dropped; QoS 1/2 get 0x97 (5.0) or close the connection (3.1/3.1.1).
    pub max_publish_rate: u32,
    /// Most levels a topic name or filter may have (deeper: SUBACK 0x80/0x8F, or the PUBLISH
    /// refused as malformed); at most `wharf_shared::topic::MAX_LEVELS_CEILING`.
    pub max_topic_levels: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1024 * 1024,
            max_inflight: 32,
            max_queued: 1000,
            max_connections: 100_000,
            max_pending_persists: 256,
            max_held_persists: 10_000,
            write_high_water: 64 * 1024,
            receive_maximum: u16::MAX,
            topic_alias_max: 10,
            topic_alias_max_out: 10,
            max_session_expiry: u32::MAX,
            server_keep_alive: None,
            max_connection_rate: 0,
            max_publish_rate: 0,
            max_topic_levels: wharf_shared::topic::DEFAULT_MAX_LEVELS,
        }
    }
}

pub use wharf_ops::config::ConfigError;

impl EdgeConfig {
    /// The listeners that are on, with their configured addresses, in the order they bind.
    pub fn listener_addresses(&self) -> impl Iterator<Item = (ListenerKind, SocketAddr)> {
        [
            (ListenerKind::Mqtt, self.listen),
            (ListenerKind::Tls, self.tls.as_ref().and_then(|t| t.listen)),
            (ListenerKind::Ws, self.web.ws),
            (ListenerKind::Wss, self.web.wss),
        ]
        .into_iter()
        .filter_map(|(kind, addr)| addr.map(|a| (kind, a)))
    }

    /// Each listener's address, and whether it requires a client certificate.
    pub fn listeners(&self) -> Vec<(SocketAddr, bool)> {
        let required = self
            .tls
            .as_ref()
            .is_some_and(|t| t.client_certs == crate::tls::ClientCerts::Required);
        self.listener_addresses()
            .map(|(kind, addr)| (addr, required && kind.is_tls()))
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.auth.check_exposure(&self.listeners())?;
        let l = &self.limits;
        let check = |ok: bool, key: &str, value: String, reason: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::new(key, value, reason))
            }
        };
        check(
            self.web.wss.is_none() || self.tls.is_some(),
            "wssListen",
            format!("{:?}", self.web.wss),
            "secure WebSocket needs serverCert and serverKey",
        )?;
        check(
            self.web.path.starts_with('/'),
            "wsPath",
            self.web.path.clone(),
            "must start with /",
        )?;
        check(
            !self.host.is_empty(),
            "host",
            self.host.clone(),
            "must not be empty",
        )?;
        check(
            (16..=(wharf_shared::MAX_FRAME_LENGTH / 2)).contains(&l.max_packet_size),
            "max-packet-size",
            l.max_packet_size.to_string(),
            "must be between 16 bytes and 32 MiB",
        )?;
        check(
            l.max_inflight >= 1,
            "max-inflight",
            l.max_inflight.to_string(),
            "must be at least 1",
        )?;
        check(
            l.max_queued >= 1,
            "max-queued",
            l.max_queued.to_string(),
            "must be at least 1",
        )?;
        check(
            l.max_connections >= 1,
            "max-connections",
            l.max_connections.to_string(),
            "must be at least 1",
        )?;
        check(
            l.max_pending_persists >= 1 && l.max_pending_persists <= l.max_held_persists,
            "max-pending-persists",
            l.max_pending_persists.to_string(),
            "must be at least 1 and at most max-held-persists",
        )?;
        check(
            l.receive_maximum >= 1,
            "receive-maximum",
            l.receive_maximum.to_string(),
            "must be at least 1",
        )?;
        check(
            (1..=wharf_shared::topic::MAX_LEVELS_CEILING).contains(&l.max_topic_levels),
            "max-topic-levels",
            l.max_topic_levels.to_string(),
            "must be between 1 and 1024",
        )?;
        check(
            !l.connect_timeout.is_zero(),
            "connect-timeout",
            format!("{:?}", l.connect_timeout),
            "must be positive",
        )
    }
}
