//! Session state under transaction pooling: a parameter a client SETs follows that client from
//! backend to backend and never reaches another client (where RDS Proxy pins); other state that
//! outlives a transaction (temporary tables, advisory locks, LISTEN, SET ROLE) pins the session
//! to its backend, as RDS Proxy does, and is cleared before the backend serves anyone else.

mod common;

use std::time::Duration;

use bytes::BytesMut;

use common::{Harness, first_column as values};
use tokio_postgres::AsyncMessage;

/// The first column of the DataRows a raw client gets up to its second ReadyForQuery.
async fn text_rows_until_second_ready(raw: &mut common::RawClient) -> Vec<String> {
    let (mut rows, mut ready) = (Vec::new(), 0);
    while ready < 2 {
        let m = raw.recv().await.expect("answers up to ReadyForQuery");
        match m.tag {
            b'D' => {
                let len = i32::from_be_bytes(m.body[2..6].try_into().unwrap()) as usize;
                rows.push(String::from_utf8(m.body[6..6 + len].to_vec()).unwrap());
            }
            b'Z' => ready += 1,
            b'E' => panic!("error: {:?}", m.error_fields()),
            _ => {}
        }
    }
    rows
}

fn pins(h: &Harness, reason: &str) -> f64 {
    h.metric(&format!("pgwarden_session_pins{{reason=\"{reason}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_parameter_follows_its_client_and_never_reaches_another() {
    // One backend for everyone: each client's settings must be put in place, and taken away,
    // every time it changes hands.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_secs(5);
    })
    .await;
    // Both protocols: a simple Query, and a Parse of an unnamed statement.
    let simple = h.client().await;
    simple.batch_execute("SET statement_timeout = '40ms'").await.unwrap();
    let extended = h.client().await;
    extended.query_typed("SET lock_timeout = '30ms'", &[]).await.unwrap();

    // And a custom parameter, by function (RLS setups keep a tenant id this way).
    let tenant = h.client().await;
    tenant.batch_execute("SELECT set_config('app.tenant', '42', false)").await.unwrap();
    let show_tenant = "SELECT coalesce(current_setting('app.tenant', true), '')";

    let other = h.client().await;
    assert_eq!(values(&other, "SHOW statement_timeout; SHOW lock_timeout").await, ["0", "0"]);
    assert_eq!(values(&other, show_tenant).await, [""]);
    assert_eq!(values(&tenant, show_tenant).await, ["42"]);
    other.batch_execute("SELECT pg_sleep(0.1)").await.expect("no timeout from another session's SET");
    // In force, not just shown: the statement is cancelled by its own client's timeout.
    let err = simple.batch_execute("SELECT pg_sleep(0.1)").await.expect_err("statement_timeout applies");
    assert_eq!(common::sqlstate(&err).as_deref(), Some("57014"));
    assert_eq!(values(&simple, "SHOW statement_timeout; SHOW lock_timeout").await, ["40ms", "0"]);
    assert_eq!(values(&extended, "SHOW statement_timeout; SHOW lock_timeout").await, ["0", "30ms"]);
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 0.0);
    assert_eq!(pins(&h, "set"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_inside_a_transaction_follows_only_if_committed() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let (a, b) = (h.client().await, h.client().await);
    let default = values(&b, "SHOW work_mem").await;
    for sql in ["BEGIN", "SET work_mem = '7MB'", "ROLLBACK"] {
        a.batch_execute(sql).await.unwrap();
    }
    assert_eq!(values(&a, "SHOW work_mem").await, default);
    for sql in ["BEGIN", "SET search_path = pg_catalog, public", "SET work_mem = '7MB'", "COMMIT"] {
        a.batch_execute(sql).await.unwrap();
    }
    assert_eq!(values(&b, "SHOW work_mem").await, default);
    assert_eq!(values(&a, "SHOW work_mem; SHOW search_path").await, ["7MB", "pg_catalog, public"]);
    a.batch_execute("RESET work_mem").await.unwrap();
    assert_eq!(values(&a, "SHOW work_mem").await, default);
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_settings_pin_instead_of_following() {
    let h = Harness::start().await;
    let client = h.client().await;
    let sets: String = (0..70).map(|i| format!("SET many.p{i} = '{i}';")).collect();
    client.batch_execute(&sets).await.unwrap();
    assert_eq!(pins(&h, "set"), 1.0);
    assert_eq!(values(&client, "SELECT current_setting('many.p69')").await, ["69"]);
    // The same after a RESET ALL.
    let other = h.client().await;
    other.batch_execute(&format!("RESET ALL; {sets}")).await.unwrap();
    h.until_metric("pgwarden_session_pins{reason=\"set\"}", |v| v == 2.0).await;
    assert_eq!(values(&other, "SELECT current_setting('many.p69')").await, ["69"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_role_pins_and_is_reset_when_its_session_ends() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 2).await;
    let user = h.env.user.clone();
    let a = h.client().await;
    a.batch_execute(&format!("SET ROLE \"{user}\"")).await.unwrap();
    assert_eq!(pins(&h, "set"), 1.0);
    assert_eq!(values(&a, "SELECT current_setting('role')").await, [user.as_str()]);
    drop(a);
    h.until_metric("DatabaseConnectionsCurrentlySessionPinned", |v| v == 0.0).await;
    let b = h.client().await;
    assert_eq!(values(&b, "SELECT current_setting('role')").await, ["none"]);
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
    client.batch_execute(&format!("SET ROLE \"{}\"", h.env.user)).await.unwrap();
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 0.0);
    client.batch_execute("LISTEN still_pins").await.unwrap();
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_returns_to_the_startup_settings_on_any_backend_without_pinning() {
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 2;
        c.pool.borrow_timeout = Duration::from_secs(3);
    })
    .await;
    let plain = h.client().await;
    let show = "SELECT pg_backend_pid(); SHOW statement_timeout; SHOW work_mem; SHOW application_name";
    // (work_mem: a value with a unit, which pg_settings keeps in kB.)
    let startup = format!("{} application_name=mine options='-c statement_timeout=5s -c work_mem=16MB'", h.conn_str());
    let a = common::connect(&startup).await.unwrap();
    a.batch_execute("SET statement_timeout = '40s'; SET work_mem = '7MB'; SET application_name = 'changed'").await.unwrap();
    assert_eq!(values(&a, show).await[1..], ["40s", "7MB", "changed"]);
    // A RESET ALL that rolls back changes nothing.
    a.batch_execute("BEGIN; RESET ALL; ROLLBACK").await.unwrap();
    assert_eq!(values(&a, show).await[1..], ["40s", "7MB", "changed"]);
    // One that takes: what the client logged in with, and what it set after.
    let ran_on = values(&a, "RESET ALL; SET lock_timeout = '3s'; SELECT pg_backend_pid()").await;
    // Another client holds that backend (the pool hands out the most recently used first, once
    // `a` has given it back), so `a` goes on to the other: what it carries there counts.
    h.until_metric("DatabaseConnectionsCurrentlyBorrowed", |v| v == 0.0).await;
    let holder = h.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    assert_eq!(values(&holder, "SELECT pg_backend_pid()").await, ran_on);
    let elsewhere = values(&a, &format!("{show}; SHOW lock_timeout")).await;
    assert_ne!(elsewhere[0], ran_on[0], "served by the other backend");
    assert_eq!(elsewhere[1..], ["5s", "16MB", "mine", "3s"]);
    holder.batch_execute("COMMIT").await.unwrap();
    // The holder's backend was handed on with the client's values read back, not left behind.
    assert_eq!(values(&plain, "SHOW statement_timeout; SHOW lock_timeout").await, ["0", "0"]);
    // A value set before a RESET ALL that rolls back (to a savepoint) is read back too: it stays
    // the client's, and never reaches the next client of the backend.
    let tenant = "SELECT coalesce(current_setting('app.tenant', true), '')";
    let on = values(&a, "BEGIN; SET app.tenant = '42'; SAVEPOINT s; RESET ALL; ROLLBACK TO s; COMMIT; SELECT pg_backend_pid()").await;
    h.until_metric("DatabaseConnectionsCurrentlyBorrowed", |v| v == 0.0).await;
    plain.batch_execute("BEGIN").await.unwrap();
    assert_eq!(values(&plain, "SELECT pg_backend_pid()").await, on);
    assert_eq!(values(&plain, tenant).await, [""], "not the other client's");
    let elsewhere = values(&a, &format!("SELECT pg_backend_pid(); {tenant}")).await;
    assert_ne!(elsewhere[0], on[0]);
    assert_eq!(elsewhere[1], "42", "carried to the other backend");
    plain.batch_execute("COMMIT").await.unwrap();
    assert_eq!(h.metric_total("pgwarden_session_pins"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_in_a_pinned_session_returns_to_the_startup_settings_too() {
    // asyncpg with a listener: LISTEN pins, and the pool still resets at every release.
    let h = Harness::start().await;
    let startup = format!("{} application_name=mine options='-c statement_timeout=5s'", h.conn_str());
    let a = common::connect(&startup).await.unwrap();
    a.batch_execute("LISTEN jobs; SET statement_timeout = '1s'; SET application_name = 'x'").await.unwrap();
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(values(&a, "SHOW statement_timeout; SHOW application_name").await, ["5s", "mine"]);
    assert_eq!(pins(&h, "listen"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_tells_a_libpq_client_its_startup_parameters_again() {
    // RESET ALL reports the backend's own application_name; pgwarden tells the client its own
    // again (libpq reads it with the next answer), and the database agrees.
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let script = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], application_name="mine", autocommit=True)
conn.execute("RESET ALL")
shown = conn.execute("SHOW application_name").fetchone()[0]
print(conn.info.parameter_status("application_name"), shown)
"#;
    let shown = common::run_python(script, vec![format!("{} sslmode=disable", h.conn_str())]).await;
    assert_eq!(shown, "mine mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_pool_resets_connections_on_release_without_pinning_them() {
    // asyncpg's pool runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; DO $$ ... UNLISTEN * ...
    // $$; RESET ALL;` at every release. Four pooled connections over two backends: pinned, two
    // of them would wait out the borrow timeout.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 2;
        c.pool.borrow_timeout = Duration::from_secs(3);
    })
    .await;
    let script = r#"
import asyncio, sys, asyncpg
async def main():
    host, port, user, password, database = sys.argv[1:6]
    pool = await asyncpg.create_pool(host=host, port=int(port), user=user, password=password,
        database=database, ssl=False, min_size=4, max_size=4,
        server_settings={"search_path": "app, public", "application_name": "svc"})
    async def worker(w):
        for k in range(10):
            async with pool.acquire() as c:
                await c.execute("SET statement_timeout = '" + str(w + 1) + "s'")
                got = await c.fetchval("SELECT current_setting('statement_timeout') || $1::text", "/" + str(k))
                assert got == str(w + 1) + "s/" + str(k), got
    await asyncio.gather(*(worker(w) for w in range(8)))
    async with pool.acquire() as c:
        print(await c.fetchval("SELECT current_setting('statement_timeout') || ' ' || current_setting('search_path')"
            " || ' ' || current_setting('application_name')"), c.get_settings().client_encoding)
    await pool.close()
asyncio.run(main())
"#;
    let args = vec![h.addr.ip().to_string(), h.addr.port().to_string(), h.env.user.clone(), h.env.password().to_owned(), h.env.database.clone()];
    let shown = common::run_python(script, args).await;
    assert_eq!(shown, "0 app, public svc UTF8", "each release reset what its user set, to the pool's server_settings");
    assert_eq!(h.metric_total("pgwarden_session_pins"), 0.0);
    assert_eq!(h.metric("pgwarden_borrow_timeouts"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_all_between_transactions_resets_the_session_without_pinning() {
    // Npgsql (by default) and Rails reset a reused pooled connection with DISCARD ALL. Pinned,
    // every such connection would keep one of the pool's backends: with one, the second client
    // below would wait out the borrow timeout.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_secs(3);
    })
    .await;
    let startup = format!("{} application_name=mine options='-c statement_timeout=5s'", h.conn_str());
    let a = common::connect(&startup).await.unwrap();
    a.batch_execute("SET statement_timeout = '40s'; SET application_name = 'x'; SET app.tenant = '42'").await.unwrap();
    let before = a.prepare("SELECT $1::int + 1").await.unwrap();
    assert_eq!(a.query_one(&before, &[&1i32]).await.unwrap().get::<_, i32>(0), 2);

    // In a transaction block it fails, as PostgreSQL says, and leaves everything as it was.
    a.batch_execute("BEGIN").await.unwrap();
    let refused = a.batch_execute("DISCARD ALL").await.unwrap_err();
    assert_eq!(common::sqlstate(&refused).as_deref(), Some("25001"));
    a.batch_execute("ROLLBACK").await.unwrap();
    // So does it among other statements (an implicit transaction block).
    let refused = a.batch_execute("DISCARD ALL; SELECT 1").await.unwrap_err();
    assert_eq!(common::sqlstate(&refused).as_deref(), Some("25001"));
    assert_eq!(a.query_one(&before, &[&2i32]).await.unwrap().get::<_, i32>(0), 3, "still the client's");
    assert_eq!(values(&a, "SHOW statement_timeout; SHOW application_name").await, ["40s", "x"]);

    // Sent as Npgsql sends it: in one write with the next command (a Parse of the client's).
    let (discarded, after) = tokio::join!(a.batch_execute("DISCARD ALL"), a.prepare("SELECT $1::int * 10"));
    discarded.unwrap();
    let after = after.unwrap();
    assert_eq!(a.query_one(&after, &[&4i32]).await.unwrap().get::<_, i32>(0), 40, "prepared after it: kept");
    let gone = a.query_one(&before, &[&1i32]).await.unwrap_err();
    assert_eq!(common::sqlstate(&gone).as_deref(), Some("26000"), "prepared before it: gone, as PostgreSQL says");
    let tenant = "SHOW statement_timeout; SHOW application_name; SELECT coalesce(current_setting('app.tenant', true), '')";
    assert_eq!(values(&a, tenant).await, ["5s", "mine", ""], "back to what it logged in with");
    // Behind a request not yet answered (where it runs, unless that request opened a
    // transaction block), it is taken to run.
    let again = a.prepare("SELECT $1::int - 1").await.unwrap();
    let (first, discarded) = tokio::join!(a.batch_execute("SET statement_timeout = '9s'"), a.batch_execute("DISCARD ALL"));
    first.unwrap();
    discarded.unwrap();
    let gone = a.query_one(&again, &[&1i32]).await.unwrap_err();
    assert_eq!(common::sqlstate(&gone).as_deref(), Some("26000"));
    assert_eq!(values(&a, "SHOW statement_timeout").await, ["5s"]);
    // Not pinned: another client gets the only backend, clean.
    let b = h.client().await;
    assert_eq!(values(&b, "SHOW statement_timeout; SELECT coalesce(current_setting('app.tenant', true), '')").await, ["0", ""]);
    assert_eq!(h.metric_total("pgwarden_session_pins"), 0.0);
    assert_eq!(h.metric("pgwarden_borrow_timeouts"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_pipelined_behind_a_reset_runs_with_the_clients_startup_settings() {
    // Npgsql sends DISCARD ALL in one write with the next command: that command must see the
    // settings the client logged in with (its search_path, say), not the backend's own.
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let startup = format!("{} application_name=mine options='-c search_path=app,public'", h.conn_str());
    let a = common::connect(&startup).await.unwrap();
    let show = "SELECT current_setting('application_name') || ' ' || current_setting('search_path')";
    a.batch_execute("SET search_path = public").await.unwrap();
    for reset in ["DISCARD ALL", "RESET ALL"] {
        let (reset_done, shown) = tokio::join!(a.batch_execute(reset), values(&a, show));
        reset_done.unwrap();
        assert_eq!(shown, ["mine app,public"], "behind {reset}");
        a.batch_execute("SET application_name = 'other'").await.unwrap();
    }
    // The same when the client waited for a backend and the pool sent its request on the
    // hand-over (it stops after the reset), and when its statement names are rewritten.
    // (The pool sends it only to a backend whose settings are the client's already.)
    let holder = common::connect(&startup).await.unwrap();
    holder.batch_execute("BEGIN").await.unwrap();
    let mut raw = common::RawClient::connect(h.addr).await;
    let startup_params = [("client_encoding", "UTF8"), ("application_name", "mine"), ("options", "-c search_path=app,public")];
    raw.login_with(&h.env.user, &h.env.database, h.env.password(), &startup_params).await;
    raw.send(&[common::query_message("DISCARD ALL"), common::query_message(show)].concat()).await;
    common::until_waiting(&h.dev_pool(), 1).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(text_rows_until_second_ready(&mut raw).await, ["mine app,public"], "handed over");
    let named = a.prepare("SELECT current_setting('search_path')").await.unwrap();
    a.batch_execute("SET search_path = public").await.unwrap();
    let (reset_done, shown) = tokio::join!(a.batch_execute("DISCARD ALL"), a.query_one("SELECT current_setting('application_name')", &[]));
    reset_done.unwrap();
    assert_eq!(shown.unwrap().get::<_, String>(0), "mine", "tracked");
    assert!(a.query_one(&named, &[]).await.is_err(), "gone with DISCARD ALL");
    // A reset inside a transaction block: what follows it runs in the same transaction.
    let (began, shown) = tokio::join!(a.batch_execute("BEGIN; RESET ALL"), values(&a, "SELECT 'inside'"));
    began.unwrap();
    assert_eq!(shown, ["inside"]);
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(values(&a, show).await, ["mine app,public"]);
    assert_eq!(h.metric_total("pgwarden_session_pins"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_with_more_behind_it_or_among_other_statements_never_stalls() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    h.client().await.batch_execute("CREATE TABLE copied (x int)").await.unwrap();
    let mut raw = common::RawClient::connect(h.addr).await;
    raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    // A reset alone, with a query and more data behind it in one write.
    let pipelined = [common::query_message("RESET ALL"), common::query_message("SELECT 'after'")].concat();
    raw.send(&pipelined).await;
    let rows = tokio::time::timeout(Duration::from_secs(10), text_rows_until_second_ready(&mut raw)).await;
    assert_eq!(rows.expect("stalled: pipelined"), ["after"]);
    // A reset among other statements, one of them a COPY from the client.
    raw.send(&common::query_message("RESET ALL; COPY copied FROM STDIN")).await;
    let copy_in = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = raw.recv().await.expect("an answer");
            assert_ne!(m.tag, b'E', "{:?}", m.error_fields());
            if m.tag == b'G' {
                break;
            }
        }
    });
    copy_in.await.expect("stalled: COPY's start");
    let mut data = BytesMut::new();
    postgres_protocol::message::frontend::CopyData::new(&b"7\n"[..]).unwrap().write(&mut data);
    postgres_protocol::message::frontend::copy_done(&mut data);
    data.extend_from_slice(&common::query_message("SELECT count(*)::text FROM copied"));
    raw.send(&data).await;
    let rows = tokio::time::timeout(Duration::from_secs(10), text_rows_until_second_ready(&mut raw)).await;
    assert_eq!(rows.expect("stalled: COPY's end"), ["1"]);
}
