//! The rotation Lambda handler, run as Lambda would run it: the real binary polls a Lambda
//! Runtime API (a small emulator of its HTTP contract, in Python) that hands it Secrets
//! Manager's four rotation events, against moto and a real PostgreSQL. Built and run only with
//! `--features lambda` (scripts/test.sh does).
#![cfg(feature = "lambda")]

mod common;

use std::time::Duration;

use common::Harness;
use common::moto::Moto;

/// Serves the events given on the command line, one per `next` call, and prints
/// `ok <id>` or `error <id> <body>` for each answer; exits after the last one.
const RUNTIME_API: &str = r#"
import json, sys, http.server, threading
events = [json.loads(e) for e in sys.argv[2:]]
answers = []
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        n = len(answers)
        if n >= len(events):
            self.send_response(500); self.end_headers(); return
        body = json.dumps(events[n]).encode()
        self.send_response(200)
        for k, v in [("Lambda-Runtime-Aws-Request-Id", f"req-{n}"), ("Lambda-Runtime-Deadline-Ms", "9999999999999"),
                     ("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:000000000000:function:rotate"),
                     ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]:
            self.send_header(k, v)
        self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        kind = "ok" if self.path.endswith("/response") else "error"
        answers.append(kind)
        print(kind, self.path.split("/")[-2], body.replace("\n", " "), flush=True)
        self.send_response(202); self.end_headers()
        if len(answers) == len(events):
            threading.Thread(target=self.server.shutdown).start()
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("listening", flush=True)
srv.serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_handler_runs_the_four_steps_from_rotation_events() {
    let moto = Moto::start().await;
    let sm = moto.client().await;
    let sm_setup = sm.clone();
    let h = Harness::start_async(false, async |env, _| {
        env.cluster.psql("CREATE ROLE app LOGIN PASSWORD 'lambda-initial-password'").unwrap();
        let secret = serde_json::json!({"engine": "postgres", "host": "127.0.0.1", "port": env.cluster.port,
            "username": "app", "password": "lambda-initial-password", "dbname": "dev"});
        sm_setup.create_secret().name("lambda/app").secret_string(secret.to_string()).send().await.unwrap();
    })
    .await;
    let token = pgwarden::rotation::new_token();
    let events: Vec<String> = ["createSecret", "setSecret", "testSecret", "finishSecret"]
        .iter()
        .map(|step| {
            serde_json::json!({"Step": step, "SecretId": "lambda/app", "ClientRequestToken": token, "RotationToken": "rt-1"}).to_string()
        })
        .collect();
    let port = pgwarden::devdb::free_port().unwrap();
    let mut api = tokio::process::Command::new(common::test_python())
        .arg("-c")
        .arg(RUNTIME_API)
        .arg(port.to_string())
        .args(&events)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(api.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("listening"));
    let mut lambda = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgwarden-rotation-lambda"))
        .env("AWS_LAMBDA_RUNTIME_API", format!("127.0.0.1:{port}"))
        .env("AWS_LAMBDA_FUNCTION_NAME", "rotate")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "test")
        // The handler finds Secrets Manager through the standard endpoint variable.
        .env("AWS_ENDPOINT_URL_SECRETS_MANAGER", &moto.endpoint)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut answers = Vec::new();
    let collect = async {
        while answers.len() < 4 {
            answers.push(lines.next_line().await.unwrap().expect("an answer per event"));
        }
    };
    tokio::time::timeout(Duration::from_secs(120), collect).await.expect("the handler answers every event");
    let _ = lambda.kill().await;
    assert!(answers.iter().all(|a| a.starts_with("ok ")), "{answers:?}");

    let current = sm.get_secret_value().secret_id("lambda/app").version_stage("AWSCURRENT").send().await.unwrap();
    assert_eq!(current.version_id(), Some(token.as_str()));
    let previous = sm.get_secret_value().secret_id("lambda/app").version_stage("AWSPREVIOUS").send().await.unwrap();
    assert!(previous.secret_string().unwrap().contains("lambda-initial-password"));
    let new: serde_json::Value = serde_json::from_str(current.secret_string().unwrap()).unwrap();
    let new_password = new["password"].as_str().unwrap();
    assert_eq!(new_password.len(), 32);
    assert!(!new_password.contains([':', '/', '@', '"', '\'', '\\']), "{new_password}");
    // PostgreSQL took the new password (as a verifier) and dropped the old one.
    let verifier = h.admin("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'");
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    let login = |password: &str| {
        std::process::Command::new("psql")
            .args(["-XAtc", "SELECT 1", &format!("host=127.0.0.1 port={} user=app dbname=dev", h.env.cluster.port)])
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(login(new_password));
    assert!(!login("lambda-initial-password"));
}
