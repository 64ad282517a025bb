//! Everything that can end a client session, and what the client is told about it.

use std::net::SocketAddr;

use thiserror::Error;

use super::SessionId;
use crate::auth::AuthError;
use crate::auth::iam::IamFailure;
use crate::auth::scram::ScramError;
use crate::net::ReadError;
use crate::pool::PoolError;
use crate::protocol::messages::Severity;
use crate::protocol::{ProtocolError, SqlState};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("client I/O error: {0}")]
    Io(#[source] std::io::Error),
    #[error("client protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("no user name in startup packet")]
    NoUser,
    #[error("unsupported startup option {0}")]
    UnsupportedOption(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("login did not finish in time")]
    LoginTimeout,
    #[error("client idle for longer than idle_client_timeout")]
    IdleTimeout,
    #[error("client connected for longer than client_max_lifetime")]
    LifetimeReached,
    #[error("pgwarden is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Pool(PoolError),
    #[error("database refused a client setting: {code} {message}")]
    SettingRejected { code: String, message: String },
    #[error("backend connection lost during a transaction")]
    BackendLost,
    #[error("TLS handshake with the client failed: {0}")]
    TlsHandshake(#[source] std::io::Error),
    #[error("IAM authentication for {user} refused: {}", failure.error)]
    IamRefused { user: String, failure: IamFailure },
}

impl From<ReadError> for SessionError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Closed => SessionError::ClientClosed,
            ReadError::Io(e) => SessionError::Io(e),
            ReadError::Protocol(e) => SessionError::Protocol(e),
        }
    }
}

impl SessionError {
    /// What to send the client before closing, if it can still read it.
    pub fn client_reply(&self) -> Option<(Severity, &str, String)> {
        let fatal = |code: SqlState, msg: String| Some((Severity::Fatal, code.code(), msg));
        match self {
            SessionError::ClientClosed | SessionError::Io(_) => None,
            SessionError::Protocol(e) => fatal(e.sqlstate(), e.to_string()),
            SessionError::NoUser => {
                fatal(SqlState::INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet".into())
            }
            SessionError::UnsupportedOption(o) => fatal(
                SqlState::FEATURE_NOT_SUPPORTED,
                format!("Feature not supported: pgwarden currently doesn't support the option {o}."),
            ),
            SessionError::Auth(AuthError::UnknownUser(user)) => fatal(
                SqlState::INVALID_AUTHORIZATION,
                format!("This RDS proxy has no credentials for the role {user}. Check the credentials for this role and try again."),
            ),
            SessionError::Auth(AuthError::BadPassword(user)) => {
                fatal(SqlState::INVALID_PASSWORD, format!("password authentication failed for user \"{user}\""))
            }
            SessionError::Auth(AuthError::Scram(ScramError::BadProof)) => {
                fatal(SqlState::INVALID_PASSWORD, "password authentication failed".into())
            }
            SessionError::Auth(AuthError::Scram(e)) => fatal(SqlState::PROTOCOL_VIOLATION, e.to_string()),
            SessionError::Auth(AuthError::IamWithoutTls(_)) => {
                fatal(SqlState::INVALID_AUTHORIZATION, "IAM authentication is allowed only with SSL connections.".into())
            }
            SessionError::Auth(AuthError::TlsRequired) => fatal(
                SqlState::INVALID_AUTHORIZATION,
                "This proxy accepts only TLS connections. Connect with sslmode=require.".into(),
            ),
            SessionError::IamRefused { user, failure } => fatal(
                if failure.error.is_authorization() { SqlState::INVALID_AUTHORIZATION } else { SqlState::INVALID_PASSWORD },
                format!("The IAM authentication failed for the role {user}. Check the IAM token for this role and try again."),
            ),
            // The handshake failed: the client cannot read a plaintext message any more.
            SessionError::TlsHandshake(_) => None,
            SessionError::LoginTimeout => fatal(SqlState::CONNECTION_FAILURE, "authentication timed out".into()),
            SessionError::IdleTimeout => {
                fatal(SqlState::IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout".into())
            }
            SessionError::ShuttingDown => {
                fatal(SqlState::ADMIN_SHUTDOWN, "terminating connection due to administrator command".into())
            }
            // 57P01, as for a shutdown: drivers and pools treat it as "this connection is gone,
            // open another" (and retry an idempotent statement there).
            SessionError::LifetimeReached => fatal(
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection: it reached the proxy's client connection lifetime".into(),
            ),
            SessionError::Pool(e) => fatal(e.sqlstate(), e.client_message()),
            SessionError::SettingRejected { code, message } => Some((Severity::Fatal, code.as_str(), message.clone())),
            SessionError::BackendLost => fatal(
                SqlState::CONNECTION_FAILURE,
                "The database connection was lost during the transaction.".into(),
            ),
        }
    }

    pub fn log(&self, id: SessionId, peer: SocketAddr) {
        match self {
            SessionError::ClientClosed | SessionError::Io(_) | SessionError::ShuttingDown | SessionError::LifetimeReached => {
                tracing::debug!(session = id.0, %peer, error = %self, "session ended")
            }
            SessionError::Auth(_)
            | SessionError::IamRefused { .. }
            | SessionError::TlsHandshake(_)
            | SessionError::Protocol(_)
            | SessionError::NoUser
            | SessionError::UnsupportedOption(_) => {
                tracing::info!(session = id.0, %peer, error = %self, "client refused")
            }
            _ => tracing::warn!(session = id.0, %peer, error = %self, "session failed"),
        }
    }
}
