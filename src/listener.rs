//! Start-up and the accept loop. [`Server::bind`] turns a [`Config`] into the one [`Shared`]
//! state every session hangs off (credential stores, pools, cancel keys, metrics), binds the
//! client listener, and [`Server::run`] accepts until shutdown, one task per client, capped by
//! `max_client_connections`, then drains (see `shutdown`).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::audit::AuditLog;
use crate::auth::UserEntry;
use crate::auth::iam::{IamVerifier, KeyringLoadError};
use crate::cancel::CancelRegistry;
use crate::config::{Config, CredentialConfig, LiveDuration, PoolConfig, SourceConfig};
use crate::credentials::aws::SecretsManagerSource;
use crate::credentials::file::FileSource;
use crate::credentials::{CredentialError, CredentialSource, CredentialStore};
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::relay::RelayLimits;
use crate::session::{self, SessionId};
use crate::tls::{BackendTls, ClientTls, TlsError};

/// State shared by every session, built once at start-up.
pub struct Shared {
    /// The configuration pgwarden started with: what a reload cannot change is read from
    /// here (see `reload` for what it can).
    pub config: Config,
    /// Configured database users, by the name clients log in with; replaced by a reload.
    users: RwLock<Arc<HashMap<String, Arc<UserEntry>>>>,
    /// The configuration as the last reload left it (= `config` until one).
    pub(crate) running: tokio::sync::Mutex<Config>,
    /// Connected clients, against `pool.max_client_connections`.
    pub(crate) client_slots: Arc<ClientSlots>,
    /// The session settings a reload changes, for clients that connect after it.
    pub session_defaults: SessionDefaults,
    pub pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    pub metrics: Arc<Metrics>,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// Client-facing TLS, if configured (SSLRequest is answered 'N' otherwise).
    pub tls: Option<Arc<ClientTls>>,
    /// IAM token verification, if configured.
    pub iam: Option<Arc<IamVerifier>>,
    pub audit: AuditLog,
    /// Set once a shutdown has begun: sessions close at their next transaction boundary.
    pub drain: Arc<crate::shutdown::Drain>,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error("credentials for user {user}: {source}")]
    Credential { user: String, #[source] source: CredentialError },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, #[source] source: std::io::Error },
    #[error("metrics.listen: cannot listen on {addr}: {source}")]
    MetricsBind { addr: SocketAddr, #[source] source: std::io::Error },
    #[error("tls: {0}")]
    ClientTls(#[source] TlsError),
    #[error("database.tls: {0}")]
    BackendTls(#[source] TlsError),
    #[error("iam.keyring: {0}")]
    Keyring(#[from] KeyringLoadError),
    #[error("audit.output: {0}")]
    Audit(#[source] std::io::Error),
}

/// What a session takes from the pool settings when it starts, which a reload changes for
/// the sessions that start after it: `pool.login_timeout`, `pool.idle_client_timeout`,
/// `pool.client_max_lifetime`, and the
/// relay's limits (`max_message_bytes`, `max_prepared_statements`, `session_pinning_filters`).
pub struct SessionDefaults {
    login: LiveDuration,
    idle_client: LiveDuration,
    client_lifetime: LiveDuration,
    limits: RwLock<RelayLimits>,
}

impl SessionDefaults {
    fn new(pool: &PoolConfig) -> SessionDefaults {
        SessionDefaults {
            login: LiveDuration::new(Some(pool.login_timeout)),
            idle_client: LiveDuration::new(pool.idle_client_timeout),
            client_lifetime: LiveDuration::new(pool.client_max_lifetime),
            limits: RwLock::new(RelayLimits::of(pool)),
        }
    }

    pub(crate) fn set(&self, pool: &PoolConfig) {
        self.login.set(Some(pool.login_timeout));
        self.idle_client.set(pool.idle_client_timeout);
        self.client_lifetime.set(pool.client_max_lifetime);
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = RelayLimits::of(pool);
    }

    pub fn login(&self) -> Duration {
        self.login.get().unwrap_or_default()
    }

    pub fn idle_client(&self) -> Option<Duration> {
        self.idle_client.get()
    }

    /// `pool.client_max_lifetime`.
    pub fn client_lifetime(&self) -> Option<Duration> {
        self.client_lifetime.get()
    }

    pub fn limits(&self) -> RelayLimits {
        *self.limits.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    /// The configured user clients log in as `name`, if there is one.
    pub fn user(&self, name: &str) -> Option<Arc<UserEntry>> {
        self.users.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Every configured user, as the last reload left them.
    pub(crate) fn users(&self) -> Arc<HashMap<String, Arc<UserEntry>>> {
        Arc::clone(&self.users.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The configuration as the last reload left it.
    pub async fn running_config(&self) -> Config {
        self.running.lock().await.clone()
    }

    pub(crate) fn replace_users(&self, users: HashMap<String, Arc<UserEntry>>) {
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(users);
    }
}

/// Loads one credential entry (its first fetch must succeed) and starts its refresh loop, which
/// ends when the entry and the pools using its store are gone.
pub(crate) async fn load_user(c: &CredentialConfig, metrics: &Arc<Metrics>) -> Result<UserEntry, StartError> {
    let source: Arc<dyn CredentialSource> = match &c.source {
        SourceConfig::File { path } => Arc::new(FileSource::new(path.clone())),
        SourceConfig::Aws { secret_id, region, endpoint_url } => {
            let client = crate::credentials::aws::client(endpoint_url.as_deref(), region.as_deref()).await;
            Arc::new(SecretsManagerSource::new(client, secret_id.clone()))
        }
    };
    let store = CredentialStore::load(source, Some(Arc::clone(metrics)))
        .await
        .map_err(|source| StartError::Credential { user: c.user.clone(), source })?;
    store.spawn_refresh_loop(c.refresh_interval);
    Ok(UserEntry::new(c.user.clone(), store, c.iam_auth))
}

/// Connected clients, counted against `pool.max_client_connections`, which a reload changes:
/// lowered below the count, new clients are turned away until enough have left (none is
/// dropped). Only the accept loop takes a slot, so the check and the count cannot race.
pub(crate) struct ClientSlots {
    connected: AtomicUsize,
    max: AtomicUsize,
    /// Told when the last client leaves (for the shutdown drain).
    emptied: Notify,
}

/// One connected client's place; given back when dropped.
pub(crate) struct ClientSlot(Arc<ClientSlots>);

impl ClientSlots {
    fn new(max: usize) -> Arc<ClientSlots> {
        Arc::new(ClientSlots { connected: AtomicUsize::new(0), max: AtomicUsize::new(max), emptied: Notify::new() })
    }

    /// A place for one more client, or the limit that leaves none.
    fn take(self: &Arc<Self>) -> Result<ClientSlot, usize> {
        let max = self.max.load(Ordering::Relaxed);
        if self.connected.load(Ordering::Acquire) >= max {
            return Err(max);
        }
        self.connected.fetch_add(1, Ordering::AcqRel);
        Ok(ClientSlot(Arc::clone(self)))
    }

    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub(crate) fn connected(&self) -> usize {
        self.connected.load(Ordering::Acquire)
    }

    /// Completes once no client is connected.
    async fn all_gone(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.connected() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if self.0.connected.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_waiters();
        }
    }
}

pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
}

impl Server {
    /// Loads every credential once (a failure here stops start-up), starts their refresh loops,
    /// the metrics exporter, and binds the client listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::start());
        let drain = Arc::new(crate::shutdown::Drain::default());
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics_listen {
            let listener = TcpListener::bind(addr).await.map_err(|source| StartError::MetricsBind { addr, source })?;
            metrics_addr = listener.local_addr().ok();
            tokio::spawn(crate::metrics::http::serve(listener, Arc::clone(&metrics), Arc::clone(&drain)));
        }
        let mut users = HashMap::new();
        for c in &config.credentials {
            users.insert(c.user.clone(), Arc::new(load_user(c, &metrics).await?));
        }
        let tls = match &config.tls {
            Some(t) => {
                let tls = ClientTls::load(t).map_err(StartError::ClientTls)?;
                tls.spawn_reload_loop(t.reload_interval);
                Some(tls)
            }
            None => None,
        };
        let backend_tls = BackendTls::new(&config.database).map_err(StartError::BackendTls)?.map(Arc::new);
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let listen_port = listener.local_addr().map(|a| a.port()).unwrap_or(config.listen.port());
        let iam = match &config.iam {
            Some(i) => {
                let iam = IamVerifier::load(i, listen_port).await?;
                iam.spawn_reload_loop(i.keyring_refresh_interval, metrics.keyring_reload_failures.clone());
                Some(iam)
            }
            None => None,
        };
        let audit = AuditLog::open(&config.audit).map_err(StartError::Audit)?;
        let pools = Pools::new(config.database.clone(), backend_tls, config.pool.clone(), Arc::clone(&metrics));
        let cancels = Arc::new(CancelRegistry::default());
        let shared = Arc::new(Shared {
            session_defaults: SessionDefaults::new(&config.pool),
            client_slots: ClientSlots::new(config.pool.max_client_connections),
            running: tokio::sync::Mutex::new(config.clone()),
            config,
            users: RwLock::new(Arc::new(users)),
            pools,
            cancels,
            metrics,
            metrics_addr,
            tls,
            iam,
            audit,
            drain,
        });
        // Per pool and per user at each scrape. (Weak: the metrics are part of what `shared` holds.)
        let pools_of = Arc::downgrade(&shared);
        shared.metrics.set_scrape_series(Box::new(move |out| {
            if let Some(shared) = pools_of.upgrade() {
                shared.pools.render_per_pool(out);
                let mut users: Vec<Arc<UserEntry>> = shared.users().values().cloned().collect();
                users.sort_by(|a, b| a.user.cmp(&b.user));
                crate::credentials::render_series(users.iter().map(|u| (u.user.as_str(), &*u.store)), out);
            }
        }));
        Ok(Server { shared, listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Accepts clients until `shutdown` completes, then drains: see [`Server::drain`].
    pub async fn run(self, shutdown: impl Future<Output = ()>, force: impl Future<Output = ()>) {
        tracing::info!(listen = %self.local_addr(), "pgwarden accepting clients");
        let next_id = AtomicU64::new(1);
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            };
            let id = SessionId(next_id.fetch_add(1, Ordering::Relaxed));
            match self.shared.client_slots.take() {
                Ok(slot) => {
                    let shared = Arc::clone(&self.shared);
                    tokio::spawn(async move {
                        session::run(shared, stream, peer, id).await;
                        drop(slot);
                    });
                }
                Err(limit) => {
                    tracing::warn!(%peer, "client connection limit reached");
                    tokio::spawn(session::refuse_too_many(stream, limit));
                }
            }
        }
        self.drain(force).await;
    }

    /// Closes the listener, asks every session to end at its next transaction boundary, and
    /// waits for them: until the last one has gone, `shutdown_timeout` has passed, or `force`
    /// completes. Then says goodbye (Terminate) to the idle backends.
    async fn drain(self, force: impl Future<Output = ()>) {
        let Server { shared, listener } = self;
        drop(listener);
        shared.drain.start();
        let slots = &shared.client_slots;
        let timeout = shared.config.shutdown_timeout;
        tracing::info!(clients = slots.connected(), ?timeout, "pgwarden stopped accepting clients; draining");
        tokio::select! {
            _ = slots.all_gone() => tracing::info!("every client has finished"),
            _ = tokio::time::sleep(timeout) => {
                tracing::warn!(clients = slots.connected(), "shutdown_timeout reached; closing the clients still connected");
            }
            _ = force => tracing::warn!("second signal: closing every client now"),
        }
        shared.pools.close_idle().await;
    }
}
