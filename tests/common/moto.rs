//! A real Secrets Manager API for tests: moto's server (from the venv `scripts/test.sh` sets
//! up) on a free port, killed on drop. `pause`/`resume` freeze it (SIGSTOP/SIGCONT) to make
//! Secrets Manager unreachable without losing its state.

use tokio::io::AsyncBufReadExt;

pub struct Moto {
    child: tokio::process::Child,
    pub endpoint: String,
}

impl Moto {
    pub async fn start() -> Moto {
        Self::start_with(&[]).await
    }

    /// With extra environment for the server (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`, after which
    /// moto checks every request against its IAM users and policies).
    pub async fn start_with(env: &[(&str, &str)]) -> Moto {
        let bin = std::env::var_os("PGWARDEN_TEST_MOTO")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/moto_server"));
        assert!(bin.exists(), "{} is missing: run scripts/test.sh, which installs moto[server] into a venv", bin.display());
        assert!(
            std::env::var_os("AWS_ACCESS_KEY_ID").is_some() && std::env::var_os("AWS_REGION").is_some(),
            "AWS_ACCESS_KEY_ID/AWS_REGION unset: run the tests through scripts/test.sh"
        );
        let port = pgwarden::devdb::free_port().unwrap();
        let mut child = tokio::process::Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server starts");
        // Werkzeug announces "Running on http://127.0.0.1:<port>" once it listens.
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("Running on") {
                    return true;
                }
            }
            false
        };
        let up = tokio::time::timeout(std::time::Duration::from_secs(60), ready).await;
        assert!(matches!(up, Ok(true)), "moto_server did not come up");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Moto { child, endpoint: format!("http://127.0.0.1:{port}") }
    }

    pub async fn client(&self) -> aws_sdk_secretsmanager::Client {
        pgwarden::credentials::aws::client(Some(&self.endpoint), Some("us-east-1")).await
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.id().expect("moto is running") as i32;
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Freezes the server: requests hang until they time out.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }
}
