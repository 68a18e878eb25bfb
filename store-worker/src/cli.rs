//! The store-worker's command line, layered over etcd like the edge's: a flag or its
//! environment variable wins, then the etcd key under the prefix, then the default.

use crate::store::mongo::{AuthCollections, Durability};
use crate::{Backend, WorkerConfig};
use clap::{ArgMatches, Parser};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use wharf_ops::config::{parse_ms, parse_secs, ConfigError, ConfigSource, Layers};

/// Wharf store-worker: persists what the edges receive, in MongoDB or an embedded store.
#[derive(Parser, Debug)]
#[command(version, about, name = "store-worker")]
pub struct Args {
    /// Unix socket the edges connect to [etcd: workerSocket].
    #[arg(
        long,
        env = "WHARF_WORKER_SOCKET",
        default_value = "/run/wharf/worker.sock"
    )]
    pub socket: PathBuf,
    /// Host name of this broker, the `host` of stored records [etcd: host].
    #[arg(long, env = "WHARF_HOST")]
    pub host: Option<String>,
    /// MongoDB connection string; without it the embedded store in --data-dir is used
    /// [etcd: mongoUri].
    #[arg(long, env = "WHARF_MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: Option<String>,
    /// MongoDB database [etcd: mongoDatabase].
    #[arg(long, env = "WHARF_MONGODB_DATABASE", default_value = "mqtt")]
    pub mongodb_database: String,
    /// Write concern `w` of MongoDB writes, "majority" or a number; always journaled
    /// [etcd: writeConcern].
    #[arg(long, env = "WHARF_WRITE_CONCERN", default_value = "majority")]
    pub write_concern: String,
    /// Follow other hosts' messages with a change stream when the server has them ("auto"),
    /// or by polling the `created` index ("poll") [etcd: follow].
    #[arg(long, env = "WHARF_FOLLOW", default_value = "auto")]
    pub follow: String,
    /// Filters (comma-separated) that stand for every topic name they match in this host's
    /// routes: `dev/+/cmd` makes one route of a fleet's per-device command subscriptions, at
    /// the cost of each command going to every host with such a device [etcd: routeAggregate].
    #[arg(long, env = "WHARF_ROUTE_AGGREGATE", default_value = "")]
    pub route_aggregate: String,
    /// Bytes of messages accepted from the edges and not yet written, at most; past it the
    /// worker stops reading its edges, which push back on their clients (a number, or with
    /// KiB, MiB or GiB; at least 1 MiB) [etcd: maxQueuedBytes].
    #[arg(long, env = "WHARF_MAX_QUEUED_BYTES", default_value = "64MiB")]
    pub max_queued_bytes: String,
    /// Directory of the embedded store [etcd: dataDir].
    #[arg(long, env = "WHARF_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Socket file permissions, octal [etcd: socketMode].
    #[arg(long, env = "WHARF_SOCKET_MODE", default_value = "600")]
    pub socket_mode: String,
    /// Group (name or id) of the socket file; use with --socket-mode 660 [etcd: socketGroup].
    #[arg(long, env = "WHARF_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Milliseconds a durable write waits for other publishes to share its commit, while
    /// commits are frequent (within 4 x this of the last): fewer commits and fsyncs per
    /// message at fleet rates, at most this much later acknowledgements (and QoS 2 deliveries,
    /// routed once stored); 0: never waits [etcd: commitDelayMs].
    #[arg(long, env = "WHARF_COMMIT_DELAY_MS", default_value_t = 1)]
    pub commit_delay_ms: u64,
    /// Seconds an unavailable store is retried before a request fails [etcd: retryLimit].
    #[arg(long, env = "WHARF_RETRY_LIMIT", default_value_t = 10)]
    pub retry_limit: u64,
    /// Seconds queued writes get to finish on shutdown [etcd: shutdownGrace].
    #[arg(long, env = "WHARF_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Metrics and health endpoint address (/metrics, /healthz, /readyz)
    /// [etcd: workerMetricsListen].
    #[arg(long, env = "WHARF_WORKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// MongoDB: the collection of users (EMQX's authenticator shape) [etcd: usersCollection].
    #[arg(long, env = "WHARF_USERS_COLLECTION", default_value = "mqtt_user")]
    pub users_collection: String,
    /// MongoDB: which user documents count, as JSON [etcd: usersFilter].
    #[arg(long, env = "WHARF_USERS_FILTER", default_value = "{}")]
    pub users_filter: String,
    /// MongoDB: the user document's user name field [etcd: usernameField].
    #[arg(long, env = "WHARF_USERNAME_FIELD", default_value = "username")]
    pub username_field: String,
    /// MongoDB: the user document's password hash field [etcd: passwordHashField].
    #[arg(
        long,
        env = "WHARF_PASSWORD_HASH_FIELD",
        default_value = "password_hash"
    )]
    pub password_hash_field: String,
    /// MongoDB: the user document's salt field [etcd: saltField].
    #[arg(long, env = "WHARF_SALT_FIELD", default_value = "salt")]
    pub salt_field: String,
    /// MongoDB: the user document's superuser flag [etcd: superuserField].
    #[arg(long, env = "WHARF_SUPERUSER_FIELD", default_value = "is_superuser")]
    pub superuser_field: String,
    /// MongoDB: the collection of authorization rules (EMQX's shape) [etcd: aclCollection].
    #[arg(long, env = "WHARF_ACL_COLLECTION", default_value = "mqtt_acl")]
    pub acl_collection: String,
    /// MongoDB: which rule documents count, as JSON [etcd: aclFilter].
    #[arg(long, env = "WHARF_ACL_FILTER", default_value = "{}")]
    pub acl_filter: String,
    #[command(flatten)]
    pub etcd: wharf_ops::config::EtcdArgs,
}

/// A MongoDB filter written as JSON (extended JSON allowed).
fn filter(key: &str, value: &str) -> Result<mongodb::bson::Document, ConfigError> {
    let json: serde_json::Value =
        serde_json::from_str(value).map_err(|e| ConfigError::new(key, value, e.to_string()))?;
    match mongodb::bson::Bson::try_from(json) {
        Ok(mongodb::bson::Bson::Document(doc)) => Ok(doc),
        Ok(_) => Err(ConfigError::new(key, value, "expected a JSON object")),
        Err(e) => Err(ConfigError::new(key, value, e.to_string())),
    }
}

fn socket_mode(key: &str, value: &str) -> Result<u32, ConfigError> {
    u32::from_str_radix(value.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| ConfigError::new(key, value, "expected octal permissions like 600"))
}

fn write_concern(key: &str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value == "majority" || value.parse::<u32>().is_ok() {
        Ok(value.to_owned())
    } else {
        Err(ConfigError::new(
            key,
            value,
            "expected \"majority\" or a number",
        ))
    }
}

fn follow(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "auto" => Ok(true),
        "poll" => Ok(false),
        _ => Err(ConfigError::new(key, value, "expected auto or poll")),
    }
}

fn aggregates(key: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            if wharf_shared::topic::valid_filter(f) && !f.starts_with("$share/") {
                Ok(f.to_owned())
            } else {
                Err(ConfigError::new(
                    key,
                    value,
                    format!("{f:?} is not a topic filter"),
                ))
            }
        })
        .collect()
}

/// A group's id from its name (via /etc/group) or its number.
fn group_id(key: &str, group: &str) -> Result<u32, ConfigError> {
    if let Ok(id) = group.trim().parse() {
        return Ok(id);
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next()? == group.trim()).then(|| fields.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| ConfigError::new(key, group, "no such group"))
}

/// The effective configuration and the metrics endpoint address.
pub fn load(
    args: &Args,
    matches: &ArgMatches,
    source: &dyn ConfigSource,
) -> Result<(WorkerConfig, Option<SocketAddr>), ConfigError> {
    let layers = Layers::new(matches, source);
    let mongodb_uri = layers.value_opt("mongodb_uri", "mongoUri", args.mongodb_uri.clone())?;
    let backend = match mongodb_uri {
        Some(uri) => Backend::Mongo {
            uri,
            database: layers.value(
                "mongodb_database",
                "mongoDatabase",
                args.mongodb_database.clone(),
            )?,
            durability: Durability {
                w: layers.pick(
                    "write_concern",
                    "writeConcern",
                    write_concern("writeConcern", &args.write_concern)?,
                    write_concern,
                )?,
                journal: true,
            },
            change_streams: layers.pick(
                "follow",
                "follow",
                follow("follow", &args.follow)?,
                follow,
            )?,
        },
        None => Backend::Embedded {
            data_dir: layers.value("data_dir", "dataDir", args.data_dir.clone())?,
        },
    };
    let host = layers
        .value_opt("host", "host", args.host.clone())?
        .unwrap_or_else(wharf_shared::host_name);
    let socket = layers.value("socket", "workerSocket", args.socket.clone())?;
    let mut config = WorkerConfig::new(socket, host, backend);
    config.socket_mode = layers.pick(
        "socket_mode",
        "socketMode",
        socket_mode("socketMode", &args.socket_mode)?,
        socket_mode,
    )?;
    let group = match &args.socket_group {
        Some(g) => Some(group_id("socketGroup", g)?),
        None => None,
    };
    config.socket_group = layers.pick_opt("socket_group", "socketGroup", group, group_id)?;
    config.commit_delay = layers.pick(
        "commit_delay_ms",
        "commitDelayMs",
        Duration::from_millis(args.commit_delay_ms),
        parse_ms,
    )?;
    config.retry_limit = layers.pick(
        "retry_limit",
        "retryLimit",
        Duration::from_secs(args.retry_limit),
        parse_secs,
    )?;
    config.shutdown_grace = layers.pick(
        "shutdown_grace",
        "shutdownGrace",
        Duration::from_secs(args.shutdown_grace),
        parse_secs,
    )?;
    config.auth_collections = AuthCollections {
        users: layers.value(
            "users_collection",
            "usersCollection",
            args.users_collection.clone(),
        )?,
        users_filter: layers.pick(
            "users_filter",
            "usersFilter",
            filter("usersFilter", &args.users_filter)?,
            filter,
        )?,
        username_field: layers.value(
            "username_field",
            "usernameField",
            args.username_field.clone(),
        )?,
        password_hash_field: layers.value(
            "password_hash_field",
            "passwordHashField",
            args.password_hash_field.clone(),
        )?,
        salt_field: layers.value("salt_field", "saltField", args.salt_field.clone())?,
        superuser_field: layers.value(
            "superuser_field",
            "superuserField",
            args.superuser_field.clone(),
        )?,
        rules: layers.value(
            "acl_collection",
            "aclCollection",
            args.acl_collection.clone(),
        )?,
        rules_filter: layers.pick(
            "acl_filter",
            "aclFilter",
            filter("aclFilter", &args.acl_filter)?,
            filter,
        )?,
    };
    config.route_aggregate = layers.pick(
        "route_aggregate",
        "routeAggregate",
        aggregates("routeAggregate", &args.route_aggregate)?,
        aggregates,
    )?;
    config.max_queued_bytes = layers.pick(
        "max_queued_bytes",
        "maxQueuedBytes",
        byte_size("maxQueuedBytes", &args.max_queued_bytes)?,
        byte_size,
    )?;
    let metrics = layers.value_opt("metrics_listen", "workerMetricsListen", args.metrics_listen)?;
    Ok((config, metrics))
}

/// A size in bytes: a number, or one with KiB, MiB or GiB; at least 1 MiB.
fn byte_size(key: &str, value: &str) -> Result<usize, ConfigError> {
    let v = value.trim();
    let (number, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, ""),
    };
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(ConfigError::new(
                key,
                value,
                "expected bytes, or a number with KiB, MiB or GiB",
            ))
        }
    };
    let bytes = number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| ConfigError::new(key, value, "not a size"))?;
    if !((1 << 20)..=(1usize << 40)).contains(&bytes) {
        return Err(ConfigError::new(key, value, "must be from 1 MiB to 1 TiB"));
    }
    Ok(bytes)
}
