//! The transaction relay: while a client holds a backend, bytes flow both ways untouched. The
//! relay only finds message boundaries (by the 5-byte header) and reads the few messages that
//! decide when the transaction is over: it counts the requests that will each end in a
//! ReadyForQuery (Query, Sync, FunctionCall), notes extended-protocol messages not yet followed
//! by Sync, and reads the status of each ReadyForQuery. The backend goes back to the pool when
//! every expected ReadyForQuery has arrived, the last one said idle ('I'), and neither stream is
//! in the middle of a message. It also reads the client's SQL (Query and Parse text, up to
//! [`SQL_READ_LIMIT`]) for what would outlive the transaction ([`session_state`]) and reports
//! it: parameters set, which the session reads back and carries to the client's next backend,
//! and state that keeps the session on this backend.
//!
//! One hand-written poll function drives both directions in the session's task, so a backend
//! that writes while the client writes (COPY, pipelining) cannot deadlock the proxy, and a
//! wake-up costs one pass over two sockets instead of two futures under a `select!`. Each
//! direction reads a chunk, forwards all of it, then reads again: a slow reader holds back its
//! writer, and memory stays bounded by one chunk per direction. Must not: decide what a client
//! is told on failure (the session does), or touch the pool.

mod client;
pub mod prepared;
pub mod session_state;
mod tracked;
mod tracker;

use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;

use crate::backend::BackendConn;
use crate::backend::settings::ClientSettings;
use crate::metrics::Metrics;
use crate::pool::Presented;
use crate::protocol::{MessageScanner, ProtocolError, TxStatus, backend_tag, frontend_tag, read_cstr};
use crate::stream::Stream;
use session_state::PinReason;
pub use client::{ClientSide, Expiry, RelayLimits};
pub use tracked::TrackedClient;
use tracker::Tracker;

/// The longest Query or Parse text the relay reads for session state; a longer one pins its
/// session ([`PinReason::Unread`]). (RDS Proxy pins past 16 KB.)
pub const SQL_READ_LIMIT: usize = 1024 * 1024;

/// Why a relay stopped.
#[derive(Debug)]
pub enum Outcome {
    /// The transaction is over and the backend is idle.
    TransactionDone,
    /// The client closed, failed, or sent Terminate.
    ClientGone,
    /// The client sent a message that breaks the protocol (e.g. a length beyond the cap).
    ClientProtocol(ProtocolError),
    /// The backend closed or failed; the client got whatever the backend said before.
    BackendGone,
    BackendProtocol(ProtocolError),
}

/// How the relay left the backend.
#[derive(Debug)]
pub struct RelayEnd {
    pub outcome: Outcome,
    /// Idle, at a message boundary, nothing outstanding: can be reused as is.
    pub backend_clean: bool,
    /// Nothing outstanding but a transaction is open: a ROLLBACK makes it clean.
    pub backend_rollbackable: bool,
    /// The client now depends on state that lives on this backend (a named prepared
    /// statement, a SET, a temporary table, ...), so the backend must stay with it for the
    /// rest of the session.
    pub pins_session: Option<PinReason>,
    /// Parameters the client set or reset (unless pinned): their values are on this backend
    /// now, and must follow the client to the next.
    pub sets: Vec<String>,
    /// The client ran `RESET ALL`: it returns to its startup settings, but for `after_reset`.
    pub resets_all: bool,
    /// What it set after the last `RESET ALL`, reported parameters included.
    pub after_reset: Vec<String>,
}

/// Chunks moved in one poll before yielding to other sessions (a COPY can stream for minutes).
const CHUNKS_PER_POLL: u32 = 32;

/// One direction's chunk in flight: `buf[sent..end]` still has to be written.
#[derive(Debug, Default)]
struct Forward {
    sent: usize,
    end: usize,
    /// All bytes written, TLS flush still owed.
    flushing: bool,
}

impl Forward {
    fn busy(&self) -> bool {
        self.sent < self.end || self.flushing
    }

    /// Writes what is left; `Ready(Ok(()))` once the chunk is out.
    fn poll_out(&mut self, cx: &mut Context<'_>, to: &mut Stream, buf: &[u8]) -> Poll<std::io::Result<()>> {
        while self.sent < self.end {
            match std::task::ready!(to.poll_write_some(cx, &buf[self.sent..self.end])) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.sent += n;
                    self.flushing = true;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if self.flushing {
            std::task::ready!(to.poll_flush_tls(cx))?;
            self.flushing = false;
        }
        Poll::Ready(Ok(()))
    }
}

struct Relay<'a> {
    client: &'a mut ClientSide,
    backend: &'a mut BackendConn,
    desired: &'a mut ClientSettings,
    metrics: &'a Metrics,
    backend_scanner: MessageScanner,
    to_backend: Forward,
    to_client: Forward,
    /// The client's chunk ends with Terminate: stop once it is forwarded.
    terminate: bool,
    /// The read that started the relay left the client's socket empty (plain TCP, short read).
    client_drained: bool,
    t: Tracker,
    /// `pool.max_prepared_statements` (0: named statements pin the session instead).
    max_statements: usize,
    /// The client's statement names are rewritten ([`prepared`]), so messages are passed on
    /// whole where a name may change (`client.tracked` is set).
    tracked: bool,
    /// This relay's tick on the backend's statements, when tracked.
    now: u64,
    /// Bytes after `to_client`'s chunk held back (the start of a message the relay may drop).
    backend_held: usize,
    /// The client's buffer holds back a message this long (tracked), or all it holds
    /// (`usize::MAX`, see `reset_hold`): not to be read before.
    client_need: usize,
    /// The session keeps this backend (it may hold the client's SQL-level statements).
    session_pinned: bool,
    /// A Query that resets the client's settings (`RESET ALL`, `DISCARD ALL`: Npgsql sends its
    /// next command right behind it) was sent alone (`Tracker::reset_cut`): what the client
    /// sent after it stays in its buffer, and nothing more is read, until the answer, so that
    /// the transaction ends there and the session puts the client's startup settings back on
    /// the backend before the rest runs (in the next one). Released at the answer if the
    /// transaction does not end there.
    reset_hold: bool,
    /// Bytes at the start of the client's buffer the pool already sent (the relay's first
    /// chunk only): a hold cannot start before them.
    presented: usize,
}


/// Relays one transaction (or more, if the client pipelines) between `client` and `backend`.
/// `desired` follows the client's own SET of reported parameters. The first `presented.len`
/// bytes of the client's buffer are already on their way to the backend (the pool sent them).
/// `session_pinned`: the session keeps this backend whatever the relay reports.
pub async fn relay(
    client: &mut ClientSide,
    backend: &mut BackendConn,
    desired: &mut ClientSettings,
    metrics: &Metrics,
    presented: Presented,
    session_pinned: bool,
) -> RelayEnd {
    let limits = client.limits;
    let max_message = limits.max_message_bytes as usize;
    let client_tls = client.stream.is_tls();
    let client_mid_message = !client.scanner.at_boundary();
    let client_drained = client.read_emptied_socket();
    let mut r = Relay {
        client,
        backend,
        desired,
        metrics,
        backend_scanner: MessageScanner::new(max_message),
        to_backend: Forward::default(),
        to_client: Forward::default(),
        terminate: false,
        client_drained,
        max_statements: limits.max_prepared_statements as usize,
        tracked: false,
        now: 0,
        backend_held: 0,
        client_need: 0,
        reset_hold: false,
        presented: presented.len,
        session_pinned,
        t: Tracker {
            pending: 0,
            unsynced: false,
            status: TxStatus::Idle,
            poisoned: false,
            // The request the pool sent reached the database then, not when this task woke.
            request_at: presented.at,
            requests: 0,
            pins_session: None,
            pin_variable_sets: limits.pin_variable_sets,
            sets: Vec::new(),
            resets_all: false,
            after_reset: Vec::new(),
            drops_statements: false,
            client_mid_message,
            awaits_reply: false,
            copy_in: false,
            reset_cut: false,
        },
    };
    if r.client.tracked.is_some() {
        r.start_tracking();
    }
    if presented.len > 0 {
        // Sent as it is: never to be rewritten (the pool does not send a named Parse).
        r.max_statements = 0;
    }
    if let Err(e) = r.take_client_chunk() {
        return r.end(Outcome::ClientProtocol(e), client_tls);
    }
    r.presented = 0;
    if presented.len > 0 {
        r.max_statements = limits.max_prepared_statements as usize;
        r.to_backend.sent = presented.len.min(r.to_backend.end);
        if !r.to_backend.busy() {
            // All of it is out: as if the relay had written it (what a hold keeps stays).
            drop_front(&mut r.client.buf, r.to_backend.end);
            r.to_backend = Forward::default();
        }
    }
    let outcome = std::future::poll_fn(|cx| r.poll(cx)).await;
    r.end(outcome, client_tls)
}

/// Where the client's chunk is cut after a Query ending at `end` that was just booked: right
/// after it if it resets the settings and runs (`Tracker::reset_cut`), unless the pool already
/// sent bytes past it (`presented`).
fn reset_cut(t: &mut Tracker, end: usize, presented: usize) -> Option<usize> {
    (std::mem::take(&mut t.reset_cut) && end >= presented).then_some(end)
}

/// Removes the first `n` bytes of `buf` (all of it, usually: no copy then).
fn drop_front(buf: &mut BytesMut, n: usize) {
    if n >= buf.len() {
        buf.clear();
    } else {
        let len = buf.len();
        buf.copy_within(n..len, 0);
        buf.truncate(len - n);
    }
}

impl Relay<'_> {
    /// Backend → client first: when the answer is in, the transaction can end without looking
    /// at the client's socket at all. A socket that said "not ready" is not asked again in the
    /// same poll (its readiness only changes when the event loop turns; the waker is set).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let (mut backend_dry, mut client_dry, mut backend_full, mut client_full) = (false, false, false, false);
        // Whether the client's socket was emptied by the last read (only the first poll carries
        // it over, from the session's read that started the relay).
        let mut client_drained = std::mem::take(&mut self.client_drained);
        for _ in 0..CHUNKS_PER_POLL {
            let mut progressed = false;

            // Backend → client: read a chunk if none is in flight, then write it out.
            if !self.to_client.busy() && !backend_dry {
                match self.backend.stream.poll_read_some(cx, &mut self.backend.buf) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        progressed = true;
                        if let Err(e) = self.take_backend_chunk() {
                            return Poll::Ready(Outcome::BackendProtocol(e));
                        }
                    }
                    Poll::Ready(_) => return Poll::Ready(Outcome::BackendGone),
                    Poll::Pending => backend_dry = true,
                }
            }
            if self.to_client.busy() && !client_full {
                match self.to_client.poll_out(cx, &mut self.client.stream, &self.backend.buf) {
                    Poll::Ready(Ok(())) => {
                        progressed = true;
                        drop_front(&mut self.backend.buf, self.to_client.end);
                        self.to_client = Forward::default();
                        if self.settled() && self.t.status == TxStatus::Idle {
                            return Poll::Ready(Outcome::TransactionDone);
                        }
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Outcome::ClientGone),
                    Poll::Pending => client_full = true,
                }
            }

            // Client → backend: the same, until the client's Terminate.
            if !self.to_backend.busy() && self.reset_hold && self.t.pending == 0 && !self.to_client.busy() {
                // The reset is answered and the transaction did not end there (the answer came
                // with more of the backend's stream, say): what waited goes on in this one.
                self.reset_hold = false;
                self.client_need = 0;
                progressed = true;
                if let Err(e) = self.take_client_chunk() {
                    return Poll::Ready(Outcome::ClientProtocol(e));
                }
            }
            if !self.to_backend.busy() {
                if self.terminate {
                    self.client.buf.clear();
                    return Poll::Ready(Outcome::ClientGone);
                }
                if !client_dry && client_drained && backend_dry && self.t.awaits_reply && !self.t.copy_in {
                    // The client's last read emptied its socket and ended with a request the
                    // backend must answer (waking this task): asking the client's socket again
                    // now would only register interest tokio has just cleared. The next poll
                    // asks. (Not after COPY data: the backend answers nothing until its end.)
                    client_dry = true;
                }
                if !client_dry && !self.reset_hold {
                    // (Held, nothing more is read: the hold ends with the backend's answer.)
                    match self.client.stream.poll_read_some(cx, &mut self.client.buf) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            progressed = true;
                            client_drained = self.client.read_emptied_socket();
                            if let Err(e) = self.take_client_chunk() {
                                return Poll::Ready(Outcome::ClientProtocol(e));
                            }
                        }
                        Poll::Ready(_) => {
                            if self.t.client_mid_message {
                                self.t.poisoned = true;
                            }
                            return Poll::Ready(Outcome::ClientGone);
                        }
                        Poll::Pending => client_dry = true,
                    }
                }
            }
            if self.to_backend.busy() && !backend_full {
                match self.to_backend.poll_out(cx, &mut self.backend.stream, &self.client.buf) {
                    Poll::Ready(Ok(())) => {
                        progressed = true;
                        drop_front(&mut self.client.buf, self.to_backend.end);
                        self.to_backend = Forward::default();
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Outcome::BackendGone),
                    Poll::Pending => backend_full = true,
                }
            }

            if !progressed {
                return Poll::Pending;
            }
        }
        // Busy for a whole budget: let the other sessions run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Scans what the client sent (the whole buffer) and queues it for the backend.
    fn take_client_chunk(&mut self) -> Result<(), ProtocolError> {
        if self.tracked {
            return self.take_client_chunk_tracked();
        }
        let buf = &self.client.buf;
        if buf.is_empty() || buf.len() < self.client_need {
            return Ok(());
        }
        let t = &mut self.t;
        let presented = self.presented;
        let mut cut = None;
        // A client's first named statement starts tracking (see `prepared`) if nothing is in
        // flight that tracking would not know of.
        let may_track = self.max_statements > 0 && t.pending == 0 && !t.unsynced && !t.client_mid_message;
        let before = (t.pending, t.unsynced, t.pins_session, t.sets.len(), t.resets_all, t.drops_statements, t.after_reset.len());
        let mut track = false;
        let mut forward_to = buf.len();
        let mut terminate = false;
        let mut requests = 0u64;
        let mut last_tag = 0u8;
        let reads_sql = |tag, len| (tag == frontend_tag::QUERY || tag == frontend_tag::PARSE) && len <= SQL_READ_LIMIT;
        self.client.scanner.feed(buf, reads_sql, |f| {
            if terminate || track || cut.is_some() {
                return;
            }
            last_tag = f.tag;
            if f.tag == frontend_tag::TERMINATE {
                terminate = true;
                forward_to = t.terminate_at(f.start);
                return;
            }
            if f.tag == frontend_tag::PARSE && may_track && f.body.first().is_some_and(|&b| b != 0) {
                track = true;
                return;
            }
            requests += u64::from(t.client_message(f.tag, f.body, false));
            cut = reset_cut(t, f.end, presented);
        })?;
        if track {
            // Read again from the chunk's start, tracked.
            (t.pending, t.unsynced, t.pins_session) = (before.0, before.1, before.2);
            t.sets.truncate(before.3);
            (t.resets_all, t.drops_statements) = (before.4, before.5);
            // (A RESET ALL in the chunk cleared it: scanned again, it clears it again.)
            t.after_reset.truncate(before.6);
            self.client.scanner = MessageScanner::new(self.client.scanner.max_body());
            let mut tracked = Box::<TrackedClient>::default();
            // What this relay passed on before was not read for settings (`SET LOCAL`, ...).
            tracked.settings_unsure_if(self.t.requests > 0);
            self.client.tracked = Some(tracked);
            self.start_tracking();
            return self.take_client_chunk_tracked();
        }
        if self.t.drops_statements {
            // (Untracked, nothing is rewritten: forgetting them by the chunk is in time.)
            self.t.drops_statements = false;
            self.backend.statements.forget_all();
        }
        if let Some(at) = cut {
            forward_to = at;
            self.hold_after_reset();
        }
        self.after_client_chunk(requests, last_tag, terminate, false);
        self.to_backend = Forward { sent: 0, end: forward_to, flushing: false };
        Ok(())
    }

    /// What follows a settings reset in the client's buffer waits for its answer (see
    /// `reset_hold`); it starts at a message boundary, where a new scanner reads it later.
    fn hold_after_reset(&mut self) {
        self.client.scanner = MessageScanner::new(self.client.scanner.max_body());
        self.client_need = usize::MAX;
        self.reset_hold = true;
    }

    /// Books what a client chunk asked for once it is scanned.
    fn after_client_chunk(&mut self, requests: u64, last_tag: u8, terminate: bool, held: bool) {
        let t = &mut self.t;
        t.requests += requests;
        if requests > 0 && t.request_at.is_none() {
            t.request_at = Some(Instant::now());
        }
        t.client_mid_message = !terminate && !self.client.scanner.at_boundary();
        t.awaits_reply = !terminate
            && !held
            && !t.client_mid_message
            && matches!(last_tag, frontend_tag::QUERY | frontend_tag::SYNC | frontend_tag::FUNCTION_CALL);
        self.terminate = terminate;
    }

    /// Scans what the backend sent and queues it for the client.
    fn take_backend_chunk(&mut self) -> Result<(), ProtocolError> {
        let t = &mut self.t;
        let now = Instant::now();
        if let Some(at) = t.request_at.take() {
            self.metrics.query_database_response_latency.record(now.saturating_duration_since(at));
        }
        self.backend.last_active = now;
        let desired = &mut *self.desired;
        let applied = &mut self.backend.applied;
        let mut rewriter = match (self.tracked, self.client.tracked.as_deref_mut()) {
            (true, Some(client)) => Some(client.rewriter(&mut self.backend.statements, self.max_statements, self.now, None)),
            _ => None,
        };
        // Answers to messages the relay added, taken out of the stream (byte ranges).
        let mut drops: Vec<(usize, usize)> = Vec::new();
        let mut error = None;
        let mut bad_status = false;
        self.backend_scanner.feed(
            &self.backend.buf,
            |tag, _| tag == backend_tag::READY_FOR_QUERY || tag == backend_tag::PARAMETER_STATUS,
            |f| {
                if let Some(rw) = rewriter.as_mut() {
                    match (rw.answer(f.tag), f.start) {
                        (Ok(prepared::Answer::Pass), _) => {}
                        (Ok(prepared::Answer::Drop), Some(start)) => drops.push((start, f.end)),
                        (Ok(prepared::Answer::Drop), None) => error = Some(ProtocolError::Malformed("an answer to drop split")),
                        (Err(e), _) => error = Some(e),
                    }
                    // Queries the backend skipped after an extended-protocol error owe nothing.
                    t.pending = t.pending.saturating_sub(rw.pipeline.take_skipped_requests());
                }
                match f.tag {
                    backend_tag::READY_FOR_QUERY => {
                        t.copy_in = false;
                        t.pending = t.pending.saturating_sub(1);
                        match f.body.first().copied().and_then(TxStatus::from_byte) {
                            Some(s) => t.status = s,
                            None => bad_status = true,
                        }
                    }
                    backend_tag::COPY_IN_RESPONSE => {
                        t.copy_in = true;
                        // (Untracked, the Syncs the backend ignores stay counted: the relay then
                        // never ends and the backend stays with its client, the safe side.)
                        if let Some(rw) = rewriter.as_mut() {
                            t.pending = t.pending.saturating_sub(rw.copy_started());
                        }
                    }
                    backend_tag::COPY_BOTH_RESPONSE => t.copy_in = true,
                    backend_tag::ERROR_RESPONSE => {
                        if t.copy_in
                            && let Some(rw) = rewriter.as_mut()
                        {
                            rw.pipeline.copy_failed();
                        }
                        t.copy_in = false;
                    }
                    backend_tag::COMMAND_COMPLETE => t.copy_in = false,
                    backend_tag::PARAMETER_STATUS => {
                        if let Ok((name, rest)) = read_cstr(f.body) {
                            if let Ok((value, _)) = read_cstr(rest) {
                                if desired.track_reported(name, value) {
                                    applied.track_reported(name, value);
                                }
                            }
                        }
                    }
                    _ => {}
                }
            },
        )?;
        if bad_status {
            return Err(ProtocolError::Malformed("ReadyForQuery without a valid status"));
        }
        if let Some(e) = error {
            return Err(e);
        }
        let end = if self.tracked { tracked::cut(&mut self.backend_scanner, &mut self.backend.buf, &drops) } else { self.backend.buf.len() };
        self.backend_held = self.backend.buf.len() - end;
        self.to_client = Forward { sent: 0, end, flushing: false };
        Ok(())
    }

    /// Nothing owed in either direction and both streams at a message boundary.
    fn settled(&self) -> bool {
        let t = &self.t;
        t.pending == 0
            && !t.unsynced
            && !t.poisoned
            && self.backend_held == 0
            && !self.to_backend.busy()
            && !t.client_mid_message
            && self.backend_scanner.at_boundary()
    }

    fn end(self, outcome: Outcome, client_tls: bool) -> RelayEnd {
        let metrics = self.metrics;
        if let Some(tracked) = self.client.tracked.as_deref_mut() {
            let counts = tracked.relay_ended();
            metrics.prepared_client_parses.increment(counts.client_parses);
            metrics.prepared_backend_parses.increment(counts.backend_parses);
            metrics.prepared_evictions.increment(counts.evictions);
        }
        metrics.query_requests.increment(self.t.requests);
        if client_tls {
            metrics.query_requests_tls.increment(self.t.requests);
        } else {
            metrics.query_requests_no_tls.increment(self.t.requests);
        }
        // (A chunk only partly written to the backend leaves it mid-message: not settled.)
        let quiet = self.settled();
        let status = self.t.status;
        RelayEnd {
            pins_session: self.t.pins_session,
            sets: self.t.sets,
            resets_all: self.t.resets_all,
            after_reset: self.t.after_reset,
            backend_clean: quiet && status == TxStatus::Idle && matches!(outcome, Outcome::TransactionDone | Outcome::ClientGone),
            backend_rollbackable: quiet
                && status != TxStatus::Idle
                && matches!(outcome, Outcome::ClientGone | Outcome::ClientProtocol(_)),
            outcome,
        }
    }
}
