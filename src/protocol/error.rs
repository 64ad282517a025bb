//! Protocol errors and the SQLSTATE codes pgwarden sends to clients.

use thiserror::Error;

/// A SQLSTATE code. Only the constants below are ever sent, so clients can rely on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    pub const INVALID_CATALOG_NAME: SqlState = SqlState("3D000");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState("42P05");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState("25P02");

    pub fn code(&self) -> &'static str {
        self.0
    }
}

/// What can be wrong with bytes a peer sent. Never carries the bytes themselves.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message length {len} is outside the allowed range (max {max})")]
    BadLength { len: i64, max: usize },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("unexpected message type {tag:?} ({context})")]
    UnexpectedTag { tag: char, context: &'static str },
    #[error("prepared statement name is already in use")]
    DuplicateStatement,
    #[error("more than 10000 named prepared statements, or 32 MiB of them, in one session")]
    TooManyStatements,
}

impl ProtocolError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ProtocolError::UnsupportedVersion { .. } => SqlState::FEATURE_NOT_SUPPORTED,
            ProtocolError::DuplicateStatement => SqlState::DUPLICATE_PREPARED_STATEMENT,
            ProtocolError::TooManyStatements => SqlState::PROGRAM_LIMIT_EXCEEDED,
            _ => SqlState::PROTOCOL_VIOLATION,
        }
    }
}
