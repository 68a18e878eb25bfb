use std::collections::HashMap;
use wharf_shared::config::{etcd, ConfigSource, NoSource, EX_USAGE};
use wharf_store_worker::cli::{self, Args};
use wharf_store_worker::store::mongo::redact;
use wharf_store_worker::Worker;

fn usage(message: impl std::fmt::Display) -> ! {
    // Never print credentials from a MongoDB URI.
    eprintln!("store-worker: {}", redact(&message.to_string()));
    std::process::exit(EX_USAGE);
}

fn main() -> anyhow::Result<()> {
    let (args, matches) = Args::parse_with_matches();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Configuration first: nothing is bound if any of it is unusable.
        let snapshot: Option<HashMap<String, String>> = if args.etcd.is_empty() {
            None
        } else {
            Some(
                etcd::load(&args.etcd, &args.etcd_prefix)
                    .await
                    .unwrap_or_else(|e| usage(e)),
            )
        };
        let source: &dyn ConfigSource = match &snapshot {
            Some(s) => s,
            None => &NoSource,
        };
        let (config, metrics_listen) =
            cli::load(&args, &matches, source).unwrap_or_else(|e| usage(e));
        // Installed before the worker starts, so that everything it records is captured.
        let metrics = metrics_listen
            .map(|_| wharf_shared::ops::install_metrics().unwrap_or_else(|e| usage(e)));
        let worker = Worker::start(config).await.unwrap_or_else(|e| usage(e));
        let ops_shutdown = tokio_util::sync::CancellationToken::new();
        if let (Some(addr), Some(metrics)) = (metrics_listen, metrics) {
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
