//! Client authentication: AWS IAM auth tokens ([`iam`], checked against the [`keyring`] with
//! [`sigv4`]), or SCRAM-SHA-256 against the password of the user's current backend credential
//! (RDS Proxy's non-IAM mode), with the verifier derived once per credential generation.
//! Must not: touch pools or backends, or talk to clients (the session drives the exchange).

pub mod iam;
pub mod keyring;
pub mod scram;
pub mod sigv4;

use std::sync::{Arc, Mutex};

use secrecy::ExposeSecret;
use thiserror::Error;

use crate::config::IamAuth;
use crate::credentials::{CredentialStore, Generation};
use scram::{ScramError, ScramVerifier};

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("no credential entry for user {0}")]
    UnknownUser(String),
    #[error("password authentication failed for user {0}")]
    BadPassword(String),
    #[error("SCRAM exchange failed: {0}")]
    Scram(#[from] ScramError),
    #[error("IAM authentication for {0} attempted without TLS")]
    IamWithoutTls(String),
    #[error("client did not use TLS and tls.require is set")]
    TlsRequired,
}

/// One configured database user: where its credential lives and the SCRAM verifier of its
/// current password.
pub struct UserEntry {
    pub user: String,
    pub store: Arc<CredentialStore>,
    pub iam_auth: IamAuth,
    verifier: Mutex<Option<(Generation, Arc<ScramVerifier>)>>,
}

impl UserEntry {
    pub fn new(user: String, store: Arc<CredentialStore>, iam_auth: IamAuth) -> UserEntry {
        UserEntry { user, store, iam_auth, verifier: Mutex::new(None) }
    }

    /// Compares a cleartext password (sent over TLS) with the current credential's, in
    /// constant time.
    pub fn password_matches(&self, password: &str) -> bool {
        use subtle::ConstantTimeEq;
        let snapshot = self.store.snapshot();
        bool::from(snapshot.secret.current.password.expose_secret().as_bytes().ct_eq(password.as_bytes()))
    }

    /// The verifier for the current password, derived at most once per generation.
    pub async fn scram_verifier(&self) -> Arc<ScramVerifier> {
        let snapshot = self.store.snapshot();
        if let Some((generation, v)) = &*self.verifier.lock().unwrap_or_else(|p| p.into_inner()) {
            if *generation == snapshot.generation {
                return Arc::clone(v);
            }
        }
        // PBKDF2 with 4096 rounds: off the async workers.
        let password = snapshot.secret.current.password.clone();
        let derived = tokio::task::spawn_blocking(move || ScramVerifier::new(password.expose_secret()))
            .await
            .map(Arc::new)
            .unwrap_or_else(|_| Arc::new(ScramVerifier::new(snapshot.secret.current.password.expose_secret())));
        *self.verifier.lock().unwrap_or_else(|p| p.into_inner()) = Some((snapshot.generation, Arc::clone(&derived)));
        derived
    }
}
