//! The registry of pools: finds the pool of a (user, database), creating it with its queue
//! timer and janitor on its first client (and dropping pools nobody uses any more when it does);
//! applies a reload's pool settings to every pool (`reconfigure`) and takes a removed or changed
//! user's pools out of use (`retire_superseded`); closes idle connections at shutdown. Must not: serve a checkout (`PoolEntry` does).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::budget::Budget;
use super::manager::BackendManager;
use super::upkeep::{spawn_janitor, spawn_queue_timer};
use super::{PoolEntry, PoolKey, State, lock};
use crate::config::{DatabaseConfig, LiveDuration, PoolConfig};
use crate::credentials::CredentialStore;
use crate::metrics::Metrics;
use crate::tls::BackendTls;

/// All pools, created on first use.
pub struct Pools {
    target: DatabaseConfig,
    tls: Option<Arc<BackendTls>>,
    /// The pool settings, new ones from a reload (`reconfigure`); janitors and backend
    /// managers read them from here.
    settings: tokio::sync::watch::Sender<PoolConfig>,
    metrics: Arc<Metrics>,
    map: Mutex<HashMap<PoolKey, Arc<PoolEntry>>>,
    budget: Arc<Budget>,
}

impl Pools {
    pub fn new(target: DatabaseConfig, tls: Option<Arc<BackendTls>>, cfg: PoolConfig, metrics: Arc<Metrics>) -> Pools {
        let budget = Budget::new(cfg.max_total_backend_connections, cfg.max_connections_percent);
        let settings = tokio::sync::watch::Sender::new(cfg);
        Pools { target, tls, settings, metrics, map: Mutex::new(HashMap::new()), budget }
    }

    /// A reload's new pool settings. Every pool in use takes its new size, borrow timeout and
    /// login retry delay at once (a larger size lets waiting clients open connections now; a
    /// smaller one closes idle and released connections until it fits; waiting clients' deadlines
    /// move by the change in the timeout), its janitor the new idle timeout and `min_idle`, and
    /// connections opened from now on the new lifetime. A new cap on all pools
    /// (`max_total_backend_connections` or `max_connections_percent`) binds connections opened
    /// from now on; while more are open than it allows, released and idle ones close.
    pub fn reconfigure(&self, cfg: &PoolConfig) {
        // Published first: a pool created from here on starts with the new settings.
        self.settings.send_replace(cfg.clone());
        self.budget.set_form(cfg.max_total_backend_connections, cfg.max_connections_percent);
        let entries = self.entries();
        for entry in &entries {
            entry.max.store(cfg.max_backend_connections, Ordering::Relaxed);
            entry.login_retry_delay.set(Some(cfg.backend_login_retry_delay));
            let mut st = lock(&entry.state);
            let old_timeout = entry.borrow_timeout();
            entry.borrow_timeout.set(Some(cfg.borrow_timeout));
            for q in st.waiting.iter_mut() {
                // (Both timeouts are at most ten years: see `config`.)
                q.deadline = q.deadline.checked_add(cfg.borrow_timeout).and_then(|d| d.checked_sub(old_timeout)).unwrap_or(q.deadline);
            }
            for _ in st.open..cfg.max_backend_connections.min(st.open + st.waiting.len()) {
                entry.offer_free_room(&mut st);
            }
            drop(st);
            // (Its next look may be sooner now.)
            entry.wake_timer.notify_one();
        }
        self.publish_allowed();
    }

    /// A reload reads the database's `max_connections` again, on the next connection opened
    /// (for `max_connections_percent`: an instance resized since).
    pub fn reread_database_max(&self) {
        self.budget.reread_database_max();
    }

    /// How many pools the registry holds.
    pub fn count(&self) -> usize {
        lock(&self.map).len()
    }

    /// Every pool in the registry.
    pub(super) fn entries(&self) -> Vec<Arc<PoolEntry>> {
        lock(&self.map).values().cloned().collect()
    }

    /// Takes the pools whose credential entry a reload removed or replaced
    /// ([`CredentialStore::supersede`]) out of the registry: clients that log in from now on get
    /// new pools (with the new credential source). An old pool keeps serving the sessions it
    /// has (a connection it opens for them logs in with its old credential, which may no longer
    /// work: keep the old password valid until they have gone), warms none (`min_idle`), and
    /// closes its connections when its last session has ended (see `Drop for PoolEntry`).
    pub fn retire_superseded(&self) {
        let mut map = lock(&self.map);
        map.retain(|_, e| !e.manager.superseded());
        drop(map);
        self.publish_allowed();
    }

    fn publish_allowed(&self) {
        self.budget.publish_allowed(&self.metrics);
    }

    /// Backend connections open or being opened, all pools together (what
    /// `max_total_backend_connections` caps).
    pub fn total_open(&self) -> usize {
        lock(&self.map).values().map(|e| e.budget_held.load(Ordering::Relaxed)).sum()
    }

    /// Closes every idle backend of every pool politely (Terminate first), for shutdown.
    pub async fn close_idle(&self) {
        let entries = self.entries();
        let mut closing = tokio::task::JoinSet::new();
        for entry in entries {
            let idle = std::mem::take(&mut lock(&entry.state).idle);
            for conn in idle {
                entry.forget_one();
                closing.spawn(conn.close());
            }
        }
        // Each close gives up after a second of its own.
        while closing.join_next().await.is_some() {}
    }

    /// The pool for `key` logging in with `store`, created (with its janitor) if this is its
    /// first client. A login that began before a reload superseded `store` gets a pool of its
    /// own, outside the registry, gone with its session.
    pub fn entry(&self, key: &PoolKey, store: &Arc<CredentialStore>) -> Arc<PoolEntry> {
        let mut map = lock(&self.map);
        if let Some(e) = map.get(key)
            && e.manager.serves(store)
        {
            return Arc::clone(e);
        }
        // A new pool: first the registry lets go of pools nobody uses (clients choose the
        // database name: without this, one cycling through names would grow it for good).
        map.retain(|_, e| !unused(e));
        let manager = BackendManager::new(
            self.target.clone(),
            self.tls.clone(),
            key.database.clone(),
            Arc::clone(store),
            self.settings.subscribe(),
            Arc::clone(&self.metrics),
        );
        let cfg = self.settings.borrow().clone();
        let live = Arc::clone(&manager.live);
        let entry = Arc::new_cyclic(|me| PoolEntry {
            key: key.clone(),
            me: me.clone(),
            manager,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                waiting: VecDeque::new(),
                login_hold: None,
                live,
                budget_blocked: false,
            }),
            max: AtomicUsize::new(cfg.max_backend_connections),
            budget: Arc::clone(&self.budget),
            budget_held: AtomicUsize::new(0),
            borrow_timeout: LiveDuration::new(Some(cfg.borrow_timeout)),
            open_timeout: self.target.connect_timeout.saturating_mul(3),
            login_retry_delay: LiveDuration::new(Some(cfg.backend_login_retry_delay)),
            wake_timer: Arc::new(tokio::sync::Notify::new()),
            metrics: Arc::clone(&self.metrics),
        });
        self.budget.join(Arc::downgrade(&entry));
        spawn_janitor(Arc::downgrade(&entry), store.subscribe(), self.settings.subscribe());
        spawn_queue_timer(Arc::downgrade(&entry), Arc::clone(&entry.wake_timer));
        if store.is_superseded() {
            return entry;
        }
        // (Replacing the pool of a superseded store, if a login of the new entry came first.)
        map.insert(key.clone(), Arc::clone(&entry));
        drop(map);
        self.publish_allowed();
        entry
    }
}

/// No session holds the pool (the registry's is the only handle), no connection of it is open or
/// opening, no client waits: it can go, and a client that comes later gets a new one. (Under the
/// registry's lock, where sessions get their handles.)
fn unused(e: &Arc<PoolEntry>) -> bool {
    Arc::strong_count(e) == 1 && {
        let st = lock(&e.state);
        st.open == 0 && !st.waiting.iter().any(|q| q.waits())
    }
}
