use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use wharf_edge::{Edge, EdgeConfig, Limits};

/// Wharf edge: MQTT 3.1.1 sessions, backed by a store-worker.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Plain MQTT listener address.
    #[arg(long, env = "WHARF_LISTEN", default_value = "0.0.0.0:1883")]
    listen: SocketAddr,
    /// The store-worker's Unix socket.
    #[arg(
        long,
        env = "WHARF_WORKER_SOCKET",
        default_value = "/run/wharf/worker.sock"
    )]
    worker_socket: PathBuf,
    /// Host name stored with every message (defaults to the machine's).
    #[arg(long, env = "WHARF_HOST")]
    host: Option<String>,
    /// Largest accepted MQTT packet, in bytes.
    #[arg(long, env = "WHARF_MAX_PACKET_SIZE", default_value_t = Limits::default().max_packet_size)]
    max_packet_size: usize,
    /// Unacknowledged QoS 1/2 messages towards one client.
    #[arg(long, env = "WHARF_MAX_INFLIGHT", default_value_t = Limits::default().max_inflight)]
    max_inflight: u16,
    /// Messages queued for one client.
    #[arg(long, env = "WHARF_MAX_QUEUED", default_value_t = Limits::default().max_queued)]
    max_queued: usize,
    /// Concurrent client connections.
    #[arg(long, env = "WHARF_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// QoS 1/2 publishes held across the edge while the store-worker is away or slow.
    #[arg(long, env = "WHARF_MAX_HELD_PERSISTS", default_value_t = Limits::default().max_held_persists)]
    max_held_persists: usize,
    /// Seconds a new connection has to send CONNECT.
    #[arg(long, env = "WHARF_CONNECT_TIMEOUT", default_value_t = 10)]
    connect_timeout: u64,
    /// Address of the metrics and health endpoint (/metrics, /healthz, /readyz); off if unset.
    #[arg(long, env = "WHARF_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Seconds sessions get to finish on shutdown.
    #[arg(long, env = "WHARF_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,
}

/// Exit code for unusable configuration (BSD EX_USAGE).
const EX_USAGE: i32 = 64;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let limits = Limits {
        max_packet_size: args.max_packet_size,
        max_inflight: args.max_inflight,
        max_queued: args.max_queued,
        max_connections: args.max_connections,
        max_held_persists: args.max_held_persists,
        max_pending_persists: Limits::default()
            .max_pending_persists
            .min(args.max_held_persists),
        connect_timeout: Duration::from_secs(args.connect_timeout),
        ..Limits::default()
    };
    let config = EdgeConfig {
        listen: args.listen,
        worker_socket: args.worker_socket,
        host: args.host.unwrap_or_else(wharf_shared::host_name),
        limits,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    if let Err(e) = config.validate() {
        usage(e.to_string());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Installed first, so that everything the edge records is captured.
        let metrics = match args
            .metrics_listen
            .map(|_| wharf_shared::ops::install_metrics())
        {
            Some(Err(e)) => usage(format!("metrics: {e}")),
            other => other.and_then(Result::ok),
        };
        let edge = match Edge::start(config).await {
            Ok(edge) => edge,
            Err(e) => usage(e.to_string()),
        };
        let ops_shutdown = tokio_util::sync::CancellationToken::new();
        if let (Some(addr), Some(metrics)) = (args.metrics_listen, metrics) {
            let served = wharf_shared::ops::serve_on(
                addr,
                metrics,
                edge.ready_check(),
                ops_shutdown.clone(),
            );
            if let Err(e) = served.await {
                edge.stop().await;
                usage(format!("metrics-listen: {e}"));
            }
        }
        wharf_shared::shutdown_signal().await;
        tracing::info!("shutdown signal received");
        edge.stop().await;
        ops_shutdown.cancel();
    });
    Ok(())
}

fn usage(message: String) -> ! {
    eprintln!("edge: {message}");
    std::process::exit(EX_USAGE);
}
