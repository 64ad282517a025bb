//! Reloading the configuration while pgwarden serves (`reload`, SIGHUP): users added and
//! removed, pools made larger and smaller, a broken file or an unreadable new credential
//! refused with nothing changed, and `pgwarden serve` reloading its file on SIGHUP. Connected
//! clients keep working through every reload.

mod common;

use std::time::Duration;

use common::{Harness, first_column as values, sqlstate};
use pgwarden::config::IamAuth;
use pgwarden::reload::{ReloadError, reload, reload_file};

/// `n` clients, each inside an open transaction (holding a backend).
async fn hold_in_transactions(h: &Harness, n: usize) -> Vec<tokio_postgres::Client> {
    let mut holders = Vec::new();
    for _ in 0..n {
        let c = h.client().await;
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        holders.push(c);
    }
    holders
}

/// The configuration the harness runs now.
async fn running(h: &Harness) -> pgwarden::config::Config {
    h.shared.running_config().await
}

#[tokio::test]
async fn users_come_and_go_without_dropping_connected_clients() {
    let h = Harness::start().await;
    let old_client = h.client().await;
    assert_eq!(values(&old_client, "SELECT current_user").await, [h.env.user.as_str()]);

    let mut config = running(&h).await;
    let password = Harness::add_user(&h.env, &mut config, "newcomer", IamAuth::Disabled);
    let report = reload(&h.shared, config.clone()).await.unwrap();
    assert_eq!((report.added.as_slice(), report.removed.len(), report.pool_changed), (&["newcomer".to_owned()][..], 0, false));
    let newcomer = common::connect(&h.conn_str_as("newcomer", &password)).await.expect("the added user logs in");
    assert_eq!(values(&newcomer, "SELECT current_user").await, ["newcomer"]);

    // The dev user leaves the file: new logins are refused as RDS Proxy refuses a role it has
    // no secret for; the session already open carries on.
    config.credentials.retain(|c| c.user != h.env.user);
    let report = reload(&h.shared, config).await.unwrap();
    assert_eq!(report.removed, [h.env.user.as_str()]);
    let err = h.client_result().await.err().expect("a removed user cannot log in");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"));
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("no credentials for the role"), "{err:?}");
    assert_eq!(values(&old_client, "SELECT 40 + 2").await, ["42"]);
    assert_eq!(values(&newcomer, "SELECT 1").await, ["1"]);
    // The removed user's pool still serves that session: it still counts as allowed room.
    let size = h.env.config.pool.max_backend_connections as f64;
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), 2.0 * size);
    // Its last session gone, the old pool closes its connections (long before any idle timeout)
    // and no longer counts.
    drop(old_client);
    h.until_backends(0).await;
    h.until_metric("MaxDatabaseConnectionsAllowed", |m| m == size).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_pool_serves_waiting_clients_and_a_smaller_one_closes_connections() {
    let h = Harness::start_with(|c| c.pool.borrow_timeout = Duration::from_secs(60)).await;
    // Five clients hold the pool's five connections in open transactions.
    let holders = hold_in_transactions(&h, 5).await;
    let waiting = h.client().await;
    let query = tokio::spawn(async move { values(&waiting, "SELECT 'served'").await });
    common::until_waiting(&h.dev_pool(), 1).await;

    let mut config = running(&h).await;
    config.pool.max_backend_connections = 7;
    assert!(reload(&h.shared, config.clone()).await.unwrap().pool_changed);
    let served = tokio::time::timeout(Duration::from_secs(20), query).await.expect("served without a release").unwrap();
    assert_eq!(served, ["served"]);
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), 7.0);

    // Smaller than what is open: released connections close until the pool fits.
    config.pool.max_backend_connections = 2;
    reload(&h.shared, config).await.unwrap();
    // The idle one goes at once; nothing closes under a client mid-transaction.
    h.until_backends(5).await;
    for c in &holders {
        c.batch_execute("COMMIT").await.unwrap();
    }
    h.until_backends(2).await;
    // The two left serve everyone, in turn: the pool never opens more meanwhile.
    let peak = concurrent_sleeps(&h, &holders).await;
    assert!(peak <= 2, "the pool opened {peak} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_borrow_timeout_applies_to_clients_already_waiting() {
    let h = Harness::start_with(|c| c.pool.borrow_timeout = Duration::from_secs(120)).await;
    let holders = hold_in_transactions(&h, 5).await;
    let waiting = h.client().await;
    let query = tokio::spawn(async move { waiting.simple_query("SELECT 1").await.map(|_| ()) });
    common::until_waiting(&h.dev_pool(), 1).await;
    let mut config = running(&h).await;
    config.pool.borrow_timeout = Duration::from_millis(300);
    reload(&h.shared, config).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), query).await.expect("not the old 120 s").unwrap().unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.message()), Some("Timed-out waiting to acquire database connection."));
    // A client queueing now waits the new timeout too.
    let late = h.client().await;
    let err = tokio::time::timeout(Duration::from_secs(20), late.simple_query("SELECT 1")).await.expect("the new timeout").unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.message()), Some("Timed-out waiting to acquire database connection."));
    drop(holders);
}

#[tokio::test]
async fn a_replaced_credential_entry_serves_new_logins_from_a_new_pool() {
    let h = Harness::start().await;
    let old_client = h.client().await;
    let old_pool = h.dev_pool();
    // iam_auth alone: the same credential and pool.
    let mut config = running(&h).await;
    let dev = config.credentials.iter().position(|c| c.user == h.env.user).unwrap();
    assert_eq!(config.credentials[dev].iam_auth, IamAuth::Optional);
    config.credentials[dev].iam_auth = IamAuth::Disabled;
    let report = reload(&h.shared, config.clone()).await.unwrap();
    assert_eq!((report.updated, report.replaced.len()), (vec![h.env.user.clone()], 0));
    assert!(std::sync::Arc::ptr_eq(&old_pool, &h.dev_pool()));

    // A new secret file with a new password: new logins use it, from a new pool.
    h.admin(&format!("ALTER ROLE \"{}\" PASSWORD 'moved-Pa55word'", h.env.user));
    let moved = h.env.cluster.dir().join("moved.json");
    let secret = serde_json::json!({"username": h.env.user, "password": "moved-Pa55word"});
    pgwarden::dev::write_private(&moved, secret.to_string().as_bytes()).unwrap();
    config.credentials[dev].source = pgwarden::config::SourceConfig::File { path: moved };
    let report = reload(&h.shared, config).await.unwrap();
    assert_eq!(report.replaced, [h.env.user.as_str()]);
    let new_client = common::connect(&h.conn_str_with_password("moved-Pa55word")).await.expect("the new secret's password");
    assert_eq!(values(&new_client, "SELECT 'new'").await, ["new"]);
    assert!(!std::sync::Arc::ptr_eq(&old_pool, &h.dev_pool()));
    // The session from before runs on, on the old pool's connection.
    assert_eq!(values(&old_client, "SELECT 'old'").await, ["old"]);
}

#[tokio::test]
async fn a_reload_that_cannot_load_changes_nothing() {
    let h = Harness::start().await;
    let client = h.client().await;
    let dir = h.env.cluster.dir();

    // A syntax error: refused with the file's line, counted.
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "listen = \"127.0.0.1:0\"\n[pool\n").unwrap();
    let err = reload_file(&h.shared, &broken).await.expect_err("a broken file is refused");
    assert!(matches!(err, ReloadError::Config(_)) && err.to_string().contains("broken.toml:2"), "{err}");
    assert_eq!(h.metric("pgwarden_config_reloads{result=\"refused\"}"), 1.0);

    // A new user whose credential cannot be read, beside a pool change: neither applies.
    let mut config = running(&h).await;
    config.pool.max_backend_connections = 9;
    config.credentials.push(pgwarden::config::CredentialConfig {
        user: "ghost".into(),
        source: pgwarden::config::SourceConfig::File { path: dir.join("no-such-secret.json") },
        refresh_interval: Duration::from_secs(1),
        iam_auth: IamAuth::Disabled,
    });
    let err = reload(&h.shared, config).await.expect_err("an unreadable credential is refused");
    assert!(err.to_string().starts_with("credentials for user ghost"), "{err}");
    assert!(h.shared.user("ghost").is_none());
    assert_eq!(running(&h).await.pool.max_backend_connections, 5);
    assert_eq!(values(&client, "SELECT 1").await, ["1"]);
    assert!(h.client_result().await.is_ok(), "the configured user still logs in");
}

#[tokio::test]
async fn a_new_idle_client_timeout_applies_to_clients_that_log_in_after() {
    let h = Harness::start().await;
    let before = h.client().await;
    let mut config = running(&h).await;
    config.pool.idle_client_timeout = Some(Duration::from_millis(200));
    let report = reload(&h.shared, config).await.unwrap();
    assert!(report.pool_changed && report.needs_restart.is_empty(), "{report:?}");
    let mut after = common::RawClient::connect(h.addr).await;
    after.login(&h.env.user, &h.env.database, h.env.password()).await;
    after.expect_fatal_then_close("57P05").await;
    // (The client from before keeps the timeout it logged in with: 30 minutes.)
    assert_eq!(values(&before, "SELECT 1").await, ["1"]);
}

/// The settings a session takes when it connects: clients that connect after a reload get the
/// new `max_message_bytes` and the new cap on clients; a client from before keeps its own.
#[tokio::test]
async fn session_limits_and_the_client_cap_apply_to_clients_that_connect_after() {
    let h = Harness::start().await;
    let before = h.client().await;
    let mut config = running(&h).await;
    config.pool.max_message_bytes = 1024;
    config.pool.max_client_connections = 2;
    let report = reload(&h.shared, config.clone()).await.unwrap();
    assert!(report.pool_changed && report.needs_restart.is_empty(), "{report:?}");
    let long = format!("SELECT length('{}')", "x".repeat(2000));
    assert_eq!(values(&before, &long).await, ["2000"]);

    let mut after = common::RawClient::connect(h.addr).await;
    after.login(&h.env.user, &h.env.database, h.env.password()).await;
    let err = h.client_result().await.err().expect("a third client is over max_client_connections");
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    config.pool.max_client_connections = 3;
    reload(&h.shared, config).await.unwrap();
    let third = h.client().await;
    assert_eq!(values(&third, "SELECT 3").await, ["3"]);

    after.send(&common::query_message(&long)).await;
    after.expect_fatal_then_close("08P01").await;
    assert_eq!(values(&before, &long).await, ["2000"]);
}

/// A cap on all pools set, lowered and changed to a percentage by reloads: nothing closes under
/// a client mid-transaction, released connections close until the cap holds, and no more
/// open after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_on_all_pools_set_by_reload_closes_connections_down_to_it() {
    let h = Harness::start_with(|c| c.pool.borrow_timeout = Duration::from_secs(60)).await;
    let holders = hold_in_transactions(&h, 4).await;
    let mut config = running(&h).await;
    config.pool.max_total_backend_connections = Some(2);
    reload(&h.shared, config.clone()).await.unwrap();
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), 2.0);
    for c in &holders {
        assert_eq!(values(c, "SELECT 'still in my transaction'").await, ["still in my transaction"]);
        c.batch_execute("COMMIT").await.unwrap();
    }
    h.until_backends(2).await;
    let peak = concurrent_sleeps(&h, &holders).await;
    assert!(peak <= 2, "{peak} connections open or opening under a cap of 2");

    // RDS Proxy's form instead: 1% of max_connections (300 in the test clusters: 3), known
    // since the first connection, so it binds at once.
    let cap = h.admin("SHOW max_connections").parse::<usize>().unwrap() / 100;
    assert!((3..holders.len()).contains(&cap), "the test needs a cap between 2 and the clients");
    config.pool.max_total_backend_connections = None;
    config.pool.max_connections_percent = Some(1);
    reload(&h.shared, config).await.unwrap();
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), cap as f64);
    let peak = concurrent_sleeps(&h, &holders).await;
    assert_eq!(peak, cap, "four clients at once under a cap of {cap}");
}

/// An instance resized (PostgreSQL restarted with a larger `max_connections`) and a reload: the
/// percentage cap follows the new `max_connections`, read on the next connection opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percentage_cap_follows_a_resized_database_after_a_reload() {
    let h = Harness::start_with(|c| {
        c.pool.max_connections_percent = Some(1);
        c.pool.max_backend_connections = 10;
        c.pool.borrow_timeout = Duration::from_secs(60);
    })
    .await;
    let cap = h.admin("SHOW max_connections").parse::<usize>().unwrap() / 100;
    assert!(cap < 5, "the test needs a cap below its 5 clients, and below 500's");
    let clients = [h.client().await, h.client().await, h.client().await, h.client().await, h.client().await];
    assert_eq!(concurrent_sleeps(&h, &clients).await, cap, "1% of max_connections");

    h.admin("ALTER SYSTEM SET max_connections = 500");
    let cluster = &h.env.cluster;
    tokio::task::block_in_place(|| cluster.restart()).unwrap();
    reload(&h.shared, running(&h).await).await.unwrap();
    // The pool's connections died with the server while idle: no client sees that (the pool
    // drops them at checkout and opens new ones, the first of which reads max_connections).
    for c in &clients {
        assert_eq!(values(c, "SELECT 'after the restart'").await, ["after the restart"]);
    }
    let clients = [h.client().await, h.client().await, h.client().await, h.client().await, h.client().await, h.client().await];
    assert_eq!(concurrent_sleeps(&h, &clients).await, 5, "1% of 500");
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), 5.0);
}

/// Every client in `clients` runs a short sleep at once; returns the most connections open or
/// opening across pools meanwhile.
async fn concurrent_sleeps(h: &Harness, clients: &[tokio_postgres::Client]) -> usize {
    let turns = clients.iter().map(|c| values(c, "SELECT 7 FROM pg_sleep(0.1)"));
    let mut all = std::pin::pin!(futures_util::future::join_all(turns));
    let mut peak = 0;
    loop {
        peak = peak.max(h.shared.pools.total_open());
        if let Ok(answers) = tokio::time::timeout(Duration::from_millis(1), all.as_mut()).await {
            assert!(answers.iter().all(|a| a == &["7"]));
            return peak;
        }
    }
}

/// `pgwarden serve` itself: a user added to its file logs in after a SIGHUP.
#[tokio::test]
async fn serve_reloads_its_file_on_sighup() {
    use tokio::io::AsyncBufReadExt;
    let h = Harness::start().await;
    let dir = h.env.cluster.dir();
    let port = pgwarden::devdb::free_port().unwrap();
    let db = &h.env.config.database;
    let base = format!(
        "listen = \"127.0.0.1:{port}\"\n[database]\nhost = \"{}\"\nport = {}\ndbname = \"{}\"\n[audit]\noutput = \"off\"\n\
         [[credentials]]\nuser = \"{}\"\nsource = \"file\"\npath = \"{}\"\n",
        db.host,
        db.port,
        db.dbname,
        h.env.user,
        h.env.secret_path.display()
    );
    let path = dir.join("serve.toml");
    std::fs::write(&path, &base).unwrap();
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(serve.stderr.take().unwrap()).lines();
    let mut until_line = async |text: &str| {
        let wait = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(text) {
                    return line;
                }
            }
            panic!("pgwarden exited before logging {text:?}");
        };
        tokio::time::timeout(Duration::from_secs(30), wait).await.unwrap_or_else(|_| panic!("no {text:?} in 30 s"))
    };
    until_line("accepting clients").await;
    let conn_str = |user: &str, password: &str| format!("host=127.0.0.1 port={port} user={user} dbname={} password={password}", db.dbname);
    let mut extra = h.env.config.clone();
    let password = Harness::add_user(&h.env, &mut extra, "late", IamAuth::Disabled);
    let err = common::connect(&conn_str("late", &password)).await.err().expect("not configured yet");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"));

    let late_path = source_of(&extra, "late");
    std::fs::write(&path, format!("{base}[[credentials]]\nuser = \"late\"\nsource = \"file\"\npath = \"{}\"\n", late_path.display())).unwrap();
    let pid = serve.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let line = until_line("configuration reloaded").await;
    assert!(line.contains(r#"added=["late"]"#), "{line}");
    let late = common::connect(&conn_str("late", &password)).await.expect("the added user logs in after SIGHUP");
    assert_eq!(values(&late, "SELECT current_user").await, ["late"]);
    let _ = serve.kill().await;
}

/// Where `user`'s credential file is, in `config`.
fn source_of(config: &pgwarden::config::Config, user: &str) -> std::path::PathBuf {
    let entry = config.credentials.iter().find(|c| c.user == user).expect("configured");
    match &entry.source {
        pgwarden::config::SourceConfig::File { path } => path.clone(),
        other => panic!("{other:?}"),
    }
}
