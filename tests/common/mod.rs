//! Test harness: a throwaway PostgreSQL (initdb into a temp dir, free port, SCRAM), a `dev`
//! role whose credential sits in a `file` source, and pgwarden running in-process on
//! 127.0.0.1:0 in front of it. Also a raw-bytes client for malformed-input tests.

#![allow(dead_code)]

pub mod moto;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use pgwarden::config::Config;
use pgwarden::dev::{DevEnv, DevOptions};
use pgwarden::{Server, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub struct Harness {
    pub env: DevEnv,
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    /// Starts with the dev defaults (pool of 5), after `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Harness {
        Self::start_full(false, |_, c| tweak(c)).await
    }

    /// Like `start_with`, but `tweak` also sees the environment (to create roles, write files).
    /// `backend_tls`: PostgreSQL serves TLS and pgwarden connects with verify-full.
    pub async fn start_full(backend_tls: bool, tweak: impl FnOnce(&DevEnv, &mut Config)) -> Harness {
        Self::start_async(backend_tls, async |env, config| tweak(env, config)).await
    }

    /// Like `start_full`, with an async `tweak` (to create secrets in moto, say).
    pub async fn start_async(backend_tls: bool, tweak: impl AsyncFnOnce(&DevEnv, &mut Config)) -> Harness {
        let _ = tracing_subscriber::fmt().with_env_filter("pgwarden=debug").with_test_writer().try_init();
        let opts = DevOptions { port: 0, metrics_port: None, pool_size: 5, worker_threads: 1, backend_tls };
        let env = DevEnv::prepare(&opts).await.expect("throwaway PostgreSQL starts");
        let mut config = env.config.clone();
        tweak(&env, &mut config).await;
        let server = Server::bind(config).await.expect("pgwarden binds");
        let addr = server.local_addr();
        let shared = server.shared();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(
            async move {
                let _ = stopped.await;
            },
            std::future::pending(),
        ));
        Harness { env, addr, shared, stop: Some(stop), server: Some(server) }
    }

    /// Does what SIGTERM does: pgwarden stops accepting and drains. The handle completes when
    /// `Server::run` returns.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.take().expect("shut down once").send(());
        self.server.take().expect("server task")
    }

    pub fn conn_str(&self) -> String {
        self.conn_str_with_password(self.env.password())
    }

    pub fn conn_str_with_password(&self, password: &str) -> String {
        self.conn_str_as(&self.env.user, password)
    }

    /// A libpq-style URL-less connection string for psql/pgbench (password via PGPASSWORD).
    pub fn libpq_conn(&self) -> String {
        format!("host={} port={} user={} dbname={}", self.addr.ip(), self.addr.port(), self.env.user, self.env.database)
    }

    pub async fn client_result(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(&self.conn_str()).await
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.conn_str()).await.expect("client connects through pgwarden")
    }

    /// Runs SQL directly on Postgres as the superuser (not through the proxy).
    pub fn admin(&self, sql: &str) -> String {
        self.env.cluster.psql(sql).expect("admin SQL runs")
    }

    /// Runs the real pgbench through the proxy (blocking); returns its report, failing the test
    /// if pgbench fails.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(self.env.cluster.client_tool("pgbench"))
            .args(args)
            .arg(self.libpq_conn())
            .env("PGPASSWORD", self.env.password())
            .output()
            .expect("pgbench runs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
        text
    }

    /// Backend connections Postgres has open for the dev role.
    pub fn backend_count(&self) -> usize {
        self.admin("SELECT count(*) FROM pg_stat_activity WHERE usename = 'dev'").parse().unwrap()
    }
}

/// Waits (up to 10 s) until exactly `n` clients wait in `pool`'s queue.
pub async fn until_waiting(pool: &pgwarden::pool::PoolEntry, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while pool.waiting() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} clients waiting, expected {n}", pool.waiting()));
}

impl Harness {
    /// Connects over TLS (`sslmode=require`), trusting the dev CA, as `user` with `password`.
    pub async fn tls_client_as(&self, user: &str, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.tls_client_trusting(&self.env.ca_cert_path, user, password).await
    }

    pub async fn tls_client_trusting(
        &self,
        ca: &std::path::Path,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.tls_client_full(ca, user, password, &self.env.database).await
    }

    pub async fn tls_client_full(
        &self,
        ca: &std::path::Path,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.addr.ip().to_string())
            .port(self.addr.port())
            .user(user)
            .dbname(database)
            .password(password)
            .ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config.connect(tls_connector(ca)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Waits (up to 20 s) until PostgreSQL has exactly `n` backends for the dev role.
    pub async fn until_backends(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.backend_count() != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} backends, expected {n}", self.backend_count()));
    }

    /// The pool of the dev role and database (created if no client has used it yet).
    pub fn dev_pool(&self) -> Arc<pgwarden::pool::PoolEntry> {
        self.pool_of(&self.env.user)
    }

    /// The pool of `user` (one with a credential entry) and the dev database.
    pub fn pool_of(&self, user: &str) -> Arc<pgwarden::pool::PoolEntry> {
        let store = &self.shared.user(user).expect("a configured user").store.clone();
        self.shared.pools.entry(&pgwarden::pool::PoolKey::new(user, &self.env.database), store)
    }

    /// A connection string for `user` with `password`, to pgwarden.
    pub fn conn_str_as(&self, user: &str, password: &str) -> String {
        format!("host={} port={} user={user} dbname={} password={password}", self.addr.ip(), self.addr.port(), self.env.database)
    }

    /// A metric's value on the Prometheus page (unlabelled series only); 0 before it is first set.
    pub fn metric(&self, name: &str) -> f64 {
        let page = self.shared.metrics.render();
        let value = page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok());
        value.unwrap_or(0.0)
    }

    /// The sum of `name`'s series, whatever their labels.
    pub fn metric_total(&self, name: &str) -> f64 {
        let page = self.shared.metrics.render();
        let series = page.lines().filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])));
        series.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    /// Waits (up to 20 s) until `name`'s value satisfies `ok`.
    pub async fn until_metric(&self, name: &str, ok: impl Fn(f64) -> bool) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !ok(self.metric(name)) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} stayed at {}", self.metric(name)));
    }

    /// Every audit line written so far, parsed.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        self.shared.audit.sync();
        let text = std::fs::read_to_string(&self.env.audit_path).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("audit lines are JSON")).collect()
    }

    /// Creates a login role (quoted, so any name works), writes its credential file, and
    /// adds a credential entry for it with `iam_auth`. Returns the role's password.
    pub fn add_user(env: &DevEnv, config: &mut Config, name: &str, iam_auth: pgwarden::config::IamAuth) -> String {
        let password = format!("pw-{}", rand_suffix());
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        env.cluster.psql(&format!("CREATE ROLE {quoted} LOGIN PASSWORD '{password}'")).expect("role created");
        let secret = serde_json::json!({"username": name, "password": password, "engine": "postgres"});
        let path = env.cluster.dir().join(format!("user-{}.json", rand_suffix()));
        pgwarden::dev::write_private(&path, secret.to_string().as_bytes()).unwrap();
        config.credentials.push(pgwarden::config::CredentialConfig {
            user: name.to_owned(),
            source: pgwarden::config::SourceConfig::File { path },
            refresh_interval: Duration::from_secs(1),
            iam_auth,
        });
        password
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A rustls connector for tokio-postgres that trusts `ca` only.
pub fn tls_connector(ca: &std::path::Path) -> tokio_postgres_rustls::MakeRustlsConnect {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}

/// The Python interpreter of the venv `scripts/test.sh` sets up (boto3 installed).
pub fn test_python() -> std::path::PathBuf {
    let path = std::env::var_os("PGWARDEN_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python"));
    assert!(path.exists(), "{} is missing: run scripts/test.sh, which sets up the Python venv with boto3", path.display());
    path
}

/// Runs a Python `script` (with `args`) in the test venv, off the async runtime; returns what it
/// printed, or fails the test with what it said on stderr.
pub async fn run_python(script: &'static str, args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(test_python()).arg("-c").arg(script).args(args).output())
        .await
        .expect("the blocking task runs")
        .expect("python runs");
    assert!(out.status.success(), "the Python client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What boto3 needs to sign a token.
pub struct AwsKey<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub region: &'a str,
}

/// A token made by boto3's `generate_db_auth_token` (credentials passed in the environment).
pub fn boto3_token(key: &AwsKey<'_>, host: &str, port: u16, user: &str) -> String {
    let script = "import boto3, sys\n\
s = boto3.session.Session(region_name=sys.argv[4])\n\
print(s.client('rds').generate_db_auth_token(DBHostname=sys.argv[1], Port=int(sys.argv[2]), DBUsername=sys.argv[3]))";
    let mut cmd = std::process::Command::new(test_python());
    cmd.arg("-c").arg(script).arg(host).arg(port.to_string()).arg(user).arg(key.region);
    cmd.env_clear()
        .env("AWS_ACCESS_KEY_ID", key.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", key.secret_access_key)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    if let Some(t) = key.session_token {
        cmd.env("AWS_SESSION_TOKEN", t);
    }
    let out = cmd.output().expect("python runs");
    assert!(out.status.success(), "boto3 failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub async fn connect(conn_str: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The first column of every row the statements return, as text ("NULL" for null).
pub async fn first_column(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let rows = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .collect()
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// A client that speaks raw bytes, for input no driver would send.
pub struct RawClient {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

/// A message read back: tag and body.
#[derive(Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: BytesMut,
}

impl Msg {
    /// (SQLSTATE, message) of an ErrorResponse.
    pub fn error_fields(&self) -> (String, String) {
        let (code, msg) = pgwarden::protocol::messages::parse_error_fields(&self.body);
        (code.unwrap_or_default(), msg.unwrap_or_default())
    }
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient { stream: TcpStream::connect(addr).await.unwrap(), buf: BytesMut::new() }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one message, or `None` if the proxy closed the connection.
    pub async fn recv(&mut self) -> Option<Msg> {
        let read = async {
            loop {
                if self.buf.len() >= 5 {
                    let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                    if self.buf.len() > len {
                        let tag = self.buf[0];
                        let mut m = self.buf.split_to(len + 1);
                        m.advance(5);
                        return Some(Msg { tag, body: m });
                    }
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read).await.expect("proxy answers or closes; it must not hang")
    }

    /// The tags of the messages up to and including the next ReadyForQuery.
    pub async fn recv_until_ready(&mut self) -> Vec<u8> {
        let mut tags = Vec::new();
        while let Some(m) = self.recv().await {
            tags.push(m.tag);
            if m.tag == b'Z' {
                break;
            }
        }
        tags
    }

    /// Reads one raw byte (the answer to SSLRequest/GSSENCRequest).
    pub async fn recv_byte(&mut self) -> u8 {
        let mut b = [0u8; 1];
        self.stream.read_exact(&mut b).await.unwrap();
        b[0]
    }

    /// Expects a FATAL ErrorResponse with `code`, then the proxy closing the connection.
    /// Returns the error's message.
    pub async fn expect_fatal_then_close(&mut self, code: &str) -> String {
        let m = self.recv().await.expect("an ErrorResponse, not a silent close or a hang");
        assert_eq!(m.tag, b'E', "expected an ErrorResponse");
        let (got, message) = m.error_fields();
        assert_eq!(got, code, "{message}");
        assert!(self.closed().await);
        message
    }

    /// True once the proxy has closed the connection (after any messages still in flight).
    pub async fn closed(&mut self) -> bool {
        while self.recv().await.is_some() {}
        true
    }

    /// Startup + SCRAM login as `user`; returns the messages after AuthenticationOk.
    pub async fn login(&mut self, user: &str, database: &str, password: &str) -> Vec<Msg> {
        self.login_with(user, database, password, &[]).await
    }

    /// [`RawClient::login`] with more startup parameters.
    pub async fn login_with(&mut self, user: &str, database: &str, password: &str, more: &[(&str, &str)]) -> Vec<Msg> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut params = vec![("user", user), ("database", database)];
        params.extend_from_slice(more);
        self.send(&startup_packet(196_608, &params)).await;
        let m = self.recv().await.unwrap();
        assert_eq!(m.tag, b'R');
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out).unwrap();
        self.send(&out).await;
        let m = self.recv().await.unwrap();
        scram.update(&m.body[4..]).unwrap();
        out.clear();
        postgres_protocol::message::frontend::sasl_response(scram.message(), &mut out).unwrap();
        self.send(&out).await;
        let mut after = Vec::new();
        loop {
            let m = self.recv().await.expect("login completes");
            let done = m.tag == b'Z';
            after.push(m);
            if done {
                return after;
            }
        }
    }
}

pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(version);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A Parse of `sql` as the statement `name` (no parameter types), then Sync.
pub fn parse_and_sync(name: &str, sql: &str) -> Vec<u8> {
    let body = [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat();
    let mut msgs = vec![b'P'];
    msgs.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
    msgs.extend_from_slice(&body);
    msgs.extend_from_slice(&[b'S', 0, 0, 0, 4]);
    msgs
}

pub fn query_message(sql: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out).unwrap();
    out.to_vec()
}
