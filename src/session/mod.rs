//! One client connection from accept to close: the startup handshake, authentication, then the
//! loop that borrows a backend for each transaction and relays it. This is the only module that
//! turns errors into what the client sees (an ErrorResponse with a SQLSTATE and a message that
//! names no secret); details go to the log.

mod authenticate;
mod error;
mod follow;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::stream::{Stream, send};

use crate::backend::settings::{ClientSettings, Settings};
use crate::listener::Shared;
use crate::metrics::GaugeGuard;
use crate::pool::{Lease, PoolEntry, PoolError, Presented};
use crate::protocol::{MessageScanner, TxStatus, messages};
use crate::relay::session_state::PinReason;
use crate::relay::{self, ClientSide, Outcome};
pub use error::SessionError;
use follow::{Readback, follow_reset_all, follow_sets};

/// A session's id, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionId(pub u64);

const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Stands in for "no idle timeout" (a year; re-armed if ever reached).
const FAR_FUTURE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Runs one client connection to completion. Never panics on client input; every failure ends
/// in an ErrorResponse (when the client can still read one) and a log line.
pub async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: SessionId) {
    let _open = GaugeGuard::new(&shared.metrics.client_connections);
    shared.metrics.client_connections_received.increment(1);
    let _ = stream.set_nodelay(true);
    let _ = crate::net::set_keepalive(&stream, shared.config.tcp_keepalive);
    let limits = shared.session_defaults.limits();
    let mut client = ClientSide {
        stream: Stream::Plain(stream),
        buf: BytesMut::new(),
        scanner: MessageScanner::new(limits.max_message_bytes as usize),
        tracked: None,
        limits,
        expires: shared.session_defaults.client_lifetime().and_then(|l| relay::Expiry::after(std::time::Instant::now(), l)),
    };
    let login = Box::pin(tokio::time::timeout(
        shared.session_defaults.login(),
        startup::login(&shared, &mut client, peer, id),
    ))
    .await;
    let result = match login {
        Err(_) => Err(SessionError::LoginTimeout),
        Ok(Err(e)) => Err(e),
        // A cancel request: nothing more to do on this connection.
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(startup::LoggedIn { entry, desired, cancel }))) => {
            let mut desired = ClientSettings::new(desired);
            transactions(&shared, &mut client, &entry, &mut desired, &cancel).await
        }
    };
    if let Err(e) = result {
        e.log(id, peer);
        Box::pin(reply_error(&mut client.stream, &e)).await;
    }
    shared.metrics.client_connections_closed.increment(1);
}

/// Sends the client the ErrorResponse for `e`, if it can still read one.
async fn reply_error(stream: &mut Stream, e: &SessionError) {
    if let Some((severity, code, message)) = e.client_reply() {
        let mut out = BytesMut::new();
        messages::error_response(&mut out, severity, code, &message);
        let _ = tokio::time::timeout(Duration::from_secs(1), send(stream, &out)).await;
    }
}

/// The transaction loop: wait for the client's next message, borrow a backend, relay, return it.
async fn transactions(
    shared: &Arc<Shared>,
    client: &mut ClientSide,
    entry: &Arc<PoolEntry>,
    desired: &mut ClientSettings,
    cancel: &crate::cancel::CancelHandle,
) -> Result<(), SessionError> {
    // One timer per session, re-armed lazily: it fires at most once per `idle_client_timeout`
    // while the client is busy, instead of being registered and cleared on every transaction.
    let limit = shared.session_defaults.idle_client();
    let mut idle_since = tokio::time::Instant::now();
    let mut idle_timer = std::pin::pin!(tokio::time::sleep_until(idle_deadline(client, idle_since, limit, idle_since)));
    // Polled once per deadline: the timer keeps this task's waker until it fires, so later
    // waits read whether it has fired (an atomic load) instead of polling it again.
    let mut timer_armed = false;
    // (`idle_since`: when the client's last transaction ended, from the relay's last clock
    // read, not a new one.)
    // Polled once, at the first idle wait: from then on the drain holds this task's waker
    // (a task's waker does not change) and wakes it; later waits read the flag, which costs no
    // lock, instead of polling the future again.
    let mut drain = std::pin::pin!(shared.drain.started_wait());
    let mut drain_registered = false;
    loop {
        if shared.drain.started() {
            return Err(SessionError::ShuttingDown);
        }
        if client.buf.is_empty() {
            // An idle client holds no read buffer: wait for readability, then take one.
            if client.buf.capacity() > 0 {
                crate::bufpool::give(std::mem::take(&mut client.buf));
            }
            let n = loop {
                let wake = std::future::poll_fn(|cx| {
                    use std::future::Future;
                    use std::task::Poll;
                    if let Poll::Ready(n) = client.stream.poll_idle_read(cx, &mut client.buf) {
                        return Poll::Ready(IdleWake::Read(n));
                    }
                    if shared.drain.started() {
                        return Poll::Ready(IdleWake::Drain);
                    }
                    if !drain_registered {
                        drain_registered = true;
                        if drain.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(IdleWake::Drain);
                        }
                    }
                    if timer_armed {
                        return if idle_timer.is_elapsed() { Poll::Ready(IdleWake::Timer) } else { Poll::Pending };
                    }
                    timer_armed = true;
                    idle_timer.as_mut().poll(cx).map(|()| IdleWake::Timer)
                })
                .await;
                match wake {
                    IdleWake::Read(n) => break n,
                    IdleWake::Drain => return Err(SessionError::ShuttingDown),
                    IdleWake::Timer => {
                        timer_armed = false;
                        let now = tokio::time::Instant::now();
                        if client.expired(now.into_std()) {
                            return Err(SessionError::LifetimeReached);
                        }
                        if limit.is_some_and(|limit| now.saturating_duration_since(idle_since) >= limit) {
                            return Err(SessionError::IdleTimeout);
                        }
                        idle_timer.as_mut().reset(idle_deadline(client, idle_since, limit, now));
                    }
                }
            };
            match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
        if client.scanner.at_boundary() && client.buf.starts_with(&[b'X', 0, 0, 0, 4]) {
            return Ok(());
        }
        // Boxed: a borrowed backend is large, and only a client in a transaction should pay for it.
        match Box::pin(transaction(shared, client, entry, desired, cancel)).await? {
            Next::WaitForClient(ended) if client.expired(ended) => return Err(SessionError::LifetimeReached),
            Next::WaitForClient(ended) => idle_since = tokio::time::Instant::from_std(ended),
            Next::Close => return Ok(()),
        }
    }
}

/// When the idle client's timer is next due: at its idle timeout (counted from `idle_since`) or
/// at the end of its connection's lifetime, whichever is first (a year from `now` if neither).
fn idle_deadline(
    client: &ClientSide,
    idle_since: tokio::time::Instant,
    limit: Option<Duration>,
    now: tokio::time::Instant,
) -> tokio::time::Instant {
    let idle = limit.map_or(now + FAR_FUTURE, |limit| idle_since + limit);
    client.expires.map_or(idle, |e| idle.min(tokio::time::Instant::from_std(e.instant())))
}

/// What ended an idle client's wait.
enum IdleWake {
    Read(std::io::Result<usize>),
    Drain,
    Timer,
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// The transaction ended at this instant; the client is idle now.
    WaitForClient(std::time::Instant),
    Close,
}

/// One borrow: check a backend out, relay until the transaction ends, give the backend back
/// (or roll it back, or close it).
async fn transaction(
    shared: &Arc<Shared>,
    client: &mut ClientSide,
    entry: &Arc<PoolEntry>,
    desired: &mut ClientSettings,
    cancel: &crate::cancel::CancelHandle,
) -> Result<Next, SessionError> {
    let max_message = client.scanner.max_body();
    let (mut lease, mut presented) = checkout_with_settings(entry, desired, client, max_message, cancel).await?;
    if presented.len == 0 {
        // (Else the hand-over that sent the request pointed the key there already.)
        cancel.set_target(lease.conn().key);
    }
    let mut pinned: Option<GaugeGuard> = None;
    // ParameterStatus for the client once the backend is back in the pool, or before a pinned
    // session waits again (see follow_reset_all).
    let mut tell = BytesMut::new();
    let result = loop {
        let end = relay::relay(client, lease.conn(), desired, &shared.metrics, std::mem::take(&mut presented), pinned.is_some()).await;
        let mut pins = end.pins_session;
        let done = matches!(end.outcome, Outcome::TransactionDone);
        let readback = if done && end.resets_all {
            // Pinned or not, the client returns to the settings it logged in with.
            Some(Box::pin(follow_reset_all(lease.conn(), desired, &end.sets, &end.after_reset, &mut tell)).await)
        } else if (!end.sets.is_empty() || end.resets_all) && pins.is_none() && pinned.is_none() {
            // Parameters the client set: carried to its next backend if they can be read back
            // now; else (or if the client is leaving) the backend keeps them, pinned, and is
            // reset when the session ends.
            Some(if done { Box::pin(follow_sets(lease.conn(), desired, &end.sets)).await } else { Readback::Unreadable })
        } else {
            None
        };
        match readback {
            Some(Readback::Unreadable) => pins = pins.or(Some(PinReason::Set)),
            Some(Readback::Broken) => {
                lease.discard();
                break Err(SessionError::BackendLost);
            }
            Some(Readback::Followed) | None => {}
        }
        if let Some(reason) = pins
            && pinned.is_none()
        {
            // RDS Proxy's rule: state that lives on one backend pins the session to it.
            tracing::debug!(reason = reason.label(), "session pinned to its backend until it ends");
            shared.metrics.session_pins(reason).increment(1);
            pinned = Some(GaugeGuard::new(&shared.metrics.database_connections_currently_session_pinned));
        }
        match end.outcome {
            Outcome::TransactionDone if pinned.is_some() => {
                if !tell.is_empty() && !Box::pin(tell_client(&mut client.stream, &mut tell)).await {
                    Box::pin(finish_abandoned(lease, true, false, true)).await;
                    break Ok(Next::Close);
                }
                let wake = if shared.drain.started() {
                    PinnedWake::Drain
                } else if client.expired(lease.conn().last_active) {
                    PinnedWake::Expired
                } else if client.buf.is_empty() {
                    // Boxed: pinned sessions are the rare case.
                    Box::pin(pinned_idle(shared, client, lease.conn())).await
                } else {
                    PinnedWake::Ready
                };
                let end = match wake {
                    PinnedWake::Ready => continue,
                    PinnedWake::ClientGone => Ok(Next::Close),
                    PinnedWake::Drain => Err(SessionError::ShuttingDown),
                    // The backend it pins is freed too, as RDS Proxy's IdleClientTimeout does.
                    PinnedWake::IdleTimeout => Err(SessionError::IdleTimeout),
                    PinnedWake::Expired => Err(SessionError::LifetimeReached),
                };
                // Between transactions: clean, only its session state to clear.
                Box::pin(finish_abandoned(lease, true, false, true)).await;
                break end;
            }
            Outcome::TransactionDone => {
                let ended = lease.conn().last_active;
                lease.release();
                if !tell.is_empty() && !Box::pin(tell_client(&mut client.stream, &mut tell)).await {
                    break Ok(Next::Close);
                }
                break Ok(Next::WaitForClient(ended));
            }
            Outcome::ClientGone => {
                Box::pin(finish_abandoned(lease, end.backend_clean, end.backend_rollbackable, pinned.is_some())).await;
                break Ok(Next::Close);
            }
            Outcome::ClientProtocol(e) => {
                let pinned = pinned.is_some();
                Box::pin(finish_abandoned(lease, end.backend_clean, end.backend_rollbackable, pinned)).await;
                break Err(SessionError::Protocol(e));
            }
            Outcome::BackendGone => {
                lease.discard();
                break Err(SessionError::BackendLost);
            }
            Outcome::BackendProtocol(e) => {
                tracing::error!(error = %e, "backend broke the protocol; closing it");
                lease.discard();
                break Err(SessionError::BackendLost);
            }
        }
    };
    cancel.set_target(None);
    result
}

/// Sends the client what the backend reported as it took the client's settings back (after a
/// RESET ALL), if anything; false if it could not take it all (part of a message written breaks
/// the client's stream: the session ends). Callers look at `tell` first: boxing this future for
/// every transaction cost an allocation, and `tell` is nearly always empty.
async fn tell_client(stream: &mut Stream, tell: &mut BytesMut) -> bool {
    if tell.is_empty() {
        return true;
    }
    let told = tokio::time::timeout(ROLLBACK_TIMEOUT, send(stream, tell)).await;
    tell.clear();
    matches!(told, Ok(Ok(())))
}

/// What ended a pinned session's wait between transactions.
enum PinnedWake {
    /// The client sent something (now in its buffer), or the backend did: back to the relay.
    Ready,
    ClientGone,
    Drain,
    IdleTimeout,
    /// The client's connection reached `client_max_lifetime`.
    Expired,
}

/// A pinned session between transactions, its client silent. The relay would wait on both
/// sockets by itself; this also hears the shutdown drain and keeps `idle_client_timeout`
/// (a pinned client holds a backend: left idle, it must not hold it forever; so the timeout is
/// read anew each time, and a reload reaches pinned sessions too). Wakes when the
/// client sends something (read into its buffer), when the backend does (a notification, or
/// its end: the relay forwards or reports it), when the drain starts, or at the timeout.
async fn pinned_idle(shared: &Shared, client: &mut ClientSide, backend: &mut crate::backend::BackendConn) -> PinnedWake {
    use std::future::Future;
    use std::task::Poll;
    let mut drain = std::pin::pin!(shared.drain.started_wait());
    let limit = shared.session_defaults.idle_client();
    let now = tokio::time::Instant::now();
    let mut idle = std::pin::pin!(tokio::time::sleep_until(idle_deadline(client, now, limit, now)));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = client.stream.poll_read_some(cx, &mut client.buf) {
            return Poll::Ready(if matches!(r, Ok(n) if n > 0) { PinnedWake::Ready } else { PinnedWake::ClientGone });
        }
        if backend.stream.tcp().is_some_and(|tcp| tcp.poll_read_ready(cx).is_ready()) {
            return Poll::Ready(PinnedWake::Ready);
        }
        if drain.as_mut().poll(cx).is_ready() {
            return Poll::Ready(PinnedWake::Drain);
        }
        while idle.as_mut().poll(cx).is_ready() {
            if client.expired(std::time::Instant::now()) {
                return Poll::Ready(PinnedWake::Expired);
            }
            if limit.is_some() {
                return Poll::Ready(PinnedWake::IdleTimeout);
            }
            // (Neither is set: a year passed. Wait another.)
            idle.as_mut().reset(tokio::time::Instant::now() + FAR_FUTURE);
        }
        Poll::Pending
    })
    .await
}

/// Borrows a backend and brings its session settings in line with the client's. Also returns
/// what of the client's request the pool already sent (see `pool::Request`).
async fn checkout_with_settings<'p>(
    entry: &'p Arc<PoolEntry>,
    desired: &mut ClientSettings,
    client: &mut ClientSide,
    max_message: usize,
    cancel: &crate::cancel::CancelHandle,
) -> Result<(Lease<'p>, Presented), SessionError> {
    // A backend that fails the settings query was broken; try a fresh one a couple of times.
    for _ in 0..3 {
        // (A tracked client's request is rewritten by its relay: the pool cannot send it as is.)
        let at_boundary = client.scanner.at_boundary() && client.tracked.is_none();
        let request = crate::pool::Request { bytes: &mut client.buf, at_boundary, max_message, settings: desired.lend(), cancel };
        let (mut lease, presented) = entry.checkout_for(Some(request)).await.map_err(SessionError::Pool)?;
        if presented.len > 0 {
            // Sent only to a backend whose settings already matched.
            return Ok((lease, presented));
        }
        let conn = lease.conn();
        let Some(sql) = Settings::sync_sql(&conn.applied, desired.now()) else { return Ok((lease, Presented::default())) };
        // Boxed: settings change rarely, and this keeps every transaction's future small.
        match Box::pin(conn.simple_query(&sql)).await {
            Ok((TxStatus::Idle, None)) => {
                conn.applied = desired.now().clone();
                return Ok((lease, Presented::default()));
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
/// back cleanly, otherwise close it. A pinned session's backend holds the client's named
/// prepared statements: `DISCARD ALL` clears them (and every other session state) first.
/// Never hand a dirty backend to another client.
async fn finish_abandoned(mut lease: Lease<'_>, clean: bool, rollbackable: bool, pinned: bool) {
    let mut cleanup: Vec<&str> = Vec::new();
    if !clean {
        if !rollbackable {
            lease.discard();
            return;
        }
        cleanup.push("ROLLBACK");
    }
    if pinned {
        cleanup.push("DISCARD ALL");
    }
    for sql in cleanup {
        match tokio::time::timeout(ROLLBACK_TIMEOUT, lease.conn().simple_query(sql)).await {
            Ok(Ok((TxStatus::Idle, None))) => {}
            _ => {
                lease.discard();
                return;
            }
        }
    }
    if pinned {
        // Back to the login defaults: the next client's settings are re-sent as needed.
        lease.conn().applied = Settings::default();
        lease.conn().statements.clear();
    }
    lease.release();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle client costs its session task; the bench holds that under 2 KiB per client.
    /// Large states (login, a borrowed backend, the relay) must stay boxed, out of this size.
    /// Budget: 1 KiB, plus 64 bytes for the idle wait's registration with the shutdown drain.
    #[test]
    fn session_future_stays_small() {
        let size = future_size::<Arc<Shared>, TcpStream, SocketAddr, SessionId, _>(run);
        assert!(size <= 1024 + 64, "session future grew to {size} bytes");
    }

    fn future_size5<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Each transaction's future is boxed (moved to the heap) once per transaction: the rare,
    /// large paths (backend connect, settings query, rollback) must stay boxed out of it.
    #[test]
    fn transaction_future_stays_small() {
        let size = future_size5::<
            &'static Arc<Shared>,
            &'static mut ClientSide,
            &'static Arc<PoolEntry>,
            &'static mut ClientSettings,
            &'static crate::cancel::CancelHandle,
            _,
        >(transaction);
        assert!(size <= 2048, "transaction future grew to {size} bytes");
    }
}
