use std::path::Path;

use super::*;
use crate::auth::sigv4::{SigningCredentials, mint};

const NOW: u64 = 1_724_709_600; // 2024-08-26T22:00:00Z
const KEYRING: &str = r#"{"keys": [
    {"access_key_id": "AKIDAPP", "secret_access_key": "app-secret", "principal": "arn:aws:iam::123456789012:role/app",
     "allow": ["arn:aws:rds-db:us-east-1:123456789012:dbuser:prx-test/app*"]},
    {"access_key_id": "ASIATEMP", "secret_access_key": "temp-secret", "session_token": "the-session",
     "principal": "arn:aws:sts::123456789012:assumed-role/etl/run", "allow": ["arn:aws:rds-db:*:123456789012:dbuser:prx-test/*"]}
]}"#;

async fn verifier(dir: &Path) -> Arc<IamVerifier> {
    let path = dir.join("keyring.json");
    std::fs::write(&path, KEYRING).unwrap();
    let cfg = IamConfig {
        endpoints: vec![("proxy.example.com".into(), Some(5432)), ("127.0.0.1".into(), None)],
        proxy_id: "prx-test".into(),
        account_id: "123456789012".into(),
        max_clock_skew: Duration::from_secs(300),
        keyring: KeyringSourceConfig::File { path },
        keyring_refresh_interval: Duration::from_secs(10),
    };
    IamVerifier::load(&cfg, 6432).await.unwrap()
}

struct Mint<'a> {
    host: &'a str,
    port: u16,
    user: &'a str,
    region: &'a str,
    key_id: &'a str,
    secret: &'a str,
    session: Option<&'a str>,
    at: u64,
    expires: u64,
}

impl Default for Mint<'_> {
    fn default() -> Self {
        Mint { host: "proxy.example.com", port: 5432, user: "app", region: "us-east-1", key_id: "AKIDAPP", secret: "app-secret", session: None, at: NOW, expires: 900 }
    }
}

impl Mint<'_> {
    fn token(&self) -> String {
        let secret = SecretString::from(self.secret);
        let session = self.session.map(SecretString::from);
        let creds = SigningCredentials { access_key_id: self.key_id, secret_access_key: &secret, session_token: session.as_ref() };
        mint(self.host, self.port, self.user, self.region, &creds, self.at, self.expires).expose_secret().to_owned()
    }
}

fn refusal(v: &IamVerifier, token: &str, user: &str, now: u64) -> IamError {
    v.verify(token, user, now).map(|_| ()).unwrap_err().error
}

#[tokio::test]
async fn valid_token_is_accepted_and_names_its_principal() {
    let dir = tempfile::tempdir().unwrap();
    let v = verifier(dir.path()).await;
    let ok = v.verify(&Mint::default().token(), "app", NOW + 10).unwrap();
    assert_eq!(&*ok.key_id, "AKIDAPP");
    assert_eq!(&*ok.principal, "arn:aws:iam::123456789012:role/app");
    // Host case does not matter; a bare endpoint takes the listen port.
    v.verify(&Mint { host: "PROXY.example.COM", ..Mint::default() }.token(), "app", NOW).unwrap();
    v.verify(&Mint { host: "127.0.0.1", port: 6432, ..Mint::default() }.token(), "app", NOW).unwrap();
}

#[tokio::test]
async fn each_bad_token_gets_its_own_reason() {
    let dir = tempfile::tempdir().unwrap();
    let v = verifier(dir.path()).await;
    let good = Mint::default();
    let cases: Vec<(String, &str, u64, fn(&IamError) -> bool)> = vec![
        (good.token(), "app", NOW + 901, |e| matches!(e, IamError::Expired)),
        (Mint { at: NOW + 301, ..Mint::default() }.token(), "app", NOW, |e| matches!(e, IamError::NotYetValid)),
        (Mint { secret: "wrong", ..Mint::default() }.token(), "app", NOW, |e| matches!(e, IamError::BadSignature)),
        (Mint { host: "other.example.com", ..Mint::default() }.token(), "app", NOW, |e| matches!(e, IamError::WrongEndpoint(_))),
        (Mint { port: 5433, ..Mint::default() }.token(), "app", NOW, |e| matches!(e, IamError::WrongEndpoint(_))),
        (good.token(), "app_other", NOW, |e| matches!(e, IamError::WrongUser { .. })),
        (Mint { key_id: "AKIDNOBODY", ..Mint::default() }.token(), "app", NOW, |e| matches!(e, IamError::UnknownKey)),
        (Mint { expires: 901, ..Mint::default() }.token(), "app", NOW, |e| matches!(e, IamError::ExpiresTooLong(901))),
        (Mint { user: "admin", ..Mint::default() }.token(), "admin", NOW, |e| matches!(e, IamError::NotAllowed(_))),
        (Mint { region: "eu-west-1", ..Mint::default() }.token(), "app", NOW, |e| matches!(e, IamError::NotAllowed(_))),
        (good.token().replacen("&X-Amz-Date", "&DBUser=app&X-Amz-Date", 1), "app", NOW, |e| matches!(e, IamError::Token(TokenError::Duplicate(_)))),
        ("hunter2".into(), "app", NOW, |e| matches!(e, IamError::Token(TokenError::Shape))),
    ];
    for (i, (token, user, now, check)) in cases.into_iter().enumerate() {
        let e = refusal(&v, &token, user, now);
        assert!(check(&e), "case {i}: {e:?}");
    }
}

#[tokio::test]
async fn a_token_altered_after_signing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let v = verifier(dir.path()).await;
    let token = Mint::default().token().replacen("DBUser=app", "DBUser=app2", 1);
    assert!(matches!(refusal(&v, &token, "app2", NOW), IamError::BadSignature));
}

#[tokio::test]
async fn temporary_credentials_need_their_session_token() {
    let dir = tempfile::tempdir().unwrap();
    let v = verifier(dir.path()).await;
    let temp = Mint { key_id: "ASIATEMP", secret: "temp-secret", session: Some("the-session"), user: "etl", ..Mint::default() };
    assert_eq!(&*v.verify(&temp.token(), "etl", NOW).unwrap().key_id, "ASIATEMP");
    let wrong = Mint { session: Some("another-session"), ..temp };
    assert!(matches!(refusal(&v, &wrong.token(), "etl", NOW), IamError::SessionTokenMismatch));
    let none = Mint { session: None, ..wrong };
    assert!(matches!(refusal(&v, &none.token(), "etl", NOW), IamError::SessionTokenMismatch));
}

#[tokio::test]
async fn repeated_token_hits_the_cache_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let v = verifier(dir.path()).await;
    let token = Mint::default().token();
    v.verify(&token, "app", NOW).unwrap();
    assert_eq!(v.cached_verdicts(), 1);
    assert!(v.verify(&token, "app", NOW + 100).unwrap().cached);
    assert_eq!(v.cached_verdicts(), 1);
    // A cached verdict still checks the user and the expiry.
    assert!(matches!(refusal(&v, &token, "app_clone", NOW), IamError::WrongUser { .. }));
    assert!(matches!(refusal(&v, &token, "app", NOW + 901), IamError::Expired));
    assert_eq!(v.cached_verdicts(), 0);
}

#[tokio::test]
async fn keyring_reload_revokes_keys_and_drops_cached_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let v = verifier(dir.path()).await;
    let token = Mint::default().token();
    v.verify(&token, "app", NOW).unwrap();
    assert!(!v.reload_keyring().await.unwrap(), "unchanged keyring is not reloaded");
    std::fs::write(dir.path().join("keyring.json"), "{not json").unwrap();
    assert!(v.reload_keyring().await.is_err());
    v.verify(&token, "app", NOW).unwrap();
    std::fs::write(dir.path().join("keyring.json"), r#"{"keys": []}"#).unwrap();
    assert!(v.reload_keyring().await.unwrap());
    assert_eq!(v.cached_verdicts(), 0);
    assert!(matches!(refusal(&v, &token, "app", NOW), IamError::UnknownKey));
}
