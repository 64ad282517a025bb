//! One byte-stream type for both sides of the proxy: plain TCP, or TLS over TCP (rustls as the
//! server for clients, as the client for backends). Sessions, the relay and backend logins
//! read and write a [`Stream`] without caring which; [`Stream::split`] gives the relay its two
//! halves (zero-cost for TCP; a lock-based split for TLS, whose state both directions share).
//!
//! rustls may keep encrypted bytes buffered after a write: every writer ends a message with
//! [`send`] (write and flush), which costs nothing extra on plain TCP.
//!
//! The relay's hot path uses [`Stream::poll_read_some`] and [`Stream::poll_write_some`]: on plain
//! TCP they go straight to the socket when tokio already knows it is ready (no coop budget, no
//! future), and tell tokio the socket is drained after a short read or write, as tokio's own
//! `poll_read` does, so the next attempt waits for epoll instead of costing a `recv` that fails.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
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

    pub fn is_plain(&self) -> bool {
        matches!(self, Stream::Plain(_))
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

    /// One write that never waits, on plain TCP only (through TLS, 0: the caller's own relay
    /// writes it). Used to send a waiting client's request from the task that releases a backend.
    pub fn write_now(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => match write_ready(tcp, bytes) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                r => r,
            },
            _ => Ok(0),
        }
    }

    /// Has `waker` woken when the socket turns readable, unless it is readable now (or not plain
    /// TCP): true if it will be. Lets the task that hands a connection over leave its new owner
    /// asleep until the connection has something to read.
    pub fn wake_when_readable(&self, waker: &Waker) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.poll_read_ready(&mut Context::from_waker(waker)).is_pending(),
            _ => false,
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

    /// Reads what is there into `buf` (growing it if it is full); `Ok(0)` is end of stream.
    pub fn poll_read_some(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        if buf.capacity() == buf.len() {
            buf.reserve(crate::bufpool::READ_BUFFER);
        }
        match self {
            Stream::Plain(tcp) => loop {
                match read_ready(tcp, buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::task::ready!(tcp.poll_read_ready(cx))?,
                    r => return Poll::Ready(r),
                }
            },
            _ => self.poll_read_buf(cx, buf),
        }
    }

    /// Writes some of `bytes`; returns how many. TLS callers must [`Stream::poll_flush_tls`] after
    /// the last byte is accepted.
    pub fn poll_write_some(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Plain(tcp) => loop {
                match write_ready(tcp, bytes) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::task::ready!(tcp.poll_write_ready(cx))?,
                    r => return Poll::Ready(r),
                }
            },
            _ => Pin::new(self).poll_write(cx, bytes),
        }
    }

    /// Pushes out what rustls still holds; nothing to do on plain TCP.
    pub fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            _ => Pin::new(self).poll_flush(cx),
        }
    }

    /// Waits for an idle peer's next bytes and reads them into `buf`. On plain TCP the buffer
    /// is taken from [`crate::bufpool`] only once data is there, so an idle client holds none;
    /// through TLS, rustls may hold decrypted bytes the socket no longer signals, so the read
    /// goes through it, buffer in hand.
    pub fn poll_idle_read(&mut self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        loop {
            if let Stream::Plain(tcp) = self {
                std::task::ready!(tcp.poll_read_ready(cx))?;
                if buf.capacity() == 0 {
                    *buf = crate::bufpool::take();
                }
                match read_ready(tcp, buf) {
                    // Stale readiness (left over from login): give the buffer back and wait again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => crate::bufpool::give(std::mem::take(buf)),
                    r => return Poll::Ready(r),
                }
                continue;
            }
            if buf.capacity() == 0 {
                *buf = crate::bufpool::take();
            }
            return self.poll_read_buf(cx, buf);
        }
    }
}

/// One `recv` if tokio has seen the socket readable (else `WouldBlock`, no syscall). A short read
/// means the socket is drained: tokio is told so (by answering `WouldBlock` to its `try_io`
/// after keeping the bytes), and the next read waits for epoll. The syscall is made on the raw
/// socket: `TcpStream::try_read` would check tokio's readiness a second time.
fn read_ready(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(crate::bufpool::READ_BUFFER);
    }
    let mut got = 0;
    let r = tcp.try_io(Interest::READABLE, || {
        let room = buf.spare_capacity_mut();
        let len = room.len();
        got = socket2::SockRef::from(tcp).recv(room)?;
        // SAFETY: `recv` initialised the first `got` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + got) };
        if got > 0 && got < len { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(got) }
    });
    match r {
        Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => Ok(got),
        r => r,
    }
}

/// One `send` if tokio has seen the socket writable; a short write marks it full, as in
/// [`read_ready`]. (`MSG_NOSIGNAL`: a peer that closed is an error, not a SIGPIPE.)
fn write_ready(tcp: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    let r = tcp.try_io(Interest::WRITABLE, || {
        sent = socket2::SockRef::from(tcp).send_with_flags(bytes, libc::MSG_NOSIGNAL)?;
        if sent > 0 && sent < bytes.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(sent) }
    });
    match r {
        Err(e) if sent > 0 && e.kind() == io::ErrorKind::WouldBlock => Ok(sent),
        r => r,
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
