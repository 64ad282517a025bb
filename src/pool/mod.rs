//! Backend pools, one per (user, database): deadpool holds the idle connections and the fair
//! FIFO queue of waiting clients; [`BackendManager`] opens connections with the user's current
//! credential and refuses, at checkout, any that expired, died while idle, or logged in with a
//! credential generation older than the newest one that works. A janitor evicts expired idle
//! connections and keeps `min_idle` warm. Must not: authenticate clients or touch client sockets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics as ObjectMetrics, Object, RecycleError, RecycleResult, Timeouts};
use thiserror::Error;

use crate::backend::{self, BackendConn, BackendError};
use crate::config::{DatabaseConfig, PoolConfig};
use crate::credentials::{CredentialStore, Generation, LoginFingerprint};
use crate::metrics::{GaugeGuard, Metrics};
use crate::protocol::SqlState;
use crate::tls::BackendTls;

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
    #[error("pool is closed")]
    Closed,
}

impl PoolError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            PoolError::BorrowTimeout => SqlState::TOO_MANY_CONNECTIONS,
            PoolError::Backend(e) => e.sqlstate(),
            PoolError::Closed => SqlState::ADMIN_SHUTDOWN,
        }
    }

    pub fn client_message(&self) -> String {
        match self {
            PoolError::BorrowTimeout => "Timed-out waiting to acquire database connection.".into(),
            PoolError::Backend(e) => e.client_message(),
            PoolError::Closed => "pgwarden is shutting down.".into(),
        }
    }
}

/// Opens and vets backend connections for one pool.
pub struct BackendManager {
    target: DatabaseConfig,
    tls: Option<Arc<BackendTls>>,
    database: String,
    store: Arc<CredentialStore>,
    cfg: PoolConfig,
    metrics: Arc<Metrics>,
    server_params: Arc<OnceLock<Vec<(String, String)>>>,
    /// The newest credential a backend logged in with. Connections that logged in with an
    /// older generation *and* another login retire at their next checkout.
    newest_working: tokio::sync::watch::Sender<Option<(Generation, LoginFingerprint)>>,
    /// The generation whose every candidate the database just refused, and when: new
    /// connections fail at once until the credential changes or the hold passes, so a queue
    /// of clients gets one clear 28P01 each instead of a bad login each.
    auth_failed: Mutex<Option<(Generation, Instant)>>,
    /// One backend login at a time per pool (as PgBouncer launches them): a refused credential
    /// costs one refused login, not one per waiting client, and a burst never storms the
    /// database with logins.
    login_gate: tokio::sync::Mutex<()>,
}

/// How long a refused credential is not tried again (unless it changes first).
const AUTH_FAILURE_HOLD: Duration = Duration::from_secs(2);

impl managed::Manager for BackendManager {
    type Type = BackendConn;
    type Error = BackendError;

    /// Boxed: opening a connection is rare and its future is large; inline, it would make every
    /// checkout future (and so every transaction) kilobytes bigger.
    fn create(&self) -> impl std::future::Future<Output = Result<BackendConn, BackendError>> + Send {
        Box::pin(self.open())
    }

    async fn recycle(&self, conn: &mut BackendConn, _: &ObjectMetrics) -> RecycleResult<BackendError> {
        if conn.expired(Instant::now(), self.cfg.backend_idle_timeout) {
            return Err(RecycleError::message("expired"));
        }
        if self.is_retired(conn) {
            return Err(RecycleError::message("credential rotated"));
        }
        if conn.is_closed_or_dirty() {
            tracing::info!(pid = ?conn.key.map(|k| k.pid.0), "backend closed while idle; replacing it");
            return Err(RecycleError::message("closed while idle"));
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BackendManager {
    /// Logs in with the credential as it is now. If the database refuses every stage, the
    /// secret may have rotated under us: refresh it (single flight) and try once more.
    async fn connect_with_current_credential(&self) -> Result<BackendConn, BackendError> {
        let _one_at_a_time = self.login_gate.lock().await;
        let creds = self.store.snapshot();
        if let Some((generation, at)) = *lock(&self.auth_failed) {
            if generation == creds.generation && at.elapsed() < AUTH_FAILURE_HOLD {
                return Err(BackendError::AuthRejected { user: creds.secret.current.username.clone(), tried: "recently refused".into() });
            }
        }
        // The login that worked last goes first only while the credential is unchanged (the
        // setSecret→finishSecret window); after a change, AWSCURRENT goes first again.
        let prefer = self.newest_working.borrow().filter(|(g, _)| *g == creds.generation).map(|(_, f)| f);
        let first = backend::connect(&self.target, self.tls.as_deref(), &self.database, &creds, prefer, self.staggered_lifetime()).await;
        let result = match first {
            Err(e) if e.is_auth_failure() && self.store.force_refresh().await => {
                let creds = self.store.snapshot();
                tracing::info!(generation = creds.generation.0, "credential changed after a refused login; retrying");
                backend::connect(&self.target, self.tls.as_deref(), &self.database, &creds, prefer, self.staggered_lifetime()).await
            }
            other => other,
        };
        if let Err(e) = &result {
            if e.is_auth_failure() {
                *lock(&self.auth_failed) = Some((self.store.snapshot().generation, Instant::now()));
            }
        }
        result
    }

    /// Logged in with an older generation *and* another login than the newest that works.
    fn is_retired(&self, conn: &BackendConn) -> bool {
        self.newest_working.borrow().is_some_and(|(g, f)| conn.generation < g && conn.fingerprint != f)
    }

    /// After a credential change no backend has logged in with yet, one login finds out
    /// whether the new credential works (and which login it uses), so connections made with
    /// the old one can retire even when no new connection was needed.
    async fn probe_new_credential(&self) {
        let generation = self.store.snapshot().generation;
        if self.newest_working.borrow().is_none_or(|(g, _)| g >= generation) {
            return;
        }
        match self.open().await {
            Ok(conn) => {
                tracing::info!(generation = generation.0, "new credential logs in; older backends retire as they come back");
                conn.close().await;
            }
            Err(e) => tracing::warn!(error = %e, "new credential does not log in yet; keeping the current backends"),
        }
    }

    fn staggered_lifetime(&self) -> Option<Duration> {
        // Up to 10% shorter, so connections opened together do not all retire together.
        self.cfg.backend_max_lifetime.map(|l| l.mul_f64(1.0 - rand::random::<f64>() * 0.1))
    }

    async fn open(&self) -> Result<BackendConn, BackendError> {
        self.metrics.database_connection_requests.increment(1);
        if self.tls.is_some() {
            self.metrics.database_connection_requests_with_tls.increment(1);
        }
        match self.connect_with_current_credential().await {
            Ok(mut conn) => {
                self.metrics.database_connections_setup_succeeded.increment(1);
                conn.open_guard = Some(GaugeGuard::new(&self.metrics.database_connections));
                if conn.stream.is_tls() {
                    conn.tls_guard = Some(GaugeGuard::new(&self.metrics.database_connections_with_tls));
                }
                let login = (conn.generation, conn.fingerprint);
                self.newest_working.send_if_modified(|newest| {
                    let newer = newest.is_none_or(|(g, _)| g < login.0);
                    if newer {
                        *newest = Some(login);
                    }
                    newer
                });
                let _ = self.server_params.set(conn.server_params.clone());
                Ok(conn)
            }
            Err(e) => {
                self.metrics.database_connections_setup_failed.increment(1);
                tracing::warn!(database = %self.database, error = %e, "backend connection failed");
                Err(e)
            }
        }
    }
}

/// One pool and what its clients need to know about its backends.
pub struct PoolEntry {
    pub key: PoolKey,
    pool: managed::Pool<BackendManager>,
    server_params: Arc<OnceLock<Vec<(String, String)>>>,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
}

/// A backend lent to one client. Drop returns it to the pool; [`Lease::discard`] closes it.
pub struct Lease {
    obj: Object<BackendManager>,
    _borrowed: GaugeGuard,
}

impl Lease {
    pub fn conn(&mut self) -> &mut BackendConn {
        &mut self.obj
    }

    /// Returns a clean, idle connection to the pool, or closes it if its login has been
    /// superseded by a rotation (so connections retire one by one, as their clients finish).
    pub fn release(mut self) {
        let retired = Object::pool(&self.obj).is_some_and(|pool| pool.manager().is_retired(&self.obj));
        if retired {
            tracing::debug!(pid = ?self.obj.key.map(|k| k.pid.0), "retiring a backend with a superseded login");
            self.discard();
            return;
        }
        self.obj.idle_since = Instant::now();
    }

    /// Closes a connection in an unknown state instead of returning it.
    pub fn discard(self) {
        let conn = Object::take(self.obj);
        tokio::spawn(conn.close());
    }
}

impl PoolEntry {
    /// Borrows a backend, waiting in line up to the borrow timeout.
    pub async fn checkout(&self) -> Result<Lease, PoolError> {
        let started = Instant::now();
        let obj = self.pool.timeout_get(&self.timeouts).await.map_err(|e| match e {
            managed::PoolError::Timeout(managed::TimeoutType::Wait) => {
                self.metrics.borrow_timeouts.increment(1);
                PoolError::BorrowTimeout
            }
            managed::PoolError::Timeout(_) => PoolError::Backend(BackendError::Timeout),
            managed::PoolError::Backend(e) => PoolError::Backend(e),
            _ => PoolError::Closed,
        })?;
        self.metrics.database_connections_borrow_latency.record(started.elapsed().as_micros() as f64);
        Ok(Lease { obj, _borrowed: GaugeGuard::new(&self.metrics.database_connections_currently_borrowed) })
    }

    /// The newest credential generation a backend of this pool has logged in with.
    pub fn newest_login(&self) -> tokio::sync::watch::Receiver<Option<(Generation, LoginFingerprint)>> {
        self.pool.manager().newest_working.subscribe()
    }

    /// The parameters the backend reported at login, once any backend has logged in.
    pub fn server_params(&self) -> Option<&[(String, String)]> {
        self.server_params.get().map(|v| v.as_slice())
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
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(key) {
            return Arc::clone(e);
        }
        let server_params = Arc::new(OnceLock::new());
        let manager = BackendManager {
            target: self.target.clone(),
            tls: self.tls.clone(),
            database: key.database.clone(),
            store: Arc::clone(store),
            cfg: self.cfg.clone(),
            metrics: Arc::clone(&self.metrics),
            server_params: Arc::clone(&server_params),
            newest_working: tokio::sync::watch::Sender::new(None),
            auth_failed: Mutex::new(None),
            login_gate: tokio::sync::Mutex::new(()),
        };
        let pool = managed::Pool::builder(manager)
            .max_size(self.cfg.max_backend_connections)
            .queue_mode(deadpool::managed::QueueMode::Lifo)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a runtime is set, so building cannot fail");
        let entry = Arc::new(PoolEntry {
            key: key.clone(),
            pool,
            server_params,
            timeouts: Timeouts {
                wait: Some(self.cfg.borrow_timeout),
                create: Some(self.target.connect_timeout.saturating_mul(3)),
                recycle: None,
            },
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
            entry.pool.manager().probe_new_credential().await;
            let now = Instant::now();
            let manager = entry.pool.manager();
            let evicted = entry.pool.retain(|conn, _| !conn.expired(now, cfg.backend_idle_timeout) && !manager.is_retired(conn));
            for conn in evicted.removed {
                tokio::spawn(conn.close());
            }
            let status = entry.pool.status();
            let want = cfg.min_idle_backend_connections.saturating_sub(status.available);
            let room = status.max_size.saturating_sub(status.size);
            let open = want.min(room);
            if open > 0 {
                // Borrowing every idle connection plus `open` more makes deadpool create them.
                let mut held = Vec::new();
                for _ in 0..status.available + open {
                    match entry.pool.timeout_get(&Timeouts { wait: Some(Duration::ZERO), ..entry.timeouts }).await {
                        Ok(obj) => held.push(obj),
                        Err(_) => break,
                    }
                }
            }
        }
    });
}
