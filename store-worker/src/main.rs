use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use wharf_store_worker::store::mongo::{redact, Durability};
use wharf_store_worker::{Backend, Worker, WorkerConfig};

/// Wharf store-worker: persists what the edges receive, in MongoDB or an embedded store.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Unix socket the edges connect to.
    #[arg(
        long,
        env = "WHARF_WORKER_SOCKET",
        default_value = "/run/wharf/worker.sock"
    )]
    socket: PathBuf,
    /// Host name of this broker (the `host` field of stored records).
    #[arg(long, env = "WHARF_HOST")]
    host: Option<String>,
    /// MongoDB connection string; without it the embedded store in --data-dir is used.
    #[arg(long, env = "WHARF_MONGODB_URI", hide_env_values = true)]
    mongodb_uri: Option<String>,
    /// MongoDB database.
    #[arg(long, env = "WHARF_MONGODB_DATABASE", default_value = "mqtt")]
    mongodb_database: String,
    /// Write concern `w` for MongoDB writes ("majority" or a number).
    #[arg(long, env = "WHARF_WRITE_CONCERN", default_value = "majority")]
    write_concern: String,
    /// Follow other hosts' messages with a MongoDB change stream when the server has them
    /// ("auto"), or always by polling the `created` index ("poll").
    #[arg(long, env = "WHARF_FOLLOW", default_value = "auto", value_parser = ["auto", "poll"])]
    follow: String,
    /// Directory of the embedded store.
    #[arg(long, env = "WHARF_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Socket file permissions, octal.
    #[arg(long, env = "WHARF_SOCKET_MODE", default_value = "600")]
    socket_mode: String,
    /// Group (name or id) of the socket file; use with --socket-mode 660.
    #[arg(long, env = "WHARF_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// Seconds an unavailable store is retried before a request fails.
    #[arg(long, env = "WHARF_RETRY_LIMIT", default_value_t = 10)]
    retry_limit: u64,
    /// Address of the metrics and health endpoint (/metrics, /healthz, /readyz); off if unset.
    #[arg(long, env = "WHARF_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds queued writes get to finish on shutdown.
    #[arg(long, env = "WHARF_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,
}

/// Exit code for unusable configuration (BSD EX_USAGE).
const EX_USAGE: i32 = 64;

fn usage(message: String) -> ! {
    eprintln!("store-worker: {message}");
    std::process::exit(EX_USAGE);
}

/// A group's id from its name (via /etc/group) or its number.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(id) = group.parse() {
        return Some(id);
    }
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then(|| fields.nth(1)?.parse().ok())?
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let socket_mode = u32::from_str_radix(&args.socket_mode, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .unwrap_or_else(|| {
            usage(format!(
                "invalid socket-mode {:?}: expected octal like 600",
                args.socket_mode
            ))
        });
    if args.write_concern != "majority" && args.write_concern.parse::<u32>().is_err() {
        usage(format!(
            "invalid write-concern {:?}: expected \"majority\" or a number",
            args.write_concern
        ));
    }
    let backend = match args.mongodb_uri {
        Some(uri) => Backend::Mongo {
            uri,
            database: args.mongodb_database,
            durability: Durability {
                w: args.write_concern,
                journal: true,
            },
            change_streams: args.follow == "auto",
        },
        None => Backend::Embedded {
            data_dir: args.data_dir,
        },
    };
    let mut config = WorkerConfig::new(
        args.socket,
        args.host.unwrap_or_else(wharf_shared::host_name),
        backend,
    );
    config.socket_mode = socket_mode;
    config.socket_group = args.socket_group.map(|g| {
        group_id(&g).unwrap_or_else(|| usage(format!("invalid socket-group {g:?}: no such group")))
    });
    config.retry_limit = Duration::from_secs(args.retry_limit);
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Installed first, so that everything the worker records is captured.
        let metrics = match args
            .metrics_listen
            .map(|_| wharf_shared::ops::install_metrics())
        {
            Some(Err(e)) => usage(format!("metrics: {e}")),
            other => other.and_then(Result::ok),
        };
        let worker = match Worker::start(config).await {
            Ok(w) => w,
            Err(e) => usage(redact(&e.to_string())),
        };
        let ops_shutdown = tokio_util::sync::CancellationToken::new();
        if let (Some(addr), Some(metrics)) = (args.metrics_listen, metrics) {
            let served = wharf_shared::ops::serve_on(
                addr,
                metrics,
                worker.ready_check(),
                ops_shutdown.clone(),
            );
            if let Err(e) = served.await {
                worker.stop().await;
                usage(format!("metrics-listen: {e}"));
            }
        }
        wharf_shared::shutdown_signal().await;
        tracing::info!("shutdown signal received");
        worker.stop().await;
        ops_shutdown.cancel();
    });
    Ok(())
}
