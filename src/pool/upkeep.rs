//! A pool's two background tasks. The queue timer ends the waits whose borrow timeout passed
//! and lifts the hold on new logins that a failed one set (see `PoolEntry::login_failed`),
//! handing its room to the front of the queue. The janitor, every second and whenever the
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
            while st.waiting.front().is_some_and(|(deadline, _)| *deadline <= now) {
                let Some((_, w)) = st.waiting.pop_front() else { break };
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
            let front = st.waiting.front().map(|(deadline, _)| *deadline);
            match (front, st.login_hold) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        wakers.into_iter().for_each(Waker::wake);
        next
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

    /// Opens connections until `min_idle` are idle (within the pool's size, and not while a
    /// failed login holds new ones back).
    async fn top_up(&self, min_idle: usize) {
        let want = {
            let mut st = lock(&self.state);
            if st.held() {
                return;
            }
            let want = min_idle.saturating_sub(st.idle.len()).min(self.max.saturating_sub(st.open));
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
pub(super) fn spawn_queue_timer(entry: Weak<PoolEntry>, hold_set: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        loop {
            let (now, next, timeout) = {
                let Some(entry) = entry.upgrade() else { return };
                let now = Instant::now();
                (now, entry.tend_queue(now), entry.borrow_timeout)
            };
            // (A zero borrow timeout must not spin.)
            let at = next.unwrap_or(now + timeout).max(now + Duration::from_millis(1));
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                _ = hold_set.notified() => {}
            }
        }
    });
}

/// The janitor (see the module doc).
pub(super) fn spawn_janitor(
    entry: Weak<PoolEntry>,
    mut credential: tokio::sync::watch::Receiver<Arc<CredentialSet>>,
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
