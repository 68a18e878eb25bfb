//! What Wharf's two processes do for their operators, alike: configuration in layers (flags,
//! environment, etcd, defaults), the metrics, health and readiness endpoint, logging, and the
//! shutdown signal. Not part of the contract between them (that is `wharf-shared`).
//!
//! # Layout
//! - [`config`]: layered, typed configuration, with etcd as a layer.
//! - [`http`]: the ops endpoint (`/metrics`, `/healthz`, `/readyz`, and an API behind it).
#![forbid(unsafe_code)]

pub mod config;
pub mod http;

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
