//! Backend pools, one per (user, database): the idle connections (last in, first out, so a
//! few warm connections serve a light load and the rest age out), the fair FIFO queue of clients
//! waiting for one, and the count of connections open or being opened, capped at
//! `max_backend_connections`. A released connection goes straight to the longest-waiting client;
//! a closed one lets the next waiting client open a new one. A janitor evicts idle connections
//! that expired or retired and keeps `min_idle` warm. [`manager`] opens connections and says
//! which must retire. Must not: authenticate clients or touch client sockets.
//!
//! Built here rather than on deadpool (which pgwarden used first): a checkout is on every
//! transaction's path, and deadpool's (semaphore, async recycle hooks, object metrics, moves of
//! the object) cost ~2,000 instructions per transaction against ~300 here (callgrind,
//! bench/RESULTS.md). The queue never waits under a lock; one timer per *waiting* client.

mod manager;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::backend::{BackendConn, BackendError};
use crate::config::{DatabaseConfig, PoolConfig};
use crate::credentials::{CredentialStore, Generation, LoginFingerprint};
use crate::metrics::Metrics;
use crate::protocol::SqlState;
use crate::tls::BackendTls;
use manager::BackendManager;

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

/// A client waiting for a connection, as the queue sees it.
#[derive(Debug)]
enum Wait {
    Waiting(Option<Waker>),
    /// A released connection, handed over.
    Served(Box<BackendConn>),
    /// A connection closed: there is room to open one.
    MayOpen,
    /// The client stopped waiting (timed out, or left); skipped by whoever pops it.
    Gone,
}

type Waiter = Arc<Mutex<Wait>>;

struct State {
    idle: Vec<Box<BackendConn>>,
    /// Connections open or being opened (idle + lent + opening).
    open: usize,
    waiting: VecDeque<Waiter>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One pool and what its clients need to know about its backends.
pub struct PoolEntry {
    pub key: PoolKey,
    manager: BackendManager,
    state: Mutex<State>,
    max: usize,
    borrow_timeout: Duration,
    open_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// What a checkout got from the queue.
enum Grant {
    Conn(Box<BackendConn>),
    Open,
    Wait(Waiter),
}

impl PoolEntry {
    /// Borrows a backend: an idle one if there is one, else a new one if the pool has room,
    /// else the client waits its turn, up to the borrow timeout.
    pub async fn checkout(&self) -> Result<Lease<'_>, PoolError> {
        loop {
            let grant = {
                let mut st = lock(&self.state);
                match st.idle.pop() {
                    Some(conn) => Grant::Conn(conn),
                    None if st.open < self.max => {
                        st.open += 1;
                        Grant::Open
                    }
                    None => {
                        let w = Arc::new(Mutex::new(Wait::Waiting(None)));
                        st.waiting.push_back(Arc::clone(&w));
                        Grant::Wait(w)
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
                    return Ok(self.lend(conn));
                }
                Grant::Open => return self.open_new(Instant::now()).await,
                Grant::Wait(w) => {
                    let start = Instant::now();
                    let deadline = tokio::time::Instant::from_std(start) + self.borrow_timeout;
                    let waiting = Waiting { pool: self, w: Some(w) };
                    return match Box::pin(tokio::time::timeout_at(deadline, waiting)).await {
                        Ok(Some(conn)) => {
                            self.record_borrow(start);
                            Ok(self.lend(conn))
                        }
                        // A connection closed while we waited: its room is ours (already counted).
                        Ok(None) => self.open_new(start).await,
                        Err(_) => {
                            self.metrics.borrow_timeouts.increment(1);
                            Err(PoolError::BorrowTimeout)
                        }
                    };
                }
            }
        }
    }

    /// Opens a connection in room already counted in `open` (given back if the login fails).
    async fn open_new(&self, start: Instant) -> Result<Lease<'_>, PoolError> {
        match Box::pin(tokio::time::timeout(self.open_timeout, self.manager.open())).await {
            Ok(Ok(conn)) => {
                self.record_borrow(start);
                Ok(self.lend(Box::new(conn)))
            }
            Ok(Err(e)) => {
                self.forget_one();
                Err(PoolError::Backend(e))
            }
            Err(_) => {
                self.forget_one();
                Err(PoolError::Backend(BackendError::Timeout))
            }
        }
    }

    fn record_borrow(&self, start: Instant) {
        self.metrics.database_connections_borrow_latency.record(start.elapsed());
    }

    fn lend(&self, conn: Box<BackendConn>) -> Lease<'_> {
        self.metrics.database_connections_currently_borrowed.increment(1.0);
        Lease { pool: self, conn: Some(conn) }
    }

    /// Gives a connection to the longest-waiting client, or keeps it idle.
    fn put(&self, conn: Box<BackendConn>) {
        let mut st = lock(&self.state);
        while let Some(w) = st.waiting.pop_front() {
            let mut w = lock(&w);
            if let Wait::Waiting(waker) = &mut *w {
                let waker = waker.take();
                *w = Wait::Served(conn);
                drop(w);
                drop(st);
                if let Some(waker) = waker {
                    waker.wake();
                }
                return;
            }
        }
        st.idle.push(conn);
    }

    /// A connection is gone (or was never opened): one more may be opened, by the
    /// longest-waiting client if there is one.
    fn forget_one(&self) {
        let mut st = lock(&self.state);
        st.open -= 1;
        Self::let_one_open(&mut st);
    }

    /// Tells the longest-waiting client it may open a connection (it counts it itself).
    fn let_one_open(st: &mut State) {
        while let Some(w) = st.waiting.pop_front() {
            let mut w = lock(&w);
            if let Wait::Waiting(waker) = &mut *w {
                let waker = waker.take();
                *w = Wait::MayOpen;
                st.open += 1;
                if let Some(waker) = waker {
                    waker.wake();
                }
                return;
            }
        }
    }

    fn close(&self, conn: Box<BackendConn>) {
        self.forget_one();
        tokio::spawn(conn.close());
    }

    /// Clients waiting for a connection now (PgBouncer's `cl_waiting`).
    pub fn waiting(&self) -> usize {
        lock(&self.state).waiting.iter().filter(|w| matches!(*lock(w), Wait::Waiting(_))).count()
    }

    /// The newest credential generation a backend of this pool has logged in with.
    pub fn newest_login(&self) -> tokio::sync::watch::Receiver<Option<(Generation, LoginFingerprint)>> {
        self.manager.newest_working.subscribe()
    }

    /// The parameters the backend reported at login, once any backend has logged in.
    pub fn server_params(&self) -> Option<&[(String, String)]> {
        self.manager.server_params()
    }

    /// Closes idle connections that expired or whose login retired.
    fn evict_idle(&self, idle_timeout: Option<Duration>) {
        let now = Instant::now();
        let evicted: Vec<Box<BackendConn>> = {
            let mut st = lock(&self.state);
            let (keep, evicted) =
                std::mem::take(&mut st.idle).into_iter().partition(|c| !c.expired(now, idle_timeout) && !self.manager.is_retired(c));
            st.idle = keep;
            evicted
        };
        for conn in evicted {
            self.close(conn);
        }
    }

    /// Opens connections until `min_idle` are idle (within the pool's size).
    async fn top_up(&self, min_idle: usize) {
        let want = {
            let mut st = lock(&self.state);
            let want = min_idle.saturating_sub(st.idle.len()).min(self.max.saturating_sub(st.open));
            st.open += want;
            want
        };
        for _ in 0..want {
            match tokio::time::timeout(self.open_timeout, self.manager.open()).await {
                Ok(Ok(conn)) => self.put(Box::new(conn)),
                _ => self.forget_one(),
            }
        }
    }
}

/// A client in the queue. Dropped before it was served (timeout, client gone), it leaves the
/// queue; if a connection or the room to open one reached it meanwhile, it passes them on.
struct Waiting<'a> {
    pool: &'a PoolEntry,
    w: Option<Waiter>,
}

impl Future for Waiting<'_> {
    /// `Some` connection handed over, or `None`: room to open one (already counted as open).
    type Output = Option<Box<BackendConn>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(w) = &self.w else { return Poll::Pending };
        let mut slot = lock(w);
        match std::mem::replace(&mut *slot, Wait::Gone) {
            Wait::Served(conn) => {
                drop(slot);
                self.w = None;
                Poll::Ready(Some(conn))
            }
            Wait::MayOpen => {
                drop(slot);
                self.w = None;
                Poll::Ready(None)
            }
            Wait::Waiting(mut waker) => {
                match &mut waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => waker = Some(cx.waker().clone()),
                }
                *slot = Wait::Waiting(waker);
                Poll::Pending
            }
            Wait::Gone => Poll::Pending,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(w) = self.w.take() else { return };
        let was = std::mem::replace(&mut *lock(&w), Wait::Gone);
        match was {
            Wait::Served(conn) => self.pool.put(conn),
            Wait::MayOpen => {
                let mut st = lock(&self.pool.state);
                st.open -= 1;
                PoolEntry::let_one_open(&mut st);
            }
            Wait::Waiting(_) | Wait::Gone => {}
        }
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

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.metrics.database_connections_currently_borrowed.decrement(1.0);
        if let Some(conn) = self.conn.take() {
            self.pool.close(conn);
        }
    }
}

/// All pools, created on first use.
pub struct Pools {
    target: DatabaseConfig,
    tls: Option<Arc<BackendTls>>,
    cfg: PoolConfig,
    metrics: Arc<Metrics>,
    map: Mutex<HashMap<PoolKey, Arc<PoolEntry>>>,
}

impl Pools {
    pub fn new(target: DatabaseConfig, tls: Option<Arc<BackendTls>>, cfg: PoolConfig, metrics: Arc<Metrics>) -> Pools {
        Pools { target, tls, cfg, metrics, map: Mutex::new(HashMap::new()) }
    }

    /// The pool for `key`, created (with its janitor) if this is its first client.
    pub fn entry(&self, key: &PoolKey, store: &Arc<CredentialStore>) -> Arc<PoolEntry> {
        let mut map = lock(&self.map);
        if let Some(e) = map.get(key) {
            return Arc::clone(e);
        }
        let manager = BackendManager::new(
            self.target.clone(),
            self.tls.clone(),
            key.database.clone(),
            Arc::clone(store),
            self.cfg.clone(),
            Arc::clone(&self.metrics),
        );
        let entry = Arc::new(PoolEntry {
            key: key.clone(),
            manager,
            state: Mutex::new(State { idle: Vec::new(), open: 0, waiting: VecDeque::new() }),
            max: self.cfg.max_backend_connections,
            borrow_timeout: self.cfg.borrow_timeout,
            open_timeout: self.target.connect_timeout.saturating_mul(3),
            metrics: Arc::clone(&self.metrics),
        });
        self.metrics.max_database_connections_allowed.increment(self.cfg.max_backend_connections as f64);
        spawn_janitor(Arc::downgrade(&entry), store.subscribe(), self.cfg.clone());
        map.insert(key.clone(), Arc::clone(&entry));
        entry
    }
}

/// Every second, and whenever the credential changes: check that a changed credential logs in
/// (so older connections can retire), drop idle connections that expired or retired, then top
/// the pool up to `min_idle`. Stops when the pool is gone.
fn spawn_janitor(
    entry: Weak<PoolEntry>,
    mut credential: tokio::sync::watch::Receiver<Arc<crate::credentials::CredentialSet>>,
    cfg: PoolConfig,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = credential.changed() => if changed.is_err() { return },
            }
            let Some(entry) = entry.upgrade() else { return };
            entry.manager.probe_new_credential().await;
            entry.evict_idle(cfg.backend_idle_timeout);
            entry.top_up(cfg.min_idle_backend_connections).await;
        }
    });
}
