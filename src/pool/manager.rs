//! Opening backend connections for one pool, and deciding which ones must go: the login with
//! the user's current credential (and a forced refresh when the database refuses it), one login
//! at a time, the hold after a refused credential, and retirement of connections whose login a
//! rotation superseded. Must not: queue clients or hold idle connections (the pool does).

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::backend::{self, BackendConn, BackendError, LiveGuard};
use crate::config::{DatabaseConfig, PoolConfig};
use crate::credentials::{CredentialStore, Generation, LoginFingerprint};
use crate::metrics::{GaugeGuard, Metrics};
use crate::tls::BackendTls;

/// Opens and vets backend connections for one pool.
pub struct BackendManager {
    target: DatabaseConfig,
    tls: Option<Arc<BackendTls>>,
    database: String,
    store: Arc<CredentialStore>,
    /// The pool settings, a reload's new ones included.
    settings: tokio::sync::watch::Receiver<PoolConfig>,
    metrics: Arc<Metrics>,
    server_params: OnceLock<Vec<(String, String)>>,
    /// The newest credential a backend logged in with. Connections that logged in with an
    /// older generation *and* another login retire at their next checkout.
    pub(super) newest_working: tokio::sync::watch::Sender<Option<(Generation, LoginFingerprint)>>,
    /// The generation whose every candidate the database just refused, and when: new
    /// connections fail at once until the credential changes or the hold passes, so a queue
    /// of clients gets one clear 28P01 each instead of a bad login each.
    auth_failed: Mutex<Option<(Generation, Instant)>>,
    /// One backend login at a time per pool (as PgBouncer launches them): a refused credential
    /// costs one refused login, not one per waiting client, and a burst never storms the
    /// database with logins.
    login_gate: tokio::sync::Mutex<()>,
    /// Connections of this pool logged in and not yet dropped.
    pub(super) live: Arc<AtomicUsize>,
}

/// How long a refused credential is not tried again (unless it changes first).
impl BackendManager {
    pub(super) fn new(
        target: DatabaseConfig,
        tls: Option<Arc<BackendTls>>,
        database: String,
        store: Arc<CredentialStore>,
        settings: tokio::sync::watch::Receiver<PoolConfig>,
        metrics: Arc<Metrics>,
    ) -> BackendManager {
        BackendManager {
            target,
            tls,
            database,
            store,
            settings,
            metrics,
            server_params: OnceLock::new(),
            newest_working: tokio::sync::watch::Sender::new(None),
            auth_failed: Mutex::new(None),
            login_gate: tokio::sync::Mutex::new(()),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether this pool logs in with `store`.
    pub(super) fn serves(&self, store: &Arc<CredentialStore>) -> bool {
        Arc::ptr_eq(&self.store, store)
    }

    /// Whether a reload took this pool's credential entry away (see `Pools::retire_superseded`).
    pub(super) fn superseded(&self) -> bool {
        self.store.is_superseded()
    }

    /// The parameters the backend reported at login, once any backend has logged in.
    pub(super) fn server_params(&self) -> Option<&[(String, String)]> {
        self.server_params.get().map(|v| v.as_slice())
    }
}

const AUTH_FAILURE_HOLD: Duration = Duration::from_secs(2);

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
        let first = backend::connect(&self.target, self.tls.as_deref(), &self.database, &creds, prefer, self.staggered_lifetime(), self.store.scram_keys()).await;
        let result = match first {
            Err(e) if e.is_auth_failure() => {
                // Compare generations: the periodic refresh may have published the new secret
                // while this login was being refused, before the forced one ran.
                self.store.force_refresh().await;
                let fresh = self.store.snapshot();
                if fresh.generation == creds.generation {
                    Err(e)
                } else {
                    tracing::info!(generation = fresh.generation.0, "credential changed after a refused login; retrying");
                    backend::connect(&self.target, self.tls.as_deref(), &self.database, &fresh, None, self.staggered_lifetime(), self.store.scram_keys()).await
                }
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
    pub(super) fn is_retired(&self, conn: &BackendConn) -> bool {
        self.newest_working.borrow().is_some_and(|(g, f)| conn.generation < g && conn.fingerprint != f)
    }

    /// Whether the credential changed and no backend has logged in with it yet.
    pub(super) fn probe_due(&self) -> bool {
        let generation = self.store.snapshot().generation;
        self.newest_working.borrow().is_some_and(|(g, _)| g < generation)
    }

    /// After a credential change no backend has logged in with yet, one login finds out
    /// whether the new credential works (and which login it uses), so connections made with
    /// the old one can retire even when no new connection was needed.
    pub(super) async fn probe_new_credential(&self) {
        if !self.probe_due() {
            return;
        }
        let generation = self.store.snapshot().generation;
        match self.open().await {
            Ok(conn) => {
                tracing::info!(generation = generation.0, "new credential logs in; older backends retire as they come back");
                conn.close().await;
            }
            Err(e) => tracing::warn!(error = %e, "probe login with the new credential failed; keeping the current backends"),
        }
    }

    fn staggered_lifetime(&self) -> Option<Duration> {
        // Up to 10% shorter, so connections opened together do not all retire together.
        self.settings.borrow().backend_max_lifetime.map(|l| l.mul_f64(1.0 - rand::random::<f64>() * 0.1))
    }

    pub(super) async fn open(&self) -> Result<BackendConn, BackendError> {
        self.metrics.database_connection_requests.increment(1);
        if self.tls.is_some() {
            self.metrics.database_connection_requests_with_tls.increment(1);
        }
        match self.connect_with_current_credential().await {
            Ok(mut conn) => {
                self.metrics.database_connections_setup_succeeded.increment(1);
                conn.open_guard = Some(GaugeGuard::new(&self.metrics.database_connections));
                conn.live_guard = Some(LiveGuard::new(&self.live));
                if conn.stream.is_tls() {
                    conn.tls_guard = Some(GaugeGuard::new(&self.metrics.database_connections_with_tls));
                }
                // A newer generation, or within one generation another login than before (the
                // setSecret→finishSecret window: AWSPENDING works, AWSCURRENT no longer does), so
                // the next connection tries that login first.
                let login = (conn.generation, conn.fingerprint);
                self.newest_working.send_if_modified(|newest| {
                    let newer = newest.is_none_or(|(g, f)| g < login.0 || (g == login.0 && f != login.1));
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

