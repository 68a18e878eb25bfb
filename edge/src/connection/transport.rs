//! The byte streams a connection runs over (TCP, TLS, WebSocket, an in-process duplex for
//! bridges), split into halves the run loop reads and writes at once, and the read that holds
//! no buffer while a connection is idle.

use super::*;

/// A client's byte stream, split into halves that the run loop reads and writes at once.
pub trait Transport: Send + 'static {
    type Read<'a>: Reader
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

/// Plain TCP: borrowed halves, no allocation and no lock per read or write.
impl Transport for tokio::net::TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

/// TLS: one session state for both directions, so the halves share it behind a lock.
impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    type Read<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut Self>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }
}

/// The in-process stream of the edge's own bridge ([`crate::bridge`]).
impl Transport for tokio::io::DuplexStream {
    type Read<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut Self>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }
}

/// WebSocket (over TCP or TLS): one protocol state for both directions, as for TLS.
impl<S> Transport for crate::websocket::WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Read<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut Self>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }
}

/// The read half of a [`Transport`].
pub trait Reader: AsyncRead + Unpin + Send {
    /// Whether a read into an empty buffer waits until the socket is readable and then
    /// returns nothing (plain TCP), so that a connection can wait without holding a buffer.
    /// Not so for TLS, whose stream takes an empty read as the end of the input.
    const EMPTY_READ_WAITS: bool;
}

impl Reader for tokio::net::tcp::ReadHalf<'_> {
    const EMPTY_READ_WAITS: bool = true;
}

impl<T: AsyncRead + Send> Reader for tokio::io::ReadHalf<T> {
    const EMPTY_READ_WAITS: bool = false;
}

/// Reads what the socket has into `buf`, offering room for about `chunk` bytes; returns the
/// bytes read and the room offered. A connection with nothing buffered first waits for the
/// socket without a buffer (where the transport can): an idle connection holds none. A poll
/// function, so that the run loop's wait holds no future for it.
pub(super) fn poll_read_some<R: Reader>(
    cx: &mut Context<'_>,
    reader: &mut R,
    buf: &mut BytesMut,
    chunk: usize,
) -> Poll<std::io::Result<(usize, usize)>> {
    if R::EMPTY_READ_WAITS && buf.is_empty() {
        std::task::ready!(
            Pin::new(&mut *reader).poll_read(cx, &mut tokio::io::ReadBuf::new(&mut []))
        )?;
    }
    if buf.capacity() - buf.len() < chunk / 2 {
        buf.reserve(chunk);
    }
    let room = buf.capacity() - buf.len();
    let n = std::task::ready!(tokio_util::io::poll_read_buf(Pin::new(reader), cx, buf))?;
    Poll::Ready(Ok((n, room)))
}
