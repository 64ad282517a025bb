//! The cap on backend connections across every pool (`pool.max_total_backend_connections`:
//! RDS Proxy's MaxConnectionsPercent as a count, PgBouncer's `max_db_connections` for the one
//! server pgwarden fronts), or as `pool.max_connections_percent` of the database's
//! `max_connections` (RDS Proxy's own form), read on the first backend connection: until then
//! that one connection is all the room there is. A reload may set, change or lift the cap
//! ([`Budget::set_form`]). A pool takes room here before it opens a connection and gives it
//! back when the connection is gone, so the sum over pools never passes the cap, however many
//! users and databases clients bring. A pool whose clients wait while it has room of its own
//! but the cap has none is *blocked*. Room that frees up goes to the blocked pool holding the
//! least (the first blocked on a tie; one that took room and needs more goes to the back), and
//! comes from the others: that pool's queue timer closes an idle connection anywhere (the
//! longest idle first), and a pool with no waiting clients, or with at least two connections
//! more than it, closes a connection released to it instead of reusing it. So pools under
//! load end up sharing the cap evenly, and room never idles in one pool while another's
//! clients wait. Room is counted with or without a cap (on each connection's open and close;
//! a release reads two atomics, for a cap a reload lowered); without one nothing blocks. Must
//! not: lock a pool while holding a lock of
//! its own (pools lock their state first, then this).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::{PoolEntry, lock};

pub(super) struct Budget {
    /// The room: `usize::MAX` for no cap; 1 while a percentage waits for `max_connections`
    /// (set at start, or by a reload before any connection was opened).
    max: AtomicUsize,
    /// How the cap is set, which a reload changes ([`Budget::set_form`]).
    form: Mutex<Form>,
    /// Whether `max` is final: not while a percentage waits for the database's
    /// `max_connections`.
    settled: AtomicBool,
    /// Whether `form.database_max` is set (read without the lock on every new connection).
    database_max_read: AtomicBool,
    /// Connections open or being opened, all pools together (counted with or without a cap,
    /// so that a reload can set one).
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

/// The cap as configured.
#[derive(Default)]
struct Form {
    /// `pool.max_total_backend_connections`.
    count: Option<usize>,
    /// `pool.max_connections_percent`.
    percent: Option<u8>,
    /// The database's `max_connections`, once read (`Some(None)`: it was not a number).
    database_max: Option<Option<usize>>,
}

impl Form {
    /// The room this form gives, if it can tell (a percentage needs `database_max`).
    fn room(&self) -> Option<usize> {
        match (self.count, self.percent, self.database_max) {
            (Some(count), _, _) => Some(count),
            (None, Some(percent), Some(Some(m))) => Some((m.saturating_mul(usize::from(percent)) / 100).max(1)),
            (None, Some(_), Some(None)) | (None, None, _) => Some(usize::MAX),
            (None, Some(_), None) => None,
        }
    }
}

impl Budget {
    pub(super) fn new(max: Option<usize>, percent: Option<u8>) -> Arc<Budget> {
        let form = Form { count: max, percent, database_max: None };
        let room = form.room();
        Arc::new(Budget {
            // (With a percentage: one connection, to read max_connections on.)
            max: AtomicUsize::new(room.unwrap_or(1)),
            settled: AtomicBool::new(room.is_some()),
            database_max_read: AtomicBool::new(false),
            form: Mutex::new(form),
            open: AtomicUsize::new(0),
            blocked: Mutex::new(Vec::new()),
            blocked_count: AtomicUsize::new(0),
            members: Mutex::new(Vec::new()),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// A reload's cap: applies at once to connections opened from now on (and to released
    /// ones, which close while more are open than it allows: [`Budget::over_cap`]). A
    /// percentage needs the database's `max_connections`, read on the first connection pgwarden
    /// opened; if none has been opened yet, the first one is all the room until it is read, as
    /// at start.
    pub(super) fn set_form(&self, count: Option<usize>, percent: Option<u8>) {
        let mut form = lock(&self.form);
        form.count = count;
        form.percent = percent;
        let room = form.room();
        self.max.store(room.unwrap_or(1), Ordering::Release);
        self.settled.store(room.is_some(), Ordering::Release);
        drop(form);
        self.freed.notify_waiters();
    }

    /// The cap, once known, if there is one.
    pub(super) fn cap(&self) -> Option<usize> {
        if !self.settled.load(Ordering::Acquire) {
            return None;
        }
        Some(self.max.load(Ordering::Relaxed)).filter(|&m| m != usize::MAX)
    }

    /// More connections are open than the cap allows (a reload lowered it): a released one
    /// closes instead of going back to the pool.
    pub(super) fn over_cap(&self) -> bool {
        self.excess() > 0
    }

    /// How many more connections are open than the cap allows.
    pub(super) fn excess(&self) -> usize {
        self.open.load(Ordering::Relaxed).saturating_sub(self.max.load(Ordering::Relaxed))
    }

    /// Whether the database's `max_connections` is still to be read (on the first connection
    /// opened; a reload may set a percentage of it later).
    pub(super) fn needs_database_max(&self) -> bool {
        !self.database_max_read.load(Ordering::Acquire)
    }

    /// A reload asks for the database's `max_connections` again (the instance may have been
    /// resized): the next connection opened reads it; the cap stays as it is meanwhile.
    pub(super) fn reread_database_max(&self) {
        self.database_max_read.store(false, Ordering::Release);
    }

    /// Records the database's `max_connections` (`None`: not a number; a number read before
    /// outlives that) and, with `max_connections_percent`, sets the cap from it (lifts it if
    /// there is no number); returns the cap.
    pub(super) fn learn_database_max(&self, read: Option<usize>) -> Option<usize> {
        let mut form = lock(&self.form);
        if self.database_max_read.load(Ordering::Acquire) {
            // (Read on another connection meanwhile.)
            drop(form);
            return self.cap();
        }
        self.database_max_read.store(true, Ordering::Release);
        form.database_max = match (form.database_max, read) {
            (Some(Some(known)), None) => Some(Some(known)),
            _ => Some(read),
        };
        let Some(percent) = form.percent else {
            tracing::debug!(max_connections = ?read, "the database's max_connections");
            return self.cap();
        };
        let cap = form.room().unwrap_or(usize::MAX);
        let before = self.max.swap(cap, Ordering::AcqRel);
        let was_settled = self.settled.swap(true, Ordering::AcqRel);
        let max_connections = form.database_max.flatten();
        drop(form);
        if was_settled && before == cap && max_connections.is_some() {
            return self.cap();
        }
        match max_connections {
            Some(max_connections) => {
                tracing::info!(max_connections, percent, cap, "backend connections across all pools capped")
            }
            None => tracing::warn!("could not read max_connections: pool.max_connections_percent caps nothing"),
        }
        // (Pools blocked on the one connection allowed meanwhile take the rest.)
        self.freed.notify_waiters();
        self.cap()
    }

    /// Sets `MaxDatabaseConnectionsAllowed` to [`Budget::allowed`].
    pub(super) fn publish_allowed(&self, metrics: &crate::metrics::Metrics) {
        metrics.max_database_connections_allowed.set(self.allowed() as f64);
    }

    /// `MaxDatabaseConnectionsAllowed`: the sizes of the pools in use (in the registry, or
    /// retired by a reload and still serving sessions) together, up to the cap once known.
    pub(super) fn allowed(&self) -> usize {
        let members: Vec<Arc<PoolEntry>> = lock(&self.members).iter().filter_map(Weak::upgrade).collect();
        // (A pool only this list holds is about to go: its drop publishes without it.)
        let sizes = members.iter().filter(|p| Arc::strong_count(p) > 1).map(|p| p.max()).fold(0usize, usize::saturating_add);
        // (The last handle on a pool may be one of these: dropped here, outside the lock.)
        drop(members);
        self.cap().map_or(sizes, |cap| cap.min(sizes))
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
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.freed.notify_waiters();
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
        let conn = lock(&pool.state).take_longest_idle();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentage_follows_max_connections_read_again() {
        let budget = Budget::new(None, Some(10));
        assert!(budget.needs_database_max());
        assert_eq!(budget.cap(), None, "one connection, to read max_connections on");
        assert_eq!(budget.learn_database_max(Some(300)), Some(30));
        assert!(!budget.needs_database_max());
        // A second read racing the first changes nothing.
        assert_eq!(budget.learn_database_max(Some(50)), Some(30));

        budget.reread_database_max();
        assert!(budget.needs_database_max());
        assert_eq!(budget.learn_database_max(Some(500)), Some(50), "the instance was resized");
        budget.reread_database_max();
        assert_eq!(budget.learn_database_max(None), Some(50), "a failed read keeps what was read");

        budget.set_form(Some(7), None);
        assert_eq!(budget.cap(), Some(7));
        budget.set_form(None, Some(20));
        assert_eq!(budget.cap(), Some(100), "known since the first read: binds at once");
        budget.set_form(None, None);
        assert_eq!(budget.cap(), None);
    }

    #[test]
    fn a_percentage_before_any_read_waits_for_one_connection() {
        let budget = Budget::new(Some(4), None);
        budget.set_form(None, Some(10));
        assert_eq!(budget.cap(), None);
        assert_eq!(budget.max.load(Ordering::Relaxed), 1);
        assert_eq!(budget.learn_database_max(None), None, "no number: no cap");
    }
}
