//! TLS between pgwarden and PostgreSQL: the test cluster serves TLS (`ssl = on`) with a
//! certificate for `localhost` signed by a throwaway CA; each `database.tls` mode is checked
//! against it, including the refusals.

mod common;

use common::{Harness, sqlstate};
use pgwarden::config::BackendTlsMode;

/// True if every backend connection the dev role has open is encrypted (Postgres's own view).
fn all_backends_encrypted(h: &Harness) -> bool {
    h.admin("SELECT coalesce(bool_and(ssl), false) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'dev'")
        == "t"
}

#[tokio::test]
async fn verify_full_against_the_test_ca_encrypts_backend_connections() {
    let h = Harness::start_full(true, |_, _| {}).await;
    assert_eq!(h.env.config.database.tls, BackendTlsMode::VerifyFull);
    let client = h.client().await;
    let n: i32 = client.query_one("SELECT 6*7", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    assert!(all_backends_encrypted(&h));
    assert!(h.shared.metrics.render().contains("DatabaseConnectionsWithTLS 1"));
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host_name() {
    // The certificate names localhost; connecting by IP address must fail verify-full.
    let h = Harness::start_full(true, |_, c| c.database.host = "127.0.0.1".into()).await;
    let err = h.client_result().await.err().expect("login fails: the backend cannot be verified");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
    assert_eq!(h.backend_count(), 0);
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_from_another_ca() {
    let h = Harness::start_full(true, |env, c| c.database.ca_file = Some(env.ca_cert_path.clone())).await;
    let err = h.client_result().await.err().expect("an untrusted CA is refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
}

#[tokio::test]
async fn verify_ca_checks_the_chain_but_not_the_name() {
    let h = Harness::start_full(true, |_, c| {
        c.database.host = "127.0.0.1".into();
        c.database.tls = BackendTlsMode::VerifyCa;
    })
    .await;
    h.client().await.query_one("SELECT 1", &[]).await.unwrap();
    assert!(all_backends_encrypted(&h));
}

#[tokio::test]
async fn require_encrypts_without_verifying() {
    let h = Harness::start_full(true, |_, c| {
        c.database.host = "127.0.0.1".into();
        c.database.tls = BackendTlsMode::Require;
        c.database.ca_file = None;
    })
    .await;
    h.client().await.query_one("SELECT 1", &[]).await.unwrap();
    assert!(all_backends_encrypted(&h));
}

#[tokio::test]
async fn require_against_a_database_without_tls_fails_clearly() {
    let h = Harness::start_with(|c| c.database.tls = BackendTlsMode::Require).await;
    let err = h.client_result().await.err().expect("no TLS on the database: refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
}
