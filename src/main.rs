//! The `pgwarden` command: `serve`, `check-config`, `dev`.

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
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGWARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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
        Cmd::Serve { config } => {
            let config = Config::from_file(&config)?;
            runtime(config.worker_threads)?.block_on(async {
                let server = Server::bind(config).await?;
                server.run(shutdown_signal()).await;
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
        Cmd::Dev { port, metrics_port, pool_size, worker_threads } => {
            let threads = worker_threads.unwrap_or_else(pgwarden::config::default_worker_threads);
            runtime(threads)?.block_on(dev(DevOptions { port, metrics_port, pool_size, worker_threads: threads }))
        }
    }
}

async fn dev(opts: DevOptions) -> anyhow::Result<()> {
    let env = DevEnv::prepare(&opts).await.context("starting the throwaway PostgreSQL")?;
    let server = Server::bind(env.config.clone()).await?;
    let addr = server.local_addr();
    let conn = format!("host={} port={} user={} dbname={}", addr.ip(), addr.port(), env.user, env.database);
    println!("\npgwarden dev is up: PostgreSQL on 127.0.0.1:{} behind pgwarden on {addr}.", env.cluster.port);
    println!("Credential file (Secrets Manager RDS shape): {}", env.secret_path.display());
    if let Some(p) = opts.metrics_port {
        println!("Metrics: http://127.0.0.1:{p}/metrics");
    }
    println!("\nPaste into another terminal:\n");
    println!("  export PGPASSWORD='{}'", env.password());
    println!("  psql \"{conn}\"");
    println!("  pgbench -i -s 1 \"{conn}\"");
    println!("  pgbench -c 16 -j 2 -T 10 -M extended \"{conn}\"");
    println!("\nCtrl-C stops pgwarden and deletes the database.\n");
    server.run(shutdown_signal()).await;
    drop(env);
    Ok(())
}
