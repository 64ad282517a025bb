//! Each pool's state as Prometheus series, computed when `/metrics` is scraped: PgBouncer's
//! `SHOW POOLS` for dashboards and alerts (clients waiting, how long the longest has waited,
//! backend connections idle and in use), one series per (user, database) pool in use. Only
//! names go into labels, escaped as the exposition format requires; never a credential.

use std::time::Instant;

use super::{PoolEntry, Pools, lock};
use crate::metrics::{label_value, write_family};

/// One pool's state at a scrape.
struct Snapshot {
    idle: usize,
    /// Connections lent to clients or being opened.
    in_use: usize,
    waiting: usize,
    /// How long the longest-waiting client has waited, in seconds.
    max_wait: f64,
}

impl PoolEntry {
    fn snapshot(&self, now: Instant) -> Snapshot {
        let borrow_timeout = self.borrow_timeout();
        let st = lock(&self.state);
        let mut waiting = 0;
        let mut first_deadline: Option<Instant> = None;
        for q in st.waiting.iter().filter(|q| q.waits()) {
            waiting += 1;
            // (Not always the front: a client whose login failed queues there again.)
            first_deadline = Some(first_deadline.map_or(q.deadline, |d| d.min(q.deadline)));
        }
        // (A client's deadline is when it queued plus the borrow timeout.)
        let max_wait = first_deadline
            .and_then(|d| d.checked_sub(borrow_timeout))
            .map_or(0.0, |queued| now.saturating_duration_since(queued).as_secs_f64());
        Snapshot { idle: st.idle.len(), in_use: st.open.saturating_sub(st.idle.len()), waiting, max_wait }
    }
}

impl Pools {
    /// Appends the per-pool series to a scrape's exposition.
    pub fn render_per_pool(&self, out: &mut String) {
        let mut entries = self.entries();
        entries.sort_by(|a, b| (&a.key.user, &a.key.database).cmp(&(&b.key.user, &b.key.database)));
        let now = Instant::now();
        let pools: Vec<(String, Snapshot)> = entries
            .iter()
            .map(|e| (format!("user=\"{}\",database=\"{}\"", label_value(&e.key.user), label_value(&e.key.database)), e.snapshot(now)))
            .collect();
        let each = |value: fn(&Snapshot) -> f64| pools.iter().map(move |(labels, s)| (labels.clone(), value(s)));
        write_family(
            out,
            "pgwarden_pool_clients_waiting",
            "gauge",
            "Clients waiting for a backend connection, per pool (PgBouncer's cl_waiting).",
            each(|s| s.waiting as f64),
        );
        write_family(
            out,
            "pgwarden_pool_max_wait_seconds",
            "gauge",
            "How long the longest-waiting client of the pool has waited (PgBouncer's maxwait).",
            each(|s| s.max_wait),
        );
        let by_state = pools.iter().flat_map(|(labels, s)| {
            [(format!("{labels},state=\"idle\""), s.idle as f64), (format!("{labels},state=\"in_use\""), s.in_use as f64)]
        });
        write_family(
            out,
            "pgwarden_pool_backend_connections",
            "gauge",
            "Backend connections of the pool: idle, or in use (lent to a client or being opened).",
            by_state,
        );
    }
}

