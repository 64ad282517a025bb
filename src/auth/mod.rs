//! Client authentication. Today: SCRAM-SHA-256 against the password of the user's current
//! backend credential (RDS Proxy's non-IAM mode), with the verifier derived once per credential
//! generation. Must not: touch pools or backends.

pub mod scram;

use std::sync::{Arc, Mutex};

use secrecy::ExposeSecret;
use thiserror::Error;

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
}

/// One configured database user: where its credential lives and the SCRAM verifier of its
/// current password.
pub struct UserEntry {
    pub user: String,
    pub store: Arc<CredentialStore>,
    verifier: Mutex<Option<(Generation, Arc<ScramVerifier>)>>,
}

impl UserEntry {
    pub fn new(user: String, store: Arc<CredentialStore>) -> UserEntry {
        UserEntry { user, store, verifier: Mutex::new(None) }
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
