//! Client authentication, credential reload, and bad input on the wire: every case gets a clear
//! error or a clean close, and the proxy keeps serving everyone else.

mod common;

use std::time::Duration;

use common::{Harness, RawClient, sqlstate, startup_packet};
use tokio::io::AsyncWriteExt;

/// After each hostile connection, a normal client must still get answers.
async fn assert_still_serving(h: &Harness) {
    let c = h.client().await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn wrong_password_is_refused_with_28p01() {
    let h = Harness::start().await;
    let err = common::connect(&h.conn_str_with_password("not-the-password")).await.err().expect("refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    assert!(h.shared.metrics.render().contains("ClientConnectionsSetupFailedAuth 1"));
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn unknown_user_gets_rds_proxy_no_credentials_error() {
    let h = Harness::start().await;
    let conn = format!("host={} port={} user=mallory dbname=dev password=x", h.addr.ip(), h.addr.port());
    let err = common::connect(&conn).await.err().expect("refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"));
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "This RDS proxy has no credentials for the role mallory. Check the credentials for this role and try again."
    );
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn rotated_credential_file_is_picked_up_for_clients_and_backends() {
    let h = Harness::start().await;
    let old = h.env.password().to_owned();
    let mut changes = h.shared.user("dev").unwrap().store.subscribe();
    h.admin("ALTER ROLE dev PASSWORD 'rotated-Pa55word'");
    let secret = serde_json::json!({"AWSCURRENT": {"username": "dev", "password": "rotated-Pa55word"}});
    let tmp = h.env.secret_path.with_extension("tmp");
    pgwarden::dev::write_private(&tmp, secret.to_string().as_bytes()).unwrap();
    std::fs::rename(&tmp, &h.env.secret_path).unwrap();
    tokio::time::timeout(Duration::from_secs(10), changes.changed()).await.expect("reload within a few ticks").unwrap();
    assert_eq!(h.shared.user("dev").unwrap().store.snapshot().generation.0, 2);
    let c = common::connect(&h.conn_str_with_password("rotated-Pa55word")).await.expect("new password works");
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let err = common::connect(&h.conn_str_with_password(&old)).await.err().expect("old password refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
}

#[tokio::test]
async fn malformed_credential_file_keeps_last_good_credential() {
    let h = Harness::start().await;
    std::fs::write(&h.env.secret_path, "{\"AWSCURRENT\": {\"username\": \"dev\"").unwrap();
    let store = h.shared.user("dev").unwrap().store.clone();
    let err = store.refresh().await.expect_err("malformed JSON is refused");
    assert!(!err.to_string().contains(h.env.password()));
    assert_eq!(store.snapshot().generation.0, 1);
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn random_bytes_get_an_error_or_close_and_proxy_keeps_serving() {
    let h = Harness::start().await;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20 {
        let mut junk = vec![0u8; 64];
        for b in junk.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        let mut raw = RawClient::connect(h.addr).await;
        raw.send(&junk).await;
        if let Some(m) = raw.recv().await {
            assert_eq!(m.tag, b'E', "only an ErrorResponse may come back");
            assert_eq!(m.error_fields().0, "08P01");
        }
        assert!(raw.closed().await);
    }
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn startup_length_of_2_pow_31_minus_1_is_refused_at_once() {
    let h = Harness::start().await;
    let mut raw = RawClient::connect(h.addr).await;
    raw.send(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).await;
    raw.expect_fatal_then_close("08P01").await;
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn truncated_startup_packet_is_closed_cleanly() {
    let h = Harness::start().await;
    let mut raw = RawClient::connect(h.addr).await;
    let packet = startup_packet(196_608, &[("user", "dev")]);
    raw.send(&packet[..packet.len() - 4]).await;
    raw.stream.shutdown().await.unwrap();
    assert!(raw.recv().await.is_none(), "nothing to answer a half packet with");
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn unknown_protocol_version_is_refused_with_0a000() {
    let h = Harness::start().await;
    for version in [2 << 16, 4 << 16] {
        let mut raw = RawClient::connect(h.addr).await;
        raw.send(&startup_packet(version, &[("user", "dev")])).await;
        raw.expect_fatal_then_close("0A000").await;
    }
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn protocol_3_2_is_negotiated_down_to_3_0() {
    let h = Harness::start().await;
    let mut raw = RawClient::connect(h.addr).await;
    raw.send(&startup_packet(196_610, &[("user", "dev"), ("_pq_.test_option", "1")])).await;
    let m = raw.recv().await.unwrap();
    assert_eq!(m.tag, b'v');
    assert_eq!(&m.body[..4], &196_608i32.to_be_bytes());
    assert_eq!(&m.body[4..8], &1i32.to_be_bytes());
    assert_eq!(&m.body[8..], b"_pq_.test_option\0");
    assert_eq!(raw.recv().await.unwrap().tag, b'R');
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_answered_n_when_tls_is_off() {
    let h = Harness::start_with(|c| c.tls = None).await;
    let mut raw = RawClient::connect(h.addr).await;
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await;
    assert_eq!(raw.recv_byte().await, b'N');
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).await;
    assert_eq!(raw.recv_byte().await, b'N');
    let greeting = raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    assert!(greeting.iter().any(|m| m.tag == b'S' && m.body.starts_with(b"server_version\0")));
}

#[tokio::test]
async fn oversize_password_message_is_refused() {
    let h = Harness::start().await;
    let mut raw = RawClient::connect(h.addr).await;
    raw.send(&startup_packet(196_608, &[("user", "dev")])).await;
    assert_eq!(raw.recv().await.unwrap().tag, b'R');
    let mut msg = vec![b'p'];
    msg.extend(((100 * 1024 + 4) as i32).to_be_bytes());
    msg.extend(vec![b'a'; 100 * 1024]);
    raw.send(&msg).await;
    raw.expect_fatal_then_close("08P01").await;
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn oversize_query_length_after_login_is_refused() {
    let h = Harness::start().await;
    let mut raw = RawClient::connect(h.addr).await;
    raw.login(&h.env.user, &h.env.database, h.env.password()).await;
    raw.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff, b'S']).await;
    raw.expect_fatal_then_close("08P01").await;
    assert_still_serving(&h).await;
}

#[tokio::test]
async fn garbage_scram_messages_are_protocol_errors() {
    let h = Harness::start().await;
    let mut raw = RawClient::connect(h.addr).await;
    raw.send(&startup_packet(196_608, &[("user", "dev")])).await;
    assert_eq!(raw.recv().await.unwrap().tag, b'R');
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::sasl_initial_response("SCRAM-SHA-256", b"garbage", &mut out).unwrap();
    raw.send(&out).await;
    raw.expect_fatal_then_close("08P01").await;
    assert_still_serving(&h).await;
}

async fn http_get(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

#[tokio::test]
async fn metrics_endpoint_serves_counters_and_latency_histograms() {
    let h = Harness::start_with(|c| c.metrics_listen = Some(([127, 0, 0, 1], 0).into())).await;
    let addr = h.shared.metrics_addr.expect("metrics listener bound");
    let c = h.client().await;
    for _ in 0..3 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // A scraper that never finishes its request costs nothing to the next one.
    let stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
    let page = http_get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.contains("# TYPE QueryDatabaseResponseLatency histogram"), "{page}");
    let count = |name: &str| -> u64 {
        let line = page.lines().find(|l| l.starts_with(&format!("{name}_count "))).unwrap_or_else(|| panic!("{name} in {page}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // tokio-postgres's own startup queries count too: at least our three.
    assert!(count("QueryDatabaseResponseLatency") >= 3, "{page}");
    assert_eq!(count("DatabaseConnectionsBorrowLatency"), count("QueryDatabaseResponseLatency") + 1, "one borrow per request, plus the first client's login probe: {page}");
    assert!(page.contains("QueryDatabaseResponseLatency_bucket{le=\"+Inf\"}"), "{page}");
    assert!(page.contains("ClientConnectionsSetupSucceeded 1"), "{page}");
    assert!(!page.contains(h.env.password()));
    assert!(http_get(addr, b"GET /other HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
    assert!(http_get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
    drop(stuck);
}

#[tokio::test]
async fn health_checks_say_live_and_ready_until_the_drain() {
    let mut h = Harness::start_with(|c| c.metrics_listen = Some(([127, 0, 0, 1], 0).into())).await;
    let addr = h.shared.metrics_addr.expect("metrics listener bound");
    let live = http_get(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert!(live.starts_with("HTTP/1.1 200 OK\r\n") && live.ends_with("\r\n\r\nok\n"), "{live}");
    let ready = http_get(addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
    assert!(ready.starts_with("HTTP/1.1 200 OK\r\n") && ready.ends_with("ready\n"), "{ready}");
    // Shut down (no clients: the drain ends at once); the endpoint outlives the listener.
    h.begin_shutdown().await.unwrap();
    let ready = http_get(addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
    assert!(ready.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && ready.ends_with("draining\n"), "{ready}");
    assert!(http_get(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 200 OK"));
}

#[tokio::test]
async fn metrics_use_rds_proxy_names_and_never_show_the_password() {
    let h = Harness::start().await;
    assert_still_serving(&h).await;
    let text = h.shared.metrics.render();
    for name in [
        "ClientConnections",
        "ClientConnectionsReceived",
        "DatabaseConnections",
        "DatabaseConnectionsCurrentlyBorrowed",
        "DatabaseConnectionsBorrowLatency",
        "DatabaseConnectionsSetupSucceeded",
        "QueryDatabaseResponseLatency",
        "QueryRequests",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(!text.contains(h.env.password()));
}
