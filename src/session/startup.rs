//! The login half of a session: the first packet (SSL/GSS refusals, cancel requests, protocol
//! version), the startup parameters, SCRAM authentication, and the greeting (ParameterStatus,
//! BackendKeyData, ReadyForQuery).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;

use super::{SessionError, SessionId};
use crate::auth::AuthError;
use crate::auth::scram::{SCRAM_SHA_256, ScramServer};
use crate::backend::settings::{Settings, is_valid_name};
use crate::cancel::CancelHandle;
use crate::listener::Shared;
use crate::net::{read_message, read_startup_packet};
use crate::pool::{PoolEntry, PoolKey};
use crate::protocol::startup::parse_options;
use crate::protocol::{
    MAX_AUTH_MESSAGE_LEN, MAX_STARTUP_LEN, ProtocolError, StartupRequest, frontend_tag, messages, parse_startup,
    read_cstr,
};
use crate::relay::ClientSide;

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
    let user = shared.users.get(&startup.user).ok_or_else(|| AuthError::UnknownUser(startup.user.clone()));
    let user = match user {
        Ok(u) => u,
        Err(e) => {
            shared.metrics.client_connections_setup_failed_auth.increment(1);
            return Err(e.into());
        }
    };

    let mut out = BytesMut::new();
    if startup.minor > 0 || !startup.unknown_protocol_options.is_empty() {
        let names: Vec<&str> = startup.unknown_protocol_options.iter().map(String::as_str).collect();
        messages::negotiate_protocol_version(&mut out, &names);
    }
    if let Err(e) = authenticate_scram(client, user, &mut out).await {
        shared.metrics.client_connections_setup_failed_auth.increment(1);
        return Err(e);
    }

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
    client.stream.write_all(&out).await.map_err(SessionError::Io)?;
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

/// Reads first packets until a StartupMessage, refusing SSL and GSS encryption on the way.
async fn first_packet(shared: &Shared, client: &mut ClientSide) -> Result<Option<Startup>, SessionError> {
    // SSLRequest, then GSSENCRequest, then the StartupMessage is the longest legal sequence.
    for _ in 0..3 {
        let body = read_startup_packet(&mut client.stream, MAX_STARTUP_LEN).await?;
        match parse_startup(&body)? {
            StartupRequest::Ssl | StartupRequest::GssEnc => {
                client.stream.write_all(b"N").await.map_err(SessionError::Io)?;
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

/// SCRAM-SHA-256 against the user's current password. `out` holds messages to send first.
async fn authenticate_scram(
    client: &mut ClientSide,
    user: &crate::auth::UserEntry,
    out: &mut BytesMut,
) -> Result<(), SessionError> {
    let verifier = user.scram_verifier().await;
    let mut server = ScramServer::new(&verifier);
    messages::auth_sasl(out, &[SCRAM_SHA_256]);
    client.stream.write_all(out).await.map_err(SessionError::Io)?;
    out.clear();

    let mut body = expect_password_message(client).await?;
    let (mechanism, rest) = read_cstr(&body)?;
    let mechanism = mechanism.to_owned();
    let consumed = body.len() - rest.len();
    body.advance(consumed);
    if body.len() < 4 {
        return Err(ProtocolError::Malformed("short SASLInitialResponse").into());
    }
    let data_len = body.get_i32();
    if data_len < 0 || data_len as usize != body.len() {
        return Err(ProtocolError::Malformed("SASLInitialResponse length mismatch").into());
    }
    let server_first = server.client_first(&mechanism, &body).map_err(AuthError::from)?;
    messages::auth_sasl_continue(out, &server_first);
    client.stream.write_all(out).await.map_err(SessionError::Io)?;
    out.clear();

    let body = expect_password_message(client).await?;
    let server_final = server.client_final(&body).map_err(|e| match e {
        crate::auth::scram::ScramError::BadProof => AuthError::BadPassword(user.user.clone()),
        other => AuthError::Scram(other),
    })?;
    messages::auth_sasl_final(out, &server_final);
    Ok(())
}

async fn expect_password_message(client: &mut ClientSide) -> Result<BytesMut, SessionError> {
    let (tag, body) = read_message(&mut client.stream, &mut client.buf, MAX_AUTH_MESSAGE_LEN).await?;
    if tag != frontend_tag::PASSWORD {
        return Err(ProtocolError::UnexpectedTag { tag: tag as char, context: "expected a password message" }.into());
    }
    Ok(body)
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
