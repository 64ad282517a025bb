//! The `pgwarden` command: `serve`, `check-config`, `dev`, `token`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgwarden::dev::{DevEnv, DevOptions};
use pgwarden::{Config, Server};

#[derive(Parser)]
#[command(name = "pgwarden", version, about = "PostgreSQL credential proxy: transaction pooling, rotation-proof credentials")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Serve {
        #[arg(long, default_value = "config/pgwarden.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    CheckConfig { config: PathBuf },
    /// Throwaway Postgres + a dev credential + the proxy, removed on Ctrl-C.
    Dev {
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Serve Prometheus metrics on 127.0.0.1:<port>.
        #[arg(long)]
        metrics_port: Option<u16>,
        #[arg(long, default_value_t = 10)]
        pool_size: usize,
        /// Threads serving clients (default: half the cores, at least one).
        #[arg(long)]
        worker_threads: Option<usize>,
        /// Run PostgreSQL with TLS and connect to it with verify-full.
        #[arg(long)]
        backend_tls: bool,
        /// Rotate the dev credential live this often (e.g. "30s"), through the four rotation
        /// steps, to watch a rotation under your own pgbench run.
        #[arg(long, value_parser = humantime::parse_duration)]
        rotate_every: Option<std::time::Duration>,
    },
    /// Rotate an RDS secret in Secrets Manager: all four steps, or one (`--step`, `--token`),
    /// as a rotation Lambda would (standard AWS credential chain, region and endpoint).
    Rotate {
        #[arg(long)]
        secret_id: String,
        #[arg(long, value_parser = ["single", "alternating"], default_value = "single")]
        strategy: String,
        /// One step: createSecret, setSecret, testSecret or finishSecret (needs --token).
        #[arg(long, requires = "token")]
        step: Option<String>,
        /// The rotation's version id (ClientRequestToken).
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        endpoint_url: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
    /// Print an IAM auth token, as `aws rds generate-db-auth-token` does, signed with the
    /// standard AWS credential chain (environment, profile, ...).
    Token {
        /// The proxy endpoint name clients connect to (one of its iam.endpoints).
        #[arg(long)]
        hostname: String,
        #[arg(long, default_value_t = 5432)]
        port: u16,
        #[arg(long)]
        username: String,
        /// Defaults to the AWS region of the environment or profile.
        #[arg(long)]
        region: Option<String>,
        /// Token lifetime in seconds (at most 900).
        #[arg(long, default_value_t = 900)]
        expires_in: u64,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGWARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // stderr: stdout is the audit log's default (`audit.output = "stdout"`), one JSON line each.
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr).init();
}

/// A single worker runs a current-thread event loop (no hand-offs between threads).
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Cmd::Serve { config: path } => {
            let config = Config::from_file(&path)?;
            runtime(config.worker_threads)?.block_on(async {
                let server = Server::bind(config).await?;
                pgwarden::reload::spawn_on_sighup(server.shared(), path)?;
                server.run(pgwarden::shutdown::signal(), pgwarden::shutdown::signal()).await;
                Ok(())
            })
        }
        Cmd::CheckConfig { config } => {
            let c = Config::from_file(&config)?;
            println!(
                "{}: ok (listen {}, {} worker thread(s), database {}:{}/{}, {} credential entr{})",
                config.display(),
                c.listen,
                c.worker_threads,
                c.database.host,
                c.database.port,
                c.database.dbname,
                c.credentials.len(),
                if c.credentials.len() == 1 { "y" } else { "ies" }
            );
            Ok(())
        }
        Cmd::Dev { port, metrics_port, pool_size, worker_threads, backend_tls, rotate_every } => {
            let threads = worker_threads.unwrap_or_else(pgwarden::config::default_worker_threads);
            let opts = DevOptions { port, metrics_port, pool_size, worker_threads: threads, backend_tls };
            runtime(threads)?.block_on(dev(opts, rotate_every))
        }
        Cmd::Rotate { secret_id, strategy, step, token, endpoint_url, region } => runtime(1)?.block_on(async {
            use pgwarden::rotation::{Rotator, Step, Strategy};
            let strategy = if strategy == "alternating" { Strategy::Alternating } else { Strategy::Single };
            let client = pgwarden::credentials::aws::client(endpoint_url.as_deref(), region.as_deref()).await;
            let rotator = Rotator::new(client, secret_id, strategy, None);
            match (step, token) {
                (Some(step), Some(token)) => {
                    let step = Step::parse(&step).with_context(|| format!("unknown step {step:?}"))?;
                    rotator.run_step(step, &token).await?;
                }
                (None, token) => {
                    anyhow::ensure!(token.is_none(), "--token goes with --step");
                    let token = rotator.rotate().await?;
                    println!("rotated: new AWSCURRENT version {token}");
                }
                (Some(_), None) => anyhow::bail!("--step needs --token"),
            }
            Ok(())
        }),
        Cmd::Token { hostname, port, username, region, expires_in } => {
            anyhow::ensure!((1..=900).contains(&expires_in), "--expires-in must be between 1 and 900 seconds");
            runtime(1)?.block_on(token(&hostname, port, &username, region, expires_in))
        }
    }
}

async fn token(hostname: &str, port: u16, username: &str, region: Option<String>, expires_in: u64) -> anyhow::Result<()> {
    use aws_credential_types::provider::ProvideCredentials;
    use pgwarden::auth::sigv4::{SigningCredentials, mint};
    use secrecy::{ExposeSecret, SecretString};
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r));
    }
    let sdk = loader.load().await;
    let region = sdk.region().context("no AWS region: pass --region or set AWS_REGION")?.to_string();
    let provider = sdk.credentials_provider().context("no AWS credential provider configured")?;
    let creds = provider.provide_credentials().await.context("loading AWS credentials")?;
    let secret = SecretString::from(creds.secret_access_key());
    let session = creds.session_token().map(SecretString::from);
    let signing = SigningCredentials { access_key_id: creds.access_key_id(), secret_access_key: &secret, session_token: session.as_ref() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    println!("{}", mint(hostname, port, username, &region, &signing, now, expires_in).expose_secret());
    Ok(())
}

async fn dev(opts: DevOptions, rotate_every: Option<std::time::Duration>) -> anyhow::Result<()> {
    let env = DevEnv::prepare(&opts).await.context("starting the throwaway PostgreSQL")?;
    let server = Server::bind(env.config.clone()).await?;
    let addr = server.local_addr();
    let conn = format!("host={} port={} user={} dbname={}", addr.ip(), addr.port(), env.user, env.database);
    println!("\npgwarden dev is up: PostgreSQL on 127.0.0.1:{} behind pgwarden on {addr}.", env.cluster.port);
    println!("Credential file (Secrets Manager RDS shape): {}", env.secret_path.display());
    if let Some(p) = opts.metrics_port {
        println!("Metrics: http://127.0.0.1:{p}/metrics");
    }
    println!("TLS certificate's CA: {}", env.ca_cert_path.display());
    println!("Audit log (one JSON line per login): {}", env.audit_path.display());
    println!("\nPaste into another terminal. With the password (SCRAM, or over TLS):\n");
    println!("  export PGPASSWORD='{}'", env.password());
    println!("  psql \"{conn}\"");
    println!("  pgbench -i -s 1 \"{conn}\"");
    println!("  pgbench -c 16 -j 2 -T 10 -M extended \"{conn}\"");
    // The dev keyring's one key, passed inline so it never clobbers real AWS settings.
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "pgwarden".into());
    let aws_env = format!(
        "AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} AWS_REGION={}",
        env.access_key_id,
        secrecy::ExposeSecret::expose_secret(env.secret_access_key()),
        pgwarden::dev::DEV_REGION
    );
    let token = format!("$({aws_env} {exe} token --hostname {} --port {} --username {})", addr.ip(), addr.port(), env.user);
    println!("\nWith an IAM auth token over TLS (the dev key lives only in this throwaway keyring):\n");
    println!("  PGPASSWORD=\"{token}\" psql \"{conn} sslmode=require\"");
    println!("  PGPASSWORD=\"{token}\" pgbench -C -c 16 -j 2 -T 10 -S \"{conn} sslmode=require\"");
    if let Some(every) = rotate_every {
        println!("\nThe dev password rotates every {} (AWSPENDING → ALTER ROLE → AWSCURRENT): the", humantime::format_duration(every));
        println!("password above stops working for new logins after the first rotation; the token lines keep working,");
        println!("and running clients never notice. Rotations are logged.");
    }
    println!("\nCtrl-C stops pgwarden and deletes the database.\n");
    let shared = server.shared();
    let env = std::sync::Arc::new(env);
    let rotation = rotate_every.map(|every| {
        let env = std::sync::Arc::clone(&env);
        tokio::spawn(async move {
            let pause = (every / 4).min(std::time::Duration::from_secs(3));
            let mut n = 0u64;
            loop {
                tokio::time::sleep(every).await;
                n += 1;
                match pgwarden::dev::rotate_dev_credential(&env.cluster, &env.secret_path, pause).await {
                    Ok(()) => tracing::info!(rotation = n, "dev credential rotated"),
                    Err(e) => tracing::warn!(error = %e, "dev credential rotation failed"),
                }
            }
        })
    });
    server.run(pgwarden::shutdown::signal(), pgwarden::shutdown::signal()).await;
    if let Some(task) = rotation {
        task.abort();
        let _ = task.await;
    }
    shared.audit.sync();
    drop(env);
    Ok(())
}
