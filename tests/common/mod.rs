//! Test harness: a throwaway PostgreSQL (initdb into a temp dir, free port, SCRAM), a `dev`
//! role whose credential sits in a `file` source, and pgwarden running in-process on
//! 127.0.0.1:0 in front of it. Also a raw-bytes client for malformed-input tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use pgwarden::config::Config;
use pgwarden::dev::{DevEnv, DevOptions};
use pgwarden::{Server, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub struct Harness {
    pub env: DevEnv,
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    /// Starts with the dev defaults (pool of 5), after `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Harness {
        let _ = tracing_subscriber::fmt().with_env_filter("pgwarden=debug").with_test_writer().try_init();
        let env = DevEnv::prepare(&DevOptions { port: 0, metrics_port: None, pool_size: 5, worker_threads: 1 })
            .await
            .expect("throwaway PostgreSQL starts");
        let mut config = env.config.clone();
        tweak(&mut config);
        let server = Server::bind(config).await.expect("pgwarden binds");
        let addr = server.local_addr();
        let shared = server.shared();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Harness { env, addr, shared, _stop: stop }
    }

    pub fn conn_str(&self) -> String {
        self.conn_str_with_password(self.env.password())
    }

    pub fn conn_str_with_password(&self, password: &str) -> String {
        format!(
            "host={} port={} user={} dbname={} password={password}",
            self.addr.ip(),
            self.addr.port(),
            self.env.user,
            self.env.database
        )
    }

    /// A libpq-style URL-less connection string for psql/pgbench (password via PGPASSWORD).
    pub fn libpq_conn(&self) -> String {
        format!("host={} port={} user={} dbname={}", self.addr.ip(), self.addr.port(), self.env.user, self.env.database)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.conn_str()).await.expect("client connects through pgwarden")
    }

    /// Runs SQL directly on Postgres as the superuser (not through the proxy).
    pub fn admin(&self, sql: &str) -> String {
        self.env.cluster.psql(sql).expect("admin SQL runs")
    }

    /// Backend connections Postgres has open for the dev role.
    pub fn backend_count(&self) -> usize {
        self.admin("SELECT count(*) FROM pg_stat_activity WHERE usename = 'dev'").parse().unwrap()
    }
}

pub async fn connect(conn_str: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

/// A client that speaks raw bytes, for input no driver would send.
pub struct RawClient {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

/// A message read back: tag and body.
#[derive(Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: BytesMut,
}

impl Msg {
    /// (SQLSTATE, message) of an ErrorResponse.
    pub fn error_fields(&self) -> (String, String) {
        let (code, msg) = pgwarden::protocol::messages::parse_error_fields(&self.body);
        (code.unwrap_or_default(), msg.unwrap_or_default())
    }
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient { stream: TcpStream::connect(addr).await.unwrap(), buf: BytesMut::new() }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one message, or `None` if the proxy closed the connection.
    pub async fn recv(&mut self) -> Option<Msg> {
        let read = async {
            loop {
                if self.buf.len() >= 5 {
                    let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                    if self.buf.len() > len {
                        let tag = self.buf[0];
                        let mut m = self.buf.split_to(len + 1);
                        m.advance(5);
                        return Some(Msg { tag, body: m });
                    }
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read).await.expect("proxy answers or closes; it must not hang")
    }

    /// Reads one raw byte (the answer to SSLRequest/GSSENCRequest).
    pub async fn recv_byte(&mut self) -> u8 {
        let mut b = [0u8; 1];
        self.stream.read_exact(&mut b).await.unwrap();
        b[0]
    }

    /// Expects a FATAL ErrorResponse with `code`, then the proxy closing the connection.
    /// Returns the error's message.
    pub async fn expect_fatal_then_close(&mut self, code: &str) -> String {
        let m = self.recv().await.expect("an ErrorResponse, not a silent close or a hang");
        assert_eq!(m.tag, b'E', "expected an ErrorResponse");
        let (got, message) = m.error_fields();
        assert_eq!(got, code, "{message}");
        assert!(self.closed().await);
        message
    }

    /// True once the proxy has closed the connection (after any messages still in flight).
    pub async fn closed(&mut self) -> bool {
        while self.recv().await.is_some() {}
        true
    }

    /// Startup + SCRAM login as `user`; returns the messages after AuthenticationOk.
    pub async fn login(&mut self, user: &str, database: &str, password: &str) -> Vec<Msg> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        self.send(&startup_packet(196_608, &[("user", user), ("database", database)])).await;
        let m = self.recv().await.unwrap();
        assert_eq!(m.tag, b'R');
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::sasl_initial_response("SCRAM-SHA-256", scram.message(), &mut out).unwrap();
        self.send(&out).await;
        let m = self.recv().await.unwrap();
        scram.update(&m.body[4..]).unwrap();
        out.clear();
        postgres_protocol::message::frontend::sasl_response(scram.message(), &mut out).unwrap();
        self.send(&out).await;
        let mut after = Vec::new();
        loop {
            let m = self.recv().await.expect("login completes");
            let done = m.tag == b'Z';
            after.push(m);
            if done {
                return after;
            }
        }
    }
}

pub fn startup_packet(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(version);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub fn query_message(sql: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out).unwrap();
    out.to_vec()
}
