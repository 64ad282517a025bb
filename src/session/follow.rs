//! Carrying what a client set from backend to backend. After a transaction that set parameters
//! the relay could not see the values of (`SET statement_timeout`, `set_config(...)`), or ran
//! `RESET ALL`, the values are read back from the backend (one query) and become the client's
//! settings and this backend's: the client's next backend gets them, and this backend's next
//! client gets its own. `RESET ALL` returns the client to the settings it logged in with, as on
//! PostgreSQL (the backend's own reset values are the ones pgwarden logged in with): the backend
//! is brought back to them at once (in a session pinned to its backend too), and the client is
//! told what it reports meanwhile. Must not: decide whether the session pins (the caller does,
//! from [`Readback`]).

use bytes::BytesMut;

use super::ROLLBACK_TIMEOUT;
use crate::backend::BackendConn;
use crate::backend::settings::{ClientSettings, Settings};
use crate::protocol::TxStatus;
use crate::relay::session_state::MAX_FOLLOWED_SETTINGS;

/// How reading back a client's parameters went.
pub(super) enum Readback {
    /// Recorded as the client's settings and this backend's.
    Followed,
    /// The database could not say (an error, an unknown name), or the client has more settings
    /// than are carried: the backend is clean but keeps the values; the caller pins.
    Unreadable,
    /// The backend failed or stopped answering: it must go.
    Broken,
}

/// Reads back the values of the parameters the client set (or reset) and makes them the
/// client's settings and this backend's.
pub(super) async fn follow_sets(conn: &mut BackendConn, desired: &mut ClientSettings, names: &[String]) -> Readback {
    let new = names.iter().filter(|n| desired.now().get(n).is_none()).count();
    if desired.now().len() + new > MAX_FOLLOWED_SETTINGS {
        return Readback::Unreadable;
    }
    let values = match read_back(conn, names).await {
        Ok(values) => values,
        Err(r) => return r,
    };
    let settings = desired.change();
    for (name, value) in names.iter().zip(values) {
        settings.set(name, &value);
        conn.applied.set(name, &value);
    }
    Readback::Followed
}

/// After a transaction that ran `RESET ALL`: reads back what the client sets or carries, what
/// this backend has applied and what the client logged in with, each with whether it is at the
/// value RESET gives (the RESET ALL may have rolled back). The client keeps what it set after
/// the last `RESET ALL` (`after_reset`) and values the reset did not change, and otherwise
/// returns to its startup values, as on PostgreSQL; this backend is brought to them at once,
/// and what it reports as it changes (ParameterStatus, in the server's spelling) goes into
/// `tell`, for the client, once the backend is given back.
pub(super) async fn follow_reset_all(
    conn: &mut BackendConn,
    desired: &mut ClientSettings,
    sets: &[String],
    after_reset: &[String],
    tell: &mut BytesMut,
) -> Readback {
    if sets.len() > MAX_FOLLOWED_SETTINGS || after_reset.len() > MAX_FOLLOWED_SETTINGS {
        return Readback::Unreadable;
    }
    let startup = desired.startup().clone();
    let before = desired.now().clone();
    let mut names: Vec<String> = Vec::new();
    let carried = before.iter().chain(conn.applied.iter()).chain(startup.iter()).map(|(n, _)| n);
    for name in sets.iter().chain(after_reset).map(String::as_str).chain(carried) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        return Readback::Followed;
    }
    let row = match read_row(conn, &Settings::read_back_with_reset_sql(&names), 2 * names.len()).await {
        Ok(row) => row,
        Err(r) => return r,
    };
    let mut applied = Settings::default();
    let mut now = Settings::default();
    for (name, pair) in names.iter().zip(row.chunks(2)) {
        let Some(value) = pair[0].as_deref() else { return Readback::Unreadable };
        applied.set(name, value);
        // (pg_settings does not list custom parameters: RESET empties those. A parameter set
        // before the RESET ALL to the value RESET gives looks reset either way.)
        let at_reset = pair[1].as_deref().map_or(value.is_empty(), |b| b == "t");
        let kept = if after_reset.contains(name) || !at_reset { Some(value) } else { startup.get(name) };
        if let Some(kept) = kept {
            now.set(name, kept);
        }
    }
    conn.applied = applied;
    if now.len() > MAX_FOLLOWED_SETTINGS + startup.len() {
        return Readback::Unreadable;
    }
    *desired.change() = now;
    let Some(sync) = Settings::sync_sql(&conn.applied, desired.now()) else { return Readback::Followed };
    match tokio::time::timeout(ROLLBACK_TIMEOUT, conn.simple_query_reporting(&sync, tell)).await {
        Ok(Ok((TxStatus::Idle, None))) => {
            conn.applied = desired.now().clone();
            Readback::Followed
        }
        // (A startup value the database takes at login but refuses now: the backend is in an
        // unknown state, and so is what the client was told.)
        _ => {
            tell.clear();
            Readback::Broken
        }
    }
}

/// The current values of `names` on the backend, or how the read failed.
async fn read_back(conn: &mut BackendConn, names: &[String]) -> Result<Vec<String>, Readback> {
    let values = read_row(conn, &Settings::read_back_sql(names), names.len()).await?;
    // (NULL: a custom parameter reset out of existence; keep the backend rather than guess.)
    values.into_iter().collect::<Option<Vec<String>>>().ok_or(Readback::Unreadable)
}

/// The one row of `columns` values `sql` returns, or how the read failed.
async fn read_row(conn: &mut BackendConn, sql: &str, columns: usize) -> Result<Vec<Option<String>>, Readback> {
    match tokio::time::timeout(ROLLBACK_TIMEOUT, conn.query_row(sql)).await {
        Ok(Ok((TxStatus::Idle, Some(row)))) if row.len() == columns => Ok(row),
        Ok(Ok((TxStatus::Idle, _))) => Err(Readback::Unreadable),
        _ => Err(Readback::Broken),
    }
}
