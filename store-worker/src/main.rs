use wharf_ops::config::{self, EX_USAGE};
use wharf_store_worker::cli::{self, Args};
use wharf_store_worker::store::mongo::redact;
use wharf_store_worker::Worker;

fn usage(message: impl std::fmt::Display) -> ! {
    // Never print credentials from a MongoDB URI.
    eprintln!("store-worker: {}", redact(&message.to_string()));
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
        let (config, metrics_listen) =
            cli::load(&args, &matches, source).unwrap_or_else(|e| usage(e));
        // Installed before the worker starts, so that everything it records is captured.
        let metrics =
            metrics_listen.map(|_| wharf_ops::http::install_metrics().unwrap_or_else(|e| usage(e)));
        let worker = Worker::start(config).await.unwrap_or_else(|e| usage(e));
        let ops_shutdown = tokio_util::sync::CancellationToken::new();
        if let (Some(addr), Some(metrics)) = (metrics_listen, metrics) {
            let served = wharf_ops::http::serve_on(
                addr,
                metrics,
                worker.ready_check(),
                None,
                ops_shutdown.clone(),
            );
            if let Err(e) = served.await {
                worker.stop().await;
                usage(format!("metrics-listen: {e}"));
            }
        }
        wharf_ops::shutdown_signal().await;
        tracing::info!("shutdown signal received");
        worker.stop().await;
        ops_shutdown.cancel();
    });
    Ok(())
}
