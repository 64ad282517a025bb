//! The pool's own backend logins. One refused while the pool has other connections open (here a
//! role's connection limit; in production the database's `max_connections`): the client whose
//! login it was waits for those connections instead of getting the error, the pool tries no
//! other login until `backend_login_retry_delay` has passed, and then grows again once the
//! database takes more. The janitor's `min_idle` top-up, refused and then let through.

mod common;

use std::time::Duration;

use common::{Harness, sqlstate, until_waiting};

/// A client in a transaction on the pool's one backend; the role may then have no other.
async fn holder_at_the_limit(h: &Harness) -> tokio_postgres::Client {
    let holder = h.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    h.admin(&format!("ALTER ROLE {} CONNECTION LIMIT 1", h.env.user));
    holder
}

fn ask(c: tokio_postgres::Client, sql: &'static str) -> tokio::task::JoinHandle<Result<String, tokio_postgres::Error>> {
    tokio::spawn(async move { c.query_one(sql, &[]).await.map(|r| r.get::<_, String>(0)) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_leaves_its_client_waiting_for_the_open_backend() {
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 3;
        c.pool.backend_login_retry_delay = Duration::from_secs(3600);
    })
    .await;
    let holder = holder_at_the_limit(&h).await;
    let pool = h.dev_pool();
    let first = ask(h.client().await, "SELECT 'first'");
    // The pool has room, so the first client's request opens a backend: PostgreSQL refuses it.
    h.until_metric("DatabaseConnectionsSetupFailed", |n| n == 1.0).await;
    until_waiting(&pool, 1).await;
    // The next client finds the pool holding off logins: it queues behind, without one.
    let second = ask(h.client().await, "SELECT 'second'");
    until_waiting(&pool, 2).await;
    assert!(!first.is_finished(), "the refused login's client still waits");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(first.await.unwrap().expect("served by the released backend"), "first");
    assert_eq!(second.await.unwrap().expect("served by the released backend"), "second");
    assert_eq!(h.metric("DatabaseConnectionsSetupFailed"), 1.0, "no login tried during the hold");
    assert_eq!(h.backend_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_retry_delay_the_pool_opens_a_backend_again() {
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 3;
        c.pool.backend_login_retry_delay = Duration::from_millis(200);
        c.pool.borrow_timeout = Duration::from_secs(60);
    })
    .await;
    let holder = holder_at_the_limit(&h).await;
    let pool = h.dev_pool();
    let first = ask(h.client().await, "SELECT 'first'");
    h.until_metric("DatabaseConnectionsSetupFailed", |n| n >= 1.0).await;
    until_waiting(&pool, 1).await;
    h.admin(&format!("ALTER ROLE {} CONNECTION LIMIT -1", h.env.user));
    // The holder keeps its backend: the client is served by a second one, opened after the hold.
    let answer = tokio::time::timeout(Duration::from_secs(20), first).await.expect("a login after the delay");
    assert_eq!(answer.unwrap().unwrap(), "first");
    assert_eq!(h.backend_count(), 2);
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_idle_backends_are_topped_up_after_a_refusal() {
    let h = Harness::start_full(false, |env, c| {
        c.pool.max_backend_connections = 3;
        c.pool.min_idle_backend_connections = 2;
        c.pool.backend_login_retry_delay = Duration::from_millis(200);
        env.cluster.psql(&format!("ALTER ROLE {} CONNECTION LIMIT 1", env.user)).unwrap();
    })
    .await;
    // The first client's login opens the pool's first backend; the janitor's top-up to two idle
    // ones is refused.
    let client = h.client().await;
    h.until_metric("DatabaseConnectionsSetupFailed", |n| n >= 1.0).await;
    h.admin(&format!("ALTER ROLE {} CONNECTION LIMIT -1", h.env.user));
    h.until_backends(2).await;
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_eq!(h.backend_count(), 2, "the two idle backends served the client; none more");
}

/// With no backend open, the refused login is the client's answer, with the database's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_with_no_backend_open_answers_with_the_databases_code() {
    let h = Harness::start_full(false, |env, _| {
        env.cluster.psql(&format!("ALTER ROLE {} CONNECTION LIMIT 0", env.user)).unwrap();
    })
    .await;
    let err = h.client_result().await.expect_err("no backend can log in");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("53300"), "{err}");
    let message = err.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("too many connections for role"), "{message}");
    assert_eq!(h.metric("DatabaseConnectionsSetupFailed"), 1.0);
}

/// `database.target_session_attrs = "read-write"`: a server whose transactions are read-only, as
/// a failover's old writer is once demoted (while the DNS name still points at it), gets no new
/// backend connection: the client whose login it was is told to try again (08006), and once the
/// server takes writes again, logins work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_target_session_attrs_refuse_a_read_only_server() {
    let h = Harness::start_with(|c| c.database.target_session_attrs = pgwarden::config::SessionAttrs::ReadWrite).await;
    let first = h.client().await;
    first.batch_execute("CREATE TABLE writes (x int); INSERT INTO writes VALUES (1)").await.unwrap();
    drop(first);
    // The role's new sessions are read-only, and the pool's connection is gone.
    h.admin(&format!("ALTER ROLE {} SET default_transaction_read_only = on", h.env.user));
    h.admin(&format!("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = '{}'", h.env.user));
    h.until_backends(0).await;
    let client = h.client().await;
    let err = client.batch_execute("INSERT INTO writes VALUES (2)").await.expect_err("no writable backend");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("read-only") && message.contains("Try again"), "{message}");
    assert_eq!(h.backend_count(), 0, "the read-only connection was not kept");

    h.admin(&format!("ALTER ROLE {} RESET default_transaction_read_only", h.env.user));
    let client = h.client().await;
    client.batch_execute("INSERT INTO writes VALUES (3)").await.expect("a writable backend again");
    let rows = client.query_one("SELECT string_agg(x::text, ',' ORDER BY x) FROM writes", &[]).await.unwrap();
    assert_eq!(rows.get::<_, String>(0), "1,3");
}
