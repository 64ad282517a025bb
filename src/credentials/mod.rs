//! Backend credentials: what a backend login needs (user name, password), in Secrets Manager's
//! staged shape (AWSCURRENT, AWSPENDING, AWSPREVIOUS), kept fresh by a refresh loop per source.
//!
//! Owns: parsing the RDS secret JSON, the [`CredentialSource`] trait (the `file` kind here, the
//! Secrets Manager kind beside it), and [`CredentialStore`], which hands the pool a snapshot
//! tagged with a [`Generation`]. Must not: log or format a password; talk to Postgres.

pub mod aws;
pub mod file;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::watch;

/// Bumped each time the credential content changes; connections remember the one they used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

/// Which version stage a credential came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Current,
    Pending,
    Previous,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Current => "AWSCURRENT",
            Stage::Pending => "AWSPENDING",
            Stage::Previous => "AWSPREVIOUS",
        }
    }
}

/// One version of an RDS secret. `Debug` never shows the password.
#[derive(Clone, Deserialize)]
pub struct Credential {
    pub username: String,
    pub password: SecretString,
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<serde_json::Value>,
    #[serde(default)]
    pub dbname: Option<String>,
    #[serde(default)]
    pub masterarn: Option<String>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// Identifies a (user name, password) pair without holding the password: the first 8 bytes of
/// a SHA-256 over both. Lets the pool tell whether two connections logged in alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoginFingerprint(pub u64);

impl Credential {
    pub fn fingerprint(&self) -> LoginFingerprint {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.username.as_bytes());
        h.update([0u8]);
        h.update(self.password.expose_secret().as_bytes());
        let d = h.finalize();
        LoginFingerprint(u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]))
    }

    fn same_login(&self, other: &Credential) -> bool {
        self.username == other.username && self.password.expose_secret() == other.password.expose_secret()
    }
}

/// The stages of one secret, as last fetched.
#[derive(Clone, Debug)]
pub struct StagedSecret {
    pub current: Credential,
    pub pending: Option<Credential>,
    pub previous: Option<Credential>,
}

impl StagedSecret {
    fn same_as(&self, other: &StagedSecret) -> bool {
        let same = |a: &Option<Credential>, b: &Option<Credential>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_login(b),
            _ => false,
        };
        self.current.same_login(&other.current)
            && same(&self.pending, &other.pending)
            && same(&self.previous, &other.previous)
    }
}

/// A snapshot the pool logs in with.
#[derive(Debug)]
pub struct CredentialSet {
    pub generation: Generation,
    pub secret: StagedSecret,
}

impl CredentialSet {
    /// Login candidates in the order a new backend connection tries them, without repeats:
    /// AWSCURRENT, AWSPENDING, AWSPREVIOUS, except that the login that worked last (`prefer`)
    /// goes first, so the setSecret→finishSecret window costs no refused login per connection.
    pub fn candidates(&self, prefer: Option<LoginFingerprint>) -> Vec<(Stage, &Credential)> {
        let mut out: Vec<(Stage, &Credential)> = vec![(Stage::Current, &self.secret.current)];
        for (stage, c) in [(Stage::Pending, &self.secret.pending), (Stage::Previous, &self.secret.previous)] {
            if let Some(c) = c {
                if !out.iter().any(|(_, seen)| seen.same_login(c)) {
                    out.push((stage, c));
                }
            }
        }
        if let Some(i) = prefer.and_then(|p| out.iter().position(|(_, c)| c.fingerprint() == p)) {
            let first = out.remove(i);
            out.insert(0, first);
        }
        out
    }
}

#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("cannot read {path}: {source}")]
    Io { path: std::path::PathBuf, #[source] source: std::io::Error },
    /// Never carries secret text: only the JSON error's category and position.
    #[error("secret is not valid RDS secret JSON ({category} at line {line}, column {column})")]
    BadJson { category: &'static str, line: usize, column: usize },
    #[error("secret has no {0} version")]
    MissingStage(&'static str),
    #[error("secret value is binary, not an RDS secret JSON string")]
    NotAString,
    /// A Secrets Manager call failed: the call, the service's error code and message (which
    /// never contain the secret value), or the transport error.
    #[error("{op} failed: {detail}")]
    Aws { op: &'static str, transient: bool, detail: String },
}

impl CredentialError {
    /// Worth retrying soon (network, throttling), as opposed to a refusal or a bad secret.
    pub fn is_transient(&self) -> bool {
        match self {
            CredentialError::Aws { transient, .. } => *transient,
            CredentialError::Io { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn from_json(e: &serde_json::Error) -> CredentialError {
        let category = match e.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "missing or mistyped field",
            serde_json::error::Category::Eof => "unexpected end",
        };
        CredentialError::BadJson { category, line: e.line(), column: e.column() }
    }
}

/// Parses secret JSON: either one RDS secret (taken as AWSCURRENT) or an object of stages
/// `{"AWSCURRENT": {...}, "AWSPENDING": {...}, "AWSPREVIOUS": {...}}`.
pub fn parse_secret_json(text: &str) -> Result<StagedSecret, CredentialError> {
    #[derive(Deserialize)]
    struct Staged {
        #[serde(rename = "AWSCURRENT")]
        current: Option<Credential>,
        #[serde(rename = "AWSPENDING", default)]
        pending: Option<Credential>,
        #[serde(rename = "AWSPREVIOUS", default)]
        previous: Option<Credential>,
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| CredentialError::from_json(&e))?;
    let is_staged = value.get("AWSCURRENT").is_some() || value.get("AWSPENDING").is_some();
    if is_staged {
        let s: Staged = serde_json::from_value(value).map_err(|e| CredentialError::from_json(&e))?;
        let current = s.current.ok_or(CredentialError::MissingStage("AWSCURRENT"))?;
        Ok(StagedSecret { current, pending: s.pending, previous: s.previous })
    } else {
        let current: Credential = serde_json::from_value(value).map_err(|e| CredentialError::from_json(&e))?;
        Ok(StagedSecret { current, pending: None, previous: None })
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Each configured user's credential as Prometheus series, for a scrape (see
/// `Metrics::set_scrape_series`): whether the last refresh failed (the last good credential
/// serves meanwhile), how long since the source last answered, and how many times the
/// credential changed since start. Names only in labels, never secret content.
pub fn render_series<'a>(users: impl Iterator<Item = (&'a str, &'a CredentialStore)> + Clone, out: &mut String) {
    use crate::metrics::{label_value, write_family};
    let now = Instant::now();
    let each = |value: &dyn Fn(&CredentialStore) -> f64| -> Vec<(String, f64)> {
        users.clone().map(|(user, store)| (format!("user=\"{}\"", label_value(user)), value(store))).collect()
    };
    let stale = each(&|s| f64::from(u8::from(s.health_now().consecutive_failures > 0)));
    write_family(out, "pgwarden_credential_stale", "gauge", "1 while the user's last credential refresh failed (the last good one serves).", stale);
    let age = each(&|s| s.health_now().last_fetched.map_or(f64::NAN, |at| now.saturating_duration_since(at).as_secs_f64()));
    write_family(out, "pgwarden_credential_age_seconds", "gauge", "Seconds since the user's credential source last answered.", age);
    // (A counter: it starts again at 0 when a reload replaces the user's credential entry.)
    let changes = each(&|s| s.snapshot().generation.0.saturating_sub(1) as f64);
    write_family(out, "pgwarden_credential_changes_total", "counter", "Times the user's credential changed (rotations seen).", changes);
}

/// Where a secret lives. Implementations fetch all stages they can see.
pub trait CredentialSource: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<'_, Result<StagedSecret, CredentialError>>;
    /// A name for logs (a path or a secret id; never secret content).
    fn describe(&self) -> String;
}

/// Forced refreshes (after the database refused a login) run at most this often.
const MIN_FORCED_REFRESH: Duration = Duration::from_secs(1);

/// How refreshing is going, for logs, metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefreshHealth {
    /// Refreshes that failed since the last one that worked (0: the credential is fresh).
    pub consecutive_failures: u64,
    /// Refreshes that failed, ever.
    pub total_failures: u64,
    /// When the source last answered (the first fetch, or a refresh that worked).
    pub last_fetched: Option<Instant>,
}

/// The latest snapshot of one user's credential, with a loop that refreshes it.
pub struct CredentialStore {
    source: Arc<dyn CredentialSource>,
    tx: watch::Sender<Arc<CredentialSet>>,
    health: watch::Sender<RefreshHealth>,
    /// Single flight for forced refreshes, and when the last one started.
    forced: tokio::sync::Mutex<Option<Instant>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// A reload removed or replaced the credential entry this store serves (`reload`).
    superseded: std::sync::atomic::AtomicBool,
    /// SCRAM keys derived from this entry's credentials, for every pool that logs in with it
    /// (one per database): a user's second database, or a pool the registry dropped and made
    /// again, logs in without another PBKDF2.
    scram_keys: crate::backend::scram::KeyCache,
}

impl CredentialStore {
    /// Fetches once (an error here is a start-up error) and returns the store.
    pub async fn load(
        source: Arc<dyn CredentialSource>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Arc<CredentialStore>, CredentialError> {
        let secret = source.fetch().await?;
        let (tx, _) = watch::channel(Arc::new(CredentialSet { generation: Generation(1), secret }));
        let (health, _) = watch::channel(RefreshHealth { last_fetched: Some(Instant::now()), ..RefreshHealth::default() });
        Ok(Arc::new(CredentialStore {
            source,
            tx,
            health,
            forced: tokio::sync::Mutex::new(None),
            metrics,
            superseded: std::sync::atomic::AtomicBool::new(false),
            scram_keys: Default::default(),
        }))
    }

    /// Marks the store as no longer configured (a reload removed or replaced its entry): its
    /// pools leave the registry and new logins never reach them (`Pools::retire_superseded`).
    pub fn supersede(&self) {
        self.superseded.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_superseded(&self) -> bool {
        self.superseded.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn scram_keys(&self) -> &crate::backend::scram::KeyCache {
        &self.scram_keys
    }

    pub fn health(&self) -> watch::Receiver<RefreshHealth> {
        self.health.subscribe()
    }

    /// How refreshing is going now.
    pub fn health_now(&self) -> RefreshHealth {
        self.health.borrow().clone()
    }

    /// A refresh the database asked for (it refused a login): single flight, at most once per
    /// [`MIN_FORCED_REFRESH`]. Callers that arrive while one runs wait for it, then compare
    /// [`CredentialStore::snapshot`]'s generation with the one they used (the periodic refresh
    /// may have published a change first, so "this call changed it" would be the wrong question).
    pub async fn force_refresh(&self) {
        let mut last = self.forced.lock().await;
        if last.is_some_and(|at| at.elapsed() < MIN_FORCED_REFRESH) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.refresh().await {
            tracing::warn!(source = %self.source.describe(), error = %e, "forced credential refresh failed");
        }
    }

    pub fn snapshot(&self) -> Arc<CredentialSet> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<CredentialSet>> {
        self.tx.subscribe()
    }

    /// Fetches now; publishes a new generation only when some stage changed. On error the
    /// last good snapshot stays in service.
    pub async fn refresh(&self) -> Result<bool, CredentialError> {
        let secret = match self.source.fetch().await {
            Ok(s) => s,
            Err(e) => {
                self.health.send_modify(|h| {
                    h.consecutive_failures += 1;
                    h.total_failures += 1;
                });
                if let Some(m) = &self.metrics {
                    m.credential_refresh_failures.increment(1);
                }
                return Err(e);
            }
        };
        if self.health.borrow().consecutive_failures > 0 {
            tracing::info!(source = %self.source.describe(), "credential refresh works again");
        }
        // (Quietly: nobody waits on the time alone.)
        self.health.send_if_modified(|h| {
            let recovered = h.consecutive_failures > 0;
            h.consecutive_failures = 0;
            h.last_fetched = Some(Instant::now());
            recovered
        });
        let current = self.snapshot();
        if current.secret.same_as(&secret) {
            return Ok(false);
        }
        let next = Generation(current.generation.0 + 1);
        self.tx.send_replace(Arc::new(CredentialSet { generation: next, secret }));
        tracing::info!(source = %self.source.describe(), generation = next.0, "credential changed");
        Ok(true)
    }

    /// Refreshes every `interval` until the store is dropped (a reload removed its user and
    /// the last pool using it is gone).
    pub fn spawn_refresh_loop(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(store) = store.upgrade() else { return };
                if let Err(e) = store.refresh().await {
                    tracing::warn!(source = %store.source.describe(), error = %e, "credential refresh failed; keeping the last good credential");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_plain_secret_is_current() {
        let s = parse_secret_json(r#"{"engine":"postgres","username":"app","password":"pw","port":5432}"#).unwrap();
        assert_eq!(s.current.username, "app");
        assert!(s.pending.is_none());
    }

    #[test]
    fn parse_staged_secret_keeps_all_stages() {
        let s = parse_secret_json(
            r#"{"AWSCURRENT":{"username":"app","password":"a"},"AWSPENDING":{"username":"app","password":"b"}}"#,
        )
        .unwrap();
        assert_eq!(s.pending.unwrap().password.expose_secret(), "b");
    }

    #[test]
    fn parse_error_never_echoes_secret_text() {
        let err = parse_secret_json(r#"{"username":"app","password":12345678}"#).err().unwrap();
        assert!(!err.to_string().contains("12345678"), "{err}");
        let err = parse_secret_json(r#"{"username":"app"}"#).err().unwrap();
        assert!(matches!(err, CredentialError::BadJson { .. }));
        let err = parse_secret_json(r#"{"AWSPENDING":{"username":"a","password":"topsecret"}}"#).err().unwrap();
        assert!(matches!(err, CredentialError::MissingStage("AWSCURRENT")));
    }

    #[test]
    fn credential_debug_redacts_password() {
        let s = parse_secret_json(r#"{"username":"app","password":"hunter2"}"#).unwrap();
        let shown = format!("{:?}", s);
        assert!(!shown.contains("hunter2") && shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn candidates_skip_duplicate_logins() {
        let s = parse_secret_json(
            r#"{"AWSCURRENT":{"username":"app","password":"a"},"AWSPENDING":{"username":"app","password":"a"},"AWSPREVIOUS":{"username":"app","password":"z"}}"#,
        )
        .unwrap();
        let set = CredentialSet { generation: Generation(1), secret: s };
        let stages: Vec<Stage> = set.candidates(None).iter().map(|(s, _)| *s).collect();
        assert_eq!(stages, vec![Stage::Current, Stage::Previous]);
        let previous = set.secret.previous.as_ref().unwrap().fingerprint();
        let stages: Vec<Stage> = set.candidates(Some(previous)).iter().map(|(s, _)| *s).collect();
        assert_eq!(stages, vec![Stage::Previous, Stage::Current], "the login that worked last goes first");
        assert_ne!(previous, set.secret.current.fingerprint());
    }
}
