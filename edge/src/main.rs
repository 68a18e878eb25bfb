use std::sync::Arc;
use wharf_edge::cli::{self, Args};
use wharf_edge::Edge;
use wharf_ops::config::{self, etcd, EX_USAGE};

fn usage(message: impl std::fmt::Display) -> ! {
    eprintln!("edge: {message}");
    std::process::exit(EX_USAGE);
}

fn main() -> anyhow::Result<()> {
    let (args, matches) = config::parse_with_matches::<Args>();
    wharf_ops::init_logging();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Configuration first: nothing is bound if any of it is unusable.
        let snapshot = args.etcd.snapshot().await.unwrap_or_else(|e| usage(e));
        let source = config::source(&snapshot);
        let config = cli::load(&args, &matches, source).unwrap_or_else(|e| usage(e));
        let metrics_listen =
            cli::metrics_listen(&args, &matches, source).unwrap_or_else(|e| usage(e));
        let admin = cli::admin_settings(&args, &matches, source).unwrap_or_else(|e| usage(e));
        // Installed before the edge starts, so that everything it records is captured.
        let metrics = metrics_listen
            .map(|_| wharf_ops::http::install_metrics().unwrap_or_else(|e| usage(e)));
        let edge = Arc::new(Edge::start(config).await.unwrap_or_else(|e| usage(e)));
        let ops_shutdown = tokio_util::sync::CancellationToken::new();
        if let (Some(addr), Some(metrics)) = (metrics_listen, metrics) {
            if admin.is_some() && !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the admin API is served over plain HTTP on a network address: put it behind TLS (a reverse proxy) or keep metricsListen on loopback");
            }
            let api = admin.map(|settings| edge.admin_api(settings, Some(metrics.clone())));
            let served = wharf_ops::http::serve_on(
                addr,
                metrics,
                edge.ready_check(),
                api,
                ops_shutdown.clone(),
            );
            if let Err(e) = served.await {
                usage(format!("metrics-listen: {e}"));
            }
        }
        tokio::spawn(reload_on_sighup(edge.clone()));
        if let Some(snapshot) = snapshot {
            tokio::spawn(follow_etcd(edge.clone(), args, matches, snapshot));
        }
        wharf_ops::shutdown_signal().await;
        tracing::info!("shutdown signal received");
        ops_shutdown.cancel();
        edge.stop().await;
    });
    Ok(())
}

/// SIGHUP re-reads the TLS certificates, the password file and the rule file.
async fn reload_on_sighup(edge: Arc<Edge>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        if edge.tls_settings().is_some() {
            if let Err(e) = edge.reload_tls(None) {
                tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in force");
            }
        }
        if let Err(e) = edge.reload_auth(None) {
            tracing::error!(error = %e, "password or rule file reload failed; the rules in force stay");
        }
    }
}

/// Applies etcd changes: TLS material and authentication at once, anything else with a
/// "restart needed" line.
async fn follow_etcd(
    edge: Arc<Edge>,
    args: Args,
    matches: clap::ArgMatches,
    mut snapshot: std::collections::HashMap<String, String>,
) {
    let (tx, mut changes) = tokio::sync::mpsc::channel(64);
    tokio::spawn(etcd::watch(
        args.etcd.endpoints.clone(),
        args.etcd.prefix.clone(),
        tx,
    ));
    while let Some((key, value)) = changes.recv().await {
        match &value {
            Some(v) => snapshot.insert(key.clone(), v.clone()),
            None => snapshot.remove(&key),
        };
        let tls = cli::TLS_KEYS.contains(&key.as_str());
        let auth = cli::AUTH_KEYS.contains(&key.as_str());
        if !tls && !auth {
            tracing::warn!(%key, ?value, "etcd key changed; it takes effect after a restart");
            continue;
        }
        let result = cli::load(&args, &matches, &snapshot).and_then(|config| {
            if tls {
                edge.reload_tls(config.tls)
            } else {
                edge.reload_auth(Some(config.auth))
            }
        });
        match result {
            Ok(()) => tracing::info!(%key, "applied etcd change"),
            Err(e) => tracing::error!(error = %e, "etcd change not applied"),
        }
    }
}
