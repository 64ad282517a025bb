//! Opening a backend connection (TCP, then TLS when configured: SSLRequest, 'S', handshake) and
//! logging in, trying the credential's stages in order (AWSCURRENT, then AWSPENDING, then
//! AWSPREVIOUS) until one is accepted.

use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::message::frontend;
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::scram::{KeyCache, ScramClient};
use super::{BackendConn, BackendError, BackendKey, BackendPid, MAX_CONTROL_MESSAGE, Settings};
use crate::auth::scram::SCRAM_SHA_256;
use crate::config::{DatabaseConfig, SessionAttrs};
use crate::credentials::{Credential, CredentialSet, LoginFingerprint, Stage};
use crate::net::read_message;
use crate::protocol::{ProtocolError, SSL_REQUEST_CODE, messages, read_cstr};
use crate::stream::{Stream, send};
use crate::tls::BackendTls;

/// Connects to `dbname` on the target and logs in with the first credential stage that works,
/// trying the login that worked last (`prefer`) first. SCRAM keys come from (and go to) `keys`.
pub async fn connect(
    target: &DatabaseConfig,
    tls: Option<&BackendTls>,
    dbname: &str,
    creds: &CredentialSet,
    prefer: Option<LoginFingerprint>,
    lifetime: Option<Duration>,
    keys: &KeyCache,
) -> Result<BackendConn, BackendError> {
    let mut tried = Vec::new();
    for (stage, credential) in creds.candidates(prefer) {
        let attempt = tokio::time::timeout(target.connect_timeout, login(target, tls, dbname, credential, keys)).await;
        match attempt {
            Err(_) => return Err(BackendError::Timeout),
            Ok(Err(e)) if e.is_auth_failure() => {
                tracing::warn!(stage = stage.label(), user = %credential.username, "backend refused credential stage");
                tried.push(stage.label());
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(mut conn)) => {
                if stage != Stage::Current {
                    tracing::info!(stage = stage.label(), user = %credential.username, "backend login used a non-current stage");
                }
                conn.generation = creds.generation;
                conn.stage = stage;
                conn.fingerprint = credential.fingerprint();
                conn.lifetime = lifetime;
                return Ok(conn);
            }
        }
    }
    Err(BackendError::AuthRejected { user: creds.secret.current.username.clone(), tried: tried.join(", ") })
}

/// Connects and logs in with exactly one credential (the rotator's logins).
pub async fn connect_as(
    target: &DatabaseConfig,
    tls: Option<&BackendTls>,
    dbname: &str,
    credential: &Credential,
) -> Result<BackendConn, BackendError> {
    let keys = KeyCache::default();
    let login = login(target, tls, dbname, credential, &keys);
    tokio::time::timeout(target.connect_timeout, login).await.map_err(|_| BackendError::Timeout)?
}

async fn login(
    target: &DatabaseConfig,
    tls: Option<&BackendTls>,
    dbname: &str,
    credential: &Credential,
    keys: &KeyCache,
) -> Result<BackendConn, BackendError> {
    let addr = format!("{}:{}", target.host, target.port);
    let mut tcp = TcpStream::connect(&addr).await.map_err(|source| BackendError::Connect { addr: addr.clone(), source })?;
    tcp.set_nodelay(true)?;
    crate::net::set_keepalive(&tcp, target.tcp_keepalive)?;
    let peer = tcp.peer_addr()?;
    let stream = match tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let mut request = [0u8; 8];
            request[..4].copy_from_slice(&8i32.to_be_bytes());
            request[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
            tcp.write_all(&request).await?;
            if tcp.read_u8().await? != b'S' {
                return Err(BackendError::TlsRefused);
            }
            let (connector, name) = tls.connector();
            let tls_stream = connector.connect(name, tcp).await.map_err(BackendError::Tls)?;
            Stream::Tls(Box::new(tls_stream.into()))
        }
    };
    let mut conn = BackendConn {
        stream,
        buf: BytesMut::with_capacity(8192),
        key: None,
        server_params: Vec::new(),
        applied: Settings::default(),
        generation: crate::credentials::Generation(0),
        stage: Stage::Current,
        fingerprint: credential.fingerprint(),
        created: Instant::now(),
        last_active: Instant::now(),
        lifetime: None,
        open_guard: None,
        tls_guard: None,
        live_guard: None,
        statements: Default::default(),
    };
    let mut out = BytesMut::new();
    let params = [("user", credential.username.as_str()), ("database", dbname), ("application_name", "pgwarden")];
    frontend::startup_message(params.iter().copied(), &mut out)?;
    send(&mut conn.stream, &out).await?;
    authenticate(&mut conn, credential, keys).await?;
    loop {
        let (tag, mut body) = read_message(&mut conn.stream, &mut conn.buf, MAX_CONTROL_MESSAGE).await?;
        match tag {
            b'S' => {
                let (name, rest) = read_cstr(&body)?;
                let (value, _) = read_cstr(rest)?;
                conn.server_params.push((name.to_owned(), value.to_owned()));
            }
            b'K' => {
                if body.len() < 8 {
                    return Err(ProtocolError::Malformed("short BackendKeyData").into());
                }
                let pid = body.get_i32();
                let secret = body.get_i32();
                conn.key = Some(BackendKey { addr: peer, pid: BackendPid(pid), secret });
            }
            b'Z' => {
                accepts(&mut conn, target.target_session_attrs).await?;
                return Ok(conn);
            }
            b'E' => return Err(refused(&body)),
            b'N' => {}
            other => {
                return Err(ProtocolError::UnexpectedTag { tag: other as char, context: "backend login" }.into());
            }
        }
    }
}

/// `database.target_session_attrs`: refuses a server in hot standby (and, for `read-write`, one
/// whose transactions are read-only by default), as libpq does. PostgreSQL 14 and later report
/// both at login (`in_hot_standby`, `default_transaction_read_only`); older servers are asked.
async fn accepts(conn: &mut BackendConn, want: SessionAttrs) -> Result<(), BackendError> {
    if want == SessionAttrs::Any {
        return Ok(());
    }
    let reported = |conn: &BackendConn, name: &str| conn.server_params.iter().find(|(n, _)| n == name).map(|(_, v)| v == "on");
    let standby = match reported(conn, "in_hot_standby") {
        Some(on) => on,
        None => asked(conn, "SELECT pg_is_in_recovery()::text").await? == "true",
    };
    let read_only = want == SessionAttrs::ReadWrite
        && match reported(conn, "default_transaction_read_only") {
            Some(on) => on,
            None => asked(conn, "SHOW transaction_read_only").await? == "on",
        };
    match (standby, read_only) {
        (true, _) => Err(BackendError::NotTarget { state: "in hot standby", want: want.name() }),
        (false, true) => Err(BackendError::NotTarget { state: "read-only", want: want.name() }),
        (false, false) => Ok(()),
    }
}

/// The one value `sql` returns; a server that cannot say is not accepted (as libpq).
async fn asked(conn: &mut BackendConn, sql: &str) -> Result<String, BackendError> {
    let (_, row) = conn.query_row(sql).await?;
    row.and_then(|r| r.into_iter().next().flatten())
        .ok_or(BackendError::NotTarget { state: "unable to say whether it takes writes", want: "read-write or primary" })
}

fn refused(body: &[u8]) -> BackendError {
    let (code, message) = messages::parse_error_fields(body);
    BackendError::Refused { code: code.unwrap_or_default(), message: message.unwrap_or_default() }
}

/// Answers the backend's authentication requests until AuthenticationOk.
async fn authenticate(conn: &mut BackendConn, credential: &Credential, keys: &KeyCache) -> Result<(), BackendError> {
    let password = credential.password.expose_secret().as_bytes();
    let mut scram: Option<ScramClient> = None;
    loop {
        let (tag, mut body) = read_message(&mut conn.stream, &mut conn.buf, MAX_CONTROL_MESSAGE).await?;
        if tag == b'E' {
            let err = refused(&body);
            return match err {
                BackendError::Refused { ref code, .. } if code.starts_with("28") => {
                    Err(BackendError::AuthRejected { user: credential.username.clone(), tried: String::new() })
                }
                other => Err(other),
            };
        }
        if tag != b'R' || body.len() < 4 {
            return Err(ProtocolError::UnexpectedTag { tag: tag as char, context: "backend authentication" }.into());
        }
        let mut out = BytesMut::new();
        match body.get_i32() {
            0 => return Ok(()),
            3 => frontend::password_message(password, &mut out)?,
            5 => {
                if body.len() < 4 {
                    return Err(ProtocolError::Malformed("short md5 salt").into());
                }
                let salt = [body[0], body[1], body[2], body[3]];
                let hash = md5_hash(credential.username.as_bytes(), password, salt);
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let mut offered = false;
                let mut rest: &[u8] = &body;
                while let Ok((mech, tail)) = read_cstr(rest) {
                    if mech.is_empty() {
                        break;
                    }
                    offered |= mech == SCRAM_SHA_256;
                    rest = tail;
                }
                if !offered {
                    return Err(BackendError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                }
                let s = ScramClient::default();
                frontend::sasl_initial_response(SCRAM_SHA_256, &s.client_first(), &mut out)?;
                scram = Some(s);
            }
            11 => {
                let s = scram.as_mut().ok_or(ProtocolError::Malformed("SASL continue before SASL start"))?;
                let salt = s.server_first(&body).map_err(ProtocolError::Malformed)?;
                let proof = s.client_final(&*keys.keys(credential, &salt).await).map_err(ProtocolError::Malformed)?;
                frontend::sasl_response(&proof, &mut out)?;
            }
            12 => {
                let s = scram.as_mut().ok_or(ProtocolError::Malformed("SASL final before SASL start"))?;
                s.server_final(&body).map_err(ProtocolError::Malformed)?;
                continue;
            }
            2 => return Err(BackendError::UnsupportedAuth("Kerberos V5")),
            7 | 8 => return Err(BackendError::UnsupportedAuth("GSSAPI")),
            9 => return Err(BackendError::UnsupportedAuth("SSPI")),
            _ => return Err(BackendError::UnsupportedAuth("unknown method")),
        }
        send(&mut conn.stream, &out).await?;
    }
}
