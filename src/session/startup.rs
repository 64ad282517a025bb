//! The login half of a session: the first packet (TLS upgrade or 'N', GSS refusal, cancel
//! requests, protocol version), the startup parameters, authentication (see
//! [`super::authenticate`]), and the greeting (ParameterStatus, BackendKeyData, ReadyForQuery).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::authenticate::{Attempt, audit_refusal, authenticate};
use super::{SessionError, SessionId};
use crate::auth::AuthError;
use crate::backend::settings::{Settings, is_valid_name};
use crate::cancel::CancelHandle;
use crate::listener::Shared;
use crate::net::read_startup_packet;
use crate::pool::{PoolEntry, PoolKey};
use crate::protocol::startup::parse_options;
use crate::protocol::{MAX_STARTUP_LEN, ProtocolError, StartupRequest, messages, parse_startup};
use crate::relay::ClientSide;
use crate::stream::{Stream, send};

pub struct LoggedIn {
    pub entry: Arc<PoolEntry>,
    pub desired: Settings,
    pub cancel: CancelHandle,
}

struct Startup {
    user: String,
    database: String,
    settings: Settings,
    /// `_pq_.` protocol options we do not know, for NegotiateProtocolVersion.
    unknown_protocol_options: Vec<String>,
    minor: u16,
}

/// Runs the handshake. `Ok(None)` means the connection was a cancel request and is done.
pub async fn login(
    shared: &Arc<Shared>,
    client: &mut ClientSide,
    peer: SocketAddr,
    id: SessionId,
) -> Result<Option<LoggedIn>, SessionError> {
    let Some(startup) = first_packet(shared, client).await? else { return Ok(None) };
    let tls = client.stream.is_tls();
    if !tls {
        shared.metrics.client_connections_no_tls.increment(1);
    }
    let attempt = Attempt { peer, user: &startup.user, database: &startup.database };
    if !tls && shared.tls.as_ref().is_some_and(|t| t.require) {
        shared.metrics.client_connections_setup_failed_auth.increment(1);
        audit_refusal(shared, &attempt, tls, "TLS required");
        return Err(AuthError::TlsRequired.into());
    }
    let Some(user) = shared.user(&startup.user) else {
        shared.metrics.client_connections_setup_failed_auth.increment(1);
        audit_refusal(shared, &attempt, tls, "no credentials for the role");
        return Err(AuthError::UnknownUser(startup.user.clone()).into());
    };

    let mut out = BytesMut::new();
    if startup.minor > 0 || !startup.unknown_protocol_options.is_empty() {
        let names: Vec<&str> = startup.unknown_protocol_options.iter().map(String::as_str).collect();
        messages::negotiate_protocol_version(&mut out, &names);
    }
    authenticate(shared, client, &user, &attempt, &mut out).await?;

    let entry = shared.pools.entry(&PoolKey::new(&startup.user, &startup.database), &user.store);
    if entry.server_params().is_none() {
        // First client of this pool: log a backend in to learn the server's parameters (and to
        // fail here, not at the first query, if the database is unreachable).
        let lease = entry.checkout().await.map_err(SessionError::Pool)?;
        lease.release();
    }
    let cancel = shared.cancels.register();
    messages::auth_ok(&mut out);
    for (name, value) in entry.server_params().unwrap_or_default() {
        match startup.settings.get(name) {
            Some(asked) => messages::parameter_status(&mut out, name, &reported_value(name, asked)),
            None => messages::parameter_status(&mut out, name, value),
        }
    }
    messages::backend_key_data(&mut out, cancel.pid, cancel.secret);
    messages::ready_for_query_idle(&mut out);
    send(&mut client.stream, &out).await.map_err(SessionError::Io)?;
    shared.metrics.client_connections_setup_succeeded.increment(1);
    tracing::debug!(session = id.0, %peer, user = %startup.user, database = %startup.database, "client logged in");
    Ok(Some(LoggedIn { entry, desired: startup.settings, cancel }))
}

/// What PostgreSQL would report for a client-chosen value. Only client_encoding needs care:
/// drivers send spellings like `'utf-8'` and then expect the canonical `UTF8` back.
fn reported_value(name: &str, value: &str) -> String {
    if !name.eq_ignore_ascii_case("client_encoding") {
        return value.to_owned();
    }
    let clean: String = value.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_uppercase();
    match clean.as_str() {
        "UNICODE" => "UTF8".to_owned(),
        _ => clean,
    }
}

/// Reads first packets until a StartupMessage: upgrades to TLS on SSLRequest when TLS is
/// configured (else 'N'), refuses GSS encryption.
async fn first_packet(shared: &Shared, client: &mut ClientSide) -> Result<Option<Startup>, SessionError> {
    // SSLRequest, then GSSENCRequest, then the StartupMessage is the longest legal sequence.
    for _ in 0..3 {
        let body = read_startup_packet(&mut client.stream, MAX_STARTUP_LEN).await?;
        match parse_startup(&body)? {
            StartupRequest::Ssl if shared.tls.is_some() && !client.stream.is_tls() => {
                let Some(tls) = &shared.tls else { continue };
                let Some(mut tcp) = client.stream.take_plain() else { continue };
                tcp.write_all(b"S").await.map_err(SessionError::Io)?;
                let accepted = tls.acceptor().accept(tcp).await.map_err(SessionError::TlsHandshake)?;
                client.stream = Stream::Tls(Box::new(accepted.into()));
                shared.metrics.client_connections_tls.increment(1);
            }
            // PostgreSQL refuses a second encryption request inside an encrypted stream.
            StartupRequest::Ssl | StartupRequest::GssEnc if client.stream.is_tls() => {
                return Err(ProtocolError::Malformed("encryption request inside TLS").into());
            }
            StartupRequest::Ssl | StartupRequest::GssEnc => {
                send(&mut client.stream, b"N").await.map_err(SessionError::Io)?;
            }
            StartupRequest::Cancel { pid, secret } => {
                shared.cancels.cancel(pid, secret).await;
                return Ok(None);
            }
            StartupRequest::Startup { minor, params } => return startup_params(shared, minor, params).map(Some),
        }
    }
    Err(ProtocolError::Malformed("too many encryption requests").into())
}

fn startup_params(shared: &Shared, minor: u16, params: Vec<(String, String)>) -> Result<Startup, SessionError> {
    let mut user = None;
    let mut database = None;
    let mut settings = Settings::default();
    let mut unknown_protocol_options = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "user" => user = Some(value),
            "database" => database = Some(value),
            "options" => {
                for (n, v) in parse_options(&value).map_err(SessionError::UnsupportedOption)? {
                    if !is_valid_name(&n) {
                        return Err(SessionError::UnsupportedOption(n));
                    }
                    settings.set(&n, &v);
                }
            }
            "replication" => return Err(SessionError::UnsupportedOption("replication".into())),
            n if n.starts_with("_pq_.") => unknown_protocol_options.push(name),
            n if is_valid_name(n) => settings.set(n, &value),
            _ => return Err(SessionError::UnsupportedOption(name)),
        }
    }
    // Held for the whole session: keep it exactly as large as it needs to be.
    settings.shrink_to_fit();
    let user = user.filter(|u| !u.is_empty()).ok_or(SessionError::NoUser)?;
    let database = database.filter(|d| !d.is_empty()).unwrap_or_else(|| shared.config.database.dbname.clone());
    Ok(Startup { user, database, settings, unknown_protocol_options, minor })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reported_value_canonicalizes_client_encoding_only() {
        assert_eq!(super::reported_value("client_encoding", "'utf-8'"), "UTF8");
        assert_eq!(super::reported_value("client_encoding", "unicode"), "UTF8");
        assert_eq!(super::reported_value("application_name", "'x-y'"), "'x-y'");
    }
}
