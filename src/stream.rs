//! One byte-stream type for both sides of the proxy: plain TCP, or TLS over TCP (rustls as the
//! server for clients, as the client for backends). Sessions, the relay and backend logins
//! read and write a [`Stream`] without caring which; [`Stream::split`] gives the relay its two
//! halves (zero-cost for TCP; a lock-based split for TLS, whose state both directions share).
//!
//! rustls may keep encrypted bytes buffered after a write: every writer ends a message with
//! [`send`] (write and flush), which costs nothing extra on plain TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp;
use tokio_rustls::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while a plain stream is being upgraded to TLS; every I/O on it fails.
    Detached,
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Detached => None,
        }
    }

    /// Takes the plain TCP stream out for a TLS handshake; `None` if it is not plain.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Stream::Detached) {
            Stream::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
            Stream::Detached => (ReadHalf::Detached, WriteHalf::Detached),
        }
    }

    /// One read that never waits: `None` if nothing is there now. Through `poll_read`, so that
    /// tokio clears the socket's readiness after a short read (saving the next `recv`), and so
    /// that TLS records that carry no data (session tickets) are consumed, not mistaken for data.
    pub fn read_now(&mut self, buf: &mut BytesMut) -> Option<io::Result<usize>> {
        match self.poll_read_buf(&mut Context::from_waker(Waker::noop()), buf) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    /// `read_buf` as a poll function (the future it makes keeps no state between polls).
    fn poll_read_buf(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        use std::future::Future;
        use tokio::io::AsyncReadExt;
        std::pin::pin!(self.read_buf(buf)).poll(cx)
    }

    /// Waits for an idle peer's next bytes and reads them into `buf`. On plain TCP the buffer
    /// is taken from [`crate::bufpool`] only once data is there, so an idle client holds none;
    /// through TLS, rustls may hold decrypted bytes the socket no longer signals, so the read
    /// goes through it, buffer in hand.
    pub fn poll_idle_read(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        loop {
            if let Stream::Plain(tcp) = self {
                std::task::ready!(tcp.poll_read_ready(cx))?;
            }
            if buf.capacity() == 0 {
                *buf = crate::bufpool::take();
            }
            match self.poll_read_buf(cx, buf) {
                Poll::Ready(r) => return Poll::Ready(r),
                // Stale readiness (left over from login): give the buffer back and wait again.
                Poll::Pending if matches!(self, Stream::Plain(_)) => crate::bufpool::give(std::mem::take(buf)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Writes all of `bytes` and flushes (TLS buffers; TCP's flush is a no-op).
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(bytes).await?;
    w.flush().await
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream is being upgraded to TLS")
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

type TlsRef<'a> = &'a mut TlsStream<TcpStream>;

pub enum ReadHalf<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<TlsRef<'a>>),
    Detached,
}

pub enum WriteHalf<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<TlsRef<'a>>),
    Detached,
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Detached => Poll::Ready(Err(detached())),
        }
    }
}
