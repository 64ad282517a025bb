//! Whole-message reads for the handshake phases (client startup and authentication, backend
//! login), where messages are small and read one at a time. The relay does not use this: it
//! streams bytes through [`crate::protocol::MessageScanner`].

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::ProtocolError;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("peer closed the connection")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Reads one tagged message (`tag`, `i32` length, body) into `buf`, returning the tag and the
/// body. Bytes past the message stay in `buf` for the next call.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_body: usize,
) -> Result<(u8, BytesMut), ReadError> {
    loop {
        if buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            if len < 4 || (len as usize - 4) > max_body {
                return Err(ProtocolError::BadLength { len: len as i64, max: max_body }.into());
            }
            let total = len as usize + 1;
            if buf.len() >= total {
                let tag = buf[0];
                let mut msg = buf.split_to(total);
                msg.advance(5);
                return Ok((tag, msg));
            }
            buf.reserve(total - buf.len());
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Reads an untagged startup-phase packet (`i32` length including itself, then body).
pub async fn read_startup_packet<S: AsyncRead + Unpin>(stream: &mut S, max_len: usize) -> Result<BytesMut, ReadError> {
    let mut len_bytes = [0u8; 4];
    read_exact_or_closed(stream, &mut len_bytes).await?;
    let len = i32::from_be_bytes(len_bytes);
    if len < 8 || len as usize > max_len {
        return Err(ProtocolError::BadLength { len: len as i64, max: max_len }.into());
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    read_exact_or_closed(stream, &mut body).await?;
    Ok(body)
}

async fn read_exact_or_closed<S: AsyncRead + Unpin>(stream: &mut S, out: &mut [u8]) -> Result<(), ReadError> {
    match stream.read_exact(out).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ReadError::Closed),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_message_splits_back_to_back_messages() {
        let data: &[u8] = b"Z\0\0\0\x05IS\0\0\0\x06a\0";
        let mut reader = data;
        let mut buf = BytesMut::new();
        let (tag, body) = read_message(&mut reader, &mut buf, 100).await.unwrap();
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        let (tag, body) = read_message(&mut reader, &mut buf, 100).await.unwrap();
        assert_eq!((tag, &body[..]), (b'S', &b"a\0"[..]));
        assert!(matches!(read_message(&mut reader, &mut buf, 100).await, Err(ReadError::Closed)));
    }

    #[tokio::test]
    async fn read_message_refuses_oversize_before_reading_body() {
        let data: &[u8] = b"p\x7f\xff\xff\xff";
        let mut reader = data;
        let err = read_message(&mut reader, &mut BytesMut::new(), 100).await.unwrap_err();
        assert!(matches!(err, ReadError::Protocol(ProtocolError::BadLength { .. })));
    }

    #[tokio::test]
    async fn read_startup_packet_refuses_bad_lengths_and_truncation() {
        let mut huge: &[u8] = &[0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(read_startup_packet(&mut huge, 10_000).await, Err(ReadError::Protocol(_))));
        let mut tiny: &[u8] = &[0, 0, 0, 2];
        assert!(matches!(read_startup_packet(&mut tiny, 10_000).await, Err(ReadError::Protocol(_))));
        let mut cut: &[u8] = &[0, 0, 0, 16, 0, 3, 0, 0];
        assert!(matches!(read_startup_packet(&mut cut, 10_000).await, Err(ReadError::Closed)));
    }
}

/// TCP keepalive on `tcp`: after `idle` without traffic, probes every 10 s, and the connection
/// is dropped after 6 unanswered ones. Finds peers that vanished without a FIN (a frozen
/// Lambda sandbox, a failed-over database host) so their sessions and backends are freed.
pub fn set_keepalive(tcp: &tokio::net::TcpStream, idle: Option<Duration>) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(tcp);
    match idle {
        None => sock.set_keepalive(false),
        Some(idle) => {
            let ka = socket2::TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(10));
            #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
            let ka = ka.with_retries(6);
            sock.set_tcp_keepalive(&ka)
        }
    }
}

#[cfg(test)]
mod keepalive_tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_is_set_with_its_idle_time_or_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        set_keepalive(&tcp, Some(Duration::from_secs(42))).unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        {
            assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
            assert_eq!(sock.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), 6);
        }
        set_keepalive(&tcp, None).unwrap();
        assert!(!sock.keepalive().unwrap());
    }
}
