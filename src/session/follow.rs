//! Carrying what a client set from backend to backend. After a transaction that set parameters
//! the relay could not see the values of (`SET statement_timeout`, `set_config(...)`), or ran
//! `RESET ALL`, the values are read back from the backend (one query) and become the client's
//! settings and this backend's: the client's next backend gets them, and this backend's next
//! client gets its own. `RESET ALL` returns the client to the settings it logged in with, as on
//! PostgreSQL (the backend's own reset values are the ones pgwarden logged in with), and the
//! client is told of each reported parameter that then differs from what the backend told it.
//! Must not: decide whether the session pins (the caller does, from [`Readback`]).

use bytes::BytesMut;

use super::ROLLBACK_TIMEOUT;
use crate::backend::BackendConn;
use crate::backend::settings::{ClientSettings, Settings, is_tracked_reported, reported_name};
use crate::protocol::{TxStatus, messages};
use crate::relay::session_state::MAX_FOLLOWED_SETTINGS;
use crate::stream::{Stream, send};

/// How reading back a client's parameters went.
pub(super) enum Readback {
    /// Recorded as the client's settings and this backend's.
    Followed,
    /// The database could not say (an error, an unknown name), or the client has more settings
    /// than are carried: the backend is clean but keeps the values; the caller pins.
    Unreadable,
    /// The backend failed or stopped answering: it must go.
    Broken,
    /// The client did not take what it was told (the backend is clean; the session ends).
    ClientLost,
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

/// After a transaction that ran `RESET ALL`: reads back everything the client carries, this
/// backend has applied or the client logged in with; the backend's settings are what was read,
/// the client's are what it set after the last `RESET ALL` (`set_after`) and otherwise its
/// startup values. Tells the client (ParameterStatus, between transactions, as a server does
/// after a configuration reload) where a reported parameter now differs from what it was told.
pub(super) async fn follow_reset_all(
    conn: &mut BackendConn,
    desired: &mut ClientSettings,
    set_after: &[String],
    client: &mut Stream,
) -> Readback {
    let startup = desired.startup().clone();
    // Reported parameters: what the backend told the client during the transaction; the rest:
    // what the client had before it.
    let before = desired.now().clone();
    let mut names = set_after.to_vec();
    for (name, _) in before.iter().chain(conn.applied.iter()).chain(startup.iter()) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    if names.len() > 2 * MAX_FOLLOWED_SETTINGS + startup.len() {
        return Readback::Unreadable;
    }
    let sql = Settings::read_back_with_reset_sql(&names);
    let row = match tokio::time::timeout(ROLLBACK_TIMEOUT, conn.query_row(&sql)).await {
        Ok(Ok((TxStatus::Idle, Some(row)))) if row.len() == 2 * names.len() => row,
        Ok(Ok((TxStatus::Idle, _))) => return Readback::Unreadable,
        _ => return Readback::Broken,
    };
    let mut applied = Settings::default();
    let mut now = Settings::default();
    let mut tell = BytesMut::new();
    for (name, pair) in names.iter().zip(row.chunks(2)) {
        let (Some(value), reset) = (pair[0].as_deref(), pair[1].as_deref()) else {
            return Readback::Unreadable;
        };
        applied.set(name, value);
        // Whether the RESET ALL took here (its transaction may have rolled back): the value is
        // the one RESET gives, or (where that is unknown) not the one before.
        let reset_took = reset.map_or(before.get(name) != Some(value), |r| r == value);
        let kept = if set_after.contains(name) || !reset_took { Some(value) } else { startup.get(name) };
        if let Some(kept) = kept {
            now.set(name, kept);
            if kept != value && is_tracked_reported(name) {
                messages::parameter_status(&mut tell, reported_name(name), kept);
            }
        }
    }
    conn.applied = applied;
    *desired.change() = now;
    // (Part of a message written would break the client's stream: the session ends then.)
    if !tell.is_empty() && !matches!(tokio::time::timeout(ROLLBACK_TIMEOUT, send(client, &tell)).await, Ok(Ok(()))) {
        return Readback::ClientLost;
    }
    Readback::Followed
}

/// The current values of `names` on the backend, or how the read failed.
async fn read_back(conn: &mut BackendConn, names: &[String]) -> Result<Vec<String>, Readback> {
    let sql = Settings::read_back_sql(names);
    let values = match tokio::time::timeout(ROLLBACK_TIMEOUT, conn.query_row(&sql)).await {
        Ok(Ok((TxStatus::Idle, Some(values)))) if values.len() == names.len() => values,
        Ok(Ok((TxStatus::Idle, _))) => return Err(Readback::Unreadable),
        _ => return Err(Readback::Broken),
    };
    // (NULL: a custom parameter reset out of existence; keep the backend rather than guess.)
    values.into_iter().collect::<Option<Vec<String>>>().ok_or(Readback::Unreadable)
}
