//! Sans-io PostgreSQL wire protocol: the handshake codes, message tags, length caps, the startup
//! packet, the few messages pgwarden synthesizes, and a streaming scanner that finds message
//! boundaries in a byte stream without copying or decoding bodies.
//!
//! Owns: every byte layout the proxy relies on. Must not: touch sockets, tokio, AWS or pools.

pub mod error;
pub mod messages;
pub mod scanner;
pub mod startup;

pub use error::{ProtocolError, SqlState};
pub use scanner::{Frame, MessageScanner};
pub use startup::{StartupRequest, parse_startup};

/// Request codes carried in place of a protocol version in the first packet.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol 3.0; 3.2 (PostgreSQL 17+) is answered with NegotiateProtocolVersion down to 3.0.
pub const PROTOCOL_3_0: i32 = 196_608;

/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Cap on authentication messages (SASL, password); a 100 KB "password" is refused.
pub const MAX_AUTH_MESSAGE_LEN: usize = 16 * 1024;

/// Frontend (client → backend) tags the relay looks at.
pub mod frontend_tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const FLUSH: u8 = b'H';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    pub const PASSWORD: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
}

/// Backend (backend → client) tags the relay looks at.
pub mod backend_tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
}

/// Transaction status carried by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// Reads a NUL-terminated string from `buf`, returning it and the rest.
pub(crate) fn read_cstr(buf: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let end = buf.iter().position(|&b| b == 0).ok_or(ProtocolError::Malformed("unterminated string"))?;
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| ProtocolError::Malformed("string is not UTF-8"))?;
    Ok((s, &buf[end + 1..]))
}
