//! The `/metrics` endpoint, and the health checks beside it: a minimal HTTP/1.1 responder on
//! the proxy's own runtime. `GET /metrics` is the current exposition; `GET /healthz` says the
//! process is up (liveness); `GET /readyz` is 200 while pgwarden accepts clients and 503 once it
//! drains (readiness: a load balancer or Kubernetes stops sending clients). Anything else is a
//! 404 or 405; then the connection closes. Requests are capped in size and time, so a stuck or
//! hostile scraper costs one small task.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Metrics;
use crate::shutdown::Drain;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves scrapes and health checks until the listener fails.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, drain: Arc<Drain>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, Arc::clone(&metrics), Arc::clone(&drain)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: Arc<Metrics>, drain: Arc<Drain>) {
    let mut request = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", metrics.render()),
        (b"GET", b"/healthz") => ("200 OK", "ok\n".to_owned()),
        (b"GET", b"/readyz") if drain.started() => ("503 Service Unavailable", "draining\n".to_owned()),
        (b"GET", b"/readyz") => ("200 OK", "ready\n".to_owned()),
        (b"GET", _) => ("404 Not Found", "not found; try /metrics, /healthz or /readyz\n".to_owned()),
        _ => ("405 Method Not Allowed", "GET /metrics, /healthz or /readyz\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
