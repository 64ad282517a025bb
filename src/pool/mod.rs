//! Backend pools, one per (user, database): the idle connections (last in, first out, so a
//! few warm connections serve a light load and the rest age out), the fair FIFO queue of clients
//! waiting for one, and the count of connections open or being opened, capped at
//! `max_backend_connections`. A released connection goes straight to the longest-waiting client;
//! a closed one lets the next waiting client open a new one. A client that opens a connection
//! (because the pool has room, or one closed) stays in the queue too, and takes whichever comes
//! first: its own login or a released connection (the login then goes to the next client), so a
//! cold pool serves its first burst with the connections already open, and a connection retired
//! under load (rotation, max lifetime) costs nobody a wait for a login. A login that fails while
//! other connections are open leaves its client waiting for those and holds new logins back for
//! `backend_login_retry_delay`. Room across pools (`max_total_backend_connections`) is the
//! [`budget`]'s, taken before a connection opens. [`manager`] opens connections and says which must retire;
//! [`queue`] is a client's place in the queue; [`upkeep`] runs the queue timer and the janitor
//! (idle eviction, `min_idle`); [`pools`] finds or creates the pool of a (user, database) and
//! applies a reload. Must not: authenticate clients or touch client sockets.
//!
//! Built here rather than on deadpool (which pgwarden used first): a checkout is on every
//! transaction's path, and deadpool's (semaphore, async recycle hooks, object metrics, moves of
//! the object) cost ~2,000 instructions per transaction against ~300 here (callgrind,
//! bench/RESULTS.md). The queue never waits under a lock; one timer per pool ends the waits
//! that time out (all clients wait the same borrow timeout, so the front deadline is the next).
//!
//! A waiting client leaves its first request with its place in the queue ([`Request`]); whoever
//! releases a connection to it sends that request on the spot (when the connection's settings
//! already match), as PgBouncer does, so the database starts on it at once instead of one trip
//! through the event loop's run queue later (measured: 80 µs with 32 clients, 400 µs with 300).
//! When that sends the whole request, the client is left asleep with its waker on the backend's
//! socket: the answer wakes it, and the hand-over costs it no trip through the run queue.

mod budget;
mod manager;
mod pools;
mod queue;
mod report;
mod upkeep;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::backend::{BackendConn, BackendError};
use crate::config::LiveDuration;
use crate::credentials::{Generation, LoginFingerprint};
use crate::metrics::Metrics;
use crate::protocol::SqlState;
use budget::Budget;
use manager::BackendManager;
pub use queue::{Presented, Request};
use queue::{Wait, Waiter, Waiting, new_waiter, presend};
pub use pools::Pools;

/// Which pool a client's transactions go to. Every field that changes what a backend may do
/// is part of the key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
}

impl PoolKey {
    pub fn new(user: &str, database: &str) -> PoolKey {
        PoolKey { user: user.to_owned(), database: database.to_owned() }
    }
}

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("timed out waiting for a backend connection")]
    BorrowTimeout,
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl PoolError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::BorrowTimeout => SqlState::TOO_MANY_CONNECTIONS,
            PoolError::Backend(e) => e.sqlstate(),
        }
    }

    pub fn client_message(&self) -> String {
        match self {
            PoolError::BorrowTimeout => "Timed-out waiting to acquire database connection.".into(),
            PoolError::Backend(e) => e.client_message(),
        }
    }
}


struct State {
    idle: Vec<Box<BackendConn>>,
    /// Connections open or being opened (idle + lent + opening).
    open: usize,
    /// Waiting clients with their borrow deadlines. Every client waits the same borrow
    /// timeout, so deadlines come in queue order: one timer, for the front, serves them all.
    waiting: VecDeque<Queued>,
    /// A login failed while other connections were open: until then, no new one is started
    /// while any is (room that frees up stays free; the queue timer hands it on when the hold
    /// ends).
    login_hold: Option<Instant>,
    /// The manager's count of connections logged in and alive (idle, lent, or in transit).
    live: Arc<AtomicUsize>,
    /// Clients wait, the pool has room of its own, and `max_total_backend_connections` has
    /// none (see [`budget`]): the queue timer looks for some.
    budget_blocked: bool,
}

/// A client's place in the queue.
struct Queued {
    /// Its borrow deadline.
    deadline: Instant,
    waiter: Waiter,
    /// It is opening a connection of its own meanwhile (it needs no room from the budget).
    opening: bool,
}

impl Queued {
    /// Its client still waits (the queue keeps places whose clients were served or left).
    fn waits(&self) -> bool {
        matches!(*lock(&self.waiter), Wait::Waiting(..))
    }
}

impl State {
    /// New logins wait for the hold to end: it is set, and the clients have connections to
    /// wait for meanwhile.
    fn held(&self) -> bool {
        self.login_hold.is_some() && self.live.load(Ordering::Relaxed) > 0
    }

    /// The idle connection that has waited longest (idle connections are a stack: the bottom
    /// one).
    fn take_longest_idle(&mut self) -> Option<Box<BackendConn>> {
        if self.idle.is_empty() { None } else { Some(self.idle.remove(0)) }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One pool and what its clients need to know about its backends.
pub struct PoolEntry {
    pub key: PoolKey,
    /// This pool, for the budget's list of blocked pools.
    me: Weak<PoolEntry>,
    manager: BackendManager,
    state: Mutex<State>,
    /// Its size, borrow timeout and login retry delay: a reload changes them in place
    /// (`Pools::reconfigure`).
    max: AtomicUsize,
    /// The room across all pools, and how much of it this one holds (= `State::open`).
    budget: Arc<Budget>,
    budget_held: AtomicUsize,
    /// (Never off.)
    borrow_timeout: LiveDuration,
    open_timeout: Duration,
    login_retry_delay: LiveDuration,
    /// Tells the queue timer to look again: a login hold was set, or the pool blocked.
    wake_timer: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
}

/// What a checkout got from the queue.
enum Grant {
    Conn(Box<BackendConn>),
    /// Room to open one more connection, and a place in the queue (at this instant) meanwhile.
    Open(Waiter, Instant),
    /// Queued at this instant.
    Wait(Waiter, Instant),
}

/// What a client without a connection does next (a loop, not recursion: a client may go from
/// waiting to opening and back many times within its borrow timeout).
enum Step<'p, 'r> {
    /// Wait in the queue, in this place.
    Wait(Waiter, Option<Request<'r>>),
    /// Open a connection in room counted for it, waiting in the queue in this place meanwhile.
    Open(Waiter, Option<Request<'r>>),
    Done(Result<(Lease<'p>, Presented), PoolError>),
}

/// Whichever came first to a client opening a connection.
enum Opening {
    Queue(Option<Result<(Box<BackendConn>, Presented), ()>>),
    Login(Result<LoginResult, tokio::sync::oneshot::error::RecvError>),
}

type LoginResult = Result<Box<BackendConn>, BackendError>;

/// A login running on a task of its own for a client (see [`PoolEntry::spawn_login`]). Dropped
/// before its result was taken (the client took another connection, or left), it sends a
/// connection that already came in on to the pool, like one that comes in later: the room it
/// holds is never lost with it.
struct PendingLogin<'p> {
    pool: &'p PoolEntry,
    rx: tokio::sync::oneshot::Receiver<LoginResult>,
}

impl Future for PendingLogin<'_> {
    type Output = Result<LoginResult, tokio::sync::oneshot::error::RecvError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx).poll(cx)
    }
}

impl Drop for PendingLogin<'_> {
    fn drop(&mut self) {
        // Closed first: a login finishing from now on finds nobody and puts its connection itself.
        self.rx.close();
        if let Ok(Ok(conn)) = self.rx.try_recv() {
            self.pool.put(conn);
        }
    }
}

impl PoolEntry {
    /// The pool's size now (see `Pools::reconfigure`).
    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// The borrow timeout now (see `Pools::reconfigure`).
    fn borrow_timeout(&self) -> Duration {
        self.borrow_timeout.get().unwrap_or_default()
    }

    /// Borrows a backend: an idle one if there is one, else the first to come of a new one (if
    /// the pool has room) and one released by another client; else the client waits its turn,
    /// up to the borrow timeout.
    pub async fn checkout(self: &Arc<Self>) -> Result<Lease<'_>, PoolError> {
        self.checkout_for(None).await.map(|(lease, _)| lease)
    }

    /// [`PoolEntry::checkout`] for a client with a request in hand: if it has to wait, the
    /// connection it gets may come with the first bytes of `request` already sent (returned as
    /// [`Presented`]). `request`'s buffer and settings are back in place when this returns.
    pub async fn checkout_for(self: &Arc<Self>, request: Option<Request<'_>>) -> Result<(Lease<'_>, Presented), PoolError> {
        loop {
            let grant = {
                let mut st = lock(&self.state);
                match st.idle.pop() {
                    Some(conn) => Grant::Conn(conn),
                    None => {
                        let w = new_waiter();
                        let start = Instant::now();
                        let has_room = st.open < self.max() && !st.held();
                        // (Blocked, room goes to the clients queued first, by the queue timer.)
                        let opens = has_room && !st.budget_blocked && self.budget.take(self, 1) == 1;
                        let deadline = start + self.borrow_timeout();
                        st.waiting.push_back(Queued { deadline, waiter: Arc::clone(&w), opening: opens });
                        if opens {
                            st.open += 1;
                            Grant::Open(w, start)
                        } else {
                            if has_room {
                                self.block(&mut st);
                            }
                            Grant::Wait(w, start)
                        }
                    }
                }
            };
            match grant {
                Grant::Conn(mut conn) => {
                    if self.manager.is_retired(&conn) || conn.is_closed_or_dirty() {
                        self.close(conn);
                        continue;
                    }
                    // At once: borrow latency 0 µs, without reading the clock.
                    self.metrics.database_connections_borrow_latency.record_zero();
                    return Ok((self.lend(conn), Presented::default()));
                }
                Grant::Open(w, start) => return self.until_done(Step::Open(w, request), start).await,
                Grant::Wait(w, start) => return self.until_done(Step::Wait(w, request), start).await,
            }
        }
    }

    /// Waits and opens, as each step says, until the client has a connection or its answer.
    async fn until_done<'p, 'r>(
        self: &'p Arc<Self>,
        mut step: Step<'p, 'r>,
        start: Instant,
    ) -> Result<(Lease<'p>, Presented), PoolError> {
        loop {
            step = match step {
                Step::Wait(w, request) => self.wait_in_queue(w, start, request).await,
                // Boxed: rare (only while the pool grows), and larger than a wait.
                Step::Open(w, request) => Box::pin(self.open_or_take(w, start, request)).await,
                Step::Done(result) => return result,
            };
        }
    }

    /// Waits in the queue (queued at `start`) for a released connection, or for room to open one.
    async fn wait_in_queue<'p, 'r>(self: &'p Arc<Self>, w: Waiter, start: Instant, request: Option<Request<'r>>) -> Step<'p, 'r> {
        let mut waiting = Waiting::new(self, w, request);
        let got = std::future::poll_fn(|cx| waiting.poll_wait(cx)).await;
        match got {
            // (Its borrow latency was recorded by the hand-over.)
            Some(Ok((conn, presented))) => Step::Done(Ok((self.lend(conn), presented))),
            // A connection closed while we waited: its room is ours (already counted). The client
            // opens one from the front of the queue, where it was, and takes a released
            // connection if one comes first.
            Some(Err(())) => {
                let request = waiting.into_request();
                Step::Open(self.queue_at_front(&mut lock(&self.state), start, true), request)
            }
            None => {
                self.metrics.borrow_timeouts.increment(1);
                Step::Done(Err(PoolError::BorrowTimeout))
            }
        }
    }

    /// Opens a connection in room already counted in `open`, while waiting in the queue: the
    /// client takes whichever comes first, its own login or a connection another client
    /// released, so while a cold pool fills up (one login at a time) every client is served by
    /// the connections already open instead of waiting for its own login. A login that finishes
    /// after its client was served goes to the next waiting client. Room for yet another
    /// connection that reaches this client meanwhile goes to the next client, and this one keeps
    /// its place at the front of the queue. A login that fails is this client's error, unless a
    /// connection reached it meanwhile or other connections are open (it waits for those then,
    /// back at the front of the queue, while the pool holds off new logins for a while: see
    /// [`PoolEntry::login_failed`]); the borrow timeout ends only the wait in the queue, never
    /// the login.
    async fn open_or_take<'p, 'r>(self: &'p Arc<Self>, w: Waiter, start: Instant, request: Option<Request<'r>>) -> Step<'p, 'r> {
        let mut login = self.spawn_login();
        let mut waiting = Waiting::new(self, w, request);
        let mut timed_out = false;
        loop {
            let first = std::future::poll_fn(|cx| {
                if let Poll::Ready(got) = waiting.poll_wait(cx) {
                    return Poll::Ready(Opening::Queue(got));
                }
                std::pin::Pin::new(&mut login).poll(cx).map(Opening::Login)
            })
            .await;
            match first {
                // (The login, dropped, goes to the next client when it completes.)
                Opening::Queue(Some(Ok((conn, presented)))) => return Step::Done(Ok((self.lend(conn), presented))),
                // Room to open another: this client is opening one already, so it passes the room
                // on, and stays in the queue, in front of the client it passed it to (out of the
                // queue it would wait for its own login while released connections go to others).
                Opening::Queue(Some(Err(()))) => {
                    let w = {
                        let mut st = lock(&self.state);
                        self.pass_room_on(&mut st);
                        self.queue_at_front(&mut st, start, true)
                    };
                    waiting = Waiting::new(self, w, waiting.into_request());
                }
                // Its place in the queue timed out: its own login still decides (within the
                // open timeout), as it would had the client never queued.
                Opening::Queue(None) => timed_out = true,
                Opening::Login(opened) => {
                    if let Some((conn, presented)) = waiting.withdraw() {
                        match opened {
                            Ok(Ok(new)) => self.put(new),
                            Ok(Err(_)) => {}
                            Err(_) => self.forget_one(),
                        }
                        return Step::Done(Ok((self.lend(conn), presented)));
                    }
                    return match opened {
                        Ok(Ok(conn)) => {
                            self.record_borrow(start);
                            Step::Done(Ok((self.lend(conn), Presented::default())))
                        }
                        Ok(Err(e)) => {
                            // (The login task counted the failure before it sent it.)
                            let mut st = lock(&self.state);
                            if timed_out || st.live.load(Ordering::Relaxed) == 0 {
                                return Step::Done(Err(PoolError::Backend(e)));
                            }
                            let w = self.queue_at_front(&mut st, start, false);
                            // (Room free and no hold on it: connections came up since the failure.)
                            self.offer_free_room(&mut st);
                            Step::Wait(w, waiting.into_request())
                        }
                        // The login task was dropped unfinished (the runtime is shutting down).
                        Err(_) => {
                            self.forget_one();
                            Step::Done(Err(PoolError::Backend(BackendError::Closed)))
                        }
                    };
                }
            }
        }
    }

    /// Logs a connection in on a task of its own (in room already counted in `open`, given back
    /// if the login fails), so that it completes, and lands in the pool, even when the client
    /// that asked for it took another connection or left.
    fn spawn_login(self: &Arc<Self>) -> PendingLogin<'_> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let pool = Arc::clone(self);
        tokio::spawn(async move {
            let opened = pool.open_within_timeout().await;
            match &opened {
                Ok(_) => pool.login_succeeded(),
                Err(_) => pool.login_failed(),
            }
            if let Err(Ok(conn)) = tx.send(opened) {
                pool.put(conn);
            }
        });
        PendingLogin { pool: self, rx }
    }

    /// One backend login, bounded by the pool's open timeout.
    async fn open_within_timeout(&self) -> Result<Box<BackendConn>, BackendError> {
        let open = async {
            let mut conn = self.manager.open().await?;
            if self.budget.needs_database_max() {
                self.learn_database_max(&mut conn).await?;
            }
            Ok(Box::new(conn))
        };
        match tokio::time::timeout(self.open_timeout, open).await {
            Ok(opened) => opened,
            Err(_) => Err(BackendError::Timeout),
        }
    }

    /// Reads the database's `max_connections` on the first connection pgwarden opens (one round
    /// trip), for `max_connections_percent` (set at start or by a later reload), which caps all
    /// pools with it. A connection that fails the query fails as a login would (it may be
    /// mid-answer); an error or an answer that is no number lifts a percentage cap, with a
    /// warning.
    async fn learn_database_max(&self, conn: &mut BackendConn) -> Result<(), BackendError> {
        let (status, row) = conn.query_row("SHOW max_connections").await?;
        if status != crate::protocol::TxStatus::Idle {
            return Err(crate::protocol::ProtocolError::Malformed("SHOW max_connections left a transaction open").into());
        }
        let max_connections = row.as_ref().and_then(|r| r.first()?.as_deref()?.parse::<usize>().ok());
        self.budget.learn_database_max(max_connections);
        self.budget.publish_allowed(&self.metrics);
        Ok(())
    }

    fn record_borrow(&self, start: Instant) {
        self.metrics.database_connections_borrow_latency.record(start.elapsed());
    }

    fn lend(&self, conn: Box<BackendConn>) -> Lease<'_> {
        self.metrics.database_connections_currently_borrowed.increment();
        Lease { pool: self, conn: Some(conn) }
    }

    /// Gives a connection to the longest-waiting client, sending its request if it left one,
    /// or keeps it idle.
    fn put(&self, conn: Box<BackendConn>) {
        loop {
            let (deadline, w) = {
                let mut st = lock(&self.state);
                if st.open > self.max() || self.budget.over_cap() {
                    // A reload made the pool, or the cap on all pools, smaller than what is open.
                    drop(st);
                    return self.close(conn);
                }
                if self.budget.wants_from(self, !st.waiting.is_empty()) {
                    // Another pool's clients wait for room this one holds more than its share of.
                    drop(st);
                    tracing::debug!(user = %self.key.user, "closing a released backend: another pool's clients wait for room");
                    self.metrics.backend_connections_rebalanced.increment(1);
                    return self.close_giving_room(conn);
                }
                match st.waiting.pop_front() {
                    Some(queued) => (queued.deadline, queued.waiter),
                    None => return st.idle.push(conn),
                }
            };
            // The pool's lock is free again: the send below holds only this client's slot.
            let mut slot = lock(&w);
            if let Wait::Waiting(waker, deposit) = std::mem::replace(&mut *slot, Wait::Gone) {
                // Recorded here: the client may only run again once the backend answered.
                let now = Instant::now();
                let queued_at = deadline.checked_sub(self.borrow_timeout()).unwrap_or(now);
                self.metrics.database_connections_borrow_latency.record(now.saturating_duration_since(queued_at));
                let sent = deposit.as_ref().map_or(0, |d| presend(&conn, d));
                if let (Some(d), true) = (&deposit, sent > 0) {
                    // The query runs now: the client may already want to cancel it.
                    d.cancel.set(conn.key);
                }
                // A whole request sent: the client has nothing to do until the backend answers,
                // so the answer wakes it, not this hand-over (one trip through the run queue
                // instead of two). The waker is registered before the slot is filled: a client
                // woken early finds it under the lock.
                let wake_now = match &waker {
                    Some(waker) => {
                        let answered_later =
                            deposit.as_ref().is_some_and(|d| d.presend.awaits_answer && sent == d.presend.len);
                        !(answered_later && conn.stream.wake_when_readable(waker))
                    }
                    None => false,
                };
                *slot = Wait::Served(conn, deposit, Presented { len: sent, at: (sent > 0).then_some(now) });
                drop(slot);
                if let (true, Some(waker)) = (wake_now, waker) {
                    waker.wake();
                }
                return;
            }
        }
    }

    /// A connection is gone (or was never opened): one more may be opened, by the
    /// longest-waiting client if there is one.
    fn forget_one(&self) {
        self.pass_room_on(&mut lock(&self.state));
    }

    /// [`PoolEntry::forget_one`] under a lock already held.
    fn pass_room_on(&self, st: &mut State) {
        st.open -= 1;
        self.budget.give_back(self);
        // (Not past the pool's size, which a reload may have made smaller than what is open.)
        self.offer_free_room(st);
    }

    /// Closes a connection whose room goes to a blocked pool, not to this one's clients.
    fn close_giving_room(&self, mut conn: Box<BackendConn>) {
        conn.live_guard = None;
        {
            let mut st = lock(&self.state);
            st.open -= 1;
            self.budget.give_back(self);
        }
        tokio::spawn(conn.close());
    }

    /// Whether a client waits that is not opening a connection of its own (one that is will
    /// be served by its login, or by a release and pass its login on).
    fn needs_room(st: &State) -> bool {
        st.waiting.iter().any(|q| !q.opening && q.waits())
    }

    /// Clients wait, and the pool's room is held up by the cap on all pools: the queue timer
    /// looks for room (see [`budget`]). Under the state's lock.
    fn block(&self, st: &mut State) {
        if !st.budget_blocked {
            st.budget_blocked = true;
            self.budget.block(self.me.clone());
            self.wake_timer.notify_one();
        }
    }

    /// A new place at the front of the queue for a client that queued at `start` (its borrow
    /// deadline unchanged): one that went to open a connection and waits again meanwhile
    /// (`opening`), or whose login failed.
    fn queue_at_front(&self, st: &mut State, start: Instant, opening: bool) -> Waiter {
        let w = new_waiter();
        st.waiting.push_front(Queued { deadline: start + self.borrow_timeout(), waiter: Arc::clone(&w), opening });
        w
    }

    /// A login failed; its room is free again. With other connections open, the clients
    /// waiting have those to wait for, and the room stays free for `backend_login_retry_delay`
    /// (PgBouncer's `server_login_retry`): a database that refuses more connections (its
    /// `max_connections`, a role's connection limit) gets one login per delay, not one per
    /// client. With none open, the longest-waiting client tries its own at once (it has nothing
    /// else to wait for, and a failure there is its answer).
    fn login_failed(&self) {
        let mut st = lock(&self.state);
        st.open -= 1;
        self.budget.give_back(self);
        let retry_delay = self.login_retry_delay.get().unwrap_or_default();
        if st.live.load(Ordering::Relaxed) > 0 && !retry_delay.is_zero() {
            st.login_hold = Some(Instant::now() + retry_delay);
            drop(st);
            self.wake_timer.notify_one();
        } else {
            self.offer_free_room(&mut st);
        }
    }

    /// A login succeeded: after a hold, room still free goes to the next waiting client, so the
    /// pool grows back one login at a time. (Otherwise a no-op: free room never waits beside a
    /// queue.)
    fn login_succeeded(&self) {
        self.offer_free_room(&mut lock(&self.state));
    }

    /// Room the pool has free (below its size) goes to the longest-waiting client, hold
    /// permitting.
    fn offer_free_room(&self, st: &mut State) {
        // (Also where a reload that made the pool larger lets waiting clients open more.)
        if st.open < self.max() {
            self.let_one_open(st);
        }
    }

    /// Tells the longest-waiting client it may open a connection (counted as open for it),
    /// unless a failed login holds new ones back while other connections are open, or the cap
    /// on all pools has no room (the pool blocks then).
    fn let_one_open(&self, st: &mut State) {
        if st.held() || st.waiting.is_empty() {
            return;
        }
        if self.budget.take(self, 1) == 0 {
            if Self::needs_room(st) {
                self.block(st);
            }
            return;
        }
        if !Self::grant_room(st) {
            self.budget.give_back(self);
        }
    }

    /// Gives room already taken from the budget to the longest-waiting client (counted as open
    /// for it); false if nobody waits after all.
    fn grant_room(st: &mut State) -> bool {
        while let Some(Queued { waiter: w, .. }) = st.waiting.pop_front() {
            let mut w = lock(&w);
            if let Wait::Waiting(waker, deposit) = std::mem::replace(&mut *w, Wait::Gone) {
                *w = Wait::MayOpen(deposit);
                st.open += 1;
                if let Some(waker) = waker {
                    waker.wake();
                }
                return true;
            }
        }
        false
    }

    fn close(&self, mut conn: Box<BackendConn>) {
        // No longer one the clients can wait for, though its Terminate is still on the way.
        conn.live_guard = None;
        self.forget_one();
        tokio::spawn(conn.close());
    }

    /// Clients waiting for a connection now (PgBouncer's `cl_waiting`).
    pub fn waiting(&self) -> usize {
        lock(&self.state).waiting.iter().filter(|q| q.waits()).count()
    }

    /// The newest credential generation a backend of this pool has logged in with.
    pub fn newest_login(&self) -> tokio::sync::watch::Receiver<Option<(Generation, LoginFingerprint)>> {
        self.manager.newest_working.subscribe()
    }

    /// The parameters the backend reported at login, once any backend has logged in.
    pub fn server_params(&self) -> Option<&[(String, String)]> {
        self.manager.server_params()
    }
}


/// A backend lent to one client. [`Lease::release`] returns it; [`Lease::discard`], or dropping
/// the lease without either (its state is unknown then), closes it.
pub struct Lease<'a> {
    pool: &'a PoolEntry,
    conn: Option<Box<BackendConn>>,
}

impl Lease<'_> {
    pub fn conn(&mut self) -> &mut BackendConn {
        self.conn.as_mut().expect("a lease holds its connection until released")
    }

    /// Returns a clean, idle connection to the pool, or closes it if its login has been
    /// superseded by a rotation or it outlived its lifetime (so connections retire one by one,
    /// as their clients finish).
    pub fn release(mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.pool.manager.is_retired(&conn) {
            tracing::debug!(pid = ?conn.key.map(|k| k.pid.0), "retiring a backend with a superseded login");
            self.pool.close(conn);
        } else if conn.lifetime.is_some_and(|l| conn.last_active.saturating_duration_since(conn.created) >= l) {
            self.pool.close(conn);
        } else {
            self.pool.put(conn);
        }
    }

    /// Closes a connection in an unknown state instead of returning it.
    pub fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.close(conn);
        }
    }
}

impl Drop for PoolEntry {
    /// A pool is dropped once a reload took it out of use (`Pools::retire_superseded`) and its last
    /// session ended, or at exit: its idle connections say goodbye and give their room back.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.state.get_mut().unwrap_or_else(|p| p.into_inner()).idle);
        let runtime = tokio::runtime::Handle::try_current();
        for conn in idle {
            self.budget.give_back(self);
            if let Ok(runtime) = &runtime {
                runtime.spawn(conn.close());
            }
        }
        // (This pool no longer counts: its handle cannot be taken any more.)
        self.budget.publish_allowed(&self.metrics);
        // Its queue timer ends now rather than at its next deadline.
        self.wake_timer.notify_one();
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.metrics.database_connections_currently_borrowed.decrement();
        if let Some(conn) = self.conn.take() {
            self.pool.close(conn);
        }
    }
}
