//! The cap on backend connections across every pool (`pool.max_total_backend_connections`:
//! RDS Proxy's MaxConnectionsPercent as a count, PgBouncer's `max_db_connections` for the one
//! server pgwarden fronts), or as `pool.max_connections_percent` of the database's
//! `max_connections` (RDS Proxy's own form), read on the first backend connection: until then
//! that one connection is all the room there is. A pool takes room here before it opens a connection and gives it
//! back when the connection is gone, so the sum over pools never passes the cap, however many
//! users and databases clients bring. A pool whose clients wait while it has room of its own
//! but the cap has none is *blocked*. Room that frees up goes to the blocked pool holding the
//! least (the first blocked on a tie; one that took room and needs more goes to the back), and
//! comes from the others: that pool's queue timer closes an idle connection anywhere (the
//! longest idle first), and a pool with no waiting clients, or with at least two connections
//! more than it, closes a connection released to it instead of reusing it. So pools under
//! load end up sharing the cap evenly, and room never idles in one pool while another's
//! clients wait. Without a cap, every step here is one relaxed atomic operation and nothing
//! blocks. Must not: lock a pool while holding a lock of
//! its own (pools lock their state first, then this).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::{PoolEntry, lock};

pub(super) struct Budget {
    /// The room: `usize::MAX` for no cap; 1 while a percentage waits for `max_connections`.
    max: AtomicUsize,
    /// Whether room is counted: a cap is set, or will be once `percent` is applied.
    counted: bool,
    /// `pool.max_connections_percent`, applied by [`Budget::learn_database_max`].
    percent: Option<u8>,
    /// Whether `max` is final (always, without a percentage).
    settled: AtomicBool,
    open: AtomicUsize,
    /// Pools waiting for room, in the order they blocked (see [`Budget::is_first_blocked`]);
    /// `blocked_count` is its length, read without the lock on every release.
    blocked: Mutex<Vec<Weak<PoolEntry>>>,
    blocked_count: AtomicUsize,
    /// Every pool, for the idle connections a blocked one may reclaim.
    members: Mutex<Vec<Weak<PoolEntry>>>,
    /// Told (all listeners) whenever room comes back.
    pub(super) freed: tokio::sync::Notify,
}

impl Budget {
    pub(super) fn new(max: Option<usize>, percent: Option<u8>) -> Arc<Budget> {
        Arc::new(Budget {
            // (With a percentage: one connection, to read max_connections on.)
            max: AtomicUsize::new(if percent.is_some() { 1 } else { max.unwrap_or(usize::MAX) }),
            counted: max.is_some() || percent.is_some(),
            percent,
            settled: AtomicBool::new(percent.is_none()),
            open: AtomicUsize::new(0),
            blocked: Mutex::new(Vec::new()),
            blocked_count: AtomicUsize::new(0),
            members: Mutex::new(Vec::new()),
            freed: tokio::sync::Notify::new(),
        })
    }

    pub(super) fn capped(&self) -> bool {
        self.counted
    }

    /// The cap, once known, if there is one.
    pub(super) fn cap(&self) -> Option<usize> {
        if !self.settled.load(Ordering::Acquire) {
            return None;
        }
        Some(self.max.load(Ordering::Relaxed)).filter(|&m| m != usize::MAX)
    }

    /// Whether the cap waits for the database's `max_connections` (see
    /// [`Budget::learn_database_max`]).
    pub(super) fn needs_database_max(&self) -> bool {
        !self.settled.load(Ordering::Acquire)
    }

    /// Sets the cap from the database's `max_connections` (with `max_connections_percent`),
    /// or lifts it (`None`: not readable); returns it.
    pub(super) fn learn_database_max(&self, max_connections: Option<usize>) -> Option<usize> {
        let percent = usize::from(self.percent?);
        let cap = max_connections.map_or(usize::MAX, |m| (m.saturating_mul(percent) / 100).max(1));
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.max.store(cap, Ordering::Release);
            match max_connections {
                Some(max_connections) => {
                    tracing::info!(max_connections, percent, cap, "backend connections across all pools capped")
                }
                None => tracing::warn!("could not read max_connections: pool.max_connections_percent caps nothing"),
            }
            // (Pools blocked on the one connection allowed meanwhile take the rest.)
            self.freed.notify_waiters();
        }
        self.cap()
    }

    /// Pools in the registry or still serving sessions.
    pub(super) fn live_members(&self) -> usize {
        lock(&self.members).iter().filter(|w| w.strong_count() > 0).count()
    }

    pub(super) fn join(&self, pool: Weak<PoolEntry>) {
        let mut members = lock(&self.members);
        // (Pools a reload retired are gone once their sessions end.)
        members.retain(|w| w.strong_count() > 0);
        members.push(pool);
    }

    /// Takes room for up to `n` connections of `pool`, returns how many. While pools are
    /// blocked, only the one next in line may take any.
    pub(super) fn take(&self, pool: &PoolEntry, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        if !self.capped() {
            pool.budget_held.fetch_add(n, Ordering::Relaxed);
            return n;
        }
        if self.blocked_count.load(Ordering::Acquire) > 0 && !self.is_first_blocked(pool) {
            // (Room that frees up goes to the neediest blocked pool.)
            return 0;
        }
        let mut open = self.open.load(Ordering::Relaxed);
        loop {
            let taken = n.min(self.max.load(Ordering::Relaxed).saturating_sub(open));
            if taken == 0 {
                return 0;
            }
            match self.open.compare_exchange_weak(open, open + taken, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    pool.budget_held.fetch_add(taken, Ordering::Relaxed);
                    return taken;
                }
                Err(now) => open = now,
            }
        }
    }

    /// A connection of `pool` is gone (or was never opened): its room is free again.
    pub(super) fn give_back(&self, pool: &PoolEntry) {
        pool.budget_held.fetch_sub(1, Ordering::Relaxed);
        if self.capped() {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    /// `pool` waits for room (its clients do); called under its state's lock, once per block.
    pub(super) fn block(&self, pool: Weak<PoolEntry>) {
        let mut blocked = lock(&self.blocked);
        blocked.retain(|w| w.strong_count() > 0);
        blocked.push(pool);
        self.blocked_count.store(blocked.len(), Ordering::Release);
        drop(blocked);
        // The pools blocked before look again: one whose clients were served meanwhile by its
        // own connections leaves the line instead of holding it up.
        self.freed.notify_waiters();
    }

    /// `pool` waits no more (it got room, or its clients left); called under its state's lock.
    pub(super) fn unblock(&self, pool: &PoolEntry) {
        let mut blocked = lock(&self.blocked);
        blocked.retain(|w| !std::ptr::eq(w.as_ptr(), pool) && w.strong_count() > 0);
        self.blocked_count.store(blocked.len(), Ordering::Release);
        drop(blocked);
        // The next blocked pool may take what this one left.
        self.freed.notify_waiters();
    }

    /// Whether `pool` is the blocked pool next in line: the one holding the least room, the
    /// first blocked of those.
    pub(super) fn is_first_blocked(&self, pool: &PoolEntry) -> bool {
        self.neediest(None).is_some_and(|p| std::ptr::eq(Arc::as_ptr(&p), pool))
    }

    /// The blocked pool (but `except`) holding the least room, the first blocked on a tie.
    fn neediest(&self, except: Option<&PoolEntry>) -> Option<Arc<PoolEntry>> {
        let mut blocked = lock(&self.blocked);
        if blocked.iter().any(|w| w.strong_count() == 0) {
            // A pool dropped while blocked (a reload retired it, and its clients left): it
            // must not hold up the line.
            blocked.retain(|w| w.strong_count() > 0);
            self.blocked_count.store(blocked.len(), Ordering::Release);
        }
        let mut best: Option<(usize, Arc<PoolEntry>)> = None;
        for pool in blocked.iter().filter(|w| except.is_none_or(|e| !std::ptr::eq(w.as_ptr(), e))).filter_map(Weak::upgrade) {
            let held = pool.budget_held.load(Ordering::Relaxed);
            if best.as_ref().is_none_or(|(least, _)| held < *least) {
                best = Some((held, pool));
            }
        }
        best.map(|(_, pool)| pool)
    }

    /// `pool` got room and still needs more: it goes to the back of the line, so that blocked
    /// pools holding as much take turns.
    pub(super) fn to_back(&self, pool: &PoolEntry) {
        let mut blocked = lock(&self.blocked);
        if let Some(at) = blocked.iter().position(|w| std::ptr::eq(w.as_ptr(), pool))
            && blocked.len() > 1
        {
            let me = blocked.remove(at);
            blocked.push(me);
            drop(blocked);
            self.freed.notify_waiters();
        }
    }

    /// Whether `pool` should close a connection released to it (with clients of its own
    /// waiting or not) so that the neediest other blocked pool gets the room: always if none
    /// of its own waits (idle, the connection would be reclaimed anyway), else if it holds two
    /// or more connections than that pool, so shares even out. One relaxed load when no pool
    /// is blocked.
    pub(super) fn wants_from(&self, pool: &PoolEntry, waiters: bool) -> bool {
        if self.blocked_count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let Some(other) = self.neediest(Some(pool)) else { return false };
        !waiters || pool.budget_held.load(Ordering::Relaxed) > other.budget_held.load(Ordering::Relaxed) + 1
    }

    /// For the blocked pool next in line: closes the longest-idle connection of another pool, if any
    /// is idle (idle room is wasted room while clients wait). Its room comes back through
    /// [`Budget::give_back`].
    pub(super) fn reclaim_idle(&self, for_pool: &PoolEntry) -> bool {
        if !self.is_first_blocked(for_pool) {
            return false;
        }
        let members: Vec<Arc<PoolEntry>> = lock(&self.members).iter().filter_map(Weak::upgrade).collect();
        let mut oldest: Option<(Instant, &Arc<PoolEntry>)> = None;
        for pool in members.iter().filter(|p| !std::ptr::eq(Arc::as_ptr(p), for_pool)) {
            // (Idle connections are a stack: the bottom one has waited longest.)
            let since = lock(&pool.state).idle.first().map(|c| c.last_active);
            if let Some(since) = since
                && oldest.is_none_or(|(t, _)| since < t)
            {
                oldest = Some((since, pool));
            }
        }
        let Some((_, pool)) = oldest else { return false };
        let conn = {
            let mut st = lock(&pool.state);
            if st.idle.is_empty() { None } else { Some(st.idle.remove(0)) }
        };
        match conn {
            Some(conn) => {
                tracing::debug!(from = %pool.key.user, to = %for_pool.key.user, "closing an idle backend: another pool's clients wait for room");
                pool.metrics.backend_connections_rebalanced.increment(1);
                pool.close_giving_room(conn);
                true
            }
            None => false,
        }
    }
}
