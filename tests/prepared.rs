//! Named prepared statements under transaction pooling (`pool.max_prepared_statements`, as in
//! PgBouncer): clients that prepare statements (tokio-postgres, pgbench -M prepared, JDBC, pgx,
//! asyncpg) share few backends instead of pinning one each; each statement follows its client
//! to whichever backend serves it, and means there what it meant to its client.

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{Harness, RawClient, sqlstate};

/// (pid, value) from a statement returning both.
async fn pid_and(c: &tokio_postgres::Client, stmt: &tokio_postgres::Statement, arg: i32) -> (i32, i32) {
    let row = c.query_one(stmt, &[&arg]).await.expect("the statement runs wherever the client is served");
    (row.get(0), row.get(1))
}

/// Server statements on the backend that runs this (an unnamed statement: it adds none).
async fn statements_on_backend(c: &tokio_postgres::Client) -> i64 {
    c.query_typed_one("SELECT count(*) FROM pg_prepared_statements", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_named_statements_share_one_backend_without_pinning() {
    // One backend, and a short borrow timeout: a pinned client would starve the other.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_secs(3);
    })
    .await;
    let a = h.client().await;
    let b = h.client().await;
    let sql = "SELECT pg_backend_pid(), $1::int4 * 2";
    let sa = a.prepare(sql).await.unwrap();
    let sb = b.prepare(sql).await.unwrap();
    let own = b.prepare("SELECT pg_backend_pid(), $1::int4 + 1000").await.unwrap();
    for i in 0..10 {
        let (pid_a, va) = pid_and(&a, &sa, i).await;
        let (pid_b, vb) = pid_and(&b, &sb, i).await;
        assert_eq!((va, vb), (i * 2, i * 2));
        assert_eq!(pid_a, pid_b, "one backend serves both");
        assert_eq!(pid_and(&b, &own, i).await.1, i + 1000);
    }
    assert_eq!(h.metric("DatabaseConnectionsCurrentlySessionPinned"), 0.0);
    // The same statement from both clients is one statement on the backend.
    assert_eq!(statements_on_backend(&a).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_follows_its_client_to_a_backend_that_never_saw_it() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 2).await;
    let client = h.client().await;
    let stmt = client.prepare("SELECT pg_backend_pid(), $1::int4 - 1").await.unwrap();
    let (first, v) = pid_and(&client, &stmt, 10).await;
    assert_eq!(v, 9);
    // Another client holds the backend the statement was prepared on (the most recently used
    // one, which the pool hands out first), inside a transaction.
    let holder = h.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let held: i32 = holder.query_typed_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(held, first);
    let (second, v) = pid_and(&client, &stmt, 20).await;
    assert_ne!(second, first, "served by the other backend");
    assert_eq!(v, 19, "parsed there first, on the fly");
    assert_eq!(h.metric("pgwarden_prepared_statements{event=\"backend_parse\"}"), 1.0);
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_text_under_another_search_path_is_another_statement() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    h.client()
        .await
        .batch_execute("CREATE SCHEMA sa; CREATE SCHEMA sb; CREATE TABLE sa.t (x int); CREATE TABLE sb.t (x int); INSERT INTO sa.t VALUES (1); INSERT INTO sb.t VALUES (2)")
        .await
        .unwrap();
    let a = common::connect(&format!("{} options='-c search_path=sa'", h.conn_str())).await.unwrap();
    let b = common::connect(&format!("{} options='-c search_path=sb'", h.conn_str())).await.unwrap();
    let sa = a.prepare("SELECT x FROM t").await.unwrap();
    let sb = b.prepare("SELECT x FROM t").await.unwrap();
    for _ in 0..3 {
        assert_eq!(a.query_one(&sa, &[]).await.unwrap().get::<_, i32>(0), 1);
        assert_eq!(b.query_one(&sb, &[]).await.unwrap().get::<_, i32>(0), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_other_settings_never_share_a_statement() {
    // A date literal is read when the statement is parsed, in the DateStyle of the moment:
    // one client's copy would give the other client the wrong date.
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let dmy = common::connect(&format!("{} options='-c datestyle=ISO,DMY'", h.conn_str())).await.unwrap();
    let mdy = common::connect(&format!("{} options='-c datestyle=ISO,MDY'", h.conn_str())).await.unwrap();
    let sql = "SELECT '01/02/2024'::date::text";
    let a = dmy.prepare(sql).await.unwrap();
    let b = mdy.prepare(sql).await.unwrap();
    for _ in 0..3 {
        assert_eq!(dmy.query_one(&a, &[]).await.unwrap().get::<_, String>(0), "2024-02-01");
        assert_eq!(mdy.query_one(&b, &[]).await.unwrap().get::<_, String>(0), "2024-01-02");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_the_backend_closes_its_least_recently_used_statements() {
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.max_prepared_statements = 2;
    })
    .await;
    let c = h.client().await;
    let mut stmts = Vec::new();
    for n in 0..5 {
        stmts.push(c.prepare(&format!("SELECT $1::int4 + {n}")).await.unwrap());
    }
    for round in 0..3 {
        for (n, s) in stmts.iter().enumerate() {
            assert_eq!(c.query_one(s, &[&round]).await.unwrap().get::<_, i32>(0), round + n as i32);
        }
    }
    assert!(statements_on_backend(&c).await <= 2, "the backend keeps at most the limit");
    assert!(h.metric("pgwarden_prepared_statements{event=\"evicted\"}") >= 13.0, "each round closes what the next needs");
    assert_eq!(h.metric("pgwarden_prepared_statements{event=\"client_parse\"}"), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_mode_runs_many_clients_on_few_backends_with_zero_failures() {
    // 16 clients, 5 backends: pinned, 11 of them would wait out the borrow timeout.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 5;
        c.pool.borrow_timeout = Duration::from_secs(10);
    })
    .await;
    let hh = &h;
    tokio::task::block_in_place(|| {
        hh.pgbench(&["-i", "-s", "1", "-q"]);
        // (pgbench prepares each statement with a blocking PQprepare the first time a client
        // runs it: in a script with BEGIN, a thread of several clients would wait there for a
        // backend its own other clients hold, behind any transaction pooler. One thread per
        // client for the tpcb-like script.)
        for script in [&["-S", "-j", "2"][..], &["-j", "16"][..]] {
            let mut args = vec!["-M", "prepared", "-c", "16", "-t", "100"];
            args.extend_from_slice(script);
            let report = hh.pgbench(&args);
            assert!(report.contains("number of transactions actually processed: 1600/1600"), "{report}");
            assert!(report.contains("number of failed transactions: 0 "), "{report}");
        }
    });
    assert!(h.backend_count() <= 5, "pool of 5 never exceeded");
    assert_eq!(h.metric("pgwarden_session_pins{reason=\"named_statement\"}"), 0.0);
}

fn message(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::new();
    out.put_u8(tag);
    out.put_i32(4 + len as i32);
    for p in parts {
        out.put_slice(p);
    }
    out.to_vec()
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    message(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"])
}

/// Bind the unnamed portal to statement `name` (no parameters, text results), run it, Sync.
fn bind_execute_sync(name: &str) -> Vec<u8> {
    let mut v = message(b'B', &[b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"]);
    v.extend(message(b'E', &[b"\0\0\0\0\0"]));
    v.extend(message(b'S', &[]));
    v
}

/// A raw client, logged in as the harness's user.
async fn logged_in(h: &Harness) -> RawClient {
    let mut raw = RawClient::connect(h.addr).await;
    raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    raw
}

/// Tags of the messages up to ReadyForQuery, and the first error's SQLSTATE.
async fn until_ready(raw: &mut RawClient) -> (String, Option<String>) {
    let (mut tags, mut error) = (String::new(), None);
    loop {
        let m = raw.recv().await.expect("an answer up to ReadyForQuery");
        tags.push(m.tag as char);
        if m.tag == b'E' && error.is_none() {
            error = Some(m.error_fields().0);
        }
        if m.tag == b'Z' {
            return (tags, error);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_skipped_parses_leave_no_statement_and_a_reused_name_ends_the_session() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let mut raw = logged_in(&h).await;
    // A Parse that fails, and one after it that the backend skips up to the Sync.
    let mut pipeline = parse("s", "SELEC 1");
    pipeline.extend(parse("skipped", "SELECT 2"));
    pipeline.extend(message(b'S', &[]));
    raw.send(&pipeline).await;
    assert_eq!(until_ready(&mut raw).await, ("EZ".into(), Some("42601".into())));
    raw.send(&bind_execute_sync("skipped")).await;
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("26000"), "never prepared, as on PostgreSQL");
    // Both names are free: a Parse of each works, and so do they.
    let mut pipeline = parse("s", "SELECT 7");
    pipeline.extend(parse("skipped", "SELECT 8"));
    pipeline.extend(bind_execute_sync("s"));
    raw.send(&pipeline).await;
    assert_eq!(until_ready(&mut raw).await, ("112DCZ".into(), None));
    // Close frees a name; the client's next Parse of it gets its own definition.
    let mut pipeline = message(b'C', &[b"Ss\0"]);
    pipeline.extend(parse("s", "SELECT 9"));
    pipeline.extend(bind_execute_sync("s"));
    raw.send(&pipeline).await;
    let answer = raw.recv().await.unwrap();
    assert_eq!(answer.tag, b'3', "CloseComplete first");
    assert_eq!(until_ready(&mut raw).await, ("12DCZ".into(), None));
    // A Parse of a name in use: PgBouncer's answer, a FATAL error and the end of the session.
    raw.send(&parse("skipped", "SELECT 10")).await;
    raw.send(&message(b'S', &[])).await;
    raw.expect_fatal_then_close("42P05").await;
    // The backend was not handed on dirty: others carry on.
    let c = h.client().await;
    let s = c.prepare("SELECT 11").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 11);
    // The backend knows statements by pgwarden's names only, never by a client's.
    let names = common::first_column(&c, "SELECT coalesce(string_agg(name, ','), '') FROM pg_prepared_statements").await;
    assert!(!names[0].is_empty() && names[0].split(',').all(|n| n.starts_with("pgwarden_")), "{names:?}");
    let err = c.batch_execute("EXECUTE skipped").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("26000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_with_a_named_statement_gives_the_backend_back() {
    // tokio-postgres prepares the COPY and sends a Sync with it that the backend ignores: the
    // relay must not wait for its answer, or the one backend stays with the copying client.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_secs(3);
    })
    .await;
    let copier = h.client().await;
    let other = h.client().await;
    copier.batch_execute("CREATE TABLE copied (n int)").await.unwrap();
    for round in 0..3i64 {
        let sink = copier.copy_in("COPY copied FROM STDIN").await.unwrap();
        futures_util::pin_mut!(sink);
        futures_util::SinkExt::send(&mut sink, bytes::Bytes::from("1\n2\n3\n")).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 3);
        let count: i64 = other.query_typed_one("SELECT count(*) FROM copied", &[]).await.expect("the backend is free").get(0);
        assert_eq!(count, 3 * (round + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_parsed_under_set_local_is_never_shared() {
    // transform_null_equals is read when a statement is parsed (`1 = NULL` becomes `1 IS NULL`)
    // and, unlike DateStyle, the server does not report it: a SET LOCAL of it is invisible in
    // the client's settings, which key shared statements.
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let sql = "SELECT ((1 = NULL) IS NULL)::text";
    let b = h.client().await;
    let sb = b.prepare(sql).await.unwrap();
    assert_eq!(b.query_one(&sb, &[]).await.unwrap().get::<_, String>(0), "true");
    let mut a = h.client().await;
    let tx = a.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL transform_null_equals = on").await.unwrap();
    let sa = tx.prepare(sql).await.unwrap();
    assert_eq!(tx.query_one(&sa, &[]).await.unwrap().get::<_, String>(0), "false");
    tx.commit().await.unwrap();
    assert_eq!(b.query_one(&sb, &[]).await.unwrap().get::<_, String>(0), "true", "b's statement untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_deallocate_all_does_not_break_statements() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let a = h.client().await;
    let s = a.prepare("SELECT $1::int4 * 3").await.unwrap();
    assert_eq!(a.query_one(&s, &[&2]).await.unwrap().get::<_, i32>(0), 6);
    // A client without statements of its own drops every statement on the shared backend.
    let b = h.client().await;
    b.batch_execute("DEALLOCATE ALL").await.unwrap();
    drop(b);
    assert_eq!(a.query_one(&s, &[&3]).await.expect("parsed again where it was dropped").get::<_, i32>(0), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_run_from_a_statement_prepared_earlier_follows_its_client_only() {
    // The SET runs in a later transaction than its Parse (pgx and pgjdbc cache statements so):
    // pgwarden must see it there, or the backend's next client inherits it.
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let a = h.client().await;
    let set = a.prepare("SET statement_timeout = '40s'").await.unwrap();
    a.execute(&set, &[]).await.unwrap();
    let b = h.client().await;
    assert_eq!(common::first_column(&b, "SHOW statement_timeout").await, ["0"], "not the other client's");
    assert_eq!(common::first_column(&a, "SHOW statement_timeout").await, ["40s"], "its own, wherever it runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_never_hands_the_backend_on_with_answers_owed() {
    // COPY data the database refuses ends that COPY with no CopyDone; the relay must not then
    // count a Sync as ignored that the database answers, or it would give the backend to the
    // next client before the last Query's answer.
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    h.client().await.batch_execute("CREATE TABLE nums (i int)").await.unwrap();
    let mut raw = logged_in(&h).await;
    let mut named = parse("s", "SELECT 1");
    named.extend(message(b'S', &[]));
    raw.send(&named).await;
    assert_eq!(until_ready(&mut raw).await, ("1Z".into(), None), "tracked from here");
    let mut burst = common::query_message("COPY nums FROM STDIN");
    burst.extend(message(b'd', &[b"not a number\n"]));
    burst.extend(common::query_message("COPY nums FROM STDIN"));
    burst.extend(message(b'c', &[]));
    burst.extend(message(b'S', &[]));
    burst.extend(common::query_message("SELECT 'mine' FROM pg_sleep(0.5)"));
    raw.send(&burst).await;
    let other = h.client().await;
    let theirs = tokio::spawn(async move { common::first_column(&other, "SELECT 'theirs'").await });
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("22P02"), "the first COPY's bad row");
    assert_eq!(until_ready(&mut raw).await, ("GCZ".into(), None), "the second COPY");
    assert_eq!(until_ready(&mut raw).await, ("Z".into(), None), "the Sync");
    assert_eq!(until_ready(&mut raw).await, ("TDCZ".into(), None), "its own answer");
    assert_eq!(theirs.await.unwrap(), ["theirs"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_deallocate_of_a_protocol_statement_is_answered_as_postgres_would_without_pinning() {
    // psycopg 3 on libpq < 17 drops statements from its cache with `DEALLOCATE name`; on the
    // backend the statement has another name, so passed on it would fail (26000), or pin.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 1;
        c.pool.borrow_timeout = Duration::from_secs(3);
    })
    .await;
    let mut raw = logged_in(&h).await;
    let q = |sql: &str| common::query_message(sql);
    let mut prepare = parse("s1", "SELECT 1");
    prepare.extend(parse("S2", "SELECT 2"));
    prepare.extend(bind_execute_sync("s1"));
    raw.send(&prepare).await;
    assert_eq!(until_ready(&mut raw).await, ("112DCZ".into(), None));
    // Outside a transaction: an unquoted name is folded, as PostgreSQL reads it.
    raw.send(&q("DEALLOCATE S1")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    raw.send(&bind_execute_sync("s1")).await;
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("26000"), "the client's name is gone");
    // Inside a failed transaction PostgreSQL refuses it and drops nothing.
    raw.send(&q("BEGIN")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    raw.send(&q("SELECT 1/0")).await;
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("22012"));
    raw.send(&q("DEALLOCATE PREPARE \"S2\";")).await;
    assert_eq!(until_ready(&mut raw).await, ("EZ".into(), Some("25P02".into())));
    raw.send(&q("ROLLBACK")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    raw.send(&bind_execute_sync("S2")).await;
    assert_eq!(until_ready(&mut raw).await, ("2DCZ".into(), None), "still there");
    // Inside a transaction that goes on.
    raw.send(&q("BEGIN")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    raw.send(&q("DEALLOCATE \"S2\"")).await;
    let answer = raw.recv().await.unwrap();
    assert_eq!((answer.tag, &answer.body[..]), (b'C', &b"DEALLOCATE\0"[..]));
    let ready = raw.recv().await.unwrap();
    assert_eq!((ready.tag, &ready.body[..]), (b'Z', &b"T"[..]), "still in the transaction");
    raw.send(&q("COMMIT")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    raw.send(&bind_execute_sync("S2")).await;
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("26000"));
    // Not a statement of this client's: the backend answers.
    raw.send(&q("DEALLOCATE nope")).await;
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("26000"));
    // DEALLOCATE ALL (psycopg 3 sends it after every rollback): the client's statements go,
    // the backend's copies stay for the others sharing them.
    let other = h.client().await;
    let shared = other.prepare("SELECT 3").await.unwrap();
    assert_eq!(other.query_one(&shared, &[]).await.unwrap().get::<_, i32>(0), 3);
    let mut prepare = parse("s3", "SELECT 3");
    prepare.extend(parse("s4", "SELECT 4"));
    prepare.extend(message(b'S', &[]));
    raw.send(&prepare).await;
    assert_eq!(until_ready(&mut raw).await, ("11Z".into(), None));
    raw.send(&q("BEGIN")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    raw.send(&q("DEALLOCATE ALL")).await;
    let answer = raw.recv().await.unwrap();
    assert_eq!((answer.tag, &answer.body[..]), (b'C', &b"DEALLOCATE ALL\0"[..]));
    assert_eq!(raw.recv().await.unwrap().body[..], b"T"[..]);
    raw.send(&q("COMMIT")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    for name in ["s3", "s4"] {
        raw.send(&bind_execute_sync(name)).await;
        assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("26000"), "{name} is gone");
    }
    let mut again = parse("s4", "SELECT 44");
    again.extend(bind_execute_sync("s4"));
    raw.send(&again).await;
    assert_eq!(until_ready(&mut raw).await, ("12DCZ".into(), None), "its name is free");
    assert_eq!(other.query_one(&shared, &[]).await.expect("the shared copy stayed").get::<_, i32>(0), 3);
    assert_eq!(h.metric("pgwarden_prepared_statements{event=\"backend_parse\"}"), 0.0, "nothing parsed again");
    // (Each exchange above ran its relay to the end before the next began.)
    assert_eq!(h.metric_total("pgwarden_session_pins"), 0.0, "nothing pinned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_cycling_its_statement_cache_runs_through_the_pool() {
    // The real client: psycopg 3 prepares every query (prepare_threshold 0) and keeps two, so
    // it drops one at every new query, by SQL DEALLOCATE on libpq < 17 (protocol Close after),
    // and all of them after a rollback, by DEALLOCATE ALL.
    let h = Harness::start_with(|c| {
        c.pool.max_backend_connections = 2;
        c.pool.borrow_timeout = Duration::from_secs(3);
    })
    .await;
    let script = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], prepare_threshold=0)
conn.prepared_max = 2
for autocommit in (False, True):
    conn.autocommit = autocommit
    for rnd in range(3):
        for i in range(5):
            got = conn.execute("SELECT %s::int + " + str(i), (rnd,)).fetchone()[0]
            assert got == rnd + i, (got, rnd, i)
        if not autocommit:
            conn.commit()
# A rollback: psycopg forgets its statements and sends DEALLOCATE ALL.
conn.autocommit = False
conn.execute("SELECT %s::int + 100", (1,))
conn.rollback()
assert conn.execute("SELECT %s::int + 100", (1,)).fetchone()[0] == 101
conn.commit()
close = getattr(psycopg, "capabilities", None)
print("close" if close and close.has_send_close_prepared() else "deallocate")
"#;
    let how = common::run_python(script, vec![format!("{} sslmode=disable", h.conn_str())]).await;
    assert_eq!(h.metric_total("pgwarden_session_pins"), 0.0, "statements dropped by {how}");
    assert!(h.metric("pgwarden_prepared_statements{event=\"client_parse\"}") >= 30.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_in_a_pinned_session_drops_its_sql_level_statements_too() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let mut raw = logged_in(&h).await;
    let mut prepare = parse("s1", "SELECT 1");
    prepare.extend(message(b'S', &[]));
    raw.send(&prepare).await;
    assert_eq!(until_ready(&mut raw).await, ("1Z".into(), None));
    // SQL PREPARE pins: the statement lives on this backend only.
    raw.send(&common::query_message("PREPARE q AS SELECT 2")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    // In a failed transaction, PostgreSQL's refusal, and nothing goes.
    for (sql, answer) in [("BEGIN", "CZ"), ("SELECT 1/0", "EZ"), ("DEALLOCATE ALL", "EZ"), ("ROLLBACK", "CZ"), ("EXECUTE q", "TDCZ")] {
        raw.send(&common::query_message(sql)).await;
        assert_eq!(until_ready(&mut raw).await.0, answer, "{sql}");
    }
    raw.send(&bind_execute_sync("s1")).await;
    assert_eq!(until_ready(&mut raw).await, ("2DCZ".into(), None));
    raw.send(&common::query_message("DEALLOCATE ALL")).await;
    assert_eq!(until_ready(&mut raw).await, ("CZ".into(), None));
    raw.send(&common::query_message("EXECUTE q")).await;
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("26000"), "the backend ran it");
    raw.send(&bind_execute_sync("s1")).await;
    assert_eq!(until_ready(&mut raw).await.1.as_deref(), Some("26000"));
    // A session that pins in the same transaction as its DEALLOCATE ALL: the backend runs it.
    // (The pinned session above ends first: it holds the one backend.)
    drop(raw);
    let mut raw = logged_in(&h).await;
    let mut prepare = parse("s1", "SELECT 1");
    prepare.extend(message(b'S', &[]));
    raw.send(&prepare).await;
    assert_eq!(until_ready(&mut raw).await, ("1Z".into(), None));
    for (sql, answer) in [("BEGIN", "CZ"), ("PREPARE q2 AS SELECT 2", "CZ"), ("DEALLOCATE ALL", "CZ"), ("EXECUTE q2", "EZ")] {
        raw.send(&common::query_message(sql)).await;
        assert_eq!(until_ready(&mut raw).await.0, answer, "{sql}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deallocate_all_that_fails_leaves_no_statement_behind_uncounted() {
    let h = Harness::start_with(|c| c.pool.max_backend_connections = 1).await;
    let a = h.client().await;
    let s = a.prepare("SELECT $1::int4 + 7").await.unwrap();
    assert_eq!(a.query_one(&s, &[&1]).await.unwrap().get::<_, i32>(0), 8);
    assert_eq!(statements_on_backend(&a).await, 1);
    // Another client's DEALLOCATE ALL that the database refuses: pgwarden cannot know whether
    // the copy went, so it stops using it and closes it with its next rewritten message.
    let b = h.client().await;
    b.batch_execute("BEGIN").await.unwrap();
    assert!(b.batch_execute("SELECT 1/0").await.is_err());
    let refused = b.batch_execute("DEALLOCATE ALL").await.unwrap_err();
    assert_eq!(sqlstate(&refused).as_deref(), Some("25P02"));
    b.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(a.query_one(&s, &[&2]).await.unwrap().get::<_, i32>(0), 9);
    assert_eq!(statements_on_backend(&a).await, 1, "the old copy closed, not left behind");
}
