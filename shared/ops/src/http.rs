//! What operators scrape and probe: a small HTTP endpoint on `--metrics-listen` with
//! `/metrics` (Prometheus text format), `/healthz` (the process is serving) and `/readyz`
//! (its dependencies are up: the worker link for the edge, the store for the worker).

pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
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

/// An HTTP request for the admin API (anything but the three endpoints above).
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    /// The path, percent-decoded.
    pub path: String,
    /// The query string's pairs, percent-decoded.
    pub query: Vec<(String, String)>,
    pub authorization: Option<String>,
    /// The `Origin`, `Host` and `Content-Type` headers, for the checks against cross-site
    /// requests.
    pub origin: Option<String>,
    pub host: Option<String>,
    pub content_type: Option<String>,
    /// The `Cookie` header (the console's login).
    pub cookie: Option<String>,
    /// The connection's other end (who made a change, in the admin API's log).
    pub peer: Option<std::net::SocketAddr>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of cookie `name`, if the request carries it.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookie.as_deref()?.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
    }
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        HttpResponse {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.into())
    }
}

/// The admin API: answers every request the ops endpoint does not answer itself.
pub type Api =
    Arc<dyn Fn(HttpRequest) -> Pin<Box<dyn Future<Output = HttpResponse> + Send>> + Send + Sync>;

/// Largest request head and body the endpoint reads.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 256 * 1024;

/// Serves the endpoint until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    ready: ReadyCheck,
    api: Option<Api>,
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
        let (metrics, ready, api) = (metrics.clone(), ready.clone(), api.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                respond(stream, &metrics, &ready, api.as_ref()),
            )
            .await;
        });
    }
}

/// What a request's head says, or why it cannot be served.
enum Head {
    Complete {
        request: Box<HttpRequest>,
        head_len: usize,
        body_len: usize,
    },
    Partial,
    Bad(&'static str),
}

fn parse_head(bytes: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Bad("malformed request"),
    };
    let target = parsed.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = HttpRequest {
        method: parsed.method.unwrap_or("").to_owned(),
        path: percent_decode(path),
        query: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect(),
        ..HttpRequest::default()
    };
    let mut body_len = 0;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) if n <= MAX_BODY => body_len = n,
                Some(_) => return Head::Bad("request body too large"),
                None => return Head::Bad("bad Content-Length"),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Head::Bad("chunked request bodies are not accepted");
        } else {
            let value = || std::str::from_utf8(h.value).ok().map(str::to_owned);
            if h.name.eq_ignore_ascii_case("authorization") {
                request.authorization = value();
            } else if h.name.eq_ignore_ascii_case("origin") {
                request.origin = value();
            } else if h.name.eq_ignore_ascii_case("host") {
                request.host = value();
            } else if h.name.eq_ignore_ascii_case("content-type") {
                request.content_type = value();
            } else if h.name.eq_ignore_ascii_case("cookie") {
                request.cookie = value();
            }
        }
    }
    Head::Complete {
        request: Box::new(request),
        head_len,
        body_len,
    }
}

/// `%XX` escapes and (in queries) `+` as a space; invalid escapes stay as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn respond(
    mut stream: TcpStream,
    metrics: &PrometheusHandle,
    ready: &ReadyCheck,
    api: Option<&Api>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let response = loop {
        match parse_head(&buf) {
            Head::Partial if buf.len() < MAX_HEAD => {}
            Head::Partial => break HttpResponse::text(431, "request head too large\n"),
            Head::Bad(why) => break HttpResponse::text(400, format!("{why}\n")),
            Head::Complete {
                mut request,
                head_len,
                body_len,
            } => {
                while buf.len() < head_len + body_len {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
                request.body = buf[head_len..head_len + body_len].to_vec();
                request.peer = stream.peer_addr().ok();
                break route(*request, metrics, ready, api).await;
            }
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&response.body).await?;
    stream.shutdown().await
}

async fn route(
    request: HttpRequest,
    metrics: &PrometheusHandle,
    ready: &ReadyCheck,
    api: Option<&Api>,
) -> HttpResponse {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/metrics") => {
            HttpResponse::new(200, "text/plain; version=0.0.4", metrics.render())
        }
        ("GET", "/healthz") => HttpResponse::text(200, "ok\n"),
        ("GET", "/readyz") => match ready().await {
            Ok(()) => HttpResponse::text(200, "ready\n"),
            Err(reason) => HttpResponse::text(503, format!("not ready: {reason}\n")),
        },
        _ => match api {
            Some(api) => api(request).await,
            None if request.method == "GET" => HttpResponse::text(404, "not found\n"),
            None => HttpResponse::text(405, "GET only\n"),
        },
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Binds `addr` and serves the endpoint in the background.
pub async fn serve_on(
    addr: std::net::SocketAddr,
    metrics: PrometheusHandle,
    ready: ReadyCheck,
    api: Option<Api>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    match api {
        Some(_) => {
            tracing::info!(%addr, "metrics and health: /metrics, /healthz, /readyz; admin API /api/v1 and console /console (with credentials)")
        }
        None => tracing::info!(%addr, "metrics and health: /metrics, /healthz, /readyz"),
    }
    tokio::spawn(serve(listener, metrics, ready, api, shutdown));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_is_parsed_with_its_query_and_body_length() {
        let head = b"DELETE /api/v1/clients/dev%2F1?x=a+b&y=%41 HTTP/1.1\r\nHost: h\r\nAuthorization: Basic YTpi\r\nContent-Length: 3\r\n\r\nabc";
        let Head::Complete {
            request,
            head_len,
            body_len,
        } = parse_head(head)
        else {
            panic!("complete head expected")
        };
        assert_eq!(request.method, "DELETE");
        assert_eq!(request.path, "/api/v1/clients/dev/1");
        assert_eq!(request.param("x"), Some("a b"));
        assert_eq!(request.param("y"), Some("A"));
        assert_eq!(request.authorization.as_deref(), Some("Basic YTpi"));
        assert_eq!((head_len, body_len), (head.len() - 3, 3));
        assert!(matches!(
            parse_head(b"GET /x HTTP/1.1\r\nHost"),
            Head::Partial
        ));
        assert!(matches!(
            parse_head(b"GET /x HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Head::Bad(_)
        ));
        assert!(matches!(
            parse_head(b"GET /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Head::Bad(_)
        ));
        assert!(matches!(
            parse_head(b"\x00\x01 nonsense\r\n\r\n"),
            Head::Bad(_)
        ));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
