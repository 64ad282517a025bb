//! `pgwarden dev`: the embedded default. A throwaway PostgreSQL, a `dev` role with a random
//! password kept in a `file` credential, and the proxy in front of it on 127.0.0.1, all removed
//! again on Ctrl-C. Prints ready-to-paste psql and pgbench lines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{
    BackendTls, Config, CredentialConfig, DatabaseConfig, PoolConfig, SourceConfig,
};
use crate::devdb::{ClusterOptions, TempCluster};

pub struct DevOptions {
    pub port: u16,
    pub metrics_port: Option<u16>,
    pub pool_size: usize,
    pub worker_threads: usize,
}

/// Everything `pgwarden dev` set up; dropping it stops Postgres and deletes its files.
pub struct DevEnv {
    pub cluster: TempCluster,
    pub config: Config,
    pub user: String,
    pub database: String,
    password: secrecy::SecretString,
    pub secret_path: PathBuf,
}

impl DevEnv {
    /// Starts Postgres, creates the dev role and database, writes the credential file.
    pub async fn prepare(opts: &DevOptions) -> anyhow::Result<DevEnv> {
        let cluster = tokio::task::spawn_blocking(|| TempCluster::start(&ClusterOptions::default())).await??;
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
            let config = Config {
                listen: SocketAddr::from(([127, 0, 0, 1], opts.port)),
                worker_threads: opts.worker_threads,
                database: DatabaseConfig {
                    host: "127.0.0.1".into(),
                    port: cluster.port,
                    dbname: database.clone(),
                    tls: BackendTls::Disable,
                    connect_timeout: Duration::from_secs(10),
                },
                pool: PoolConfig {
                    max_backend_connections: opts.pool_size,
                    min_idle_backend_connections: 0,
                    borrow_timeout: Duration::from_secs(120),
                    login_timeout: Duration::from_secs(60),
                    idle_client_timeout: Some(Duration::from_secs(1800)),
                    backend_idle_timeout: Some(Duration::from_secs(600)),
                    backend_max_lifetime: Some(Duration::from_secs(3600)),
                    max_client_connections: 10_000,
                    max_message_bytes: 64 * 1024 * 1024,
                },
                metrics_listen: opts.metrics_port.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
                credentials: vec![CredentialConfig {
                    user: user.clone(),
                    source: SourceConfig::File { path: secret_path.clone() },
                    refresh_interval: Duration::from_secs(1),
                }],
            };
            Ok(DevEnv { cluster, config, user, database, password, secret_path })
        }
    }

    pub fn password(&self) -> &str {
        use secrecy::ExposeSecret;
        self.password.expose_secret()
    }
}

fn random_password() -> secrecy::SecretString {
    use rand::RngExt;
    let mut rng = rand::rng();
    let s: String = (0..32).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect();
    secrecy::SecretString::from(s)
}

/// Writes a file only its owner can read.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}
