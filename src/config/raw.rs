//! The TOML shape as written, with defaults, and its validation into [`super::Config`].

use std::path::Path;

use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default)]
    worker_threads: Option<usize>,
    #[serde(default = "default_shutdown_timeout")]
    shutdown_timeout: String,
    #[serde(default = "default_tcp_keepalive")]
    tcp_keepalive: Option<String>,
    database: RawDatabase,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    metrics: Option<RawMetrics>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    iam: Option<RawIam>,
    #[serde(default)]
    audit: Option<RawAudit>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    #[serde(default)]
    require: bool,
    #[serde(default = "default_tls_reload")]
    reload_interval: String,
}

fn default_tcp_keepalive() -> Option<String> {
    Some("60s".into())
}

fn default_shutdown_timeout() -> String {
    "25s".into()
}

fn default_tls_reload() -> String {
    "10s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIam {
    endpoints: Vec<String>,
    proxy_id: String,
    account_id: String,
    #[serde(default = "default_skew")]
    max_clock_skew: String,
    keyring: RawKeyring,
}

fn default_skew() -> String {
    "5m".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyring {
    source: String,
    path: Option<String>,
    secret_id: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    #[serde(default = "default_keyring_refresh")]
    refresh_interval: String,
}

fn default_keyring_refresh() -> String {
    "10s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    /// A file path, "stdout", or "off".
    output: String,
}

/// Half the cores, at least one: the database and the clients usually share the machine, and
/// on a small one a single event loop wastes less time handing work between threads.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get() / 2).unwrap_or(1).max(1)
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_dbname")]
    dbname: String,
    #[serde(default = "default_tls")]
    tls: String,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
    #[serde(default = "default_session_attrs")]
    target_session_attrs: String,
}

fn default_session_attrs() -> String {
    "any".into()
}

fn default_port() -> u16 {
    5432
}
fn default_dbname() -> String {
    "postgres".into()
}
fn default_tls() -> String {
    "disable".into()
}
fn default_connect_timeout() -> String {
    "10s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPool {
    max_backend_connections: usize,
    max_total_backend_connections: Option<usize>,
    max_connections_percent: Option<u8>,
    min_idle_backend_connections: usize,
    borrow_timeout: String,
    login_timeout: String,
    idle_client_timeout: Option<String>,
    client_max_lifetime: Option<String>,
    backend_idle_timeout: Option<String>,
    backend_max_lifetime: Option<String>,
    backend_login_retry_delay: String,
    max_client_connections: usize,
    max_message_bytes: usize,
    session_pinning_filters: Vec<String>,
    max_prepared_statements: usize,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            max_backend_connections: 20,
            max_total_backend_connections: None,
            max_connections_percent: None,
            min_idle_backend_connections: 0,
            borrow_timeout: "120s".into(),
            login_timeout: "60s".into(),
            idle_client_timeout: Some("30m".into()),
            client_max_lifetime: Some("24h".into()),
            backend_idle_timeout: Some("10m".into()),
            backend_max_lifetime: Some("1h".into()),
            backend_login_retry_delay: "1s".into(),
            max_client_connections: 10_000,
            max_message_bytes: 64 * 1024 * 1024,
            session_pinning_filters: Vec::new(),
            max_prepared_statements: 200,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    user: String,
    source: String,
    path: Option<String>,
    #[serde(default)]
    secret_id: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    endpoint_url: Option<String>,
    refresh_interval: Option<String>,
    #[serde(default)]
    iam_auth: Option<String>,
}

/// RDS Proxy's session pinning filters; the one it has, `exclude_variable_sets`, is the one
/// returned (true if given).
fn pinning_filters(filters: &[String]) -> Result<bool, ConfigError> {
    let mut exclude_variable_sets = false;
    for f in filters {
        match f.to_ascii_lowercase().as_str() {
            "exclude_variable_sets" => exclude_variable_sets = true,
            _ => return Err(invalid("pool.session_pinning_filters", format!("unknown filter {f:?} (known: \"exclude_variable_sets\")"))),
        }
    }
    Ok(exclude_variable_sets)
}

fn existing_file(key: &str, base: &Path, path: &str) -> Result<PathBuf, ConfigError> {
    let path = base.join(path);
    if !path.is_file() {
        return Err(invalid(key, format!("{} is not a readable file", path.display())));
    }
    Ok(path)
}

fn validate_iam(i: RawIam, base: &Path) -> Result<IamConfig, ConfigError> {
    if i.endpoints.is_empty() {
        return Err(invalid("iam.endpoints", "list at least one host or host:port clients connect to"));
    }
    let mut endpoints = Vec::new();
    for e in &i.endpoints {
        let bad = || invalid("iam.endpoints", format!("{e:?} is not a host or host:port"));
        let (host, port) = match e.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
            None => (e.as_str(), None),
        };
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(bad());
        }
        endpoints.push((host.to_ascii_lowercase(), port));
    }
    if i.proxy_id.is_empty() || i.proxy_id.contains(['/', ':']) {
        return Err(invalid("iam.proxy_id", "must be a resource id like prx-0123456789abcdef"));
    }
    if i.account_id.len() != 12 || !i.account_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("iam.account_id", "must be a 12-digit AWS account id"));
    }
    let k = i.keyring;
    let keyring = match k.source.as_str() {
        "file" => {
            if k.secret_id.is_some() || k.region.is_some() || k.endpoint_url.is_some() {
                return Err(invalid("iam.keyring.secret_id", "secret_id, region and endpoint_url are only for source = \"aws\""));
            }
            let path = k.path.ok_or_else(|| invalid("iam.keyring.path", "required for source = \"file\""))?;
            KeyringSourceConfig::File { path: existing_file("iam.keyring.path", base, &path)? }
        }
        "aws" => {
            if k.path.is_some() {
                return Err(invalid("iam.keyring.path", "only for source = \"file\""));
            }
            let secret_id = k.secret_id.filter(|s| !s.is_empty());
            let secret_id = secret_id.ok_or_else(|| invalid("iam.keyring.secret_id", "required for source = \"aws\" (a secret name or ARN)"))?;
            KeyringSourceConfig::Aws { secret_id, region: k.region, endpoint_url: k.endpoint_url }
        }
        other => return Err(invalid("iam.keyring.source", format!("unknown source kind {other:?} (known: \"file\", \"aws\")"))),
    };
    Ok(IamConfig {
        endpoints,
        proxy_id: i.proxy_id,
        account_id: i.account_id,
        max_clock_skew: parse_duration("iam.max_clock_skew", &i.max_clock_skew)?,
        keyring,
        keyring_refresh_interval: parse_duration("iam.keyring.refresh_interval", &k.refresh_interval)?,
    })
}

/// "off" turns an optional timeout off; anything else must parse.
fn optional_duration(key: &str, value: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    match value.as_deref() {
        None | Some("off") => Ok(None),
        Some(v) => parse_duration(key, v).map(Some),
    }
}

impl RawConfig {
    pub(super) fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let listen = parse_addr("listen", &self.listen)?;
        let worker_threads = match self.worker_threads {
            Some(0) => return Err(invalid("worker_threads", "must be at least 1")),
            Some(n) => n,
            None => default_worker_threads(),
        };
        let shutdown_timeout = parse_duration("shutdown_timeout", &self.shutdown_timeout)?;
        let tcp_keepalive = optional_duration("tcp_keepalive", &self.tcp_keepalive)?;
        if tcp_keepalive.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err(invalid("tcp_keepalive", "must be at least 1s (or \"off\")"));
        }
        let d = self.database;
        if d.host.is_empty() {
            return Err(invalid("database.host", "must not be empty"));
        }
        let tls = match d.tls.as_str() {
            "disable" => BackendTlsMode::Disable,
            "require" => BackendTlsMode::Require,
            "verify-ca" => BackendTlsMode::VerifyCa,
            "verify-full" => BackendTlsMode::VerifyFull,
            other => {
                return Err(invalid(
                    "database.tls",
                    format!("{other:?} is not one of \"disable\", \"require\", \"verify-ca\", \"verify-full\""),
                ));
            }
        };
        let ca_file = d.ca_file.map(|p| existing_file("database.ca_file", base, &p)).transpose()?;
        if matches!(tls, BackendTlsMode::VerifyCa | BackendTlsMode::VerifyFull) && ca_file.is_none() {
            return Err(invalid("database.ca_file", format!("required when database.tls = {:?}", d.tls)));
        }
        let database = DatabaseConfig {
            host: d.host,
            port: d.port,
            dbname: d.dbname,
            tls,
            ca_file,
            connect_timeout: parse_duration("database.connect_timeout", &d.connect_timeout)?,
            tcp_keepalive,
            target_session_attrs: match d.target_session_attrs.as_str() {
                "any" => SessionAttrs::Any,
                "read-write" => SessionAttrs::ReadWrite,
                "primary" => SessionAttrs::Primary,
                _ => return Err(invalid("database.target_session_attrs", "must be \"any\", \"read-write\" or \"primary\"")),
            },
        };
        let p = self.pool;
        if p.max_backend_connections == 0 {
            return Err(invalid("pool.max_backend_connections", "must be at least 1"));
        }
        if p.max_total_backend_connections == Some(0) {
            return Err(invalid("pool.max_total_backend_connections", "must be at least 1 (leave it out for no cap across pools)"));
        }
        if p.max_connections_percent.is_some_and(|pct| !(1..=100).contains(&pct)) {
            return Err(invalid("pool.max_connections_percent", "must be between 1 and 100"));
        }
        if p.max_connections_percent.is_some() && p.max_total_backend_connections.is_some() {
            return Err(invalid(
                "pool.max_connections_percent",
                "set it or pool.max_total_backend_connections, not both (both cap the connections of all pools)",
            ));
        }
        if p.min_idle_backend_connections > p.max_backend_connections {
            return Err(invalid("pool.min_idle_backend_connections", "must not exceed pool.max_backend_connections"));
        }
        if p.max_client_connections == 0 || u32::try_from(p.max_client_connections).is_err() {
            return Err(invalid("pool.max_client_connections", "must be between 1 and 4294967295"));
        }
        if p.max_message_bytes < 1024 || p.max_message_bytes > (1 << 30) {
            return Err(invalid("pool.max_message_bytes", "must be between 1024 and 1073741824"));
        }
        if p.max_prepared_statements > 100_000 {
            return Err(invalid("pool.max_prepared_statements", "must be at most 100000"));
        }
        let pool = PoolConfig {
            max_backend_connections: p.max_backend_connections,
            max_total_backend_connections: p.max_total_backend_connections,
            max_connections_percent: p.max_connections_percent,
            min_idle_backend_connections: p.min_idle_backend_connections,
            borrow_timeout: parse_duration("pool.borrow_timeout", &p.borrow_timeout)?,
            login_timeout: parse_duration("pool.login_timeout", &p.login_timeout)?,
            idle_client_timeout: optional_duration("pool.idle_client_timeout", &p.idle_client_timeout)?,
            client_max_lifetime: match optional_duration("pool.client_max_lifetime", &p.client_max_lifetime)? {
                Some(d) if d < Duration::from_secs(1) => {
                    return Err(invalid("pool.client_max_lifetime", "must be at least 1s (or \"off\")"));
                }
                d => d,
            },
            backend_idle_timeout: optional_duration("pool.backend_idle_timeout", &p.backend_idle_timeout)?,
            backend_max_lifetime: optional_duration("pool.backend_max_lifetime", &p.backend_max_lifetime)?,
            backend_login_retry_delay: match parse_duration("pool.backend_login_retry_delay", &p.backend_login_retry_delay)? {
                d if d.is_zero() => return Err(invalid("pool.backend_login_retry_delay", "must be more than 0")),
                d => d,
            },
            max_client_connections: p.max_client_connections,
            max_message_bytes: p.max_message_bytes,
            pin_variable_sets: !pinning_filters(&p.session_pinning_filters)?,
            max_prepared_statements: p.max_prepared_statements,
        };
        let metrics_listen = self.metrics.map(|m| parse_addr("metrics.listen", &m.listen)).transpose()?;
        let tls = match self.tls {
            None => None,
            Some(t) => Some(TlsConfig {
                cert: existing_file("tls.cert", base, &t.cert)?,
                key: existing_file("tls.key", base, &t.key)?,
                require: t.require,
                reload_interval: parse_duration("tls.reload_interval", &t.reload_interval)?,
            }),
        };
        let iam = self.iam.map(|i| validate_iam(i, base)).transpose()?;
        let audit = match self.audit.as_ref().map(|a| a.output.as_str()) {
            None | Some("stdout") => AuditTarget::Stdout,
            Some("off") => AuditTarget::Off,
            Some("") => return Err(invalid("audit.output", "must be a file path, \"stdout\" or \"off\"")),
            Some(path) => AuditTarget::File(base.join(path)),
        };
        let mut credentials = Vec::new();
        for (i, c) in self.credentials.into_iter().enumerate() {
            let key = |k: &str| format!("credentials[{i}].{k}");
            if c.user.is_empty() {
                return Err(invalid(key("user"), "must not be empty"));
            }
            if credentials.iter().any(|e: &CredentialConfig| e.user == c.user) {
                return Err(invalid(key("user"), format!("user {:?} has two credential entries", c.user)));
            }
            let source = match c.source.as_str() {
                "file" => {
                    let path = c.path.ok_or_else(|| invalid(key("path"), "required for source = \"file\""))?;
                    let path = base.join(path);
                    if !path.is_file() {
                        return Err(invalid(key("path"), format!("{} is not a readable file", path.display())));
                    }
                    SourceConfig::File { path }
                }
                "aws" => {
                    let secret_id = c.secret_id.clone().filter(|s| !s.is_empty());
                    let secret_id = secret_id.ok_or_else(|| invalid(key("secret_id"), "required for source = \"aws\" (a secret name or ARN)"))?;
                    if c.path.is_some() {
                        return Err(invalid(key("path"), "only for source = \"file\""));
                    }
                    SourceConfig::Aws { secret_id, region: c.region.clone(), endpoint_url: c.endpoint_url.clone() }
                }
                other => return Err(invalid(key("source"), format!("unknown source kind {other:?} (known: \"file\", \"aws\")"))),
            };
            if matches!(source, SourceConfig::File { .. }) && (c.secret_id.is_some() || c.region.is_some() || c.endpoint_url.is_some()) {
                return Err(invalid(key("secret_id"), "secret_id, region and endpoint_url are only for source = \"aws\""));
            }
            let refresh_interval = match (&c.refresh_interval, &source) {
                (Some(v), _) => parse_duration(&key("refresh_interval"), v)?,
                (None, SourceConfig::File { .. }) => Duration::from_secs(1),
                // DescribeSecret is cheap, but it is an API call: every 30 s by default.
                (None, SourceConfig::Aws { .. }) => Duration::from_secs(30),
            };
            if refresh_interval.is_zero() {
                return Err(invalid(key("refresh_interval"), "must be more than 0"));
            }
            let iam_auth = match c.iam_auth.as_deref() {
                None | Some("disabled") => IamAuth::Disabled,
                Some("required") => IamAuth::Required,
                Some("optional") => IamAuth::Optional,
                Some(other) => {
                    return Err(invalid(key("iam_auth"), format!("{other:?} is not one of \"disabled\", \"required\", \"optional\"")));
                }
            };
            if iam_auth != IamAuth::Disabled {
                if iam.is_none() {
                    return Err(invalid(key("iam_auth"), "needs an [iam] section (endpoints, proxy_id, account_id, keyring)"));
                }
                if tls.is_none() {
                    return Err(invalid(key("iam_auth"), "needs a [tls] section: IAM tokens are accepted only over TLS"));
                }
            }
            credentials.push(CredentialConfig { user: c.user, source, refresh_interval, iam_auth });
        }
        Ok(Config { listen, worker_threads, shutdown_timeout, tcp_keepalive, database, pool, metrics_listen, tls, iam, audit, credentials })
    }
}
