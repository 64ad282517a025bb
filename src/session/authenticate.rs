//! Client authentication exchanges, once the startup packet named a configured user: which
//! method the user's `iam_auth` and the connection's TLS call for, the exchange itself
//! (SCRAM-SHA-256, or a cleartext password message carrying an IAM token or, over TLS, the
//! password), and one audit line per decision whatever the outcome.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use secrecy::{ExposeSecret, SecretString};

use super::SessionError;
use crate::audit::{AuthEvent, Decision, Method};
use crate::auth::iam::{IamError, IamFailure, Verified};
use crate::auth::scram::{SCRAM_SHA_256, ScramServer};
use crate::auth::{AuthError, UserEntry, sigv4};
use crate::config::IamAuth;
use crate::listener::Shared;
use crate::net::read_message;
use crate::protocol::{MAX_AUTH_MESSAGE_LEN, ProtocolError, frontend_tag, messages, read_cstr};
use crate::relay::ClientSide;
use crate::stream::send;

/// Who is logging in, for the audit line.
pub struct Attempt<'a> {
    pub peer: SocketAddr,
    pub user: &'a str,
    pub database: &'a str,
}

/// What a successful exchange established.
struct Outcome {
    method: Method,
    signer: Option<Verified>,
}

/// Authenticates the client as `user`; `out` holds messages to send first. Audits the result.
pub async fn authenticate(
    shared: &Arc<Shared>,
    client: &mut ClientSide,
    user: &UserEntry,
    attempt: &Attempt<'_>,
    out: &mut BytesMut,
) -> Result<(), SessionError> {
    let tls = client.stream.is_tls();
    // Refined by the exchange once it knows (a password or a token, in optional mode).
    let mut method = Method::Iam;
    let result = match (user.iam_auth, tls) {
        (IamAuth::Disabled, _) | (IamAuth::Optional, false) => {
            method = Method::Scram;
            scram(client, user, out).await.map(|()| Outcome { method: Method::Scram, signer: None })
        }
        (IamAuth::Required, false) => Err(AuthError::IamWithoutTls(user.user.clone()).into()),
        (IamAuth::Required, true) => cleartext(shared, client, user, true, out, &mut method).await,
        (IamAuth::Optional, true) => cleartext(shared, client, user, false, out, &mut method).await,
    };
    match &result {
        Ok(o) => {
            if o.signer.as_ref().is_some_and(|s| s.cached) {
                shared.metrics.iam_token_cache_hits.increment(1);
            }
            let (key_id, principal) = (o.signer.as_ref().map(|s| &*s.key_id), o.signer.as_ref().map(|s| &*s.principal));
            record(shared, attempt, tls, o.method, (key_id, principal), Decision::Allowed, "ok");
        }
        Err(e) => {
            shared.metrics.client_connections_setup_failed_auth.increment(1);
            let signer = match e {
                SessionError::IamRefused { failure, .. } => (failure.key_id.as_deref(), failure.principal.as_deref()),
                _ => (None, None),
            };
            record(shared, attempt, tls, method, signer, Decision::Denied, &e.to_string());
        }
    }
    result.map(|_| ())
}

/// Audits a decision made before any exchange (unknown user, TLS required).
pub fn audit_refusal(shared: &Shared, attempt: &Attempt<'_>, tls: bool, reason: &str) {
    record(shared, attempt, tls, Method::None, (None, None), Decision::Denied, reason);
}

/// One audit line; `signer` is the access key id and principal, when IAM got that far.
fn record(
    shared: &Shared,
    attempt: &Attempt<'_>,
    tls: bool,
    method: Method,
    signer: (Option<&str>, Option<&str>),
    result: Decision,
    reason: &str,
) {
    shared.audit.record(&AuthEvent {
        client: attempt.peer,
        user: attempt.user,
        database: attempt.database,
        tls,
        method,
        key_id: signer.0,
        principal: signer.1,
        result,
        reason,
    });
}

/// Asks for a cleartext password (only ever over TLS) and checks it as an IAM token, or, when
/// the user allows both and it is not shaped like a token, as the credential's password.
async fn cleartext(
    shared: &Arc<Shared>,
    client: &mut ClientSide,
    user: &UserEntry,
    iam_only: bool,
    out: &mut BytesMut,
    method: &mut Method,
) -> Result<Outcome, SessionError> {
    messages::auth_cleartext_password(out);
    send(&mut client.stream, out).await.map_err(SessionError::Io)?;
    out.clear();
    let body = expect_password_message(client).await?;
    let (password, _) = read_cstr(&body)?;
    let password = SecretString::from(password);
    drop(body);
    if !iam_only && !sigv4::looks_like_token(password.expose_secret()) {
        *method = Method::Password;
        return if user.password_matches(password.expose_secret()) {
            Ok(Outcome { method: Method::Password, signer: None })
        } else {
            Err(AuthError::BadPassword(user.user.clone()).into())
        };
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let verdict = match &shared.iam {
        Some(iam) => iam.verify(password.expose_secret(), &user.user, now),
        // Config validation makes an [iam] section a condition of iam_auth; be safe anyway.
        None => Err(IamFailure { error: IamError::NotConfigured, key_id: None, principal: None }),
    };
    match verdict {
        Ok(signer) => Ok(Outcome { method: Method::Iam, signer: Some(signer) }),
        Err(failure) => Err(SessionError::IamRefused { user: user.user.clone(), failure }),
    }
}

/// SCRAM-SHA-256 against the user's current password.
async fn scram(client: &mut ClientSide, user: &UserEntry, out: &mut BytesMut) -> Result<(), SessionError> {
    let verifier = user.scram_verifier().await;
    let mut server = ScramServer::new(&verifier);
    messages::auth_sasl(out, &[SCRAM_SHA_256]);
    send(&mut client.stream, out).await.map_err(SessionError::Io)?;
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
    send(&mut client.stream, out).await.map_err(SessionError::Io)?;
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
