//! Session state under transaction pooling: SQL that leaves state on a backend beyond its
//! transaction (SET, temporary tables, advisory locks, LISTEN) pins the session to that backend,
//! as RDS Proxy does, so it never reaches another client; parameters the proxy follows (SET
//! application_name, TimeZone, ...) do not pin.

mod common;

use std::time::Duration;

use common::{Harness, first_column as values};
use tokio_postgres::AsyncMessage;

fn pins(h: &Harness, reason: &str) -> f64 {
    h.metric(&format!("pgwarden_session_pins{{reason=\"{reason}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_of_unfollowed_parameter_pins_and_never_reaches_another_client() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 3).await;
    // Both protocols: a simple Query, and a Parse of an unnamed statement.
    let simple = h.client().await;
    simple.batch_execute("SET statement_timeout = '40ms'").await.unwrap();
    let extended = h.client().await;
    extended.query_typed("SET lock_timeout = '30ms'", &[]).await.unwrap();
    assert_eq!(pins(&h, "set"), 2.0);
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 2.0);

    // Unpinned, the most recently released backend (the one with a SET) would serve the next
    // client; pinned, the next client gets the third.
    let other = h.client().await;
    assert_eq!(values(&other, "SHOW statement_timeout; SHOW lock_timeout").await, ["0", "0"]);
    other.batch_execute("SELECT pg_sleep(0.1)").await.expect("no timeout from another session's SET");

    // The pinned clients keep their settings, transaction after transaction.
    assert_eq!(values(&simple, "SHOW statement_timeout").await, ["40ms"]);
    assert_eq!(values(&extended, "SHOW lock_timeout").await, ["30ms"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_of_followed_parameter_does_not_pin_and_follows_its_client() {
    // One backend: a pinned session would keep the other client waiting until the borrow timeout.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_secs(5);
    })
    .await;
    let show = "SHOW application_name; SHOW TimeZone";
    let (a, b) = (h.client().await, h.client().await);
    let defaults = values(&b, show).await;
    a.batch_execute("SET application_name = 'reporting'; SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    assert_eq!(values(&b, show).await, defaults);
    assert_eq!(values(&a, show).await, ["reporting", "Asia/Tokyo"]);
    assert_eq!(values(&b, show).await, defaults);
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 0.0);
    assert_eq!(pins(&h, "set"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_table_keeps_its_session_on_the_backend_that_holds_it() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 2).await;
    let owner = h.client().await;
    owner.batch_execute("CREATE TEMP TABLE scratch (x int)").await.unwrap();
    // Another client opens a transaction on the most recently released backend, the one with
    // the table unless the owner kept it.
    let other = h.client().await;
    other.batch_execute("BEGIN").await.unwrap();
    owner.batch_execute("INSERT INTO scratch VALUES (1), (2)").await.expect("the temp table is still there");
    assert_eq!(values(&owner, "SELECT count(*) FROM scratch").await, ["2"]);
    // (pg_tables lists every session's temp tables; name resolution sees only one's own.)
    assert_eq!(values(&other, "SELECT to_regclass('scratch') IS NULL").await, ["t"]);
    other.batch_execute("COMMIT").await.unwrap();
    assert_eq!(pins(&h, "temp_object"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_lock_pins_and_is_released_when_its_session_ends() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 2).await;
    let holder = h.client().await;
    holder.batch_execute("SELECT pg_advisory_lock(4242)").await.unwrap();
    assert_eq!(pins(&h, "advisory_lock"), 1.0);
    let count = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted";
    let watcher = h.client().await;
    assert_eq!(values(&watcher, count).await, ["1"]);
    drop(holder);
    // The pinned backend is reset (DISCARD ALL) before it serves anyone else.
    h.until_metric("DatabaseConnectionsCurrentlySessionPinned", |v| v == 0.0).await;
    assert_eq!(values(&watcher, count).await, ["0"], "the lock did not stay behind in the pool");
    assert_eq!(h.backend_count(), 2, "the backend was reset, not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_and_notifications_reach_the_listener() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 2).await;
    let (listener, mut connection) = tokio_postgres::connect(&h.conn_str(), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    assert_eq!(pins(&h, "listen"), 1.0);
    let notifier = h.client().await;
    for i in 0..3 {
        notifier.batch_execute(&format!("NOTIFY jobs, 'job {i}'")).await.unwrap();
        // Between the listener's transactions, too: the pinned session forwards what arrives.
        let got = tokio::time::timeout(Duration::from_secs(10), notes.recv()).await.expect("notification arrives");
        assert_eq!(got.as_deref(), Some(format!("job {i}").as_str()));
        assert_eq!(values(&listener, "SELECT 1").await, ["1"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclude_variable_sets_filter_leaves_sets_unpinned() {
    let h = Harness::start_with(|c| c.pool.pin_variable_sets = false).await;
    let client = h.client().await;
    client.batch_execute("SET statement_timeout = '5s'").await.unwrap();
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 0.0);
    client.batch_execute("LISTEN still_pins").await.unwrap();
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 1.0);
}
