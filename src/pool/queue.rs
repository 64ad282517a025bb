//! A client's place in a pool's queue: the request it lends while it waits ([`Request`], kept
//! as a [`Deposit`] with what of it may be sent early), its slot ([`Wait`]) that whoever
//! releases or opens a connection settles under the slot's own lock, the hand-over's early send
//! ([`presend`]), and [`Waiting`], the client's side of the slot (poll, withdraw, leave).
//! Must not: decide who is served next (the pool's `put` and `let_one_open` do).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::BytesMut;

use super::{PoolEntry, lock};
use crate::backend::BackendConn;
use crate::backend::settings::Settings;
use crate::cancel::{CancelHandle, CancelTarget};
use crate::protocol::{MessageScanner, frontend_tag};

/// What a client has to send first, lent to the pool while it waits (see the module doc).
pub struct Request<'a> {
    /// The client's read buffer: the request starts at its first byte.
    pub bytes: &'a mut BytesMut,
    /// Whether the buffer starts at a message boundary (else none of it may be sent early).
    pub at_boundary: bool,
    /// The message length cap, for measuring what may be sent: see [`presendable`].
    pub max_message: usize,
    pub settings: &'a mut Settings,
    /// Where the client's cancel key points: at the backend its request is sent to.
    pub cancel: &'a CancelHandle,
}

/// What the hand-over to a waiting client did with its request: the first `len` bytes went to
/// the backend at `at` (when the database started on it, for the response-latency metric; none
/// when nothing was sent).
#[derive(Clone, Copy, Debug, Default)]
pub struct Presented {
    pub len: usize,
    pub at: Option<Instant>,
}

/// A waiting client's request, in its place in the queue.
pub(super) struct Deposit {
    pub(super) bytes: BytesMut,
    pub(super) presend: Presend,
    /// The client's settings (moved here while it waits, like the bytes).
    pub(super) settings: Settings,
    pub(super) cancel: CancelTarget,
}

/// A client waiting for a connection, as the queue sees it.
pub(super) enum Wait {
    Waiting(Option<Waker>, Option<Deposit>),
    /// A released connection, handed over, with what of the request was already written to it.
    Served(Box<BackendConn>, Option<Deposit>, Presented),
    /// A connection closed: there is room to open one.
    MayOpen(Option<Deposit>),
    /// The borrow timeout passed (told by the pool's queue timer).
    TimedOut(Option<Deposit>),
    /// The client stopped waiting (timed out, or left); skipped by whoever pops it.
    Gone,
}

/// What of a waiting client's request may be sent by whoever releases a connection to it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Presend {
    /// The prefix of whole messages before any Terminate ('X').
    pub(super) len: usize,
    /// The prefix is all the client sent, and ends with a request the backend answers (Query,
    /// Sync, FunctionCall): once it is sent, the client has nothing to do until that answer.
    pub(super) awaits_answer: bool,
}

/// Measures [`Presend`] for `buf`: nothing unless `buf` starts at a message boundary; nothing
/// from a length out of bounds on (the relay reports that, not the pool).
fn presendable(buf: &[u8], at_boundary: bool, max_body: usize) -> Presend {
    let mut p = Presend { len: 0, awaits_answer: false };
    if !at_boundary {
        return p;
    }
    // Boundaries and length checks as the relay finds them; this scanner only measures (the
    // relay scans the same bytes again with the session's own).
    let mut terminated = false;
    let mut named = false;
    let mut after_reset = false;
    let wants_body = |tag, _| tag == frontend_tag::PARSE || tag == frontend_tag::QUERY;
    let _ = MessageScanner::new(max_body).feed(buf, wants_body, |f| {
        // What follows a settings reset waits for its answer (the relay's `reset_hold`).
        terminated |= f.tag == frontend_tag::TERMINATE || after_reset;
        after_reset = f.tag == frontend_tag::QUERY && may_reset(f.body);
        // A named statement's Parse is the relay's to rewrite (or to pin for): nothing is sent.
        named |= f.tag == frontend_tag::PARSE && f.body.first() != Some(&0);
        if !terminated {
            p.len = f.end;
            p.awaits_answer =
                matches!(f.tag, frontend_tag::QUERY | frontend_tag::SYNC | frontend_tag::FUNCTION_CALL);
        }
    });
    p.awaits_answer &= p.len == buf.len();
    if named {
        return Presend { len: 0, awaits_answer: false };
    }
    p
}

pub(super) type Waiter = Arc<Mutex<Wait>>;

/// A client's new place in the queue, nothing in it yet.
pub(super) fn new_waiter() -> Waiter {
    Arc::new(Mutex::new(Wait::Waiting(None, None)))
}

/// Whether a Query's text starts with `RESET` or `DISCARD` (a first look: the relay reads it
/// properly).
fn may_reset(body: &[u8]) -> bool {
    let sql = body.trim_ascii_start();
    let starts = |word: &[u8]| sql.get(..word.len()).is_some_and(|w| w.eq_ignore_ascii_case(word));
    starts(b"reset") || starts(b"discard")
}

/// Writes a waiting client's request to the connection it is handed, if the connection's
/// settings already match the client's (else the client syncs them first) and the socket takes
/// it now. Returns the bytes sent; the client's relay sends the rest.
pub(super) fn presend(conn: &BackendConn, d: &Deposit) -> usize {
    if d.presend.len == 0 || Settings::sync_sql(&conn.applied, &d.settings).is_some() {
        return 0;
    }
    conn.stream.write_now(&d.bytes[..d.presend.len]).unwrap_or(0)
}

/// A client in the queue. Dropped before it was served (the session went away), it leaves the
/// queue; if a connection or the room to open one reached it meanwhile, it passes them on, and
/// the request it lent comes back to the session.
pub(super) struct Waiting<'p, 'r> {
    pool: &'p PoolEntry,
    w: Option<Waiter>,
    /// The lent request: its buffer and settings go back here.
    home: Option<Request<'r>>,
}

impl<'p, 'r> Waiting<'p, 'r> {
    pub(super) fn new(pool: &'p PoolEntry, w: Waiter, request: Option<Request<'r>>) -> Self {
        let mut home = request;
        // Lent only if nobody served the slot yet (another thread may have, since it queued).
        if let (Some(r), Wait::Waiting(_, slot)) = (home.as_mut(), &mut *lock(&w)) {
            // Measured only now: a client served at once never needs it.
            let presend = presendable(r.bytes, r.at_boundary, r.max_message);
            *slot = Some(Deposit {
                bytes: std::mem::take(r.bytes),
                presend,
                settings: std::mem::take(r.settings),
                cancel: r.cancel.target(),
            });
        }
        Waiting { pool, w: Some(w), home }
    }

    /// The request, back in the client's hands, once the wait is settled.
    pub(super) fn into_request(mut self) -> Option<Request<'r>> {
        debug_assert!(self.w.is_none(), "the wait is settled before the request is taken back");
        self.home.take()
    }

    /// Leaves the queue now; returns the connection handed over meanwhile, if one was.
    pub(super) fn withdraw(&mut self) -> Option<(Box<BackendConn>, Presented)> {
        let w = self.w.take()?;
        let was = std::mem::replace(&mut *lock(&w), Wait::Gone);
        match was {
            Wait::Served(conn, deposit, presented) => {
                self.give_back(deposit);
                Some((conn, presented))
            }
            Wait::MayOpen(deposit) => {
                self.give_back(deposit);
                self.pool.forget_one();
                None
            }
            Wait::Waiting(_, deposit) | Wait::TimedOut(deposit) => {
                self.give_back(deposit);
                None
            }
            Wait::Gone => None,
        }
    }

    fn give_back(&mut self, deposit: Option<Deposit>) {
        if let (Some(d), Some(home)) = (deposit, self.home.as_mut()) {
            *home.bytes = d.bytes;
            *home.settings = d.settings;
        }
    }

    /// `Some(Ok)`: a connection, with what of the request was sent; `Some(Err)`: room to open one
    /// (already counted as open); `None`: the borrow timeout passed. Whoever settles the slot
    /// does so under its lock, so a connection handed over is never lost to the timeout.
    pub(super) fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<(Box<BackendConn>, Presented), ()>>> {
        let Some(w) = self.w.as_ref() else { return Poll::Pending };
        let mut slot = lock(w);
        let outcome = match std::mem::replace(&mut *slot, Wait::Gone) {
            Wait::Served(conn, deposit, presented) => (deposit, Some(Ok((conn, presented)))),
            Wait::MayOpen(deposit) => (deposit, Some(Err(()))),
            Wait::TimedOut(deposit) => (deposit, None),
            Wait::Waiting(waker, deposit) => {
                let waker = match waker {
                    Some(old) if old.will_wake(cx.waker()) => old,
                    _ => cx.waker().clone(),
                };
                *slot = Wait::Waiting(Some(waker), deposit);
                return Poll::Pending;
            }
            Wait::Gone => return Poll::Pending,
        };
        drop(slot);
        self.w = None;
        self.give_back(outcome.0);
        Poll::Ready(outcome.1)
    }
}

impl Drop for Waiting<'_, '_> {
    fn drop(&mut self) {
        let Some(w) = self.w.take() else { return };
        let was = std::mem::replace(&mut *lock(&w), Wait::Gone);
        match was {
            Wait::Served(conn, deposit, presented) => {
                self.give_back(deposit);
                // A request already on its way: nobody will read the answer.
                if presented.len > 0 { self.pool.close(conn) } else { self.pool.put(conn) }
            }
            Wait::MayOpen(deposit) => {
                self.give_back(deposit);
                self.pool.forget_one();
            }
            Wait::Waiting(_, deposit) | Wait::TimedOut(deposit) => self.give_back(deposit),
            Wait::Gone => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::{Presend, presendable};
    use crate::protocol::messages;

    fn p(len: usize, awaits_answer: bool) -> Presend {
        Presend { len, awaits_answer }
    }

    #[test]
    fn presendable_is_whole_messages_before_any_terminate() {
        let mut q = BytesMut::new();
        messages::query(&mut q, "SELECT 1");
        let mut two = q.clone();
        messages::query(&mut two, "SELECT 2");
        assert_eq!(presendable(&two, true, 1024), p(two.len(), true));
        let mut then_x = q.clone();
        messages::terminate(&mut then_x);
        assert_eq!(presendable(&then_x, true, 1024), p(q.len(), false), "never the Terminate");
        assert_eq!(presendable(&q[..q.len() - 1], true, 1024), p(0, false), "not a partial message");
        let mut and_part = q.clone();
        and_part.extend_from_slice(&q[..3]);
        assert_eq!(presendable(&and_part, true, 1024), p(q.len(), false), "more of the client's to come");
        assert_eq!(presendable(&q, false, 1024), p(0, false), "not from the middle of a message");
        let mut huge = q.clone();
        huge.extend_from_slice(&[b'Q', 0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(presendable(&huge, true, 1024), p(q.len(), false), "a bad length is left to the relay");
    }

    #[test]
    fn only_a_request_the_backend_answers_awaits_an_answer() {
        // Parse (unnamed statement, "SELECT 1", no parameter types), then Sync.
        let body = b"\0SELECT 1\0\0\0";
        let mut parse_only = BytesMut::from(&[b'P'][..]);
        parse_only.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        parse_only.extend_from_slice(body);
        assert_eq!(presendable(&parse_only, true, 1024), p(parse_only.len(), false), "no Sync yet");
        let mut synced = parse_only.clone();
        synced.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        assert_eq!(presendable(&synced, true, 1024), p(synced.len(), true));
        let body = b"s1\0SELECT 1\0\0\0";
        let mut named = BytesMut::from(&[b'P'][..]);
        named.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        named.extend_from_slice(body);
        named.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        assert_eq!(presendable(&named, true, 1024), p(0, false), "a named statement is the relay's");
    }
}
