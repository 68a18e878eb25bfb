//! What operators scrape and probe: a small HTTP endpoint on `--metrics-listen` with
//! `/metrics` (Prometheus text format), `/healthz` (the process is serving) and `/readyz`
//! (its dependencies are up: the worker link for the edge, the store for the worker).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Answers "is this process ready for traffic", with the reason when not.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

const SECONDS_BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Installs the process-wide Prometheus recorder: `*_seconds` histograms get latency buckets,
/// `*_size` histograms count buckets.
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &SIZE_BUCKETS))
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// Serves the endpoint until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &metrics, &ready))
                .await;
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    metrics: &PrometheusHandle,
    ready: &ReadyCheck,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") => match ready().await {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds `addr` and serves the endpoint in the background.
pub async fn serve_on(
    addr: std::net::SocketAddr,
    metrics: PrometheusHandle,
    ready: ReadyCheck,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "metrics and health: /metrics, /healthz, /readyz");
    tokio::spawn(serve(listener, metrics, ready, shutdown));
    Ok(())
}
