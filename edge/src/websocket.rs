//! MQTT over WebSocket (MQTT 5.0 section 6, the same for 3.1.1): an HTTP upgrade on one path
//! with the `mqtt` (or the older `mqttv3.1`) subprotocol, then the payloads of the binary
//! messages as one byte stream, so that a packet may span messages and a message may hold
//! several packets. A text message closes the connection. The framing is tungstenite's; this
//! module only adapts its message stream to the byte stream the connection reads and writes.

use bytes::Bytes;
use futures::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The subprotocols Wharf speaks, in the order it prefers them.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("WebSocket handshake failed: {0}")]
    Handshake(#[from] tokio_tungstenite::tungstenite::Error),
    /// Answered with this HTTP status (RFC 6455 4.2.2: an error response, not a silent close).
    #[error("HTTP {0}: {1}")]
    Refused(u16, &'static str),
    #[error("reading the upgrade request: {0}")]
    Io(#[from] io::Error),
}

/// The longest request head read (tungstenite's own limit is larger; browsers send ~1 KiB).
const MAX_HEAD: usize = 8 * 1024;

/// Reads the request head and checks what tungstenite would refuse without an answer: the
/// method, the HTTP version, the upgrade headers, the WebSocket version, the path. Returns
/// the bytes read (the head, and whatever followed it) for tungstenite to read again, or
/// writes the HTTP error (400; 404 for another path; 426 naming version 13) and says so.
async fn check_request<S>(stream: &mut S, path: &str) -> Result<Vec<u8>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let verdict = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(UpgradeError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => break judge(&request, path),
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => break Err((400, "request head too large")),
            Err(_) => break Err((400, "not an HTTP request")),
        }
    };
    let Err((status, why)) = verdict else {
        return Ok(head);
    };
    let reason = match status {
        404 => "Not Found",
        426 => "Upgrade Required",
        _ => "Bad Request",
    };
    let extra = if status == 426 {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n{extra}\r\n{why}",
        why.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    Err(UpgradeError::Refused(status, why))
}

/// What a complete request head is answered with, if not an upgrade.
fn judge(request: &httparse::Request<'_, '_>, path: &str) -> Result<(), (u16, &'static str)> {
    let header = |name: &str| {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .collect::<Vec<&str>>()
    };
    let has_token = |name: &str, token: &str| {
        header(name)
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if request.method != Some("GET") {
        return Err((400, "a WebSocket upgrade is a GET"));
    }
    if request.version != Some(1) {
        return Err((400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    let target = request.path.unwrap_or("");
    if target.split('?').next() != Some(path) {
        return Err((404, "MQTT over WebSocket is not served on this path"));
    }
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err((400, "only WebSocket upgrades are served here"));
    }
    if header("sec-websocket-version") != ["13"] {
        return Err((426, "WebSocket version 13 only"));
    }
    if header("sec-websocket-key").len() != 1 {
        return Err((400, "no Sec-WebSocket-Key"));
    }
    Ok(())
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = buf.remaining().min(self.prefix.len());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            if self.prefix.is_empty() {
                // Let the allocation go: an idle connection keeps none.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answers the HTTP upgrade on `path` and returns the connection as a byte stream. Messages
/// and frames are bounded by `max_message` bytes (the packet size limit).
pub async fn accept<S>(
    mut stream: S,
    path: &str,
    max_message: usize,
) -> Result<WsStream<S>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = check_request(&mut stream, path).await?;
    let stream = Prefixed {
        prefix: Bytes::from(head),
        inner: stream,
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        // Every message goes straight to the socket: the connection batches its own writes.
        .write_buffer_size(0)
        .max_write_buffer_size(max_message.saturating_mul(2).max(64 * 1024))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    #[allow(clippy::result_large_err)] // the signature is tungstenite's callback
    let callback = |request: &Request, response: Response| upgrade(request, response, path);
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsStream {
        inner,
        pending: Bytes::new(),
        sent: None,
    })
}

/// Checks the request's path and picks the subprotocol. A client that offers subprotocols
/// but none of Wharf's is refused (400); one that offers none is served (some clients send
/// none, and MQTT over the connection is the only thing this path speaks).
#[allow(clippy::result_large_err)] // the signature is tungstenite's callback
fn upgrade(
    request: &Request,
    mut response: Response,
    path: &str,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != path {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            format!("MQTT is served on {path}"),
        ));
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(response);
    }
    let Some(chosen) = SUBPROTOCOLS
        .iter()
        .find(|ours| offered.iter().any(|p| p.eq_ignore_ascii_case(ours)))
    else {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "subprotocol must be mqtt or mqttv3.1".to_owned(),
        ));
    };
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(chosen),
    );
    Ok(response)
}

fn refusal(status: StatusCode, why: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why));
    *response.status_mut() = status;
    response
}

/// A WebSocket connection as a byte stream: reads return the binary messages' payloads,
/// each write is sent as one binary message.
///
/// A write returns only once its message is on the socket (or in the kernel's buffer), as a
/// socket write would: the connection never flushes. A write that has to wait keeps its
/// message; the next call to `poll_write` finishes sending it and returns its length, so the
/// caller must offer the same bytes first again (the connection's write buffer does: it only
/// grows at the end until a write returns).
pub struct WsStream<S> {
    inner: WebSocketStream<Prefixed<S>>,
    /// The rest of the binary message being read.
    pending: Bytes,
    /// The length of a message sent and not yet flushed.
    sent: Option<usize>,
}

fn io_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Io(e) => e,
        Error::ConnectionClosed | Error::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = buf.remaining().min(self.pending.len());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                // The end of the stream, or the client's close: the end of the input.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket message: MQTT is sent in binary messages",
                    )))
                }
                // Pings are answered by tungstenite; pongs need nothing.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.sent.is_none() {
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(io_error)?;
            Pin::new(&mut self.inner)
                .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
                .map_err(io_error)?;
            self.sent = Some(buf.len());
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx)).map_err(io_error)?;
        Poll::Ready(Ok(self.sent.take().unwrap_or(0)))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    async fn pair(
        protocols: Option<&str>,
        path: &str,
    ) -> (
        Result<WsStream<tokio::io::DuplexStream>, UpgradeError>,
        Result<WebSocketStream<tokio::io::DuplexStream>, tokio_tungstenite::tungstenite::Error>,
    ) {
        let (server, client) = tokio::io::duplex(64 * 1024);
        let mut request = format!("ws://localhost{path}")
            .into_client_request()
            .expect("request");
        if let Some(p) = protocols {
            request.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(p).expect("header"),
            );
        }
        let server = tokio::spawn(async move { accept(server, "/mqtt", 1024).await });
        let client =
            tokio_tungstenite::client_async(request, client)
                .await
                .map(|(ws, response)| {
                    if protocols.is_some() {
                        assert_eq!(
                            response.headers().get(header::SEC_WEBSOCKET_PROTOCOL),
                            Some(&HeaderValue::from_static("mqtt"))
                        );
                    }
                    ws
                });
        (server.await.expect("server task"), client)
    }

    #[tokio::test]
    async fn packets_span_messages_and_messages_hold_several_packets() {
        let (server, client) = pair(Some("mqttv3.1, mqtt"), "/mqtt").await;
        let (mut server, mut client) = (server.expect("upgrade"), client.expect("client"));
        client
            .send(Message::binary(vec![1u8, 2, 3]))
            .await
            .expect("send");
        client.send(Message::binary(vec![4u8])).await.expect("send");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, [1, 2, 3, 4]);
        server.write_all(b"hello").await.expect("write");
        let echoed = client.next().await.expect("message").expect("ok");
        assert_eq!(echoed, Message::binary(b"hello".to_vec()));
    }

    #[tokio::test]
    async fn a_text_message_ends_the_stream_with_an_error() {
        let (server, client) = pair(Some("mqtt"), "/mqtt").await;
        let (mut server, mut client) = (server.expect("upgrade"), client.expect("client"));
        client.send(Message::text("CONNECT")).await.expect("send");
        let mut got = [0u8; 4];
        let e = server.read(&mut got).await.expect_err("text refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused() {
        let (server, client) = pair(None, "/mqtt").await;
        let (mut server, mut client) = (server.expect("upgrade"), client.expect("client"));
        client
            .send(Message::binary(vec![0u8; 2000]))
            .await
            .expect("send");
        let mut got = [0u8; 4];
        assert!(server.read(&mut got).await.is_err());
    }

    #[tokio::test]
    async fn other_paths_and_foreign_subprotocols_are_refused() {
        let (server, client) = pair(Some("mqtt"), "/other").await;
        assert!(server.is_err() && client.is_err());
        let (server, client) = pair(Some("wamp"), "/mqtt").await;
        assert!(server.is_err() && client.is_err());
    }
}
