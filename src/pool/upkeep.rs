//! A pool's two background tasks. The queue timer ends the waits whose borrow timeout passed
//! and lifts the hold on new logins that a failed one set (see `PoolEntry::login_failed`),
//! handing its room to the front of the queue; for a pool blocked by the cap across pools
//! (`budget`) it takes room as it frees up and closes another pool's idle connection to free
//! some. The janitor, every second and whenever the
//! credential changes, checks that a changed credential logs in (so older connections can
//! retire), closes idle connections that expired or retired, and keeps `min_idle` warm. Both
//! hold only a weak reference and stop when the pool is gone. Must not: serve clients (the
//! pool's checkout does).

use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::queue::Wait;
use super::{PoolEntry, lock};
use crate::backend::BackendConn;
use crate::config::PoolConfig;
use crate::credentials::CredentialSet;

impl PoolEntry {
    /// Tells the waiting clients whose borrow deadline has passed, and lifts a login hold that
    /// has run out; returns when to look again (the front deadline or the hold's end).
    fn tend_queue(&self, now: Instant) -> Option<Instant> {
        let mut wakers = Vec::new();
        let next = {
            let mut st = lock(&self.state);
            while st.waiting.front().is_some_and(|q| q.deadline <= now) {
                let Some(super::Queued { waiter: w, .. }) = st.waiting.pop_front() else { break };
                let mut slot = lock(&w);
                if let Wait::Waiting(waker, deposit) = std::mem::replace(&mut *slot, Wait::Gone) {
                    *slot = Wait::TimedOut(deposit);
                    wakers.extend(waker);
                }
            }
            if st.login_hold.is_some_and(|until| until <= now) {
                st.login_hold = None;
                // One login to find out whether the database takes connections again; each one
                // that succeeds lets the next waiting client open another (`login_succeeded`).
                self.offer_free_room(&mut st);
            }
            if st.budget_blocked {
                self.tend_blocked(&mut st);
            }
            let front = st.waiting.front().map(|q| q.deadline);
            match (front, st.login_hold) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        wakers.into_iter().for_each(Waker::wake);
        next
    }

    /// A pool blocked by the cap on all pools: takes what room there is while it is next in
    /// line (`Budget::is_first_blocked`) for its waiting clients, and stops being blocked once
    /// it has no room of its own left or no client waits but those opening connections of
    /// their own.
    fn tend_blocked(&self, st: &mut super::State) {
        loop {
            if st.open >= self.max() || st.held() || !Self::needs_room(st) {
                st.budget_blocked = false;
                self.budget.unblock(self);
                return;
            }
            if self.budget.take(self, 1) == 0 {
                return;
            }
            if !Self::grant_room(st) {
                self.budget.give_back(self);
            } else if Self::needs_room(st) {
                // Still short: the next room goes to the next blocked pool.
                self.budget.to_back(self);
                if !self.budget.is_first_blocked(self) {
                    return;
                }
            }
        }
    }

    /// Whether the pool is blocked by the cap on all pools (see `budget`).
    pub(super) fn is_blocked(&self) -> bool {
        lock(&self.state).budget_blocked
    }

    /// Closes idle connections that expired or whose login retired, and (the longest idle
    /// first) those a reload left the pool too small for.
    fn evict_idle(&self, idle_timeout: Option<Duration>) {
        let now = Instant::now();
        let evicted: Vec<Box<BackendConn>> = {
            let mut st = lock(&self.state);
            let (mut keep, mut evicted): (Vec<_>, Vec<_>) =
                std::mem::take(&mut st.idle).into_iter().partition(|c| !c.expired(now, idle_timeout) && !self.manager.is_retired(c));
            // Over the pool's size (a reload made it smaller).
            let over = (st.open - evicted.len()).saturating_sub(self.max()).min(keep.len());
            evicted.extend(keep.drain(..over));
            st.idle = keep;
            evicted
        };
        for conn in evicted {
            self.close(conn);
        }
        // Over the cap on all pools (a reload lowered it): one at a time, the longest idle
        // first, looking again after each close (which gives its room back at once), so that
        // janitors of other pools doing the same close no more than the excess between them.
        while self.budget.over_cap() {
            let Some(conn) = lock(&self.state).take_longest_idle() else { break };
            self.close(conn);
        }
    }

    /// Opens connections until `min_idle` are idle (within the pool's size, and not while a
    /// failed login holds new ones back).
    async fn top_up(&self, min_idle: usize) {
        if self.manager.superseded() {
            // Out of use since a reload: it serves the sessions it has, no more.
            return;
        }
        let want = {
            let mut st = lock(&self.state);
            if st.held() {
                return;
            }
            let want = min_idle.saturating_sub(st.idle.len()).min(self.max().saturating_sub(st.open));
            let want = self.budget.take(self, want);
            st.open += want;
            want
        };
        for opened in 0..want {
            match self.open_within_timeout().await {
                Ok(conn) => self.put(conn),
                Err(_) => {
                    self.login_failed();
                    // The rest of the room counted for this round is free again (a hold the
                    // failure set keeps it so); the next round tries again.
                    for _ in opened + 1..want {
                        self.forget_one();
                    }
                    return;
                }
            }
        }
    }
}

/// The queue timer: sleeps until the next borrow deadline or the end of a login hold, or until
/// a new hold is set. An empty queue is looked at again a borrow timeout later: any client
/// queued meanwhile has a deadline no sooner than that.
pub(super) fn spawn_queue_timer(entry: Weak<PoolEntry>, wake: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        let Some(budget) = entry.upgrade().map(|e| Arc::clone(&e.budget)) else { return };
        loop {
            // Listening before looking: room freed after the look still wakes this task.
            let freed = budget.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (now, next, timeout, blocked) = {
                let Some(entry) = entry.upgrade() else { return };
                let now = Instant::now();
                let next = entry.tend_queue(now);
                // Blocked: an idle connection of another pool is closed for it (its room
                // comes back through `freed`); else a pool holding more than its share gives
                // up its next released one (`Budget::wants_from`).
                let blocked = entry.is_blocked();
                if blocked {
                    entry.budget.reclaim_idle(&entry);
                }
                (now, next, entry.borrow_timeout(), blocked)
            };
            // (A zero borrow timeout must not spin.)
            let at = next.unwrap_or(now + timeout).max(now + Duration::from_millis(1));
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                _ = wake.notified() => {}
                _ = &mut freed, if blocked => {}
            }
        }
    });
}

/// The janitor (see the module doc).
pub(super) fn spawn_janitor(
    entry: Weak<PoolEntry>,
    mut credential: tokio::sync::watch::Receiver<Arc<CredentialSet>>,
    mut settings: tokio::sync::watch::Receiver<PoolConfig>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = credential.changed() => if changed.is_err() { return },
                changed = settings.changed() => if changed.is_err() { return },
            }
            let Some(entry) = entry.upgrade() else { return };
            // (The probe's login counts against the cap on all pools: with no room there, the
            // old connections keep serving until a later round finds some.)
            if entry.manager.probe_due() && entry.budget.take(&entry, 1) == 1 {
                entry.manager.probe_new_credential().await;
                entry.budget.give_back(&entry);
            }
            let (idle_timeout, min_idle) = {
                let cfg = settings.borrow_and_update();
                (cfg.backend_idle_timeout, cfg.min_idle_backend_connections)
            };
            entry.evict_idle(idle_timeout);
            entry.top_up(min_idle).await;
        }
    });
}
