//! Transaction pooling under load and faults: many clients over few backends, clients and
//! backends dying mid-transaction, the borrow timeout, and query cancellation.

mod common;

use std::time::Duration;

use common::{Harness, sqlstate, until_waiting};
use tokio_postgres::types::Type;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_five_backends_with_every_result_checked() {
    let h = Harness::start().await;
    h.client().await.batch_execute("CREATE TABLE ledger (client int, n int, PRIMARY KEY (client, n))").await.unwrap();
    let mut tasks = Vec::new();
    for client_id in 0..200i32 {
        let conn = h.conn_str();
        tasks.push(tokio::spawn(async move {
            let mut c = common::connect(&conn).await.expect("connect");
            for n in 0..10i32 {
                let tx = c.transaction().await.unwrap();
                // Unnamed statements (query_typed): nothing pins the session, so all 200 clients
                // really share the 5 backends transaction by transaction.
                tx.execute_typed("INSERT INTO ledger VALUES ($1, $2)", &[(&client_id, Type::INT4), (&n, Type::INT4)])
                    .await
                    .unwrap();
                let sum: i64 = tx
                    .query_typed_one("SELECT sum(n)::int8 FROM ledger WHERE client = $1", &[(&client_id, Type::INT4)])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(sum, (0..=n as i64).sum::<i64>(), "client {client_id} sees its own rows only");
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task succeeds");
    }
    let c = h.client().await;
    let total: i64 = c.query_one("SELECT count(*) FROM ledger", &[]).await.unwrap().get(0);
    assert_eq!(total, 2000);
    assert!(h.backend_count() <= 5, "pool of 5: {} backends", h.backend_count());
    let metrics = h.shared.metrics.render();
    assert!(metrics.contains("ClientConnectionsSetupSucceeded 202"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_leaves_no_dirty_backend() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let setup = h.client().await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    drop(setup);
    {
        let mut raw = common::RawClient::connect(h.addr).await;
        raw.login(&h.env.user, &h.env.database, h.env.password()).await;
        raw.send(&common::query_message("BEGIN; INSERT INTO t VALUES (1); SET LOCAL work_mem = '77MB'")).await;
        while raw.recv().await.expect("reply").tag != b'Z' {}
        // Vanish without Terminate while the transaction is open.
    }
    // The only backend must come back rolled back, not carrying the open transaction.
    let c = h.client().await;
    let count: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 0, "the abandoned insert was rolled back");
    let wm: String = c.query_one("SELECT current_setting('work_mem')", &[]).await.unwrap().get(0);
    assert_ne!(wm, "77MB");
    let state = h.admin("SELECT count(*) FROM pg_stat_activity WHERE usename = 'dev' AND state LIKE 'idle in transaction%'");
    assert_eq!(state, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_query_gets_its_backend_discarded() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    {
        let mut raw = common::RawClient::connect(h.addr).await;
        raw.login(&h.env.user, &h.env.database, h.env.password()).await;
        raw.send(&common::query_message("SELECT pg_sleep(0.3)")).await;
        // Leave before the answer: the backend is mid-query and must not be reused as is.
    }
    let c = h.client().await;
    let v: i32 = c.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backend_terminated_is_replaced_without_client_error() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 2).await;
    let c = h.client().await;
    let pid: i32 = c.query_typed_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    h.admin(&format!("SELECT pg_terminate_backend({pid}, 5000)"));
    for _ in 0..5 {
        let got: i32 = c.query_typed_one("SELECT 11", &[]).await.expect("pool replaced the dead backend").get(0);
        assert_eq!(got, 11);
    }
    let new_pid: i32 = c.query_typed_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(new_pid, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_terminated_mid_transaction_fails_that_client_only() {
    let h = Harness::start().await;
    let victim = h.client().await;
    victim.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let bystander = h.client().await;
    h.admin(&format!("SELECT pg_terminate_backend({pid}, 5000)"));
    let err = victim.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(err.is_closed() || sqlstate(&err).as_deref() == Some("57P01"), "{err:?}");
    let v: i32 = bystander.query_one("SELECT 3", &[]).await.unwrap().get(0);
    assert_eq!(v, 3);
    let again = h.client().await;
    assert_eq!(again.query_one("SELECT 4", &[]).await.unwrap().get::<_, i32>(0), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrow_timeout_answers_rds_proxy_error() {
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_millis(300);
    })
    .await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = h.client().await;
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
    assert_eq!(err.as_db_error().unwrap().message(), "Timed-out waiting to acquire database connection.");
    holder.batch_execute("COMMIT").await.unwrap();
    let after = h.client().await;
    assert_eq!(after.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_clients_are_served_in_arrival_order() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let holder = h.client().await;
    // The order the backend runs their queries in (not the order their answers are read,
    // which the test's own tasks may swap).
    holder.batch_execute("CREATE SEQUENCE served; BEGIN; SELECT 1").await.unwrap();
    let pool = h.dev_pool();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let c = h.client().await;
        tasks.push(tokio::spawn(async move { c.query_typed_one("SELECT nextval('served')", &[]).await.unwrap().get::<_, i64>(0) }));
        until_waiting(&pool, i + 1).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let mut served = Vec::new();
    for t in tasks {
        served.push(t.await.unwrap());
    }
    assert_eq!(served, vec![1, 2, 3, 4], "FIFO hand-off of the one backend");
    assert_eq!(pool.waiting(), 0);
    assert_eq!(h.backend_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_lost_while_clients_wait_lets_the_next_one_open_another() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = holder.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let pool = h.dev_pool();
    let waiter = h.client().await;
    let waiting = tokio::spawn(async move { waiter.query_one("SELECT 42", &[]).await.map(|r| r.get::<_, i32>(0)) });
    until_waiting(&pool, 1).await;
    h.admin(&format!("SELECT pg_terminate_backend({pid}, 5000)"));
    assert!(holder.query_one("SELECT 1", &[]).await.is_err(), "the holder's backend is gone");
    assert_eq!(waiting.await.unwrap().expect("the waiting client got a new backend"), 42);
    let new_pid: i32 = h.client().await.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(new_pid, pid);
    assert_eq!(h.backend_count(), 1, "still within the pool size");
}

/// Waits until PostgreSQL itself shows `query` running on a backend.
async fn until_active(h: &Harness, query: &str) {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE query = '{query}' AND state = 'active'");
    for _ in 0..400 {
        if h.admin(&sql) == "1" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{query} never reached a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_long_pg_sleep() {
    let h = Harness::start().await;
    let c = h.client().await;
    let token = c.cancel_token();
    let running = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    until_active(&h, "SELECT pg_sleep(60)").await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");
}

/// A client that waited for a backend has its query sent by whoever released one, and is only
/// woken by the answer: its cancel key must point at that backend from the hand-over on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_query_sent_on_hand_over() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pool = h.dev_pool();
    let c = h.client().await;
    let token = c.cancel_token();
    let running = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    until_waiting(&pool, 1).await;
    holder.batch_execute("COMMIT").await.unwrap();
    until_active(&h, "SELECT pg_sleep(60)").await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    // (A dropped cancel would leave the query running its 60 s: fail well before that.)
    let ended = tokio::time::timeout(Duration::from_secs(30), running).await.expect("the cancel reached the query");
    let err = ended.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");
}

/// A TCP path to PostgreSQL that holds each new connection while its gate is closed, and says
/// when one arrives: a backend login that takes as long as the test wants.
async fn gated_path_to(port: u16) -> (u16, tokio::sync::watch::Sender<bool>, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap().port();
    let (gate, open) = tokio::sync::watch::channel(true);
    let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut open = open.clone();
            let _ = arrived.send(());
            tokio::spawn(async move {
                if open.wait_for(|o| *o).await.is_err() {
                    return;
                }
                let mut outbound = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (local, gate, arrivals)
}

/// A harness with a pool of 2 whose backend logins go through [`gated_path_to`].
async fn start_gated(
    tweak: impl FnOnce(&mut pgwarden::config::Config),
) -> (Harness, tokio::sync::watch::Sender<bool>, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let mut gated = None;
    let h = Harness::start_async(false, async |env, c| {
        let (port, gate, arrivals) = gated_path_to(env.cluster.port).await;
        c.database.port = port;
        c.pool.max_backend_connections = 2;
        tweak(c);
        gated = Some((gate, arrivals));
    })
    .await;
    let (gate, arrivals) = gated.unwrap();
    (h, gate, arrivals)
}

/// Two clients in a transaction each, through a gated path that is open: the holder, whose
/// backend the test releases later, and the doomed, whose backend's pid it returns to terminate.
async fn holder_and_doomed(
    h: &Harness,
    arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
) -> (tokio_postgres::Client, tokio_postgres::Client, i32) {
    let holder = h.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    arrivals.recv().await.unwrap();
    let doomed = h.client().await;
    doomed.batch_execute("BEGIN").await.unwrap();
    arrivals.recv().await.unwrap();
    let pid: i32 = doomed.query_typed_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    (holder, doomed, pid)
}

fn assert_row(rows: &[tokio_postgres::SimpleQueryMessage]) {
    assert!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))), "{rows:?}");
}

/// While a pool fills up (one login at a time), a client that is opening a backend takes one
/// that another client releases first, instead of waiting for its own login; that login still
/// lands in the pool when it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_a_backend_takes_a_released_one_first() {
    let (h, gate, mut arrivals) = start_gated(|_| {}).await;
    let holder = h.client().await; // (its login opened the first backend, to learn the server's parameters)
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    arrivals.recv().await.unwrap();
    gate.send_replace(false);
    let c = h.client().await;
    let answer = tokio::spawn(async move { c.simple_query("SELECT 'served'").await });
    // The pool has room for a second backend: the client's login for it is held at the gate.
    arrivals.recv().await.unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    // (Waiting for its own login, the client would wait for the gate: fail well before that.)
    let rows = tokio::time::timeout(Duration::from_secs(20), answer).await.expect("served by the released backend");
    let rows = rows.unwrap().unwrap();
    let row = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let row = row.unwrap_or_else(|| panic!("no row: {rows:?}"));
    assert_eq!(row.get(0), Some("served"));
    assert_eq!(h.backend_count(), 1, "the second login is still held");
    gate.send_replace(true);
    // The held login completes, and its backend joins the pool.
    h.until_backends(2).await;
    let metrics = h.shared.metrics.render();
    assert!(metrics.contains("DatabaseConnections 2"), "{metrics}");
}

/// A connection that closes while clients wait lets the longest-waiting one open another; that
/// client still takes a connection released before its login completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_replacing_a_lost_backend_takes_a_released_one_first() {
    let (h, gate, mut arrivals) = start_gated(|_| {}).await;
    let (holder, doomed, pid) = holder_and_doomed(&h, &mut arrivals).await;
    gate.send_replace(false);
    let pool = h.dev_pool();
    let c = h.client().await;
    let answer = tokio::spawn(async move { c.simple_query("SELECT 'served'").await });
    until_waiting(&pool, 1).await;
    h.admin(&format!("SELECT pg_terminate_backend({pid})"));
    doomed.batch_execute("SELECT 1").await.expect_err("its backend is gone");
    // The waiting client got the room and logs in: held at the gate.
    arrivals.recv().await.unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    let rows = tokio::time::timeout(Duration::from_secs(20), answer).await.expect("served by the released backend");
    let rows = rows.unwrap().unwrap();
    assert_row(&rows);
    gate.send_replace(true);
    // The held login completes, and its backend joins the pool.
    h.until_backends(2).await;
}

/// The borrow timeout ends a client's wait in the queue, never the login it started: a login
/// slower than the borrow timeout still serves its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_login_outlasts_the_borrow_timeout() {
    let (h, gate, mut arrivals) = start_gated(|c| c.pool.borrow_timeout = Duration::from_millis(200)).await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    arrivals.recv().await.unwrap();
    gate.send_replace(false);
    let pool = h.dev_pool();
    let c = h.client().await;
    let answer = tokio::spawn(async move { c.simple_query("SELECT 'served'").await });
    arrivals.recv().await.unwrap();
    until_waiting(&pool, 1).await;
    // The queue's timer ends the wait; the login, held at the gate, goes on.
    until_waiting(&pool, 0).await;
    gate.send_replace(true);
    let rows = answer.await.unwrap().expect("served by its own login");
    assert_row(&rows);
    assert!(!h.shared.metrics.render().contains("pgwarden_borrow_timeouts 1"), "counted as a borrow timeout");
}

/// A client opening a connection that is given the room of another one that closed passes that
/// room on and keeps its place in the queue: a connection released before its own login
/// completes still serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_a_backend_keeps_its_place_when_another_closes() {
    let (h, gate, mut arrivals) = start_gated(|c| c.pool.max_backend_connections = 3).await;
    let (holder, doomed, pid) = holder_and_doomed(&h, &mut arrivals).await;
    gate.send_replace(false);
    let pool = h.dev_pool();
    let c = h.client().await;
    let answer = tokio::spawn(async move { c.simple_query("SELECT 'served'").await });
    // The pool has room for a third backend: the client's login for it is held at the gate.
    arrivals.recv().await.unwrap();
    until_waiting(&pool, 1).await;
    h.admin(&format!("SELECT pg_terminate_backend({pid})"));
    doomed.batch_execute("SELECT 1").await.expect_err("its backend is gone");
    // The closed backend is gone from the count (its room went to the front of the queue, the
    // opening client, first)...
    h.until_metric("DatabaseConnections", |v| v == 1.0).await;
    // ...which passed it on (nobody else waits: it is simply free again) and still waits.
    until_waiting(&pool, 1).await;
    holder.batch_execute("COMMIT").await.unwrap();
    let rows = tokio::time::timeout(Duration::from_secs(20), answer).await.expect("served by the released backend");
    let rows = rows.unwrap().unwrap();
    assert_row(&rows);
    gate.send_replace(true);
    h.until_backends(2).await;
}

/// Wakes the test when a future it polls by hand is woken.
struct NotifyWaker(std::sync::Arc<tokio::sync::Notify>);

impl std::task::Wake for NotifyWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.notify_one();
    }
}

/// A login that completes for a client that then goes away before taking it (the client left,
/// or took a released connection in the same instant) lands in the pool: the room it was
/// counted in is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_completed_for_a_client_that_left_lands_in_the_pool() {
    use std::future::Future;
    let (h, gate, mut arrivals) = start_gated(|_| {}).await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    arrivals.recv().await.unwrap();
    gate.send_replace(false);
    let pool = h.dev_pool();
    let woken = std::sync::Arc::new(tokio::sync::Notify::new());
    let waker = std::task::Waker::from(std::sync::Arc::new(NotifyWaker(std::sync::Arc::clone(&woken))));
    let mut checkout = Box::pin(pool.checkout());
    let first = checkout.as_mut().poll(&mut std::task::Context::from_waker(&waker));
    assert!(first.is_pending(), "the pool's one free room means a login");
    arrivals.recv().await.unwrap();
    gate.send_replace(true);
    // The login completed and woke the client, which leaves without running again.
    woken.notified().await;
    drop(checkout);
    // The pool of 2 still has room for both: the holder's and the login's, idle now.
    let lease = tokio::time::timeout(Duration::from_secs(20), pool.checkout())
        .await
        .expect("the pool lost the room of the login")
        .expect("a connection");
    lease.release();
    assert_eq!(h.backend_count(), 2);
    let metrics = h.shared.metrics.render();
    assert!(metrics.contains("DatabaseConnections 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_wrong_secret_is_ignored() {
    let h = Harness::start().await;
    let mut raw = common::RawClient::connect(h.addr).await;
    let greeting = raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    let key = greeting.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let pid = i32::from_be_bytes(key.body[0..4].try_into().unwrap());
    let secret = i32::from_be_bytes(key.body[4..8].try_into().unwrap());
    raw.send(&common::query_message("SELECT pg_sleep(0.5), 'done'")).await;
    let mut cancel = common::RawClient::connect(h.addr).await;
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend(80_877_102i32.to_be_bytes());
    packet.extend(pid.to_be_bytes());
    packet.extend(secret.wrapping_add(1).to_be_bytes());
    cancel.send(&packet).await;
    assert!(cancel.closed().await);
    let mut tags = Vec::new();
    loop {
        let m = raw.recv().await.expect("reply");
        tags.push(m.tag);
        if m.tag == b'Z' {
            break;
        }
    }
    assert!(!tags.contains(&b'E'), "query was not cancelled: {tags:?}");
    assert!(tags.contains(&b'D'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_timeout_closes_with_57p05() {
    let h = Harness::start_with(|c| c.pool.idle_client_timeout = Some(Duration::from_millis(200))).await;
    let mut raw = common::RawClient::connect(h.addr).await;
    raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    raw.expect_fatal_then_close("57P05").await;
}

/// `client_max_lifetime` (RDS Proxy closes client connections after 24 hours): an idle client is
/// closed when its connection reaches it, a pinned one too (freeing its backend), and one in a
/// transaction only once the transaction has ended; each with 57P01, which drivers answer by
/// connecting again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_max_lifetime_closes_clients_at_a_transaction_boundary() {
    let h = Harness::start_with(|c| {
        // (Counted from accept: room for a login and a BEGIN on a busy machine.)
        c.pool.client_max_lifetime = Some(Duration::from_secs(2));
        c.pool.max_prepared_statements = 0;
    })
    .await;
    // Connected first, so it has passed its lifetime by the time the others have.
    let busy = h.client().await;
    busy.batch_execute("BEGIN; CREATE TABLE lived (x int)").await.unwrap();
    let mut pinned = common::RawClient::connect(h.addr).await;
    pinned.login(&h.env.user, &h.env.database, h.env.password()).await;
    pinned.send(&common::parse_and_sync("held", "SELECT 1")).await;
    assert_eq!(pinned.recv_until_ready().await, [b'1', b'Z'], "ParseComplete, ReadyForQuery");
    let mut idle = common::RawClient::connect(h.addr).await;
    idle.login(&h.env.user, &h.env.database, h.env.password()).await;

    let message = idle.expect_fatal_then_close("57P01").await;
    assert!(message.contains("client connection lifetime"), "{message}");
    pinned.expect_fatal_then_close("57P01").await;
    h.until_metric("DatabaseConnectionsCurrentlySessionPinned", |n| n == 0.0).await;
    // Past its lifetime too, but inside a transaction: that runs to its end.
    assert_eq!(common::first_column(&busy, "INSERT INTO lived VALUES (1) RETURNING x::text").await, ["1"]);
    busy.batch_execute("COMMIT").await.expect("the transaction finishes");
    let err = busy.batch_execute("SELECT 1").await.expect_err("closed after its transaction");
    assert!(busy.is_closed() || sqlstate(&err).as_deref() == Some("57P01"), "unexpected: {err}");
    // New clients are welcome.
    assert_eq!(common::first_column(&h.client().await, "SELECT 2").await, ["2"]);
}

/// PgBouncer's SHOW POOLS as per-pool series on `/metrics`: a client waiting behind a busy pool
/// shows in `pgwarden_pool_clients_waiting` and `pgwarden_pool_max_wait_seconds`, the busy
/// backend as in use; once served, the wait is gone and the backend idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pool_series_show_a_waiting_client() {
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_secs(60);
    })
    .await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiting = h.client().await;
    let query = tokio::spawn(async move { common::first_column(&waiting, "SELECT 'served'").await });
    common::until_waiting(&h.dev_pool(), 1).await;
    let pool = format!("user=\"{}\",database=\"{}\"", h.env.user, h.env.database);
    let waiting_series = format!("pgwarden_pool_clients_waiting{{{pool}}}");
    let max_wait_series = format!("pgwarden_pool_max_wait_seconds{{{pool}}}");
    let (idle_series, in_use_series) = (
        format!("pgwarden_pool_backend_connections{{{pool},state=\"idle\"}}"),
        format!("pgwarden_pool_backend_connections{{{pool},state=\"in_use\"}}"),
    );
    assert_eq!(h.metric(&waiting_series), 1.0);
    h.until_metric(&max_wait_series, |w| w > 0.0).await;
    assert_eq!((h.metric(&in_use_series), h.metric(&idle_series)), (1.0, 0.0));

    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(query.await.unwrap(), ["served"]);
    h.until_metric(&idle_series, |n| n == 1.0).await;
    let page = h.shared.metrics.render();
    for line in [format!("{waiting_series} 0"), format!("{max_wait_series} 0"), format!("{in_use_series} 0")] {
        assert!(page.lines().any(|l| l == line), "{line} missing from\n{page}");
    }
}

/// Clients choose the database name: one that tries many names that do not exist gets the
/// database's own error for each (3D000), and the registry lets go of the pools nobody uses
/// instead of keeping one per name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_nobody_uses_do_not_pile_up() {
    let h = Harness::start_with(|c| c.pool.backend_idle_timeout = Some(Duration::from_millis(100))).await;
    let steady = h.client().await;
    assert_eq!(common::first_column(&steady, "SELECT 1").await, ["1"]);
    // Its pool has no connection left, but a session holds it: that one stays.
    h.until_backends(0).await;
    let steady_pool = std::sync::Arc::downgrade(&h.dev_pool());
    for i in 0..20 {
        let conn_str = format!("{} dbname=no_such_db_{i}", h.conn_str());
        let err = common::connect(&conn_str).await.err().expect("no such database");
        assert_eq!(sqlstate(&err).as_deref(), Some("3D000"), "{err}");
    }
    // The dev pool (a session holds it) and at most the last name's, until the next new pool.
    assert!(h.shared.pools.count() <= 2, "{} pools", h.shared.pools.count());
    assert!(std::sync::Arc::ptr_eq(&steady_pool.upgrade().unwrap(), &h.dev_pool()), "the held pool stayed in the registry");
    assert_eq!(common::first_column(&steady, "SELECT 'still served'").await, ["still served"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cap_refuses_with_rds_proxy_text() {
    let h = Harness::start_with(|c| c.pool.max_client_connections = 2).await;
    let _a = h.client().await;
    let _b = h.client().await;
    let err = common::connect(&h.conn_str()).await.err().expect("third client refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "The maximum number of client connections to the proxy exceeded 2."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statement_pins_session_and_keeps_working() {
    // With statement tracking off, RDS Proxy's way: the named statement pins.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 2;
        c.pool.max_prepared_statements = 0;
    })
    .await;
    let pinned = h.client().await;
    let other = h.client().await;
    // tokio-postgres prepares named statements ("s0", ...): they live on one backend only.
    let stmt = pinned.prepare("SELECT $1::int4 + 1, pg_backend_pid()").await.unwrap();
    let mut pids = std::collections::HashSet::new();
    for i in 0..20i32 {
        let row = pinned.query_one(&stmt, &[&i]).await.expect("statement still exists on its backend");
        assert_eq!(row.get::<_, i32>(0), i + 1);
        pids.insert(row.get::<_, i32>(1));
        let v: i32 = other.query_typed_one("SELECT 9", &[]).await.unwrap().get(0);
        assert_eq!(v, 9);
    }
    assert_eq!(pids.len(), 1, "one backend served the pinned session");
    assert!(h.shared.metrics.render().contains("DatabaseConnectionsCurrentlySessionPinned 1"));
    drop(stmt);
    drop(pinned);
    // Once the pinned client leaves, its backend serves everyone again.
    let a = h.client().await;
    let b = h.client().await;
    assert_eq!(a.query_typed_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_eq!(b.query_typed_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_backend_is_reset_before_the_next_client_gets_it() {
    // One backend: the next client gets exactly the backend the pinned session used.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.max_prepared_statements = 0;
    })
    .await;
    let with_path = format!("{} options='-c search_path=pinned_path'", h.conn_str());
    let pinned = common::connect(&with_path).await.unwrap();
    let stmt = pinned.prepare("SELECT count(*) FROM pg_prepared_statements").await.unwrap();
    let prepared: i64 = pinned.query_one(&stmt, &[]).await.unwrap().get(0);
    assert!(prepared >= 1, "the named statement lives on the backend");
    pinned.batch_execute("CREATE TEMP TABLE leftover (x int)").await.unwrap();
    drop(stmt);
    drop(pinned);
    // Same settings as the pinned client: nothing to re-send unless pgwarden knows the backend
    // was reset, which it must, or the next client would silently get the default path.
    let next = common::connect(&with_path).await.unwrap();
    let values = common::first_column(
        &next,
        "SELECT count(*) FROM pg_prepared_statements; SELECT count(*) FROM pg_tables WHERE tablename = 'leftover'; SHOW search_path",
    )
    .await;
    assert_eq!(values, ["0", "0", "pinned_path"], "statements and temp tables gone, the client's settings in place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_clients_and_lets_transactions_finish() {
    let mut h = Harness::start().await;
    let mut idle = common::RawClient::connect(h.addr).await;
    idle.login(&h.env.user, &h.env.database, h.env.password()).await;
    let busy = h.client().await;
    busy.batch_execute("CREATE TABLE drained (x int)").await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO drained VALUES (1)").await.unwrap();

    let server = h.begin_shutdown();
    h.shared.drain.started_wait().await;
    // Between transactions: told why, then closed.
    idle.expect_fatal_then_close("57P01").await;
    // Mid-transaction: it finishes, and its next statement is refused with the same code.
    busy.batch_execute("INSERT INTO drained VALUES (2); COMMIT").await.expect("the open transaction finishes");
    let err = busy.batch_execute("SELECT 1").await.expect_err("closed after its transaction");
    assert!(busy.is_closed() || sqlstate(&err).as_deref() == Some("57P01"), "unexpected: {err}");
    assert!(common::connect(&h.conn_str()).await.is_err(), "no new clients while draining");
    tokio::time::timeout(Duration::from_secs(30), server).await.expect("drain ends once every client has gone").unwrap();
    // Straight to PostgreSQL: the proxy is gone.
    let direct = format!(
        "host=127.0.0.1 port={} user={} dbname={} password={}",
        h.env.cluster.port,
        h.env.user,
        h.env.database,
        h.env.password()
    );
    let sum: i64 = common::connect(&direct).await.unwrap().query_one("SELECT sum(x)::int8 FROM drained", &[]).await.unwrap().get(0);
    assert_eq!(sum, 3, "the transaction in flight committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_waiting_for_a_client_at_shutdown_timeout() {
    let mut h = Harness::start_with(|c| c.shutdown_timeout = Duration::from_millis(300)).await;
    let stuck = h.client().await;
    stuck.batch_execute("BEGIN").await.unwrap();
    let server = h.begin_shutdown();
    // The client never ends its transaction: the drain gives up on it at the timeout.
    tokio::time::timeout(Duration::from_secs(30), server).await.expect("drain gives up at shutdown_timeout").unwrap();
    assert!(h.shared.drain.started());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reaches_a_pinned_session_between_transactions() {
    // A long timeout: the drain must end because the pinned client was closed, not by giving up.
    let mut h = Harness::start_with(|c| {
        c.shutdown_timeout = Duration::from_secs(600);
        c.pool.max_prepared_statements = 0;
    })
    .await;
    let pinned = h.client().await;
    let stmt = pinned.prepare("SELECT 1").await.unwrap();
    pinned.query_one(&stmt, &[]).await.unwrap();
    assert!(h.shared.metrics.render().contains("DatabaseConnectionsCurrentlySessionPinned 1"));
    let server = h.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(60), server).await.expect("the pinned idle client was closed").unwrap();
    let err = pinned.query_one(&stmt, &[]).await.expect_err("closed by the drain");
    assert!(pinned.is_closed() || sqlstate(&err).as_deref() == Some("57P01"), "unexpected: {err}");
    assert!(h.shared.metrics.render().contains("DatabaseConnectionsCurrentlySessionPinned 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pinned_client_times_out_and_frees_its_backend() {
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.idle_client_timeout = Some(Duration::from_millis(300));
        c.pool.max_prepared_statements = 0;
    })
    .await;
    let mut raw = common::RawClient::connect(h.addr).await;
    raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    // A named statement pins the session to the only backend.
    raw.send(&common::parse_and_sync("held", "SELECT 1")).await;
    assert_eq!(raw.recv_until_ready().await, [b'1', b'Z'], "ParseComplete, ReadyForQuery");
    raw.expect_fatal_then_close("57P05").await;
    // The backend it held serves the next client, with the statement gone.
    let next = h.client().await;
    let left: i64 = next.query_typed_one("SELECT count(*) FROM pg_prepared_statements", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    assert!(h.shared.metrics.render().contains("DatabaseConnectionsCurrentlySessionPinned 0"));
}
