//! Configuration: a raw TOML shape that refuses unknown keys, validated into typed settings.
//! Every refusal names the key and the reason. Durations are strings (`"120s"`, `"30m"`),
//! optional features are `Option`, relative paths are taken from the config file's folder.
//! No password is ever read from here: credentials point at a source.

mod raw;

pub use raw::default_worker_threads;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax { path: PathBuf, line: usize, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// libpq's `sslmode` values that make sense for a proxy (no "prefer": the operator decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendTlsMode {
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

/// libpq's `target_session_attrs`, for the servers a backend login accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    /// Not in hot standby, and transactions not read-only by default.
    ReadWrite,
    /// Not in hot standby.
    Primary,
}

impl SessionAttrs {
    pub fn name(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::Primary => "primary",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub host: String,
    pub port: u16,
    /// Database used when a client names none.
    pub dbname: String,
    pub tls: BackendTlsMode,
    /// CA bundle for `verify-ca` / `verify-full` (e.g. RDS's global bundle).
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// TCP keepalive for backend connections (the top-level `tcp_keepalive`).
    pub tcp_keepalive: Option<Duration>,
    /// Which servers a backend login accepts: after a failover, a DNS name that still points at
    /// the old writer (now a standby) must not get the pool's new connections.
    pub target_session_attrs: SessionAttrs,
}

/// Client-facing TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Refuse clients that do not ask for TLS.
    pub require: bool,
    /// How often the certificate files are checked for changes.
    pub reload_interval: Duration,
}

/// RDS Proxy's per-secret `IAMAuth`, plus a mode that takes either.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IamAuth {
    /// SCRAM with the credential's password.
    Disabled,
    /// Only an IAM auth token, only over TLS.
    Required,
    /// Over TLS: an IAM token or the credential's password; without TLS: SCRAM.
    Optional,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyringSourceConfig {
    File { path: PathBuf },
    /// The same JSON as the AWSCURRENT `SecretString` of a Secrets Manager secret, read with
    /// the standard credential chain and region.
    Aws { secret_id: String, region: Option<String>, endpoint_url: Option<String> },
}

/// IAM token verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IamConfig {
    /// `host:port` names clients put in their tokens (the proxy's endpoint names). A bare host
    /// means the listen port.
    pub endpoints: Vec<(String, Option<u16>)>,
    /// The proxy's resource id in `arn:aws:rds-db:<region>:<account>:dbuser:<proxy_id>/<user>`.
    pub proxy_id: String,
    pub account_id: String,
    /// How far in the future a token's X-Amz-Date may be.
    pub max_clock_skew: Duration,
    pub keyring: KeyringSourceConfig,
    pub keyring_refresh_interval: Duration,
}

/// Where the audit log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Backend connections per (user, database) pool.
    pub max_backend_connections: usize,
    /// Backend connections across all pools (RDS Proxy's MaxConnectionsPercent as a count,
    /// PgBouncer's `max_db_connections`); `None`: only each pool's own cap.
    pub max_total_backend_connections: Option<usize>,
    /// The same cap as a percentage of the database's `max_connections`, read at the first
    /// backend login (RDS Proxy's MaxConnectionsPercent); exclusive with the count.
    pub max_connections_percent: Option<u8>,
    pub min_idle_backend_connections: usize,
    pub borrow_timeout: Duration,
    /// Time a client has to finish startup and authentication.
    pub login_timeout: Duration,
    pub idle_client_timeout: Option<Duration>,
    /// Clients connected this long are closed at their next transaction boundary (RDS Proxy
    /// closes client connections after 24 hours): an IAM login is checked once, so this bounds
    /// how long a session outlives its principal's access.
    pub client_max_lifetime: Option<Duration>,
    pub backend_idle_timeout: Option<Duration>,
    pub backend_max_lifetime: Option<Duration>,
    /// After a failed backend login while the pool has other connections open, how long before
    /// it tries another (PgBouncer's `server_login_retry`); its clients wait for those meanwhile.
    pub backend_login_retry_delay: Duration,
    pub max_client_connections: usize,
    /// Cap on any one message's body, either direction.
    pub max_message_bytes: usize,
    /// A parameter change the proxy cannot carry to the next backend (`SET ROLE`, `set_config`
    /// of a computed name) pins the session (RDS Proxy's default; false with its
    /// `EXCLUDE_VARIABLE_SETS` filter).
    pub pin_variable_sets: bool,
    /// Named prepared statements each backend keeps for clients (PgBouncer's
    /// `max_prepared_statements`); 0: a named statement pins its session, as on RDS Proxy.
    pub max_prepared_statements: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    File { path: PathBuf },
    /// AWS Secrets Manager, through the standard credential chain and region.
    Aws { secret_id: String, region: Option<String>, endpoint_url: Option<String> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialConfig {
    /// The database user clients log in as.
    pub user: String,
    pub source: SourceConfig,
    pub refresh_interval: Duration,
    pub iam_auth: IamAuth,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    /// Threads serving clients: 1 runs a single-threaded event loop (like PgBouncer).
    pub worker_threads: usize,
    /// How long a shutdown waits for clients to finish their transactions (see `shutdown`).
    pub shutdown_timeout: Duration,
    /// Idle time before TCP keepalive probes on client and backend sockets; `None` = off.
    pub tcp_keepalive: Option<Duration>,
    pub database: DatabaseConfig,
    pub pool: PoolConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: Option<TlsConfig>,
    pub iam: Option<IamConfig>,
    pub audit: AuditTarget,
    pub credentials: Vec<CredentialConfig>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, path, base)
    }

    /// Parses TOML text; `origin` names it in errors, `base` anchors relative paths.
    pub fn from_toml(text: &str, origin: &Path, base: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            // The message names the key; the span gives the line. The source line itself is
            // not echoed, in case someone pasted a secret into the file.
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1).unwrap_or(0);
            ConfigError::Syntax { path: origin.to_owned(), line, message: e.message().trim().to_owned() }
        })?;
        raw.validate(base)
    }
}

/// The longest duration any key takes: deadlines are clock readings plus a duration, which a
/// larger one would overflow. (Timeouts that can be turned off take "off".)
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value).map_err(|e| invalid(key, format!("invalid duration {value:?}: {e}")))?;
    if d > MAX_DURATION {
        return Err(invalid(key, format!("{value:?} is longer than 10 years")));
    }
    Ok(d)
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| invalid(key, format!("{value:?} is not an address like 127.0.0.1:6432")))
}

/// A duration setting a reload may change while it is in use (`reload`); each read takes the
/// value current then. `None` is "off" (a key that takes "off").
pub struct LiveDuration(std::sync::atomic::AtomicU64);

impl LiveDuration {
    /// (Nanoseconds; `u64::MAX` is off. Durations are at most ten years, see `parse_duration`.)
    const OFF: u64 = u64::MAX;

    pub fn new(d: Option<Duration>) -> LiveDuration {
        let live = LiveDuration(std::sync::atomic::AtomicU64::new(Self::OFF));
        live.set(d);
        live
    }

    pub fn get(&self) -> Option<Duration> {
        Some(self.0.load(std::sync::atomic::Ordering::Relaxed)).filter(|&n| n != Self::OFF).map(Duration::from_nanos)
    }

    pub fn set(&self, d: Option<Duration>) {
        let nanos = d.map_or(Self::OFF, |d| u64::try_from(d.as_nanos()).unwrap_or(Self::OFF - 1).min(Self::OFF - 1));
        self.0.store(nanos, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
