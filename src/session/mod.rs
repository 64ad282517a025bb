//! One client connection from accept to close: the startup handshake, authentication, then the
//! loop that borrows a backend for each transaction and relays it. This is the only module that
//! turns errors into what the client sees (an ErrorResponse with a SQLSTATE and a message that
//! names no secret); details go to the log.

mod error;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::settings::Settings;
use crate::listener::Shared;
use crate::metrics::GaugeGuard;
use crate::pool::{Lease, PoolEntry, PoolError, PoolKey};
use crate::protocol::{MessageScanner, TxStatus, messages};
use crate::relay::{self, ClientSide, Outcome};
pub use error::SessionError;

/// A session's id, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionId(pub u64);

const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one client connection to completion. Never panics on client input; every failure ends
/// in an ErrorResponse (when the client can still read one) and a log line.
pub async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: SessionId) {
    let _open = GaugeGuard::new(&shared.metrics.client_connections);
    shared.metrics.client_connections_received.increment(1);
    shared.metrics.client_connections_no_tls.increment(1);
    let _ = stream.set_nodelay(true);
    let mut client = ClientSide {
        stream,
        buf: BytesMut::with_capacity(8192),
        scanner: MessageScanner::new(shared.config.pool.max_message_bytes),
    };
    if let Err(e) = serve(&shared, &mut client, peer, id).await {
        e.log(id, peer);
        if let Some((severity, code, message)) = e.client_reply() {
            let mut out = BytesMut::new();
            messages::error_response(&mut out, severity, code, &message);
            let _ = tokio::time::timeout(Duration::from_secs(1), client.stream.write_all(&out)).await;
        }
    }
    shared.metrics.client_connections_closed.increment(1);
}

async fn serve(shared: &Arc<Shared>, client: &mut ClientSide, peer: SocketAddr, id: SessionId) -> Result<(), SessionError> {
    let login = tokio::time::timeout(shared.config.pool.login_timeout, startup::login(shared, client, peer, id))
        .await
        .map_err(|_| SessionError::LoginTimeout)??;
    let Some(startup::LoggedIn { entry, mut desired, cancel }) = login else { return Ok(()) };
    transactions(shared, client, &entry, &mut desired, &cancel).await
}

/// The transaction loop: wait for the client's next message, borrow a backend, relay, return it.
async fn transactions(
    shared: &Arc<Shared>,
    client: &mut ClientSide,
    entry: &Arc<PoolEntry>,
    desired: &mut Settings,
    cancel: &crate::cancel::CancelHandle,
) -> Result<(), SessionError> {
    let max_message = shared.config.pool.max_message_bytes;
    loop {
        if client.buf.is_empty() {
            let read = client.stream.read_buf(&mut client.buf);
            let n = match shared.config.pool.idle_client_timeout {
                Some(t) => tokio::time::timeout(t, read).await.map_err(|_| SessionError::IdleTimeout)?,
                None => read.await,
            };
            match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
        if client.scanner.at_boundary() && client.buf.starts_with(&[b'X', 0, 0, 0, 4]) {
            return Ok(());
        }
        let mut lease = checkout_with_settings(entry, desired).await?;
        cancel.set_target(lease.conn().key);
        let end = relay::relay(client, lease.conn(), desired, &shared.metrics, max_message).await;
        cancel.set_target(None);
        match end.outcome {
            Outcome::TransactionDone => lease.release(),
            Outcome::ClientGone => {
                finish_abandoned(lease, end.backend_clean, end.backend_rollbackable).await;
                return Ok(());
            }
            Outcome::ClientProtocol(e) => {
                finish_abandoned(lease, end.backend_clean, end.backend_rollbackable).await;
                return Err(SessionError::Protocol(e));
            }
            Outcome::BackendGone => {
                lease.discard();
                return Err(SessionError::BackendLost);
            }
            Outcome::BackendProtocol(e) => {
                tracing::error!(error = %e, "backend broke the protocol; closing it");
                lease.discard();
                return Err(SessionError::BackendLost);
            }
        }
    }
}

/// Borrows a backend and brings its session settings in line with the client's.
async fn checkout_with_settings(entry: &PoolEntry, desired: &Settings) -> Result<Lease, SessionError> {
    // A backend that fails the settings query was broken; try a fresh one a couple of times.
    for _ in 0..3 {
        let mut lease = entry.checkout().await.map_err(SessionError::Pool)?;
        let conn = lease.conn();
        let Some(sql) = Settings::sync_sql(&conn.applied, desired) else { return Ok(lease) };
        match conn.simple_query(&sql).await {
            Ok((TxStatus::Idle, None)) => {
                conn.applied = desired.clone();
                return Ok(lease);
            }
            Ok((TxStatus::Idle, Some((code, message)))) => {
                lease.release();
                return Err(SessionError::SettingRejected { code, message });
            }
            Ok(_) => lease.discard(),
            Err(e) => {
                tracing::warn!(error = %e, "backend failed while applying session settings; replacing it");
                lease.discard();
            }
        }
    }
    Err(SessionError::Pool(PoolError::Backend(crate::backend::BackendError::Closed)))
}

/// The client left while holding a backend: keep the backend if it is clean or can be rolled
/// back cleanly, otherwise close it. Never hand a dirty backend to another client.
async fn finish_abandoned(mut lease: Lease, clean: bool, rollbackable: bool) {
    if clean {
        lease.release();
        return;
    }
    if rollbackable {
        let rolled_back = tokio::time::timeout(ROLLBACK_TIMEOUT, lease.conn().simple_query("ROLLBACK")).await;
        if let Ok(Ok((TxStatus::Idle, _))) = rolled_back {
            lease.release();
            return;
        }
    }
    lease.discard();
}

/// Used by `listener` when the client cap is reached.
pub async fn refuse_too_many(mut stream: TcpStream, limit: usize) {
    let mut out = BytesMut::new();
    messages::error_response(
        &mut out,
        messages::Severity::Fatal,
        crate::protocol::SqlState::TOO_MANY_CONNECTIONS.code(),
        &format!("The maximum number of client connections to the proxy exceeded {limit}."),
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&out)).await;
}

impl PoolKey {
    pub fn new(user: &str, database: &str) -> PoolKey {
        PoolKey { user: user.to_owned(), database: database.to_owned() }
    }
}
