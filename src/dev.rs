//! `pgwarden dev`: the embedded default. A throwaway PostgreSQL, a `dev` role with a random
//! password kept in a `file` credential, a self-signed TLS certificate, a keyring with one dev
//! access key (so IAM tokens work without AWS), and the proxy in front of it all on 127.0.0.1,
//! all removed again on Ctrl-C. Prints ready-to-paste psql and pgbench lines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{
    AuditTarget, BackendTlsMode, Config, CredentialConfig, DatabaseConfig, IamAuth, IamConfig, KeyringSourceConfig,
    PoolConfig, SessionAttrs, SourceConfig, TlsConfig,
};
use crate::devdb::{ClusterOptions, TempCluster};

pub struct DevOptions {
    pub port: u16,
    pub metrics_port: Option<u16>,
    pub pool_size: usize,
    pub worker_threads: usize,
    /// PostgreSQL serves TLS and pgwarden connects to it with `verify-full`.
    pub backend_tls: bool,
}

/// Everything `pgwarden dev` set up; dropping it stops Postgres and deletes its files.
pub struct DevEnv {
    pub cluster: TempCluster,
    pub config: Config,
    pub user: String,
    pub database: String,
    password: secrecy::SecretString,
    pub secret_path: PathBuf,
    /// The CA that signed the proxy's certificate (for `sslmode=verify-full`).
    pub ca_cert_path: PathBuf,
    pub keyring_path: PathBuf,
    pub audit_path: PathBuf,
    /// The dev access key in the keyring, for minting tokens.
    pub access_key_id: String,
    secret_access_key: secrecy::SecretString,
}

/// Region and account the dev keyring and policy use.
pub const DEV_REGION: &str = "us-east-1";
pub const DEV_ACCOUNT: &str = "000000000000";
pub const DEV_PROXY_ID: &str = "prx-pgwarden-dev";

impl DevEnv {
    /// Starts Postgres, creates the dev role and database, writes the credential file.
    pub async fn prepare(opts: &DevOptions) -> anyhow::Result<DevEnv> {
        let cluster_opts = ClusterOptions { ssl: opts.backend_tls, ..ClusterOptions::default() };
        let cluster = tokio::task::spawn_blocking(move || TempCluster::start(&cluster_opts)).await??;
        let user = "dev".to_owned();
        let database = "dev".to_owned();
        let password = random_password();
        {
            use secrecy::ExposeSecret;
            cluster.psql(&format!("CREATE ROLE {user} LOGIN PASSWORD '{}'", password.expose_secret()))?;
            cluster.psql(&format!("CREATE DATABASE {database} OWNER {user}"))?;
            let secret = serde_json::json!({
                "AWSCURRENT": {
                    "engine": "postgres", "host": "127.0.0.1", "port": cluster.port,
                    "username": user, "password": password.expose_secret(), "dbname": database,
                }
            });
            let secret_path = cluster.dir().join("dev.secret.json");
            write_private(&secret_path, secret.to_string().as_bytes())?;
            let (ca_cert_path, cert, key) = crate::tls::write_generated_certs(cluster.dir(), &["localhost", "127.0.0.1"])?;
            let access_key_id = format!("AKIDDEV{}", random_alnum(13).expose_secret().to_ascii_uppercase());
            let secret_access_key = random_alnum(40);
            let keyring = serde_json::json!({"keys": [{
                "access_key_id": access_key_id,
                "secret_access_key": secret_access_key.expose_secret(),
                "principal": format!("arn:aws:iam::{DEV_ACCOUNT}:user/pgwarden-dev"),
                "allow": [format!("arn:aws:rds-db:{DEV_REGION}:{DEV_ACCOUNT}:dbuser:{DEV_PROXY_ID}/*")],
            }]});
            let keyring_path = cluster.dir().join("dev.keyring.json");
            write_private(&keyring_path, keyring.to_string().as_bytes())?;
            let audit_path = cluster.dir().join("audit.log");
            let config = Config {
                listen: SocketAddr::from(([127, 0, 0, 1], opts.port)),
                worker_threads: opts.worker_threads,
                shutdown_timeout: Duration::from_secs(5),
                tcp_keepalive: Some(Duration::from_secs(60)),
                database: DatabaseConfig {
                    // The cluster's certificate names localhost: verify-full checks that name.
                    host: if opts.backend_tls { "localhost".into() } else { "127.0.0.1".into() },
                    port: cluster.port,
                    dbname: database.clone(),
                    tls: if opts.backend_tls { BackendTlsMode::VerifyFull } else { BackendTlsMode::Disable },
                    ca_file: cluster.ca_cert(),
                    connect_timeout: Duration::from_secs(10),
                    tcp_keepalive: Some(Duration::from_secs(60)),
                    target_session_attrs: SessionAttrs::Any,
                },
                pool: PoolConfig {
                    max_backend_connections: opts.pool_size,
                    max_total_backend_connections: None,
                    max_connections_percent: None,
                    min_idle_backend_connections: 0,
                    borrow_timeout: Duration::from_secs(120),
                    login_timeout: Duration::from_secs(60),
                    idle_client_timeout: Some(Duration::from_secs(1800)),
                    client_max_lifetime: Some(Duration::from_secs(24 * 3600)),
                    backend_idle_timeout: Some(Duration::from_secs(600)),
                    backend_max_lifetime: Some(Duration::from_secs(3600)),
                    backend_login_retry_delay: Duration::from_secs(1),
                    max_client_connections: 10_000,
                    max_message_bytes: 64 * 1024 * 1024,
                    pin_variable_sets: true,
                    max_prepared_statements: 200,
                },
                metrics_listen: opts.metrics_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
                tls: Some(TlsConfig { cert, key, require: false, reload_interval: Duration::from_secs(10) }),
                iam: Some(IamConfig {
                    endpoints: vec![("127.0.0.1".into(), None), ("localhost".into(), None)],
                    proxy_id: DEV_PROXY_ID.into(),
                    account_id: DEV_ACCOUNT.into(),
                    max_clock_skew: Duration::from_secs(300),
                    keyring: KeyringSourceConfig::File { path: keyring_path.clone() },
                    keyring_refresh_interval: Duration::from_secs(10),
                }),
                audit: AuditTarget::File(audit_path.clone()),
                credentials: vec![CredentialConfig {
                    user: user.clone(),
                    source: SourceConfig::File { path: secret_path.clone() },
                    refresh_interval: Duration::from_secs(1),
                    // Over TLS: an IAM token or the password; without TLS: SCRAM.
                    iam_auth: IamAuth::Optional,
                }],
            };
            Ok(DevEnv {
                cluster,
                config,
                user,
                database,
                password,
                secret_path,
                ca_cert_path,
                keyring_path,
                audit_path,
                access_key_id,
                secret_access_key,
            })
        }
    }

    pub fn password(&self) -> &str {
        use secrecy::ExposeSecret;
        self.password.expose_secret()
    }

    /// The dev access key's secret, for minting tokens (`pgwarden token` reads it from the
    /// standard AWS environment variables).
    pub fn secret_access_key(&self) -> &secrecy::SecretString {
        &self.secret_access_key
    }

    /// A token for the dev user, as `aws rds generate-db-auth-token` would make it.
    pub fn token(&self, host: &str, port: u16, user: &str) -> secrecy::SecretString {
        let creds = crate::auth::sigv4::SigningCredentials {
            access_key_id: &self.access_key_id,
            secret_access_key: &self.secret_access_key,
            session_token: None,
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        crate::auth::sigv4::mint(host, port, user, DEV_REGION, &creds, now, 900)
    }
}

fn random_password() -> secrecy::SecretString {
    random_alnum(32)
}

fn random_alnum(len: usize) -> secrecy::SecretString {
    use rand::RngExt;
    let mut rng = rand::rng();
    let s: String = (0..len).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect();
    secrecy::SecretString::from(s)
}

/// Writes a file only its owner can read.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

/// One rotation of the dev credential file through the four rotation steps, with the stage
/// rules of Secrets Manager: the new password appears as AWSPENDING, the database takes it
/// (as a SCRAM verifier), then it becomes AWSCURRENT and the old one AWSPREVIOUS. `pause` sits
/// between the steps so the proxy sees each state (it refreshes the file every second).
pub async fn rotate_dev_credential(cluster: &TempCluster, secret_path: &std::path::Path, pause: Duration) -> anyhow::Result<()> {
    use secrecy::ExposeSecret;
    let text = std::fs::read_to_string(secret_path)?;
    let mut staged: serde_json::Value = serde_json::from_str(&text)?;
    let current = staged.get("AWSCURRENT").cloned().ok_or_else(|| anyhow::anyhow!("no AWSCURRENT in {}", secret_path.display()))?;
    let user = current.get("username").and_then(|u| u.as_str()).unwrap_or_default().to_owned();
    let password = random_password();
    let mut pending = current.clone();
    pending["password"] = password.expose_secret().into();
    // createSecret
    staged["AWSPENDING"] = pending.clone();
    write_atomically(secret_path, &staged)?;
    tokio::time::sleep(pause).await;
    // setSecret: the verifier, never the password, goes to the server.
    let verifier = postgres_protocol::password::scram_sha_256(password.expose_secret().as_bytes());
    let sql = format!("ALTER ROLE \"{}\" PASSWORD '{verifier}'", user.replace('"', "\"\""));
    cluster.psql(&sql)?;
    tokio::time::sleep(pause).await;
    // finishSecret
    let staged = serde_json::json!({ "AWSCURRENT": pending, "AWSPREVIOUS": current });
    write_atomically(secret_path, &staged)?;
    Ok(())
}

fn write_atomically(path: &std::path::Path, value: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    write_private(&tmp, value.to_string().as_bytes())?;
    std::fs::rename(tmp, path)
}
