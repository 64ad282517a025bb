//! The rotator's database side: logging in with a secret version's credential (host, port and
//! database from the secret, as the templates do) and the SQL that sets a password, always
//! sent as a SCRAM-SHA-256 verifier so the plaintext never reaches the server or its logs.

use std::time::Duration;

use secrecy::ExposeSecret;

use super::{RotationError, SecretValue};
use crate::backend::{BackendConn, BackendError, connect_as};
use crate::config::{BackendTlsMode, DatabaseConfig};
use crate::protocol::TxStatus;
use crate::tls::BackendTls;

/// Logs in as `login`, to the database `target` names (host, port, dbname; `"ssl": true`
/// asks for TLS).
pub(super) async fn open(login: &SecretValue, target: &SecretValue) -> Result<BackendConn, BackendError> {
    let port = match target.0.get("port") {
        Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    let ssl = matches!(target.0.get("ssl"), Some(serde_json::Value::Bool(true))) || target.str("ssl") == Some("true");
    let db = DatabaseConfig {
        host: target.str("host").or(login.str("host")).unwrap_or("localhost").to_owned(),
        port: port.unwrap_or(5432),
        dbname: target.str("dbname").unwrap_or("postgres").to_owned(),
        tls: if ssl { BackendTlsMode::Require } else { BackendTlsMode::Disable },
        ca_file: None,
        connect_timeout: Duration::from_secs(10),
        tcp_keepalive: None,
        target_session_attrs: crate::config::SessionAttrs::Any,
    };
    let tls = BackendTls::new(&db).map_err(|e| BackendError::Tls(std::io::Error::other(e.to_string())))?;
    connect_as(&db, tls.as_ref(), &db.dbname, &login.credential()).await
}

pub(super) async fn can_log_in(secret: &SecretValue) -> bool {
    open(secret, secret).await.is_ok()
}

/// `"name"` with inner quotes doubled.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with inner quotes doubled (standard_conforming_strings is on since PostgreSQL 9.1).
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Sets the pending user's password. With `clone_of`, creates the user first if it does not
/// exist, as a member of `clone_of` (the alternating-users template's CREATE ROLE ... IN ROLE).
pub(super) async fn set_password(conn: &mut BackendConn, pending: &SecretValue, clone_of: Option<&str>) -> Result<(), RotationError> {
    let verifier = postgres_protocol::password::scram_sha_256(pending.password().expose_secret().as_bytes());
    let user = pending.username();
    // A role may change its own password, not its other attributes: PASSWORD only.
    let alter = format!("ALTER ROLE {} WITH PASSWORD {}", ident(user), literal(&verifier));
    let sql = match clone_of {
        None => alter,
        Some(base) => format!(
            "DO $pgwarden$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {}) THEN {alter}; \
             ELSE CREATE ROLE {} WITH LOGIN PASSWORD {} IN ROLE {}; END IF; END $pgwarden$",
            literal(user),
            ident(user),
            literal(&verifier),
            ident(base)
        ),
    };
    run(conn, &sql, "the password change").await
}

pub(super) async fn run(conn: &mut BackendConn, sql: &str, what: &'static str) -> Result<(), RotationError> {
    match conn.simple_query(sql).await? {
        (TxStatus::Idle, None) => Ok(()),
        (_, Some((code, message))) => Err(RotationError::Sql { what, code, message }),
        (_, None) => Err(RotationError::Sql { what, code: String::new(), message: "left a transaction open".into() }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(super::ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(super::literal("it's"), "'it''s'");
    }
}
