//! Throwaway PostgreSQL clusters for `pgwarden dev`, the integration tests and the benchmarks:
//! `initdb` into a temp dir (SCRAM auth, a random superuser password), a free port on
//! 127.0.0.1, the Unix socket inside the temp dir, stopped and deleted on drop. PostgreSQL
//! refuses to run as root, so as root the server binaries run as the `postgres` OS user.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use secrecy::{ExposeSecret, SecretString};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DevDbError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found; install them (Debian/Ubuntu: `apt-get install postgresql`) or set PGWARDEN_PG_BIN to their folder"
    )]
    NoBinaries,
    #[error("running as root needs an OS user named `postgres` to run the server as (Debian's postgresql package creates it)")]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: &'static str, detail: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub max_connections: u32,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// Serve TLS (`ssl = on`) with a certificate for `localhost` signed by a throwaway CA
    /// (see [`TempCluster::ca_cert`]).
    pub ssl: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions { max_connections: 300, extra_conf: Vec::new(), ssl: false }
    }
}

pub struct TempCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    pub port: u16,
    superuser_password: SecretString,
    running: bool,
}

/// Finds `initdb`/`pg_ctl`: `$PGWARDEN_PG_BIN`, then the newest `/usr/lib/postgresql/*/bin`,
/// then `initdb` on `PATH`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PGWARDEN_PG_BIN").map(PathBuf::from) {
        return has_tools(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_tools(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|d| {
        let initdb = std::fs::canonicalize(d.join("initdb")).ok()?;
        let dir = initdb.parent()?.to_owned();
        has_tools(&dir).then_some(dir)
    })
}

fn postgres_ids() -> Result<Option<(u32, u32)>, DevDbError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL in a literal");
    // SAFETY: getpwnam reads a static buffer; we copy the two ids out before any other call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(DevDbError::NoPostgresUser);
    }
    // SAFETY: pw is non-null and points at a valid passwd record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

fn chown(path: &Path, ids: (u32, u32)) -> Result<(), DevDbError> {
    std::os::unix::fs::chown(path, Some(ids.0), Some(ids.1)).map_err(DevDbError::Io)
}

fn check(what: &'static str, out: Output) -> Result<Output, DevDbError> {
    if out.status.success() {
        return Ok(out);
    }
    let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if detail.is_empty() {
        detail = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(DevDbError::Command { what, detail })
}

/// A port the OS just handed out on 127.0.0.1 (free now; tiny race until the server binds it).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether a failed start's server log says its port was in use.
fn port_was_taken(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|l| l.contains("Address already in use"))
}

impl TempCluster {
    /// initdb and start a cluster. Blocking (runs `initdb` and `pg_ctl`): call it from
    /// `spawn_blocking` in async code.
    pub fn start(opts: &ClusterOptions) -> Result<TempCluster, DevDbError> {
        let bin = find_bin_dir().ok_or(DevDbError::NoBinaries)?;
        let run_as = postgres_ids()?;
        let dir = tempfile::Builder::new().prefix("pgwarden-pg-").tempdir()?;
        if let Some(ids) = run_as {
            chown(dir.path(), ids)?;
        }
        let password: String = {
            use rand::RngExt;
            let mut rng = rand::rng();
            (0..24).map(|_| rng.sample(rand::distr::Alphanumeric) as char).collect()
        };
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password)?;
        if let Some(ids) = run_as {
            chown(&pwfile, ids)?;
        }
        let mut cluster = TempCluster {
            bin,
            run_as,
            port: free_port()?,
            superuser_password: SecretString::from(password),
            running: false,
            dir,
        };
        let data = cluster.data_dir();
        let out = cluster
            .server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()?;
        check("initdb", out)?;
        std::fs::remove_file(&pwfile)?;
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nmax_connections = {}\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 128MB\n",
            cluster.port,
            cluster.dir.path().display(),
            opts.max_connections
        );
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        if opts.ssl {
            let ssl_dir = cluster.dir.path().join("backend-tls");
            std::fs::create_dir(&ssl_dir)?;
            let (_, cert, key) = crate::tls::write_generated_certs(&ssl_dir, &["localhost"])
                .map_err(|e| DevDbError::Command { what: "certificate generation", detail: e.to_string() })?;
            if let Some(ids) = run_as {
                for p in [&ssl_dir, &cert, &key] {
                    chown(p, ids)?;
                }
            }
            conf.push_str(&format!("ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n", cert.display(), key.display()));
        }
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?.write_all(conf.as_bytes())?;
        // The free port can be taken between `free_port` and the postmaster's bind (by any
        // process's outgoing connection): then try another one, a few times.
        let log = cluster.dir.path().join("postgres.log");
        for attempt in 1.. {
            let out = cluster
                .server_command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"])
                .output()?;
            match check("pg_ctl start", out) {
                Ok(_) => break,
                Err(_) if attempt < 4 && port_was_taken(&log) => {
                    std::fs::write(&log, "")?;
                    cluster.port = free_port()?;
                    let line = format!("port = {}\n", cluster.port);
                    std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?.write_all(line.as_bytes())?;
                }
                Err(e) => return Err(cluster.with_log(e)),
            }
        }
        cluster.running = true;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed the cluster's certificate, when started with `ssl`.
    pub fn ca_cert(&self) -> Option<PathBuf> {
        Some(self.dir.path().join("backend-tls/ca.crt")).filter(|p| p.is_file())
    }

    pub fn superuser_password(&self) -> &str {
        self.superuser_password.expose_secret()
    }

    fn with_log(&self, e: DevDbError) -> DevDbError {
        let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
        match e {
            DevDbError::Command { what, detail } => DevDbError::Command { what, detail: format!("{detail}\n{log}") },
            other => other,
        }
    }

    fn server_command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    /// Path of a client tool (psql, pgbench) next to the server binaries, else from PATH.
    pub fn client_tool(&self, tool: &str) -> PathBuf {
        let beside = self.bin.join(tool);
        if beside.is_file() { beside } else { PathBuf::from(tool) }
    }

    /// Runs SQL as the superuser with `psql` and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String, DevDbError> {
        let out = Command::new(self.client_tool("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", self.superuser_password.expose_secret())
            .output()?;
        Ok(String::from_utf8_lossy(&check("psql", out)?.stdout).trim().to_owned())
    }

    /// Restarts the server on the same port (fast shutdown: every connection to it is closed),
    /// e.g. to apply a setting that needs a restart, as an instance resize does.
    pub fn restart(&self) -> Result<(), DevDbError> {
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .output()?;
        check("pg_ctl restart", out).map(drop).map_err(|e| self.with_log(e))
    }

    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let _ = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
