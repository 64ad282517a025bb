//! Credential rotation through Secrets Manager (moto's server) while clients keep working:
//! the `aws` credential source, the rotation-aware pool, and the rotator's four steps, for
//! single-user and alternating-users secrets. Clients log in with IAM tokens (so their own
//! login does not depend on the secret) and every transaction's result is checked.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Harness;
use common::moto::Moto;
use pgwarden::config::{CredentialConfig, IamAuth, SourceConfig};
use pgwarden::rotation::{Rotator, Step, Strategy};
use secrecy::ExposeSecret;

const SECRET: &str = "prod/app/postgres";
const MASTER: &str = "prod/master/postgres";

struct Rig {
    h: Harness,
    moto: Moto,
    sm: aws_sdk_secretsmanager::Client,
}

/// PostgreSQL with role `app`, its secret in moto (plus the master secret for the
/// alternating strategy), and pgwarden serving `app` from the `aws` source, refreshing fast.
async fn rig(strategy: Strategy) -> Rig {
    let moto = Moto::start().await;
    let sm = moto.client().await;
    let endpoint = moto.endpoint.clone();
    let sm_setup = sm.clone();
    let h = Harness::start_async(false, async |env, config| {
        let password = "initial-Pa55word-0123456789abcdef";
        env.cluster.psql(&format!("CREATE ROLE app LOGIN PASSWORD '{password}'")).unwrap();
        env.cluster.psql("GRANT ALL ON DATABASE dev TO app").unwrap();
        let mut secret = serde_json::json!({
            "engine": "postgres", "host": "127.0.0.1", "port": env.cluster.port,
            "username": "app", "password": password, "dbname": "dev",
        });
        if strategy == Strategy::Alternating {
            let master = serde_json::json!({
                "engine": "postgres", "host": "127.0.0.1", "port": env.cluster.port,
                "username": "postgres", "password": env.cluster.superuser_password(), "dbname": "dev",
            });
            let out = sm_setup.create_secret().name(MASTER).secret_string(master.to_string()).send().await.unwrap();
            secret["masterarn"] = out.arn().unwrap().into();
        }
        sm_setup.create_secret().name(SECRET).secret_string(secret.to_string()).send().await.unwrap();
        config.credentials.push(CredentialConfig {
            user: "app".into(),
            source: SourceConfig::Aws { secret_id: SECRET.into(), region: Some("us-east-1".into()), endpoint_url: Some(endpoint) },
            refresh_interval: Duration::from_millis(200),
            iam_auth: IamAuth::Required,
        });
    })
    .await;
    Rig { h, moto, sm }
}

impl Rig {
    fn rotator(&self, strategy: Strategy) -> Rotator {
        Rotator::new(self.sm.clone(), SECRET.into(), strategy, None)
    }

    async fn client(&self) -> tokio_postgres::Client {
        self.client_to("dev").await
    }

    /// A client of `database`: another database is another pool, whose first client makes
    /// pgwarden log a backend in.
    async fn client_to(&self, database: &str) -> tokio_postgres::Client {
        let token = self.h.env.token("127.0.0.1", self.h.addr.port(), "app");
        let ca = &self.h.env.ca_cert_path;
        self.h.tls_client_full(ca, "app", token.expose_secret(), database).await.expect("app logs in with a token")
    }

    /// Waits until the proxy's snapshot of `app`'s credential satisfies `pred`.
    async fn until_credential(&self, pred: impl Fn(&pgwarden::credentials::CredentialSet) -> bool) {
        let mut rx = self.h.shared.user("app").unwrap().store.subscribe();
        if tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| pred(s))).await.is_err() {
            let s = self.h.shared.user("app").unwrap().store.snapshot();
            panic!(
                "proxy never saw the change; it holds generation {} (current {}, pending {:?}, previous {:?})",
                s.generation.0,
                s.secret.current.username,
                s.secret.pending.as_ref().map(|c| &c.username),
                s.secret.previous.as_ref().map(|c| &c.username),
            );
        }
    }

    /// `pid:user` of each backend pgwarden holds for `app`'s pool (the user may be app_clone).
    fn backends(&self) -> Vec<String> {
        let out = self.h.admin(
            "SELECT string_agg(pid || ':' || usename, ',' ORDER BY pid) FROM pg_stat_activity \
             WHERE application_name = 'pgwarden' AND datname = 'dev' AND usename IN ('app', 'app_clone')",
        );
        out.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }

    /// Closes every backend pgwarden has open, so the next transactions need fresh logins.
    /// Terminates pgwarden's backends and waits until they are gone (their FATAL written, so
    /// the pool sees each one dead before it would lend it).
    fn kill_backends(&self) {
        self.h.admin("SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity WHERE application_name = 'pgwarden'");
    }
}

/// Clients each running `SELECT <n> + 1` (every third in a transaction) in a loop and
/// checking the answer, until stopped. `progress` counts successes, or goes to `u64::MAX` when
/// a client fails, so waiters wake up either way.
struct Load {
    stop: Arc<AtomicBool>,
    progress: tokio::sync::watch::Sender<u64>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Load {
    async fn start(rig: &Rig, clients: usize) -> Load {
        let mut all = Vec::new();
        for _ in 0..clients {
            all.push(rig.client().await);
        }
        Load::with(all)
    }

    fn with(clients: Vec<tokio_postgres::Client>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = tokio::sync::watch::Sender::new(0u64);
        let mut tasks = Vec::new();
        for (c, client) in clients.into_iter().enumerate() {
            let (stop, ok) = (Arc::clone(&stop), progress.clone());
            tasks.push(tokio::spawn(async move {
                let failed = |e: String| {
                    ok.send_replace(u64::MAX);
                    e
                };
                let mut n = c as i64 * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let sql = if n % 3 == 0 { format!("BEGIN; SELECT {n} + 1; COMMIT") } else { format!("SELECT {n} + 1") };
                    let rows = client.simple_query(&sql).await.map_err(|e| failed(format!("client {c} tx {n}: {e}")))?;
                    let got = rows.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    });
                    if got.as_deref() != Some((n + 1).to_string().as_str()) {
                        return Err(failed(format!("client {c}: SELECT {n} + 1 returned {got:?}")));
                    }
                    ok.send_modify(|k| *k = k.saturating_add(1));
                }
                Ok(())
            }));
        }
        Load { stop, progress, tasks }
    }

    /// Waits for `more` successful transactions beyond the count now (or for a failure).
    async fn progress(&self, more: u64) {
        let target = self.progress.borrow().saturating_add(more);
        let mut rx = self.progress.subscribe();
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|n| *n >= target)).await.expect("load keeps making progress").unwrap();
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap().expect("no client transaction fails");
        }
        *self.progress.borrow()
    }
}

/// Runs `SELECT 1` and returns the value it read.
async fn select_one(c: &tokio_postgres::Client) -> String {
    let rows = c.simple_query("SELECT 1").await.expect("SELECT 1 runs");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

async fn rotate_under_load(strategy: Strategy) {
    let rig = rig(strategy).await;
    let load = Load::start(&rig, 20).await;
    load.progress(200).await;
    let before = rig.backends();
    assert!(!before.is_empty() && before.iter().all(|b| b.ends_with(":app")), "{before:?}");
    let rotator = rig.rotator(strategy);
    let token = pgwarden::rotation::new_token();
    for step in Step::ALL {
        rotator.run_step(step, &token).await.unwrap_or_else(|e| panic!("{step:?}: {e}"));
        load.progress(100).await;
        if step == Step::SetSecret {
            // The window RDS Proxy fails in: for a single user only AWSPENDING logs in now.
            // New clients of another database (a new pool, so new backend logins) and of
            // this one keep connecting, for longer than the refresh interval.
            rig.until_credential(|s| s.secret.pending.is_some()).await;
            for database in ["postgres", "dev", "postgres", "dev"] {
                assert_eq!(select_one(&rig.client_to(database).await).await, "1");
                load.progress(50).await;
            }
            assert!(rig.h.admin("SELECT count(*) FROM pg_stat_activity WHERE datname = 'postgres' AND usename LIKE 'app%'") != "0");
        }
    }
    rig.until_credential(|s| s.secret.pending.is_none() && s.secret.previous.is_some()).await;
    // Once a backend has logged in with the final credential, the older ones retire as they
    // come back to the pool (never mid-transaction).
    let generation = rig.h.shared.user("app").unwrap().store.snapshot().generation;
    let pool = rig.h.shared.pools.entry(&pgwarden::pool::PoolKey::new("app", "dev"), &rig.h.shared.user("app").unwrap().store);
    let mut logins = pool.newest_login();
    tokio::time::timeout(Duration::from_secs(30), logins.wait_for(|l| l.is_some_and(|(g, _)| g >= generation))).await.unwrap().unwrap();
    load.progress(300).await;
    let done = load.finish().await;
    assert!(done >= 1000, "{done} transactions");
    // Backends that logged in before the rotation retired once the new credential had logged
    // in; the new ones follow the username (alternating users).
    let after = rig.backends();
    assert!(!after.is_empty());
    assert!(after.iter().all(|b| !before.contains(b)), "old backends still open: {before:?} / {after:?}");
    let user = if strategy == Strategy::Alternating { ":app_clone" } else { ":app" };
    assert!(after.iter().all(|b| b.ends_with(user)), "{after:?}");
    let new_password = rig.h.shared.user("app").unwrap().store.snapshot().secret.current.password.clone();
    assert_ne!(new_password.expose_secret(), "initial-Pa55word-0123456789abcdef");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_user_rotation_under_load_fails_no_transaction() {
    rotate_under_load(Strategy::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_users_rotation_under_load_fails_no_transaction() {
    rotate_under_load(Strategy::Alternating).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_secrets_manager_keeps_the_cached_credential_until_it_returns() {
    let rig = rig(Strategy::Single).await;
    let mut health = rig.h.shared.user("app").unwrap().store.health();
    rig.moto.pause();
    tokio::time::timeout(Duration::from_secs(60), health.wait_for(|h| h.consecutive_failures >= 1)).await.unwrap().unwrap();
    assert_eq!(rig.h.metric("pgwarden_credential_stale{user=\"app\"}"), 1.0);
    let age_while_stale = rig.h.metric("pgwarden_credential_age_seconds{user=\"app\"}");
    // New backend logins still work with the cached credential.
    rig.kill_backends();
    let c = rig.client().await;
    assert_eq!(select_one(&c).await, "1");
    rig.moto.resume();
    tokio::time::timeout(Duration::from_secs(60), health.wait_for(|h| h.consecutive_failures == 0)).await.unwrap().unwrap();
    assert_eq!(rig.h.metric("pgwarden_credential_stale{user=\"app\"}"), 0.0);
    let age = rig.h.metric("pgwarden_credential_age_seconds{user=\"app\"}");
    assert!(age < age_while_stale, "the source answered again: {age} s, {age_while_stale} s while stale");
    // Refresh resumes: a rotation now is picked up.
    assert_eq!(rig.h.metric("pgwarden_credential_changes_total{user=\"app\"}"), 0.0);
    rig.rotator(Strategy::Single).rotate().await.unwrap();
    rig.until_credential(|s| s.generation.0 > 1 && s.secret.previous.is_some()).await;
    assert!(rig.h.metric("pgwarden_credential_changes_total{user=\"app\"}") >= 1.0);
    assert_eq!(select_one(&c).await, "1");
}

#[tokio::test]
async fn malformed_or_incomplete_secret_keeps_the_last_good_credential() {
    let rig = rig(Strategy::Single).await;
    let store = Arc::clone(&rig.h.shared.user("app").unwrap().store);
    for bad in ["{not json", r#"{"username": "app"}"#, r#"{"username": "app", "password": 42}"#] {
        rig.sm.put_secret_value().secret_id(SECRET).secret_string(bad).send().await.unwrap();
        let err = store.refresh().await.expect_err("a bad secret is refused");
        assert!(!err.to_string().contains("initial-Pa55word"), "{err}");
        assert_eq!(store.snapshot().generation.0, 1);
        rig.kill_backends();
        assert_eq!(select_one(&rig.client().await).await, "1", "still serving with {bad}");
    }
}

#[tokio::test]
async fn rotator_steps_are_idempotent_and_check_the_token() {
    let rig = rig(Strategy::Single).await;
    let rotator = rig.rotator(Strategy::Single);
    let wrong = pgwarden::rotation::new_token();
    assert!(matches!(rotator.run_step(Step::SetSecret, &wrong).await, Err(pgwarden::rotation::RotationError::UnknownVersion(_))));
    let token = pgwarden::rotation::new_token();
    for step in Step::ALL {
        rotator.run_step(step, &token).await.unwrap();
        rotator.run_step(step, &token).await.unwrap_or_else(|e| panic!("{step:?} twice: {e}"));
    }
    // Once current, every step for that version is a no-op.
    rotator.run_step(Step::CreateSecret, &token).await.unwrap();
    let c = rig.client().await;
    rig.until_credential(|s| s.secret.previous.is_some()).await;
    rig.kill_backends();
    assert_eq!(select_one(&c).await, "1");
}

#[tokio::test]
async fn set_secret_falls_back_to_the_previous_password_when_current_no_longer_works() {
    let rig = rig(Strategy::Single).await;
    let rotator = rig.rotator(Strategy::Single);
    rotator.rotate().await.unwrap();
    // Someone reset the database password to the old one: AWSCURRENT no longer logs in.
    rig.h.admin("ALTER ROLE app PASSWORD 'initial-Pa55word-0123456789abcdef'");
    let token = rotator.rotate().await.expect("setSecret logs in with AWSPREVIOUS");
    assert_eq!(token.len(), 36);
    // Wait for the proxy to hold what Secrets Manager now calls AWSCURRENT (counting
    // generations would race: two quick rotations can land within one refresh).
    let current = rig.sm.get_secret_value().secret_id(SECRET).version_stage("AWSCURRENT").send().await.unwrap();
    let current: serde_json::Value = serde_json::from_str(current.secret_string().unwrap()).unwrap();
    let password = current["password"].as_str().unwrap().to_owned();
    rig.until_credential(|s| s.secret.pending.is_none() && s.secret.current.password.expose_secret() == password).await;
    rig.kill_backends();
    let c = rig.client().await;
    assert_eq!(select_one(&c).await, "1", "the proxy logs in with the new AWSCURRENT");
}

/// `pgwarden dev --rotate-every`: the dev credential file goes through the same four steps
/// while clients run; none of them notices, and new logins after it use the new password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_file_rotation_under_load_fails_no_transaction() {
    let h = Harness::start().await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let token = h.env.token("127.0.0.1", h.addr.port(), &h.env.user);
        clients.push(h.tls_client_as(&h.env.user, token.expose_secret()).await.unwrap());
    }
    let load = Load::with(clients);
    load.progress(100).await;
    let old = h.env.password().to_owned();
    for _ in 0..2 {
        pgwarden::dev::rotate_dev_credential(&h.env.cluster, &h.env.secret_path, Duration::from_millis(1200)).await.unwrap();
        load.progress(100).await;
    }
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&h.env.secret_path).unwrap()).unwrap();
    let new = file["AWSCURRENT"]["password"].as_str().unwrap().to_owned();
    let store = h.shared.user("dev").unwrap().store.clone();
    let mut rx = store.subscribe();
    let caught_up = rx.wait_for(|s| s.secret.pending.is_none() && s.secret.current.password.expose_secret() == new);
    tokio::time::timeout(Duration::from_secs(30), caught_up).await.unwrap().unwrap();
    assert_ne!(new, old);
    assert!(common::connect(&h.conn_str_with_password(&old)).await.is_err(), "the old password no longer logs in");
    common::connect(&h.conn_str_with_password(&new)).await.expect("the new one does");
    assert!(load.finish().await >= 300);
}

/// Secrets Manager refuses the read (AccessDenied, from moto enforcing IAM policies): the
/// refresh fails with the call and the service's code, the last good credential stays.
#[tokio::test]
async fn access_denied_keeps_the_last_good_credential_and_says_why() {
    use pgwarden::credentials::aws::SecretsManagerSource;
    use pgwarden::credentials::{CredentialSource, CredentialStore};
    // Seven unauthenticated calls to set up an admin and a reader; then IAM is enforced.
    let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "7")]).await;
    let setup = r#"
import boto3, json, sys
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1")
iam, sm = boto3.client("iam", **kw), boto3.client("secretsmanager", **kw)
sm.create_secret(Name="denied/app", SecretString=json.dumps({"username": "app", "password": "first-password"}))
keys = {}
for user, actions in [("admin", "*"), ("reader", ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"])]:
    iam.create_user(UserName=user)
    keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
print(json.dumps({u: [k["AccessKeyId"], k["SecretAccessKey"]] for u, k in keys.items()}))
"#;
    let out = std::process::Command::new(common::test_python()).arg("-c").arg(setup).arg(&moto.endpoint).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let client_as = |user: &str| {
        let creds = aws_credential_types::Credentials::new(keys[user][0].as_str().unwrap(), keys[user][1].as_str().unwrap(), None, None, "test");
        let config = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
            .endpoint_url(&moto.endpoint)
            .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .build();
        aws_sdk_secretsmanager::Client::from_conf(config)
    };
    let source: Arc<dyn CredentialSource> = Arc::new(SecretsManagerSource::new(client_as("reader"), "denied/app".into()));
    let store = CredentialStore::load(source, None).await.expect("the reader may read");
    // The reader loses GetSecretValue, and the secret moves on.
    let admin = client_as("admin");
    let deny = r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "secretsmanager:DescribeSecret", "Resource": "*"}]}"#;
    let out = std::process::Command::new(common::test_python())
        .arg("-c")
        .arg("import boto3, sys; boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3]).put_user_policy(UserName='reader', PolicyName='p', PolicyDocument=sys.argv[4])")
        .args([moto.endpoint.as_str(), keys["admin"][0].as_str().unwrap(), keys["admin"][1].as_str().unwrap(), deny])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    admin.put_secret_value().secret_id("denied/app").secret_string(r#"{"username": "app", "password": "second-password"}"#).send().await.unwrap();
    let err = store.refresh().await.expect_err("GetSecretValue is denied");
    let text = err.to_string();
    assert!(text.contains("GetSecretValue") && text.contains("AccessDenied"), "{text}");
    assert!(!text.contains("second-password") && !err.is_transient(), "{text}");
    assert_eq!(store.snapshot().secret.current.password.expose_secret(), "first-password");
    let health = store.health_now();
    assert_eq!((health.consecutive_failures, health.total_failures), (1, 1));
}

/// When the database refuses every stage of the credential, clients waiting for a backend fail
/// together with 28P01 and one clear message, and the database sees a handful of bad logins,
/// not one per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credential_fails_waiting_clients_fast_with_one_login_attempt() {
    let h = Harness::start().await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(Arc::new(h.client().await));
    }
    h.admin("ALTER ROLE dev PASSWORD 'changed-behind-our-back'");
    h.admin("SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity WHERE application_name = 'pgwarden'");
    let log = h.env.cluster.dir().join("postgres.log");
    let refusals = || std::fs::read_to_string(&log).unwrap().matches("password authentication failed").count();
    let before = refusals();
    let queries: Vec<_> = clients.iter().map(|c| {
        let c = Arc::clone(c);
        tokio::spawn(async move { c.simple_query("SELECT 1").await.map(|_| ()) })
    }).collect();
    for q in queries {
        let r = q.await.unwrap();
        let e = r.as_ref().err().expect("no backend can log in");
        assert_eq!(common::sqlstate(e).as_deref(), Some("28P01"), "{e}");
        assert!(e.as_db_error().unwrap().message().contains("no valid credentials for the role dev"), "{e}");
    }
    let attempts = refusals() - before;
    assert!((1..=2).contains(&attempts), "{attempts} refused logins for 10 waiting clients");
}
