//! The edge's command line and its layering over etcd: a flag or its environment variable
//! wins, then the etcd key under the prefix, then the default. Keys are the etcd names.

use crate::auth::{AuthSettings, PublishDenied};
use crate::config::{ConfigError, EdgeConfig, Limits, ProxyListeners, WebListeners};
use crate::tls::{ClientCerts, TlsSettings};
use clap::{ArgMatches, Parser};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use wharf_ops::config::{parse, parse_bool, parse_secs, ConfigSource, Layers};

/// Wharf edge: MQTT 3.1, 3.1.1 and 5.0 sessions, backed by a store-worker.
#[derive(Parser, Debug)]
#[command(version, about, name = "edge")]
pub struct Args {
    /// Plain MQTT listener address, or "off" [etcd: listen; default 0.0.0.0:1883, or
    /// 127.0.0.1:1883 while no authentication is configured].
    #[arg(long, env = "WHARF_LISTEN")]
    pub listen: Option<String>,
    /// Serve MQTT over TLS [etcd: tls].
    #[arg(long, env = "WHARF_TLS", default_value = "false")]
    pub tls: String,
    /// TLS listener address; setting it turns TLS on [etcd: tlsListen; default 0.0.0.0:8883,
    /// or 127.0.0.1:8883 while no authentication is configured and client certificates are
    /// not required].
    #[arg(long, env = "WHARF_TLS_LISTEN")]
    pub tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket listener address, or "off" [etcd: wsListen; default off].
    #[arg(long, env = "WHARF_WS_LISTEN")]
    pub ws_listen: Option<String>,
    /// MQTT over secure WebSocket listener address, or "off"; uses the TLS certificates and
    /// client certificate settings [etcd: wssListen; default off].
    #[arg(long, env = "WHARF_WSS_LISTEN")]
    pub wss_listen: Option<String>,
    /// The HTTP path of the WebSocket listeners [etcd: wsPath].
    #[arg(long, env = "WHARF_WS_PATH", default_value = "/mqtt")]
    pub ws_path: String,
    /// Listeners whose connections must start with a PROXY protocol (v1 or v2) header: "off"
    /// or a list of mqtt, tls, ws, wss [etcd: proxyProtocol].
    #[arg(long, env = "WHARF_PROXY_PROTOCOL", default_value = "off")]
    pub proxy_protocol: String,
    /// Root CA (PEM) that client certificates must chain to [etcd: cacert].
    #[arg(long, env = "WHARF_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Server certificate chain (PEM) [etcd: serverCert].
    #[arg(long, env = "WHARF_SERVER_CERT")]
    pub server_cert: Option<PathBuf>,
    /// Server private key (PEM) [etcd: serverKey].
    #[arg(long, env = "WHARF_SERVER_KEY")]
    pub server_key: Option<PathBuf>,
    /// Client certificates: off, optional or required [etcd: clientCerts].
    #[arg(long, env = "WHARF_CLIENT_CERTS", default_value = "off")]
    pub client_certs: String,
    /// A client certificate's CN or SAN must equal the MQTT client id [etcd: certIdentity].
    #[arg(long, env = "WHARF_CERT_IDENTITY", default_value = "false")]
    pub cert_identity: String,
    /// Mosquitto password file (`user:hash`, made with `wharf-passwd` or `mosquitto_passwd`)
    /// [etcd: passwordFile].
    #[arg(long, env = "WHARF_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Mosquitto ACL file: topic rules per user, anonymous clients and patterns
    /// [etcd: aclFile].
    #[arg(long, env = "WHARF_ACL_FILE")]
    pub acl_file: Option<PathBuf>,
    /// Serve clients without credentials: true or false [etcd: allowAnonymous; default: only
    /// while no password file is configured, and then on loopback listeners only].
    #[arg(long, env = "WHARF_ALLOW_ANONYMOUS")]
    pub allow_anonymous: Option<String>,
    /// A verified client certificate's identity (CN, else first SAN) is the user name, with no
    /// password [etcd: useIdentityAsUsername].
    #[arg(long, env = "WHARF_USE_IDENTITY_AS_USERNAME", default_value = "false")]
    pub use_identity_as_username: String,
    /// Every message carries its publisher's identity as MQTT 5.0 User Properties (the client
    /// id, and where known the user name and the certificate identity, under the
    /// --identity-key-* keys): true or false. A publisher's own properties with those keys are
    /// removed [etcd: publisherIdentity].
    #[arg(long, env = "WHARF_PUBLISHER_IDENTITY", default_value = "false")]
    pub publisher_identity: String,
    /// The User Property key of the publisher's client id [etcd: identityKeyClientId].
    #[arg(
        long,
        env = "WHARF_IDENTITY_KEY_CLIENT_ID",
        default_value = "wharf-client-id"
    )]
    pub identity_key_client_id: String,
    /// The User Property key of the publisher's user name [etcd: identityKeyUsername].
    #[arg(
        long,
        env = "WHARF_IDENTITY_KEY_USERNAME",
        default_value = "wharf-username"
    )]
    pub identity_key_username: String,
    /// The User Property key of the publisher's certificate identity
    /// [etcd: identityKeyCertificate].
    #[arg(
        long,
        env = "WHARF_IDENTITY_KEY_CERTIFICATE",
        default_value = "wharf-certificate"
    )]
    pub identity_key_certificate: String,
    /// Users from the store-worker's MongoDB users collection (EMQX's document shape; the
    /// worker's --users-* flags name it) [etcd: storeUsers].
    #[arg(long, env = "WHARF_STORE_USERS", default_value = "false")]
    pub store_users: String,
    /// Rules from the store-worker's MongoDB authorization collection (EMQX's document shape)
    /// [etcd: storeAcl].
    #[arg(long, env = "WHARF_STORE_ACL", default_value = "false")]
    pub store_acl: String,
    /// Where a store user's salt goes in a hex SHA-256/512 digest: suffix (password then
    /// salt) or prefix, as EMQX's salt_position [etcd: saltPosition].
    #[arg(long, env = "WHARF_SALT_POSITION", default_value = "suffix")]
    pub salt_position: String,
    /// What a topic no rule matches gets: deny or allow [etcd: aclNoMatch].
    #[arg(long, env = "WHARF_ACL_NO_MATCH", default_value = "deny")]
    pub acl_no_match: String,
    /// What a 3.1/3.1.1 PUBLISH to a topic the client may not write gets: drop (acknowledged
    /// and dropped) or disconnect; 5.0 clients get reason 0x87 [etcd: publishDenied].
    #[arg(long, env = "WHARF_PUBLISH_DENIED", default_value = "drop")]
    pub publish_denied: String,
    /// The store-worker's Unix socket [etcd: workerSocket].
    #[arg(
        long,
        env = "WHARF_WORKER_SOCKET",
        default_value = "/run/wharf/worker.sock"
    )]
    pub worker_socket: PathBuf,
    /// Host name stored with every message [etcd: host; default: the machine's].
    #[arg(long, env = "WHARF_HOST")]
    pub host: Option<String>,
    /// Largest accepted MQTT packet, in bytes [etcd: maxPacketSize].
    #[arg(long, env = "WHARF_MAX_PACKET_SIZE", default_value_t = Limits::default().max_packet_size)]
    pub max_packet_size: usize,
    /// Unacknowledged QoS 1/2 messages towards one client [etcd: maxInflight].
    #[arg(long, env = "WHARF_MAX_INFLIGHT", default_value_t = Limits::default().max_inflight)]
    pub max_inflight: u16,
    /// Messages queued for one client [etcd: maxQueued].
    #[arg(long, env = "WHARF_MAX_QUEUED", default_value_t = Limits::default().max_queued)]
    pub max_queued: usize,
    /// Concurrent client connections [etcd: maxConnections].
    #[arg(long, env = "WHARF_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// QoS 1/2 publishes held edge-wide while the store-worker is away or slow
    /// [etcd: maxHeldPersists].
    #[arg(long, env = "WHARF_MAX_HELD_PERSISTS", default_value_t = Limits::default().max_held_persists)]
    pub max_held_persists: usize,
    /// MQTT 5.0 Receive Maximum: QoS 2 messages a 5.0 client may have unreleased (QoS 1 ones
    /// beyond it wait unread) [etcd: receiveMaximum].
    #[arg(long, env = "WHARF_RECEIVE_MAXIMUM", default_value_t = Limits::default().receive_maximum)]
    pub receive_maximum: u16,
    /// MQTT 5.0 Topic Alias Maximum: topic aliases a 5.0 client may set; 0 for none
    /// [etcd: topicAliasMaximum].
    #[arg(long, env = "WHARF_TOPIC_ALIAS_MAXIMUM", default_value_t = Limits::default().topic_alias_max)]
    pub topic_alias_maximum: u16,
    /// Most levels a topic name or filter may have (1-1024); deeper ones are refused
    /// [etcd: maxTopicLevels].
    #[arg(long, env = "WHARF_MAX_TOPIC_LEVELS", default_value_t = Limits::default().max_topic_levels)]
    pub max_topic_levels: usize,
    /// Topic aliases the server gives a 5.0 client that takes them; 0 for none
    /// [etcd: topicAliasesOut].
    #[arg(long, env = "WHARF_TOPIC_ALIASES_OUT", default_value_t = Limits::default().topic_alias_max_out)]
    pub topic_aliases_out: u16,
    /// Longest a session outlives its connection, in seconds, or "never" for no bound: caps
    /// MQTT 5.0 Session Expiry Intervals and 3.1/3.1.1 persistent sessions
    /// [etcd: maxSessionExpiry].
    #[arg(long, env = "WHARF_MAX_SESSION_EXPIRY", default_value = "never")]
    pub max_session_expiry: String,
    /// MQTT 5.0 Server Keep Alive in seconds: the longest keepalive a 5.0 client may use (one
    /// asking for more, or none, is told this); "off" lets each client choose
    /// [etcd: serverKeepAlive].
    #[arg(long, env = "WHARF_SERVER_KEEP_ALIVE", default_value = "off")]
    pub server_keep_alive: String,
    /// New connections per second from one source address, 0 for no limit; more are closed
    /// at once [etcd: maxConnectionRate].
    #[arg(long, env = "WHARF_MAX_CONNECTION_RATE", default_value_t = 0)]
    pub max_connection_rate: u32,
    /// PUBLISHes per second from one client, 0 for no limit; past it QoS 0 is dropped, QoS
    /// 1/2 get reason 0x97 (5.0) or the connection is closed (3.1/3.1.1)
    /// [etcd: maxPublishRate].
    #[arg(long, env = "WHARF_MAX_PUBLISH_RATE", default_value_t = 0)]
    pub max_publish_rate: u32,
    /// Seconds a new connection has to send CONNECT (and finish TLS) [etcd: connectTimeout].
    #[arg(long, env = "WHARF_CONNECT_TIMEOUT", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Seconds sessions get to finish on shutdown [etcd: shutdownGrace].
    #[arg(long, env = "WHARF_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Metrics and health endpoint address (/metrics, /healthz, /readyz) [etcd: metricsListen].
    #[arg(long, env = "WHARF_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// User name of the admin API and console [etcd: adminUser].
    #[arg(long, env = "WHARF_ADMIN_USER", default_value = "admin")]
    pub admin_user: String,
    /// Password of the admin API and console on the metrics address; setting it turns them on
    /// (prefer the environment variable to the flag) [etcd: adminPassword].
    #[arg(long, env = "WHARF_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Seconds between the console's chart points; 360 are kept (10: the last hour)
    /// [etcd: adminHistoryStep].
    #[arg(long, env = "WHARF_ADMIN_HISTORY_STEP", default_value_t = 10)]
    pub admin_history_step: u64,
    /// Seconds a console login lasts without being used (it ends 12 hours after the login
    /// whatever its use) [etcd: adminSessionIdle].
    #[arg(long, env = "WHARF_ADMIN_SESSION_IDLE", default_value_t = 1800)]
    pub admin_session_idle: u64,
    /// Bridges to other brokers: a JSON file's path, or the JSON list itself (see
    /// docs/bridge.md) [etcd: bridges].
    #[arg(long, env = "WHARF_BRIDGES")]
    pub bridges: Option<String>,
    #[command(flatten)]
    pub etcd: wharf_ops::config::EtcdArgs,
}

fn listen_value(key: &str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    match value.trim() {
        "off" | "" => Ok(None),
        addr => parse(key, addr).map(Some),
    }
}

fn default_listen(port: u16, local_only: bool) -> SocketAddr {
    let ip = if local_only {
        std::net::Ipv4Addr::LOCALHOST
    } else {
        std::net::Ipv4Addr::UNSPECIFIED
    };
    SocketAddr::from((ip, port))
}

fn salt_first(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "suffix" => Ok(false),
        "prefix" => Ok(true),
        _ => Err(ConfigError::new(key, value, "expected suffix or prefix")),
    }
}

fn no_match(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "deny" => Ok(false),
        "allow" => Ok(true),
        _ => Err(ConfigError::new(key, value, "expected deny or allow")),
    }
}

/// The authentication settings, layered like the rest.
pub fn auth_settings(args: &Args, layers: &Layers) -> Result<AuthSettings, ConfigError> {
    // An empty value (an etcd key set to "") is the same as none.
    let path = |_: &str, value: &str| -> Result<Option<PathBuf>, ConfigError> {
        Ok((!value.trim().is_empty()).then(|| PathBuf::from(value.trim())))
    };
    let anonymous = |key: &str, value: &str| match value.trim() {
        "" => Ok(None),
        v => parse_bool(key, v).map(Some),
    };
    let allow_anonymous = match &args.allow_anonymous {
        Some(v) => anonymous("allowAnonymous", v)?,
        None => None,
    };
    Ok(AuthSettings {
        password_file: layers.pick(
            "password_file",
            "passwordFile",
            args.password_file.clone(),
            path,
        )?,
        acl_file: layers.pick("acl_file", "aclFile", args.acl_file.clone(), path)?,
        allow_anonymous: layers.pick(
            "allow_anonymous",
            "allowAnonymous",
            allow_anonymous,
            anonymous,
        )?,
        identity_as_username: layers.pick(
            "use_identity_as_username",
            "useIdentityAsUsername",
            parse_bool("useIdentityAsUsername", &args.use_identity_as_username)?,
            parse_bool,
        )?,
        store_users: layers.pick(
            "store_users",
            "storeUsers",
            parse_bool("storeUsers", &args.store_users)?,
            parse_bool,
        )?,
        store_rules: layers.pick(
            "store_acl",
            "storeAcl",
            parse_bool("storeAcl", &args.store_acl)?,
            parse_bool,
        )?,
        salt_first: layers.pick(
            "salt_position",
            "saltPosition",
            salt_first("saltPosition", &args.salt_position)?,
            salt_first,
        )?,
        no_match_allows: layers.pick(
            "acl_no_match",
            "aclNoMatch",
            no_match("aclNoMatch", &args.acl_no_match)?,
            no_match,
        )?,
        publish_denied: layers.value(
            "publish_denied",
            "publishDenied",
            parse::<PublishDenied>("publishDenied", &args.publish_denied)?,
        )?,
    })
}

fn session_expiry_value(key: &str, value: &str) -> Result<u32, ConfigError> {
    match value.trim() {
        "never" => Ok(u32::MAX),
        secs => parse(key, secs),
    }
}

fn keep_alive_value(key: &str, value: &str) -> Result<Option<u16>, ConfigError> {
    match value.trim() {
        "off" | "" => Ok(None),
        secs => parse(key, secs).map(Some),
    }
}

/// The effective configuration: flags and environment over `source` over defaults.
pub fn load(
    args: &Args,
    matches: &ArgMatches,
    source: &dyn ConfigSource,
) -> Result<EdgeConfig, ConfigError> {
    let layers = Layers::new(matches, source);
    let auth = auth_settings(args, &layers)?;
    let listen = match &args.listen {
        Some(value) => listen_value("listen", value)?,
        None => Some(default_listen(1883, auth.local_only())),
    };
    let listen = layers.pick("listen", "listen", listen, listen_value)?;
    let tls_listen = layers.value_opt("tls_listen", "tlsListen", args.tls_listen)?;
    let tls_on = layers.pick("tls", "tls", parse_bool("tls", &args.tls)?, parse_bool)?
        || tls_listen.is_some();
    let web_listen = |name: &str, key: &str, value: &Option<String>| match value {
        Some(v) => layers.pick(name, key, listen_value(key, v)?, listen_value),
        None => layers.pick(name, key, None, listen_value),
    };
    let web = WebListeners {
        ws: web_listen("ws_listen", "wsListen", &args.ws_listen)?,
        wss: web_listen("wss_listen", "wssListen", &args.wss_listen)?,
        path: layers.value("ws_path", "wsPath", args.ws_path.clone())?,
    };
    let proxy = layers.value(
        "proxy_protocol",
        "proxyProtocol",
        parse::<ProxyListeners>("proxyProtocol", &args.proxy_protocol)?,
    )?;
    let tls = if tls_on || web.wss.is_some() {
        let cert = layers.value_opt("server_cert", "serverCert", args.server_cert.clone())?;
        let key = layers.value_opt("server_key", "serverKey", args.server_key.clone())?;
        let (Some(cert), Some(key)) = (cert, key) else {
            return Err(ConfigError::new(
                "serverCert",
                "",
                "TLS (and secure WebSocket) needs serverCert and serverKey",
            ));
        };
        let client_certs = layers.value(
            "client_certs",
            "clientCerts",
            parse::<ClientCerts>("clientCerts", &args.client_certs)?,
        )?;
        Some(TlsSettings {
            listen: tls_on.then(|| {
                tls_listen.unwrap_or_else(|| {
                    default_listen(
                        8883,
                        auth.local_only() && client_certs != ClientCerts::Required,
                    )
                })
            }),
            cert,
            key,
            ca: layers.value_opt("cacert", "cacert", args.cacert.clone())?,
            client_certs,
            cert_identity: layers.pick(
                "cert_identity",
                "certIdentity",
                parse_bool("certIdentity", &args.cert_identity)?,
                parse_bool,
            )?,
        })
    } else {
        None
    };
    let defaults = Limits::default();
    let limits = Limits {
        max_packet_size: layers.value("max_packet_size", "maxPacketSize", args.max_packet_size)?,
        max_inflight: layers.value("max_inflight", "maxInflight", args.max_inflight)?,
        max_queued: layers.value("max_queued", "maxQueued", args.max_queued)?,
        max_connections: layers.value("max_connections", "maxConnections", args.max_connections)?,
        max_held_persists: layers.value(
            "max_held_persists",
            "maxHeldPersists",
            args.max_held_persists,
        )?,
        connect_timeout: layers.pick(
            "connect_timeout",
            "connectTimeout",
            Duration::from_secs(args.connect_timeout),
            parse_secs,
        )?,
        receive_maximum: layers.value("receive_maximum", "receiveMaximum", args.receive_maximum)?,
        topic_alias_max: layers.value(
            "topic_alias_maximum",
            "topicAliasMaximum",
            args.topic_alias_maximum,
        )?,
        topic_alias_max_out: layers.value(
            "topic_aliases_out",
            "topicAliasesOut",
            args.topic_aliases_out,
        )?,
        max_topic_levels: layers.value(
            "max_topic_levels",
            "maxTopicLevels",
            args.max_topic_levels,
        )?,
        max_session_expiry: layers.pick(
            "max_session_expiry",
            "maxSessionExpiry",
            session_expiry_value("maxSessionExpiry", &args.max_session_expiry)?,
            session_expiry_value,
        )?,
        server_keep_alive: layers.pick(
            "server_keep_alive",
            "serverKeepAlive",
            keep_alive_value("serverKeepAlive", &args.server_keep_alive)?,
            keep_alive_value,
        )?,
        max_connection_rate: layers.value(
            "max_connection_rate",
            "maxConnectionRate",
            args.max_connection_rate,
        )?,
        max_publish_rate: layers.value(
            "max_publish_rate",
            "maxPublishRate",
            args.max_publish_rate,
        )?,
        ..defaults
    };
    let limits = Limits {
        max_pending_persists: defaults.max_pending_persists.min(limits.max_held_persists),
        ..limits
    };
    let publisher_identity = if layers.pick(
        "publisher_identity",
        "publisherIdentity",
        parse_bool("publisherIdentity", &args.publisher_identity)?,
        parse_bool,
    )? {
        let keys = crate::config::IdentityKeys {
            client_id: layers.value(
                "identity_key_client_id",
                "identityKeyClientId",
                args.identity_key_client_id.clone(),
            )?,
            username: layers.value(
                "identity_key_username",
                "identityKeyUsername",
                args.identity_key_username.clone(),
            )?,
            certificate: layers.value(
                "identity_key_certificate",
                "identityKeyCertificate",
                args.identity_key_certificate.clone(),
            )?,
        };
        let names = [&keys.client_id, &keys.username, &keys.certificate];
        if names.iter().any(|k| k.is_empty())
            || names[0] == names[1]
            || names[0] == names[2]
            || names[1] == names[2]
        {
            return Err(ConfigError::new(
                "identityKeyClientId",
                format!("{names:?}"),
                "the identity keys must be non-empty and distinct",
            ));
        }
        Some(keys)
    } else {
        None
    };
    let config = EdgeConfig {
        listen,
        tls,
        web,
        proxy,
        worker_socket: layers.value("worker_socket", "workerSocket", args.worker_socket.clone())?,
        host: layers
            .value_opt("host", "host", args.host.clone())?
            .unwrap_or_else(wharf_shared::host_name),
        limits,
        shutdown_grace: layers.pick(
            "shutdown_grace",
            "shutdownGrace",
            Duration::from_secs(args.shutdown_grace),
            parse_secs,
        )?,
        auth,
        publisher_identity,
        bridges: layers.pick(
            "bridges",
            "bridges",
            match &args.bridges {
                Some(v) => crate::bridge::config::load("bridges", v)?,
                None => Vec::new(),
            },
            crate::bridge::config::load,
        )?,
    };
    config.validate()?;
    Ok(config)
}

/// The metrics endpoint address, layered like the rest.
pub fn metrics_listen(
    args: &Args,
    matches: &ArgMatches,
    source: &dyn ConfigSource,
) -> Result<Option<SocketAddr>, ConfigError> {
    Layers::new(matches, source).value_opt("metrics_listen", "metricsListen", args.metrics_listen)
}

/// The admin API's credentials, layered like the rest; `None` keeps it off. It is served on
/// the metrics address, so it needs one.
pub fn admin_settings(
    args: &Args,
    matches: &ArgMatches,
    source: &dyn ConfigSource,
) -> Result<Option<crate::admin::AdminSettings>, ConfigError> {
    let layers = Layers::new(matches, source);
    let text = |_: &str, value: &str| -> Result<String, ConfigError> { Ok(value.to_owned()) };
    let password = layers
        .pick_opt(
            "admin_password",
            "adminPassword",
            args.admin_password.clone(),
            text,
        )?
        .filter(|p| !p.is_empty());
    let Some(password) = password else {
        return Ok(None);
    };
    let user = layers.pick("admin_user", "adminUser", args.admin_user.clone(), text)?;
    if user.is_empty() || user.contains(':') {
        return Err(ConfigError::new(
            "adminUser",
            user,
            "must be non-empty, without ':'",
        ));
    }
    if password.len() < 8 {
        return Err(ConfigError::new(
            "adminPassword",
            "(hidden)",
            "must be at least 8 characters",
        ));
    }
    if metrics_listen(args, matches, source)?.is_none() {
        return Err(ConfigError::new(
            "adminPassword",
            "(hidden)",
            "the admin API is served on metricsListen: set it too",
        ));
    }
    let history_step = layers.pick(
        "admin_history_step",
        "adminHistoryStep",
        Duration::from_secs(args.admin_history_step),
        parse_secs,
    )?;
    if !(1..=60).contains(&history_step.as_secs()) {
        return Err(ConfigError::new(
            "adminHistoryStep",
            history_step.as_secs().to_string(),
            "must be 1 to 60 seconds",
        ));
    }
    let session_idle = layers.pick(
        "admin_session_idle",
        "adminSessionIdle",
        Duration::from_secs(args.admin_session_idle),
        parse_secs,
    )?;
    if !(1..=43_200).contains(&session_idle.as_secs()) {
        return Err(ConfigError::new(
            "adminSessionIdle",
            session_idle.as_secs().to_string(),
            "must be 1 to 43200 seconds",
        ));
    }
    Ok(Some(crate::admin::AdminSettings {
        user,
        password,
        history_step,
        session_idle,
    }))
}

/// Keys whose change takes effect at once: the TLS material and policy.
pub const TLS_KEYS: [&str; 5] = [
    "cacert",
    "serverCert",
    "serverKey",
    "clientCerts",
    "certIdentity",
];

/// Keys whose change takes effect at once: who may connect and what they may do.
pub const AUTH_KEYS: [&str; 9] = [
    "passwordFile",
    "aclFile",
    "allowAnonymous",
    "useIdentityAsUsername",
    "publishDenied",
    "storeUsers",
    "storeAcl",
    "saltPosition",
    "aclNoMatch",
];
