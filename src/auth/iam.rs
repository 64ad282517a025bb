//! IAM auth token verification, as RDS Proxy does it: the token must be a SigV4 presign of
//! `rds-db:connect` for one of the proxy's endpoint names and for the user logging in, signed
//! within its lifetime by an access key in the [`Keyring`] whose policy covers that user.
//!
//! Lambda bursts send thousands of logins with the same few tokens, so two caches keep a
//! repeated token cheap: the SigV4 signing key per (key id, date, region), and the verdict per
//! token (keyed by the token's SHA-256, never the token) until the token expires. Both live
//! inside the keyring snapshot they were computed from ([`Ring`]), so a reload replaces them
//! with the keyring, and a check still running on the old keyring can only fill the old
//! caches. Must not: talk to clients (the session does) or log a token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::keyring::{Keyring, connect_resource};
use super::sigv4::{self, MAX_EXPIRES_SECS, TokenError};
use crate::config::{IamConfig, KeyringSourceConfig};
use crate::credentials::CredentialError;
use crate::credentials::aws::{CURRENT, aws_error};

/// Cached verdicts beyond this many are swept (expired first, then all).
const MAX_CACHED_TOKENS: usize = 100_000;

/// Why a token was refused. The client sees one generic text; this goes to the log and audit.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    #[error("malformed token: {0}")]
    Token(#[from] TokenError),
    #[error("token is for endpoint {0}, which is not one of this proxy's endpoints")]
    WrongEndpoint(String),
    #[error("token is for database user {token_user:?}, not {startup_user:?}")]
    WrongUser { token_user: String, startup_user: String },
    #[error("X-Amz-Expires is {0} s; at most 900 is allowed")]
    ExpiresTooLong(u64),
    #[error("token expired")]
    Expired,
    #[error("token is dated in the future beyond the allowed clock skew")]
    NotYetValid,
    #[error("unknown access key id")]
    UnknownKey,
    #[error("signature does not match")]
    BadSignature,
    #[error("session token does not match the keyring entry")]
    SessionTokenMismatch,
    #[error("principal is not allowed rds-db:connect on {0}")]
    NotAllowed(String),
    #[error("IAM authentication is not configured (no [iam] section)")]
    NotConfigured,
}

impl IamError {
    /// Authorization refusals (the signer is known but may not connect) are 28000; a token
    /// that does not prove anything is a bad password, 28P01.
    pub fn is_authorization(&self) -> bool {
        matches!(self, IamError::NotAllowed(_) | IamError::UnknownKey | IamError::NotConfigured)
    }
}

/// A refusal, with what is known of the signer (for the audit line).
#[derive(Debug)]
pub struct IamFailure {
    pub error: IamError,
    pub key_id: Option<String>,
    pub principal: Option<String>,
}

/// An accepted token's signer.
#[derive(Clone, Debug)]
pub struct Verified {
    pub key_id: Arc<str>,
    pub principal: Arc<str>,
    /// Answered from the verdict cache.
    pub cached: bool,
}

#[derive(Clone)]
struct CachedVerdict {
    verified: Verified,
    db_user: Arc<str>,
    expires_at: u64,
}

/// One keyring and the caches derived from it, replaced together.
struct Ring {
    keyring: Keyring,
    /// SHA-256 of the keyring's text, to skip reloads of an unchanged file.
    text_hash: [u8; 32],
    signing_keys: Mutex<HashMap<(String, String, String), [u8; 32]>>,
    verdicts: Mutex<HashMap<[u8; 32], CachedVerdict>>,
}

impl Ring {
    fn new(keyring: Keyring, text_hash: [u8; 32]) -> Arc<Ring> {
        Arc::new(Ring { keyring, text_hash, signing_keys: Mutex::default(), verdicts: Mutex::default() })
    }
}

pub struct IamVerifier {
    /// Lower-cased host and port of every endpoint name clients may sign for.
    endpoints: Vec<(String, u16)>,
    proxy_id: String,
    account_id: String,
    max_skew_secs: u64,
    ring: RwLock<Arc<Ring>>,
    source: KeyringReader,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringLoadError {
    #[error("cannot read keyring {path}: {source}")]
    Read { path: String, #[source] source: std::io::Error },
    /// The Secrets Manager call and how it failed (never the secret's text).
    #[error("cannot read the keyring secret {secret_id}: {error}")]
    Aws { secret_id: String, error: CredentialError },
    #[error(transparent)]
    Invalid(#[from] super::keyring::KeyringError),
}

/// Where the keyring's text comes from.
enum KeyringReader {
    File(PathBuf),
    Aws { client: aws_sdk_secretsmanager::Client, secret_id: String },
}

impl KeyringReader {
    async fn new(source: &KeyringSourceConfig) -> KeyringReader {
        match source {
            KeyringSourceConfig::File { path } => KeyringReader::File(path.clone()),
            KeyringSourceConfig::Aws { secret_id, region, endpoint_url } => KeyringReader::Aws {
                client: crate::credentials::aws::client(endpoint_url.as_deref(), region.as_deref()).await,
                secret_id: secret_id.clone(),
            },
        }
    }

    /// The keyring's text and its SHA-256 (to skip re-parsing an unchanged one).
    async fn read(&self) -> Result<(SecretString, [u8; 32]), KeyringLoadError> {
        let text = match self {
            KeyringReader::File(path) => {
                let read = tokio::fs::read_to_string(path).await;
                read.map_err(|source| KeyringLoadError::Read { path: path.display().to_string(), source })?
            }
            KeyringReader::Aws { client, secret_id } => {
                let failed = |error| KeyringLoadError::Aws { secret_id: secret_id.clone(), error };
                let out = client.get_secret_value().secret_id(secret_id).version_stage(CURRENT).send().await;
                let out = out.map_err(|e| failed(aws_error("GetSecretValue", e)))?;
                out.secret_string().ok_or_else(|| failed(CredentialError::NotAString))?.to_owned()
            }
        };
        let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        Ok((SecretString::from(text), hash))
    }
}

impl IamVerifier {
    /// Loads the keyring; `listen_port` stands in for endpoints written without a port.
    pub async fn load(cfg: &IamConfig, listen_port: u16) -> Result<Arc<IamVerifier>, KeyringLoadError> {
        let source = KeyringReader::new(&cfg.keyring).await;
        let (text, hash) = source.read().await?;
        let keyring = Keyring::from_json(text.expose_secret())?;
        Ok(Arc::new(IamVerifier {
            endpoints: cfg.endpoints.iter().map(|(h, p)| (h.clone(), p.unwrap_or(listen_port))).collect(),
            proxy_id: cfg.proxy_id.clone(),
            account_id: cfg.account_id.clone(),
            max_skew_secs: cfg.max_clock_skew.as_secs(),
            ring: RwLock::new(Ring::new(keyring, hash)),
            source,
        }))
    }

    fn ring(&self) -> Arc<Ring> {
        Arc::clone(&self.ring.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Re-reads the keyring; swaps it in (and drops both caches) if its text changed and is
    /// valid. An unreadable or invalid keyring leaves the current one in place.
    pub async fn reload_keyring(&self) -> Result<bool, KeyringLoadError> {
        let (text, hash) = self.source.read().await?;
        if self.ring().text_hash == hash {
            return Ok(false);
        }
        let keyring = Keyring::from_json(text.expose_secret())?;
        tracing::info!(keys = keyring.len(), "keyring reloaded");
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Ring::new(keyring, hash);
        Ok(true)
    }

    /// Reloads the keyring every `every`, counting the reloads that fail in `failures`.
    pub fn spawn_reload_loop(self: &Arc<Self>, every: Duration, failures: metrics::Counter) {
        crate::periodic::spawn_every(self, every, move |v| {
            let failures = failures.clone();
            async move {
                if let Err(e) = v.reload_keyring().await {
                    failures.increment(1);
                    tracing::warn!(error = %e, "keyring reload failed; keeping the current keyring");
                }
            }
        });
    }

    /// Verifies `token` for a client logging in as `startup_user`, at `now` (seconds since
    /// the epoch).
    pub fn verify(&self, token: &str, startup_user: &str, now: u64) -> Result<Verified, IamFailure> {
        let fail = |error| IamFailure { error, key_id: None, principal: None };
        if token.len() > sigv4::MAX_TOKEN_LEN {
            return Err(fail(IamError::Token(TokenError::TooLong)));
        }
        let ring = self.ring();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = cached(&ring, &digest, now) {
            if &*hit.db_user != startup_user {
                return Err(IamFailure {
                    error: IamError::WrongUser { token_user: hit.db_user.to_string(), startup_user: startup_user.into() },
                    key_id: Some(hit.verified.key_id.to_string()),
                    principal: Some(hit.verified.principal.to_string()),
                });
            }
            return Ok(Verified { cached: true, ..hit.verified });
        }
        let parsed = sigv4::parse(token).map_err(|e| fail(e.into()))?;
        let endpoint = (parsed.host.to_ascii_lowercase(), parsed.port);
        if !self.endpoints.contains(&endpoint) {
            return Err(fail(IamError::WrongEndpoint(format!("{}:{}", endpoint.0, endpoint.1))));
        }
        let Some(key) = ring.keyring.get(&parsed.access_key_id) else {
            return Err(IamFailure { error: IamError::UnknownKey, key_id: Some(parsed.access_key_id.clone()), principal: None });
        };
        let known = |error| IamFailure { error, key_id: Some(key.access_key_id.clone()), principal: Some(key.principal.clone()) };
        if parsed.expires_secs > MAX_EXPIRES_SECS {
            return Err(known(IamError::ExpiresTooLong(parsed.expires_secs)));
        }
        let expires_at = parsed.signed_at + parsed.expires_secs;
        if now > expires_at {
            return Err(known(IamError::Expired));
        }
        if parsed.signed_at > now + self.max_skew_secs {
            return Err(known(IamError::NotYetValid));
        }
        // The signing key is cached only once a signature made with it checked out, so
        // made-up (key, date, region) triples cannot fill the cache.
        let scope = (key.access_key_id.clone(), parsed.scope_date.clone(), parsed.region.clone());
        let cached_key = ring.signing_keys.lock().unwrap_or_else(|p| p.into_inner()).get(&scope).copied();
        let signing_key = cached_key
            .unwrap_or_else(|| sigv4::signing_key(&key.secret_access_key, &parsed.scope_date, &parsed.region));
        let expected = sigv4::sign(&signing_key, &parsed.string_to_sign());
        if !bool::from(expected.ct_eq(&parsed.signature)) {
            return Err(known(IamError::BadSignature));
        }
        if cached_key.is_none() {
            let mut keys = ring.signing_keys.lock().unwrap_or_else(|p| p.into_inner());
            if keys.len() >= 10_000 {
                keys.clear();
            }
            keys.insert(scope, signing_key);
        }
        if let Some(want) = &key.session_token {
            let got = parsed.security_token.as_ref().map(|t| t.expose_secret().as_bytes()).unwrap_or_default();
            if !bool::from(want.expose_secret().as_bytes().ct_eq(got)) {
                return Err(known(IamError::SessionTokenMismatch));
            }
        }
        let resource = connect_resource(&parsed.region, &self.account_id, &self.proxy_id, &parsed.db_user);
        if !key.allows(&resource) {
            return Err(known(IamError::NotAllowed(resource)));
        }
        // Signature and policy hold for this token whoever presents it; the user must match.
        let verified = Verified {
            key_id: Arc::from(key.access_key_id.as_str()),
            principal: Arc::from(key.principal.as_str()),
            cached: false,
        };
        let db_user: Arc<str> = Arc::from(parsed.db_user.as_str());
        remember(&ring, digest, CachedVerdict { verified: verified.clone(), db_user: Arc::clone(&db_user), expires_at }, now);
        if &*db_user != startup_user {
            return Err(known(IamError::WrongUser { token_user: db_user.to_string(), startup_user: startup_user.into() }));
        }
        Ok(verified)
    }

    /// Number of token verdicts held (for tests and metrics).
    pub fn cached_verdicts(&self) -> usize {
        self.ring().verdicts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn cached(ring: &Ring, digest: &[u8; 32], now: u64) -> Option<CachedVerdict> {
    let mut verdicts = ring.verdicts.lock().unwrap_or_else(|p| p.into_inner());
    let hit = verdicts.get(digest)?;
    if now > hit.expires_at {
        verdicts.remove(digest);
        return None;
    }
    Some(hit.clone())
}

fn remember(ring: &Ring, digest: [u8; 32], verdict: CachedVerdict, now: u64) {
    let mut verdicts = ring.verdicts.lock().unwrap_or_else(|p| p.into_inner());
    if verdicts.len() >= MAX_CACHED_TOKENS {
        verdicts.retain(|_, v| v.expires_at >= now);
        if verdicts.len() >= MAX_CACHED_TOKENS {
            verdicts.clear();
        }
    }
    verdicts.insert(digest, verdict);
}

#[cfg(test)]
mod tests;
