//! Backend connections: TCP connect, login with the pool's credential (SCRAM-SHA-256 with keys
//! derived once per credential, md5 or cleartext, as the backend asks), the server parameters and cancel key the backend reports,
//! the session settings applied on top of them, and small utility queries (settings sync,
//! rollback). Must not: authenticate clients or decide which client gets a connection.

mod login;
pub mod scram;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use thiserror::Error;
use crate::stream::{Stream, send};

use crate::credentials::{Generation, LoginFingerprint, Stage};
use crate::net::{ReadError, read_message};
use crate::protocol::{ProtocolError, SqlState, TxStatus, messages};

pub use login::{connect, connect_as};
pub use settings::Settings;

/// A backend's process id, as Postgres reports it in BackendKeyData.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendPid(pub i32);

/// What is needed to cancel a query running on a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendKey {
    pub addr: SocketAddr,
    pub pid: BackendPid,
    pub secret: i32,
}

/// Cap on messages read outside the relay (login, utility queries).
const MAX_CONTROL_MESSAGE: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, #[source] source: std::io::Error },
    #[error("timed out connecting or logging in to the database")]
    Timeout,
    #[error("database refused the credential for {user} (tried {tried})")]
    AuthRejected { user: String, tried: String },
    #[error("database refused the connection: {code} {message}")]
    Refused { code: String, message: String },
    #[error("database asked for an authentication method pgwarden does not support: {0}")]
    UnsupportedAuth(&'static str),
    #[error("backend connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend closed the connection")]
    Closed,
    #[error("the database does not accept TLS, and database.tls asks for it")]
    TlsRefused,
    #[error("TLS handshake with the database failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("backend protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the database is {state}, and database.target_session_attrs is {want}")]
    NotTarget { state: &'static str, want: &'static str },
}

impl From<ReadError> for BackendError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Closed => BackendError::Closed,
            ReadError::Io(e) => BackendError::Io(e),
            ReadError::Protocol(e) => BackendError::Protocol(e),
        }
    }
}

impl BackendError {
    /// The SQLSTATE a client should see for this failure. A refusal the client can act on keeps
    /// the database's own code (as PgBouncer passes it on): too many connections and "the
    /// database is starting up or shutting down" (both worth a retry), a database that does not
    /// exist. Anything else is a connection failure.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            BackendError::AuthRejected { .. } => SqlState::INVALID_PASSWORD,
            BackendError::Refused { code, .. } => match code.as_str() {
                "53300" => SqlState::TOO_MANY_CONNECTIONS,
                "57P03" => SqlState::CANNOT_CONNECT_NOW,
                "3D000" => SqlState::INVALID_CATALOG_NAME,
                _ => SqlState::CONNECTION_FAILURE,
            },
            _ => SqlState::CONNECTION_FAILURE,
        }
    }

    /// A message safe to show a client (no addresses, no credential details).
    pub fn client_message(&self) -> String {
        match self {
            BackendError::AuthRejected { user, .. } => format!(
                "This RDS proxy has no valid credentials for the role {user}. Check the credentials for this role and try again."
            ),
            BackendError::Refused { message, .. } => message.clone(),
            BackendError::NotTarget { state, .. } => format!(
                "The database server is {state}, not the writer: after a failover its address may not have moved yet. Try again."
            ),
            _ => "pgwarden could not connect to the database.".into(),
        }
    }

    pub fn is_auth_failure(&self) -> bool {
        matches!(self, BackendError::AuthRejected { .. })
    }
}

/// One logged-in backend connection.
pub struct BackendConn {
    pub stream: Stream,
    /// Read buffer; empty whenever the connection is idle.
    pub buf: BytesMut,
    pub key: Option<BackendKey>,
    /// ParameterStatus values reported at login.
    pub server_params: Vec<(String, String)>,
    /// Session settings applied on top of the login defaults.
    pub applied: Settings,
    pub generation: Generation,
    pub stage: Stage,
    /// Which (user, password) logged this connection in.
    pub fingerprint: LoginFingerprint,
    pub created: Instant,
    /// When the backend last sent something (or logged in): idle since then, once back in the
    /// pool. Set by the relay from the clock read it already makes per answer.
    pub last_active: Instant,
    /// This connection's own max lifetime (the configured one, less a random stagger).
    pub lifetime: Option<Duration>,
    /// Keeps the DatabaseConnections gauge counting this connection while it lives.
    pub open_guard: Option<crate::metrics::GaugeGuard>,
    /// Keeps DatabaseConnectionsWithTLS counting this connection, if it is encrypted.
    pub tls_guard: Option<crate::metrics::GaugeGuard>,
    /// Keeps its pool's count of logged-in connections counting this one while it lives.
    pub live_guard: Option<LiveGuard>,
    /// Clients' named prepared statements this connection holds (see `relay::prepared`).
    pub statements: crate::relay::prepared::BackendStatements,
}

/// Counts a connection in a shared count for as long as it lives (wherever it is: idle, lent,
/// or on its way between the two).
pub struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    pub fn new(count: &Arc<AtomicUsize>) -> LiveGuard {
        count.fetch_add(1, Ordering::Relaxed);
        LiveGuard(Arc::clone(count))
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn").field("pid", &self.key.map(|k| k.pid.0)).field("generation", &self.generation).finish()
    }
}

impl BackendConn {
    /// True if the backend closed or sent something unprompted while idle (a FATAL from
    /// `pg_terminate_backend`, say). Costs at most one non-blocking read.
    pub fn is_closed_or_dirty(&mut self) -> bool {
        match &self.stream {
            Stream::Plain(tcp) => {
                let mut probe = [0u8; 1];
                !matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
            // A TLS record may carry no data (a session ticket): read through rustls, into the
            // connection's own (empty, idle) buffer, and call it dirty only if data came out.
            _ => {
                let dirty = !matches!(self.stream.read_now(&mut self.buf), None);
                dirty || !self.buf.is_empty()
            }
        }
    }

    pub fn expired(&self, now: Instant, idle_timeout: Option<Duration>) -> bool {
        let too_old = self.lifetime.is_some_and(|l| now.duration_since(self.created) >= l);
        let idle_too_long = idle_timeout.is_some_and(|t| now.duration_since(self.last_active) >= t);
        too_old || idle_too_long
    }

    /// Runs a simple query to completion, discarding its rows. Returns the transaction status
    /// and the first error the backend reported, if any.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(TxStatus, Option<(String, String)>), BackendError> {
        self.simple_query_reporting(sql, &mut BytesMut::new()).await
    }

    /// [`Self::simple_query`], also appending every ParameterStatus the backend sent, whole, to
    /// `reports` (to pass on to the client whose settings the query applied).
    pub async fn simple_query_reporting(
        &mut self,
        sql: &str,
        reports: &mut BytesMut,
    ) -> Result<(TxStatus, Option<(String, String)>), BackendError> {
        let mut first_error = None;
        let status = self
            .exchange(sql, |tag, body| {
                match tag {
                    b'E' if first_error.is_none() => {
                        let (code, message) = messages::parse_error_fields(body);
                        first_error = Some((code.unwrap_or_default(), message.unwrap_or_default()));
                    }
                    b'S' => {
                        reports.put_u8(tag);
                        reports.put_i32(4 + body.len() as i32);
                        reports.put_slice(body);
                    }
                    _ => {}
                }
                Ok(())
            })
            .await?;
        Ok((status, first_error))
    }

    /// Runs a query that returns one row of text values (`SELECT a, b`) and returns that row,
    /// or `None` if the database answered with an error (or no row).
    pub async fn query_row(&mut self, sql: &str) -> Result<(TxStatus, Option<Vec<Option<String>>>), BackendError> {
        let (mut row, mut failed) = (None, false);
        let status = self
            .exchange(sql, |tag, body| {
                match tag {
                    b'E' => failed = true,
                    b'D' if row.is_none() => row = Some(data_row(body).ok_or(ProtocolError::Malformed("DataRow"))?),
                    _ => {}
                }
                Ok(())
            })
            .await?;
        Ok((status, if failed { None } else { row }))
    }

    /// Sends one simple Query and reads the answer up to its ReadyForQuery, handing every message
    /// before it to `each`; returns the ReadyForQuery's transaction status.
    async fn exchange(
        &mut self,
        sql: &str,
        mut each: impl FnMut(u8, &[u8]) -> Result<(), ProtocolError>,
    ) -> Result<TxStatus, BackendError> {
        let mut out = BytesMut::new();
        messages::query(&mut out, sql);
        send(&mut self.stream, &out).await?;
        loop {
            let (tag, body) = read_message(&mut self.stream, &mut self.buf, MAX_CONTROL_MESSAGE).await?;
            if tag == b'Z' {
                let status = body.first().copied().and_then(TxStatus::from_byte);
                return Ok(status.ok_or(ProtocolError::Malformed("ReadyForQuery without a valid status"))?);
            }
            each(tag, &body)?;
        }
    }

    /// Sends Terminate and drops the socket; errors are irrelevant at this point.
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        messages::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(1), send(&mut self.stream, &out)).await;
    }
}

/// A DataRow's columns as text (`None` for NULL); `None` if the body is malformed.
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let (count, mut rest) = body.split_first_chunk::<2>()?;
    let mut values = Vec::new();
    for _ in 0..i16::from_be_bytes(*count) {
        let (len, after) = rest.split_first_chunk::<4>()?;
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            values.push(None);
            rest = after;
            continue;
        }
        let (value, after) = after.split_at_checked(len as usize)?;
        values.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = after;
    }
    Some(values)
}

#[cfg(test)]
mod tests {
    use super::data_row;

    #[test]
    fn data_row_reads_text_and_null_and_refuses_short_bodies() {
        let body = [&[0, 2][..], &[0, 0, 0, 3], b"1ms", &[0xff, 0xff, 0xff, 0xff]].concat();
        assert_eq!(data_row(&body), Some(vec![Some("1ms".to_owned()), None]));
        assert_eq!(data_row(&body[..8]), None, "a value cut short");
        assert_eq!(data_row(&[0, 1, 0x7f, 0xff, 0xff, 0xff]), None, "a length past the end");
        assert_eq!(data_row(&[0]), None);
    }
}
