//! Queries through pgwarden with real clients: tokio-postgres (simple and extended protocol),
//! psql and pgbench, against a real PostgreSQL.

mod common;

use std::process::Stdio;

use common::{Harness, RawClient, query_message, sqlstate};
use futures_util::SinkExt;

#[tokio::test]
async fn simple_query_returns_rows_from_postgres() {
    let h = Harness::start().await;
    let c = h.client().await;
    let rows = c.simple_query("SELECT 40 + 2 AS answer, current_user").await.unwrap();
    let row = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    });
    let row = row.expect("one row");
    assert_eq!(row.get("answer"), Some("42"));
    assert_eq!(row.get("current_user"), Some("dev"));
}

#[tokio::test]
async fn extended_query_binds_parameters_and_returns_typed_rows() {
    let h = Harness::start().await;
    let c = h.client().await;
    for i in 0..20i32 {
        let row = c.query_one("SELECT $1::int4 * 2, $2::text || '!'", &[&i, &format!("n{i}")]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
        assert_eq!(row.get::<_, String>(1), format!("n{i}!"));
    }
}

#[tokio::test]
async fn extended_query_with_unnamed_statements_binds_parameters() {
    use tokio_postgres::types::Type;
    let h = Harness::start().await;
    let c = h.client().await;
    for i in 0..20i32 {
        let row = c
            .query_typed_one("SELECT $1::int4 * 3, $2::text", &[(&i, Type::INT4), (&"x", Type::TEXT)])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 3);
        assert_eq!(row.get::<_, String>(1), "x");
    }
}

#[tokio::test]
async fn transaction_commit_and_rollback_are_honoured() {
    let h = Harness::start().await;
    let mut c = h.client().await;
    c.batch_execute("CREATE TABLE items (id int PRIMARY KEY)").await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES (1)", &[]).await.unwrap();
    tx.commit().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute("INSERT INTO items VALUES (2)", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    let ids: Vec<i32> = c.query("SELECT id FROM items ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1]);
}

#[tokio::test]
async fn error_inside_transaction_is_reported_and_session_recovers() {
    let h = Harness::start().await;
    let c = h.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    let err = c.batch_execute("SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"), "transaction stays aborted until rollback");
    c.batch_execute("ROLLBACK").await.unwrap();
    let err = c.query_one("SELECT nosuchcolumn", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42703"));
    assert_eq!(c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
}

#[tokio::test]
async fn copy_in_and_out_round_trip_rows() {
    let h = Harness::start().await;
    let c = h.client().await;
    c.batch_execute("CREATE TABLE copied (id int, name text)").await.unwrap();
    let sink = c.copy_in("COPY copied FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tname-{i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 5000);
    let stream = c.copy_out("COPY (SELECT * FROM copied ORDER BY id) TO STDOUT").await.unwrap();
    let chunks: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(stream).await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), data);
}

/// COPY data that arrives in small pieces, each read on its own: the backend owes the COPY's
/// answer but waits for the rest of the data, so the relay must keep reading the client (it
/// may skip that read only after a request the backend answers, such as the Query itself).
#[tokio::test]
async fn copy_in_arriving_in_pieces_completes() {
    let h = Harness::start().await;
    h.client().await.batch_execute("CREATE TABLE pieces (n int)").await.unwrap();
    let mut raw = RawClient::connect(h.addr).await;
    raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    raw.send(&query_message("COPY pieces FROM STDIN")).await;
    assert_eq!(raw.recv().await.expect("CopyInResponse").tag, b'G');
    for i in 0..20 {
        let row = format!("{i}\n");
        let mut piece = vec![b'd'];
        piece.extend_from_slice(&((row.len() + 4) as i32).to_be_bytes());
        piece.extend_from_slice(row.as_bytes());
        raw.send(&piece).await;
        // The proxy runs on this test's runtime: yielding lets it read this piece by itself.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    }
    raw.send(&[b'c', 0, 0, 0, 4]).await;
    let done = raw.recv().await.expect("CommandComplete, not a hang");
    assert_eq!(done.tag, b'C', "{done:?}");
    assert_eq!(&done.body[..], b"COPY 20\0");
    assert_eq!(raw.recv().await.expect("ReadyForQuery").tag, b'Z');
    let n: i64 = h.client().await.query_one("SELECT count(*) FROM pieces", &[]).await.unwrap().get(0);
    assert_eq!(n, 20);
}

#[tokio::test]
async fn startup_settings_follow_the_client_across_backends() {
    let h = Harness::start().await;
    let conn = format!("{} application_name=warden-test options='-c search_path=custom,public'", h.conn_str());
    let c = common::connect(&conn).await.unwrap();
    let other = h.client().await;
    // Interleave so the two clients trade backends; each must keep seeing its own settings.
    // Unnamed statements only, so neither session is pinned: the two take turns on the pool's
    // backends (LIFO: usually the very same one), which must switch settings between them.
    for _ in 0..10 {
        let row = c
            .query_typed_one(
                "SELECT current_setting('application_name'), current_setting('search_path')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "warden-test");
        assert_eq!(row.get::<_, String>(1), "custom,public");
        let row = other.query_typed_one("SELECT current_setting('search_path')", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "\"$user\", public");
    }
    c.batch_execute("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    for _ in 0..5 {
        let tz: String = c.query_typed_one("SELECT current_setting('TimeZone')", &[]).await.unwrap().get(0);
        assert_eq!(tz, "Asia/Tokyo");
        let tz: String = other.query_typed_one("SELECT current_setting('TimeZone')", &[]).await.unwrap().get(0);
        assert_ne!(tz, "Asia/Tokyo");
    }
}

#[tokio::test]
async fn invalid_startup_setting_is_refused_with_the_database_error() {
    let h = Harness::start().await;
    let conn = format!("{} options='-c statement_timeout=banana'", h.conn_str());
    let c = common::connect(&conn).await.unwrap();
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err:?}");
    let ok = h.client().await;
    assert_eq!(ok.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

/// Runs the real psql against the proxy (async: the proxy runs in this test's runtime).
async fn psql(h: &Harness, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(h.env.cluster.client_tool("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(h.libpq_conn())
        .args(args)
        .env("PGPASSWORD", h.env.password())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql runs");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).await.unwrap();
    drop(pipe);
    child.wait_with_output().await.unwrap()
}

#[tokio::test]
async fn psql_runs_queries_and_copies_both_ways() {
    let h = Harness::start().await;
    let out = psql(&h, &["-c", "CREATE TABLE p (a int, b text)", "-c", "\\copy p FROM STDIN"], Some("1\tone\n2\ttwo\n\\.\n")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = psql(&h, &["-c", "\\copy (SELECT * FROM p ORDER BY a) TO STDOUT"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\tone\n2\ttwo\n");
    let out = psql(&h, &["-c", "SELECT sum(a) FROM p"], None).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
}

fn processed_and_failed(report: &str) -> (u64, u64) {
    let field = |prefix: &str| -> Option<u64> {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next()?.split('/').next()?.parse().ok())
    };
    (field("number of transactions actually processed:").unwrap_or(0), field("number of failed transactions:").unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_and_extended_run_with_zero_failures() {
    let h = Harness::start().await;
    let hh = &h;
    tokio::task::block_in_place(|| {
        hh.pgbench(&["-i", "-s", "1", "-q"]);
        for mode in ["simple", "extended"] {
            let report = hh.pgbench(&["-c", "16", "-j", "2", "-t", "200", "-M", mode]);
            let (processed, failed) = processed_and_failed(&report);
            assert_eq!(processed, 16 * 200, "{mode}: {report}");
            assert_eq!(failed, 0, "{mode}: {report}");
        }
        let report = hh.pgbench(&["-C", "-c", "8", "-j", "2", "-t", "50", "-S"]);
        assert_eq!(processed_and_failed(&report), (8 * 50, 0), "{report}");
    });
    assert!(h.backend_count() <= 5, "pool of 5 never exceeded");
}
