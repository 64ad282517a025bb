//! The audit log: one JSON line per client authentication decision (time, client address,
//! database user and database, method, access key id and principal when IAM was used, result,
//! reason), to a file or stdout. Never a token, password or proof: callers hand over only the
//! fields below. Lines are written by a dedicated thread so a burst of logins never waits on
//! the disk; the thread flushes whenever it runs out of lines.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;

use serde::Serialize;

use crate::config::AuditTarget;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// An AWS IAM auth token (SigV4).
    Iam,
    /// SCRAM-SHA-256 with the credential's password.
    Scram,
    /// The credential's password in cleartext, over TLS.
    Password,
    /// Refused before any method was chosen (unknown user, TLS required).
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allowed,
    Denied,
}

/// One authentication decision.
#[derive(Debug, Serialize)]
pub struct AuthEvent<'a> {
    pub client: SocketAddr,
    pub user: &'a str,
    pub database: &'a str,
    pub tls: bool,
    pub method: Method,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<&'a str>,
    pub result: Decision,
    pub reason: &'a str,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a AuthEvent<'a>,
}

enum Entry {
    Line(String),
    /// Answered once every line before it is written and flushed.
    Barrier(mpsc::SyncSender<()>),
}

pub struct AuditLog {
    lines: Option<mpsc::Sender<Entry>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl AuditLog {
    pub fn open(target: &AuditTarget) -> std::io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match target {
            AuditTarget::Off => return Ok(AuditLog { lines: None, writer: None }),
            AuditTarget::Stdout => Box::new(std::io::stdout()),
            AuditTarget::File(path) => Box::new(open_append(path)?),
        };
        let (tx, rx) = mpsc::channel::<Entry>();
        let writer = std::thread::Builder::new().name("pgwarden-audit".into()).spawn(move || write_lines(rx, out))?;
        Ok(AuditLog { lines: Some(tx), writer: Some(writer) })
    }

    /// Returns once every line recorded so far is written and flushed.
    pub fn sync(&self) {
        let Some(lines) = &self.lines else { return };
        let (ack, done) = mpsc::sync_channel(1);
        if lines.send(Entry::Barrier(ack)).is_ok() {
            let _ = done.recv();
        }
    }

    /// Writes out every line recorded so far and stops the writer.
    pub fn close(mut self) {
        self.lines = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }

    pub fn record(&self, event: &AuthEvent<'_>) {
        let Some(lines) = &self.lines else { return };
        let line = Line { time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(), event };
        match serde_json::to_string(&line) {
            Ok(text) => {
                let _ = lines.send(Entry::Line(text));
            }
            Err(e) => tracing::error!(error = %e, "cannot write an audit line"),
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

fn write_lines(rx: mpsc::Receiver<Entry>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(first) = rx.recv() {
        let mut entry = Some(first);
        while let Some(e) = entry {
            match e {
                Entry::Line(text) => {
                    if writeln!(out, "{text}").is_err() {
                        tracing::error!("audit log write failed");
                    }
                }
                Entry::Barrier(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
            entry = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_lines_are_json_with_every_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&AuditTarget::File(path.clone())).unwrap();
        log.record(&AuthEvent {
            client: "127.0.0.1:5555".parse().unwrap(),
            user: "app",
            database: "db",
            tls: true,
            method: Method::Iam,
            key_id: Some("AKIDEXAMPLE"),
            principal: Some("arn:aws:iam::123456789012:role/app"),
            result: Decision::Denied,
            reason: "token expired",
        });
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["client"], "127.0.0.1:5555");
        assert_eq!(v["method"], "iam");
        assert_eq!(v["result"], "denied");
        assert_eq!(v["reason"], "token expired");
        assert_eq!(v["key_id"], "AKIDEXAMPLE");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
