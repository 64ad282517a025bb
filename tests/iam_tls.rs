//! IAM token authentication over TLS, end to end: tokens made by boto3 and aws-sdk-rds, every
//! refusal with its SQLSTATE and audit line, TLS on the client side (require switch, certificate
//! reload) and psql/pgbench with a token.

mod common;

use common::{AwsKey, Harness, boto3_token, sqlstate};
use pgwarden::config::{IamAuth, TlsConfig};
use pgwarden::dev::{DEV_ACCOUNT, DEV_PROXY_ID};
use secrecy::{ExposeSecret, SecretString};

const REGION: &str = "us-east-1";
const FULL: AwsKey<'static> =
    AwsKey { access_key_id: "AKIDTESTFULL", secret_access_key: "full/secret+key", session_token: None, region: REGION };
const LIMITED: AwsKey<'static> =
    AwsKey { access_key_id: "AKIDTESTLIMITED", secret_access_key: "limited-secret", session_token: None, region: REGION };
const TEMP: AwsKey<'static> = AwsKey {
    access_key_id: "ASIATESTTEMP",
    secret_access_key: "temp-secret",
    session_token: Some("FwoGZXIvYXdzE+with/odd=chars"),
    region: REGION,
};

/// The dev harness plus three IAM-only users, a keyring with three keys (one limited to
/// `iam_app`, one temporary), and two extra endpoint names (a mixed-case host, port 443).
async fn iam_harness() -> Harness {
    Harness::start_full(false, |env, config| {
        for user in ["iam_app", "app+x", "app user"] {
            Harness::add_user(env, config, user, IamAuth::Required);
        }
        let arn = |user: &str| format!("arn:aws:rds-db:{REGION}:{DEV_ACCOUNT}:dbuser:{DEV_PROXY_ID}/{user}");
        let keyring = serde_json::json!({"keys": [
            {"access_key_id": FULL.access_key_id, "secret_access_key": FULL.secret_access_key,
             "principal": "arn:aws:iam::000000000000:role/full", "allow": [arn("*")]},
            {"access_key_id": LIMITED.access_key_id, "secret_access_key": LIMITED.secret_access_key,
             "principal": "arn:aws:iam::000000000000:role/limited", "allow": [arn("iam_app")]},
            {"access_key_id": TEMP.access_key_id, "secret_access_key": TEMP.secret_access_key,
             "session_token": TEMP.session_token, "principal": "arn:aws:sts::000000000000:assumed-role/temp/run",
             "allow": [format!("arn:aws:rds-db:*:{DEV_ACCOUNT}:dbuser:{DEV_PROXY_ID}/*")]}
        ]});
        std::fs::write(&env.keyring_path, keyring.to_string()).unwrap();
        let iam = config.iam.as_mut().unwrap();
        iam.endpoints.push(("mixed.example.com".into(), Some(5432)));
        iam.endpoints.push(("pgwarden.test".into(), Some(443)));
    })
    .await
}

async fn current_user(h: &Harness, user: &str, token: &str) -> String {
    let client = h.tls_client_as(user, token).await.unwrap_or_else(|e| panic!("{user} logs in with a token: {e}"));
    client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0)
}

fn mint(key: &AwsKey<'_>, host: &str, port: u16, user: &str, at: u64, expires: u64) -> String {
    let secret = SecretString::from(key.secret_access_key);
    let session = key.session_token.map(SecretString::from);
    let creds = pgwarden::auth::sigv4::SigningCredentials {
        access_key_id: key.access_key_id,
        secret_access_key: &secret,
        session_token: session.as_ref(),
    };
    pgwarden::auth::sigv4::mint(host, port, user, key.region, &creds, at, expires).expose_secret().to_owned()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn boto3_tokens_log_in_for_odd_user_names_hosts_ports_and_session_tokens() {
    let h = iam_harness().await;
    let port = h.addr.port();
    assert_eq!(current_user(&h, "iam_app", &boto3_token(&FULL, "127.0.0.1", port, "iam_app")).await, "iam_app");
    assert_eq!(current_user(&h, "app+x", &boto3_token(&FULL, "Mixed.Example.COM", 5432, "app+x")).await, "app+x");
    assert_eq!(current_user(&h, "app user", &boto3_token(&FULL, "pgwarden.test", 443, "app user")).await, "app user");
    assert_eq!(current_user(&h, "iam_app", &boto3_token(&TEMP, "127.0.0.1", port, "iam_app")).await, "iam_app");

    let allowed: Vec<_> = h.audit_lines().into_iter().filter(|l| l["result"] == "allowed").collect();
    assert_eq!(allowed.len(), 4, "{allowed:?}");
    assert!(allowed.iter().all(|l| l["method"] == "iam" && l["tls"] == true));
    assert_eq!(allowed[1]["user"], "app+x");
    assert_eq!(allowed[1]["principal"], "arn:aws:iam::000000000000:role/full");
    assert_eq!(allowed[3]["key_id"], "ASIATESTTEMP");
}

async fn sdk_token(key: &AwsKey<'_>, host: &str, port: u16, user: &str) -> String {
    use aws_sdk_rds::auth_token::{AuthTokenGenerator, Config};
    let creds = aws_credential_types::Credentials::new(
        key.access_key_id,
        key.secret_access_key,
        key.session_token.map(str::to_owned),
        None,
        "test",
    );
    let config = Config::builder()
        .hostname(host)
        .port(u64::from(port))
        .username(user)
        .region(aws_types::region::Region::new(key.region.to_owned()))
        .credentials(creds)
        .build()
        .unwrap();
    let sdk = aws_types::sdk_config::SdkConfig::builder().time_source(aws_smithy_async::time::SystemTimeSource::new()).build();
    AuthTokenGenerator::new(config).auth_token(&sdk).await.unwrap().as_str().to_owned()
}

#[tokio::test]
async fn aws_sdk_rds_tokens_log_in() {
    let h = iam_harness().await;
    let port = h.addr.port();
    for (key, host, port) in [(&FULL, "127.0.0.1", port), (&TEMP, "127.0.0.1", port), (&FULL, "pgwarden.test", 443)] {
        let token = sdk_token(key, host, port, "iam_app").await;
        assert_eq!(current_user(&h, "iam_app", &token).await, "iam_app", "{host}:{port}");
    }
}

/// Two aws-sdk-rds quirks (boto3 and the CLI get both right, see the boto3 test):
/// - it writes `DBUser=app+x` without encoding the `+`, and its signer reads that `+` as a
///   space, so the token is signed for `app x`;
/// - given a mixed-case host it signs the host as given but writes it lower-cased.
/// pgwarden takes a token's text literally (`+` is `+`; the host line is lower-cased, as
/// SigV4 and botocore do), so these signatures cannot match: refused, never misread as a
/// token for another user.
#[tokio::test]
async fn aws_sdk_rds_quirky_tokens_are_refused_not_misread() {
    let h = iam_harness().await;
    let plus = sdk_token(&FULL, "127.0.0.1", h.addr.port(), "app+x").await;
    assert!(plus.contains("DBUser=app+x&"), "{plus}");
    let mixed = sdk_token(&FULL, "Mixed.Example.COM", 5432, "iam_app").await;
    for (user, token) in [("app+x", &plus), ("app user", &plus), ("iam_app", &mixed)] {
        let err = h.tls_client_as(user, token).await.err().expect("refused");
        assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    }
    let lines = h.audit_lines();
    assert!(lines.iter().all(|l| l["result"] == "denied"));
    assert!(lines[0]["reason"].as_str().unwrap().contains("signature does not match"));
}

/// Every way a token can be wrong: the client gets RDS Proxy's text and a stable SQLSTATE,
/// the audit log gets the precise reason, and the proxy keeps serving.
#[tokio::test]
async fn every_bad_token_is_refused_with_its_sqlstate_and_audited() {
    let h = iam_harness().await;
    let port = h.addr.port();
    let good = boto3_token(&FULL, "127.0.0.1", port, "iam_app");
    let t = now();
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("expired", mint(&FULL, "127.0.0.1", port, "iam_app", t - 1000, 900), "28P01", "token expired"),
        ("future", mint(&FULL, "127.0.0.1", port, "iam_app", t + 600, 900), "28P01", "in the future"),
        ("wrong signature", mint(&AwsKey { secret_access_key: "nope", ..FULL }, "127.0.0.1", port, "iam_app", t, 900), "28P01", "signature does not match"),
        ("other host", boto3_token(&FULL, "db.example.com", port, "iam_app"), "28P01", "not one of this proxy's endpoints"),
        ("other port", boto3_token(&FULL, "127.0.0.1", port.wrapping_add(1), "iam_app"), "28P01", "not one of this proxy's endpoints"),
        ("other user", boto3_token(&FULL, "127.0.0.1", port, "app+x"), "28P01", "is for database user"),
        ("unknown key", boto3_token(&AwsKey { access_key_id: "AKIDNOBODY", ..FULL }, "127.0.0.1", port, "iam_app"), "28000", "unknown access key id"),
        ("expires > 900", mint(&FULL, "127.0.0.1", port, "iam_app", t, 901), "28P01", "at most 900"),
        ("missing parameter", good.replacen("&X-Amz-Date=", "&X-Amz-Nope=", 1), "28P01", "unexpected parameter"),
        ("no date", remove_param(&good, "X-Amz-Date"), "28P01", "missing parameter X-Amz-Date"),
        ("duplicated parameter", good.replacen("Action=connect", "Action=connect&Action=connect", 1), "28P01", "appears twice"),
        ("policy", boto3_token(&LIMITED, "127.0.0.1", port, "app user"), "28000", "not allowed rds-db:connect"),
        ("not a token", "hunter2".into(), "28P01", "malformed token"),
    ];
    for (name, token, code, _) in &cases {
        let user = if *name == "policy" { "app user" } else { "iam_app" };
        let err = h.tls_client_as(user, token).await.err().unwrap_or_else(|| panic!("{name}: must be refused"));
        assert_eq!(sqlstate(&err).as_deref(), Some(*code), "{name}: {err}");
        let message = err.as_db_error().unwrap().message().to_owned();
        assert_eq!(
            message,
            format!("The IAM authentication failed for the role {user}. Check the IAM token for this role and try again."),
            "{name}"
        );
    }
    let denied: Vec<_> = h.audit_lines().into_iter().filter(|l| l["result"] == "denied").collect();
    assert_eq!(denied.len(), cases.len());
    for ((name, token, _, reason), line) in cases.iter().zip(&denied) {
        let text = line.to_string();
        assert!(line["reason"].as_str().unwrap().contains(reason), "{name}: {text}");
        assert!(!text.contains(token.as_str()) && !text.contains("X-Amz-Signature"), "{name}: audit line leaks the token");
    }
    assert_eq!(denied[11]["key_id"], "AKIDTESTLIMITED");
    assert_eq!(denied[11]["principal"], "arn:aws:iam::000000000000:role/limited");
    // The proxy still serves everyone else.
    assert_eq!(current_user(&h, "iam_app", &good).await, "iam_app");
}

fn remove_param(token: &str, name: &str) -> String {
    let (head, query) = token.split_once("/?").unwrap();
    let kept: Vec<&str> = query.split('&').filter(|p| !p.starts_with(&format!("{name}="))).collect();
    format!("{head}/?{}", kept.join("&"))
}

#[tokio::test]
async fn token_without_tls_gets_rds_proxy_text_and_an_audit_line() {
    let h = iam_harness().await;
    let token = boto3_token(&FULL, "127.0.0.1", h.addr.port(), "iam_app");
    let conn = format!("host=127.0.0.1 port={} user=iam_app dbname={} password={token}", h.addr.port(), h.env.database);
    let err = common::connect(&conn).await.err().expect("plaintext IAM login is refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"));
    assert_eq!(err.as_db_error().unwrap().message(), "IAM authentication is allowed only with SSL connections.");
    let lines = h.audit_lines();
    let last = lines.last().unwrap();
    assert_eq!((last["result"].as_str(), last["tls"].as_bool()), (Some("denied"), Some(false)));
    assert!(last["reason"].as_str().unwrap().contains("without TLS"), "{last}");
}

#[tokio::test]
async fn oversize_password_message_over_tls_is_refused_and_audited() {
    let h = iam_harness().await;
    let huge = "a".repeat(100 * 1024);
    let err = h.tls_client_as("iam_app", &huge).await.err().expect("refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("08P01"), "{err}");
    let lines = h.audit_lines();
    assert!(lines.last().unwrap()["reason"].as_str().unwrap().contains("length"), "{lines:?}");
    let token = boto3_token(&FULL, "127.0.0.1", h.addr.port(), "iam_app");
    assert_eq!(current_user(&h, "iam_app", &token).await, "iam_app");
}

#[tokio::test]
async fn password_over_tls_and_scram_without_work_for_an_optional_user() {
    let h = Harness::start().await;
    let client = h.tls_client_as(&h.env.user, h.env.password()).await.unwrap();
    client.query_one("SELECT 1", &[]).await.unwrap();
    let token = h.env.token("127.0.0.1", h.addr.port(), &h.env.user);
    h.tls_client_as(&h.env.user, token.expose_secret()).await.expect("the dev token logs in too");
    h.client().await.query_one("SELECT 1", &[]).await.expect("SCRAM without TLS still works");
    let wrong = h.tls_client_as(&h.env.user, "wrong").await.err().unwrap();
    assert_eq!(sqlstate(&wrong).as_deref(), Some("28P01"));
    let methods: Vec<String> = h.audit_lines().iter().map(|l| format!("{}/{}", l["method"], l["result"])).collect();
    assert_eq!(methods, ["\"password\"/\"allowed\"", "\"iam\"/\"allowed\"", "\"scram\"/\"allowed\"", "\"password\"/\"denied\""]);
    let metrics = h.shared.metrics.render();
    assert!(metrics.contains("ClientConnectionsTLS 3"), "{metrics}");
}

#[tokio::test]
async fn require_tls_refuses_plaintext_clients() {
    let h = Harness::start_with(|c| c.tls.as_mut().unwrap().require = true).await;
    let err = h.client_result().await.err().expect("plaintext refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"));
    assert!(err.as_db_error().unwrap().message().contains("sslmode=require"));
    h.tls_client_as(&h.env.user, h.env.password()).await.expect("TLS accepted");
}

#[tokio::test]
async fn renewed_certificate_is_served_to_new_clients_while_old_connections_keep_going() {
    let h = Harness::start().await;
    let old = h.tls_client_as(&h.env.user, h.env.password()).await.unwrap();
    let TlsConfig { cert, key, .. } = h.env.config.tls.clone().unwrap();
    let renewed_dir = tempfile::tempdir().unwrap();
    let (new_ca, new_cert, new_key) = pgwarden::tls::write_generated_certs(renewed_dir.path(), &["127.0.0.1"]).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    assert!(h.shared.tls.as_ref().unwrap().reload_if_changed(), "the reload sees the new files");
    let fresh = h.tls_client_trusting(&new_ca, &h.env.user, h.env.password()).await.expect("new CA trusted by new clients");
    assert!(h.tls_client_as(&h.env.user, h.env.password()).await.is_err(), "the old certificate is no longer served");
    old.query_one("SELECT 1", &[]).await.expect("connections made before the renewal keep working");
    fresh.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn psql_and_pgbench_log_in_with_a_boto3_token_over_tls() {
    let h = iam_harness().await;
    let port = h.addr.port();
    let token = boto3_token(&FULL, "127.0.0.1", port, "iam_app");
    let conn = format!("host=127.0.0.1 port={port} user=iam_app dbname={} sslmode=require", h.env.database);
    // tokio's Command: the proxy runs on this test's runtime and must keep running meanwhile.
    let out = tokio::process::Command::new("psql")
        .args([&conn, "-XAtc", "SELECT current_user || ' ' || 6*7"])
        .env("PGPASSWORD", &token)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "iam_app 42");

    let script = h.env.cluster.dir().join("select.sql");
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-C", "-c", "4", "-j", "2", "-t", "25", "-f"])
        .arg(&script)
        .arg(&conn)
        .env("PGPASSWORD", &token)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("number of transactions actually processed: 100/100"), "{stdout}");
    assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    let allowed = h.audit_lines().iter().filter(|l| l["result"] == "allowed").count();
    assert!(allowed >= 101, "every pgbench connection authenticated with the token: {allowed}");
}

/// A keyring of one key that may connect as any user of the dev proxy.
fn keyring_of(key: &AwsKey<'_>) -> String {
    let arn = format!("arn:aws:rds-db:{REGION}:{DEV_ACCOUNT}:dbuser:{DEV_PROXY_ID}/*");
    serde_json::json!({"keys": [{"access_key_id": key.access_key_id, "secret_access_key": key.secret_access_key,
        "principal": "arn:aws:iam::000000000000:role/app", "allow": [arn]}]})
    .to_string()
}

/// The keyring kept in Secrets Manager (moto): tokens signed by its keys log in; a malformed new
/// version is counted and changes nothing; a new valid version replaces the keyring at the next
/// refresh, revoking the keys it no longer lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_from_secrets_manager_follows_its_current_version() {
    const SECRET: &str = "pgwarden/keyring";
    let moto = common::moto::Moto::start().await;
    let sm = moto.client().await;
    sm.create_secret().name(SECRET).secret_string(keyring_of(&FULL)).send().await.unwrap();
    let endpoint = moto.endpoint.clone();
    let h = Harness::start_full(false, |env, config| {
        Harness::add_user(env, config, "iam_app", IamAuth::Required);
        let iam = config.iam.as_mut().unwrap();
        iam.keyring = pgwarden::config::KeyringSourceConfig::Aws {
            secret_id: SECRET.into(),
            region: Some(REGION.into()),
            endpoint_url: Some(endpoint),
        };
        iam.keyring_refresh_interval = std::time::Duration::from_millis(100);
    })
    .await;
    let port = h.addr.port();
    let token = |key: &AwsKey<'_>| mint(key, "127.0.0.1", port, "iam_app", now(), 900);
    assert_eq!(current_user(&h, "iam_app", &boto3_token(&FULL, "127.0.0.1", port, "iam_app")).await, "iam_app");

    sm.put_secret_value().secret_id(SECRET).secret_string("{\"keys\": [{\"access_key_id\"").send().await.unwrap();
    h.until_metric("pgwarden_keyring_reload_failures", |n| n >= 1.0).await;
    assert_eq!(current_user(&h, "iam_app", &token(&FULL)).await, "iam_app", "the last good keyring stays");

    sm.put_secret_value().secret_id(SECRET).secret_string(keyring_of(&LIMITED)).send().await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while h.tls_client_as("iam_app", &token(&LIMITED)).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new keyring's key logs in");
    let err = h.tls_client_as("iam_app", &token(&FULL)).await.err().expect("a key the new keyring dropped is refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
}
