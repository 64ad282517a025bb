//! The client side of SCRAM-SHA-256, as pgwarden logs in to the database, and the cache that
//! makes such a login cost a few HMACs instead of a 4096-round PBKDF2.
//!
//! The keys a SCRAM client derives from a password depend only on the password, the role's salt
//! and the iteration count, and a role's salt changes only when its password does. So each
//! credential entry derives them once per credential and salt ([`KeyCache`], held by its
//! `CredentialStore`) and reuses them for every later login of all its pools: pool growth,
//! replacements, max-lifetime recycling, another database. A miss derives them on the
//! blocking pool, never on the event loop that relays every other client's traffic.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::scram::{hmac, salted_password};
use crate::credentials::{Credential, LoginFingerprint};

/// Above this, a server-first-message is refused rather than spending minutes of CPU on one
/// login (PostgreSQL's default is 4096; its `scram_iterations` setting allows more).
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// How many (credential, salt) pairs one pool remembers: the current, pending and previous
/// stages of an alternating-users secret, with room to spare.
const CACHE_ENTRIES: usize = 6;

/// ClientKey and ServerKey of one password under one salt: enough to log in as that role, so
/// they are kept like the password (never printed).
pub struct ScramKeys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramKeys(<redacted>)")
    }
}

impl Drop for ScramKeys {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.client_key.zeroize();
        self.server_key.zeroize();
    }
}

impl ScramKeys {
    /// The 4096-round (or `iterations`-round) PBKDF2: milliseconds of CPU.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
        let mut salted = salted_password(password, salt, iterations);
        let keys = ScramKeys { client_key: hmac(&salted, &[b"Client Key"]), server_key: hmac(&salted, &[b"Server Key"]) };
        zeroize::Zeroize::zeroize(&mut salted);
        keys
    }
}

/// What the server's first message asks the keys to be derived with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Salt {
    pub salt: Vec<u8>,
    pub iterations: u32,
}

#[derive(PartialEq, Eq)]
struct CacheKey {
    login: LoginFingerprint,
    salt: Salt,
}

/// Keys derived for one credential entry's logins, newest first.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<VecDeque<(CacheKey, Arc<ScramKeys>)>>,
}

impl KeyCache {
    /// The keys of `credential` under `salt`: from the cache, or derived on the blocking pool.
    pub async fn keys(&self, credential: &Credential, salt: &Salt) -> Arc<ScramKeys> {
        let key = CacheKey { login: credential.fingerprint(), salt: salt.clone() };
        if let Some(hit) = self.lookup(&key) {
            return hit;
        }
        let password: SecretString = credential.password.clone();
        let (s, iterations) = (salt.salt.clone(), salt.iterations);
        let derived = tokio::task::spawn_blocking(move || ScramKeys::derive(password.expose_secret(), &s, iterations));
        let keys = Arc::new(match derived.await {
            Ok(keys) => keys,
            // The blocking pool is gone (runtime shutting down): derive here rather than fail.
            Err(_) => ScramKeys::derive(credential.password.expose_secret(), &salt.salt, salt.iterations),
        });
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|(k, _)| *k != key);
        entries.push_front((key, keys.clone()));
        entries.truncate(CACHE_ENTRIES);
        keys
    }

    fn lookup(&self, key: &CacheKey) -> Option<Arc<ScramKeys>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().find(|(k, _)| k == key).map(|(_, keys)| keys.clone())
    }
}

/// One SCRAM-SHA-256 exchange as the client, without channel binding (gs2 header `n,,`).
pub struct ScramClient {
    client_first_bare: String,
    client_nonce: String,
    state: ClientState,
}

enum ClientState {
    Started,
    /// The server's first message arrived: the full nonce and the message itself, for the proof.
    Challenged { nonce: String, server_first: String },
    /// The proof went out: the ServerSignature the server must answer with.
    Proved { server_signature: [u8; 32] },
    Done,
}

impl Default for ScramClient {
    fn default() -> Self {
        let raw: [u8; 18] = rand::random();
        Self::with_nonce(B64.encode(raw))
    }
}

impl ScramClient {
    /// For tests: a fixed client nonce.
    pub fn with_nonce(client_nonce: String) -> ScramClient {
        // PostgreSQL takes the user name from the startup packet and ignores SCRAM's.
        ScramClient { client_first_bare: format!("n=,r={client_nonce}"), client_nonce, state: ClientState::Started }
    }

    /// The SASLInitialResponse data.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Reads the server-first-message (`r=<nonce>,s=<salt>,i=<iterations>`).
    pub fn server_first(&mut self, data: &[u8]) -> Result<Salt, &'static str> {
        if !matches!(self.state, ClientState::Started) {
            return Err("unexpected SCRAM server-first message");
        }
        let msg = std::str::from_utf8(data).map_err(|_| "SCRAM server-first message is not UTF-8")?;
        let mut parts = msg.split(',');
        let nonce = parts.next().and_then(|p| p.strip_prefix("r=")).ok_or("SCRAM server-first message has no nonce")?;
        if nonce.len() <= self.client_nonce.len() || !nonce.starts_with(&self.client_nonce) {
            return Err("SCRAM server nonce does not extend the client's");
        }
        let salt = parts
            .next()
            .and_then(|p| p.strip_prefix("s="))
            .and_then(|s| B64.decode(s).ok())
            .filter(|s| !s.is_empty())
            .ok_or("SCRAM server-first message has no valid salt")?;
        let iterations = parts
            .next()
            .and_then(|p| p.strip_prefix("i="))
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .ok_or("SCRAM iteration count is missing or out of range")?;
        self.state = ClientState::Challenged { nonce: nonce.to_owned(), server_first: msg.to_owned() };
        Ok(Salt { salt, iterations })
    }

    /// The SASLResponse data: the client-final-message with its proof.
    pub fn client_final(&mut self, keys: &ScramKeys) -> Result<Vec<u8>, &'static str> {
        let ClientState::Challenged { nonce, server_first } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err("SCRAM proof asked for before the server's challenge");
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(keys.client_key).into();
        let signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        let proof: Vec<u8> = keys.client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        self.state = ClientState::Proved { server_signature: hmac(&keys.server_key, &[auth_message.as_bytes()]) };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message: the server proves it knew the password too.
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), &'static str> {
        let ClientState::Proved { server_signature } = std::mem::replace(&mut self.state, ClientState::Done) else {
            return Err("unexpected SCRAM server-final message");
        };
        let msg = std::str::from_utf8(data).map_err(|_| "SCRAM server-final message is not UTF-8")?;
        if msg.starts_with("e=") {
            return Err("database ended the SCRAM exchange with an error");
        }
        let signature = msg
            .split(',')
            .next()
            .and_then(|v| v.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or("SCRAM server-final message has no valid signature")?;
        if !bool::from(signature.as_slice().ct_eq(&server_signature)) {
            return Err("SCRAM server signature does not verify");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{SCRAM_SHA_256, ScramError, ScramServer, ScramVerifier};

    fn credential(password: &str) -> Credential {
        serde_json::from_value(serde_json::json!({"username": "app", "password": password})).unwrap()
    }

    /// A whole exchange between this client and pgwarden's own SCRAM server.
    async fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = ScramVerifier::new(server_password);
        let mut server = ScramServer::new(&verifier);
        let mut client = ScramClient::default();
        let first = server.client_first(SCRAM_SHA_256, &client.client_first())?;
        let salt = client.server_first(&first).expect("server-first parses");
        let keys = KeyCache::default().keys(&credential(client_password), &salt).await;
        let last = server.client_final(&client.client_final(&keys).unwrap())?;
        client.server_final(&last).expect("server signature verifies");
        Ok(())
    }

    #[tokio::test]
    async fn logs_in_to_a_scram_server_with_the_right_password_only() {
        exchange("s3cret", "s3cret").await.unwrap();
        assert_eq!(exchange("s3cret", "other").await, Err(ScramError::BadProof));
    }

    /// RFC 7677 §3: user "user", password "pencil", fixed nonces.
    #[test]
    fn rfc7677_vector() {
        let mut client = ScramClient::with_nonce("rOprNGfwEbeRWgbNEkqO".into());
        let salt = client
            .server_first(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(salt.iterations, 4096);
        let keys = ScramKeys::derive("pencil", &salt.salt, salt.iterations);
        // The RFC's client-first-bare names the user; PostgreSQL's leaves it empty.
        client.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        assert_eq!(
            client.client_final(&keys).unwrap(),
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        client.server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=").unwrap();
    }

    #[test]
    fn a_wrong_server_signature_or_an_error_is_refused() {
        for last in [&b"v=AAAA"[..], b"e=invalid-proof", b"", b"v=%%%"] {
            let mut client = ScramClient::with_nonce("abc".into());
            let salt = client.server_first(b"r=abcdef,s=c2FsdA==,i=1").unwrap();
            client.client_final(&ScramKeys::derive("pw", &salt.salt, salt.iterations)).unwrap();
            assert!(client.server_final(last).is_err(), "{last:?}");
        }
    }

    #[test]
    fn a_bad_server_first_message_is_refused_without_deriving_anything() {
        for first in [
            &b""[..],
            b"r=xyz,s=c2FsdA==,i=4096",              // nonce does not extend ours
            b"r=abc,s=c2FsdA==,i=4096",              // nonce adds nothing
            b"r=abcdef,s=,i=4096",                   // empty salt
            b"r=abcdef,s=%%%,i=4096",                // salt not base64
            b"r=abcdef,s=c2FsdA==,i=0",              // no iterations
            b"r=abcdef,s=c2FsdA==,i=4294967295",     // minutes of CPU
            b"r=abcdef,s=c2FsdA==,i=-1",
            b"r=abcdef,s=c2FsdA==",
            b"\xff\xfe",
        ] {
            let mut client = ScramClient::with_nonce("abc".into());
            assert!(client.server_first(first).is_err(), "{first:?}");
        }
        let mut client = ScramClient::with_nonce("abc".into());
        assert_eq!(client.server_first(b"r=abcdef,s=c2FsdA==,i=10000000").unwrap().iterations, MAX_ITERATIONS);
    }

    #[test]
    fn messages_out_of_order_are_refused() {
        let mut client = ScramClient::with_nonce("abc".into());
        assert!(client.client_final(&ScramKeys::derive("pw", b"salt", 1)).is_err());
        let mut client = ScramClient::with_nonce("abc".into());
        assert!(client.server_final(b"v=AAAA").is_err());
        client.server_first(b"r=abcdef,s=c2FsdA==,i=1").unwrap_err();
    }

    #[tokio::test]
    async fn keys_are_derived_once_per_credential_and_salt() {
        let cache = KeyCache::default();
        let salt = Salt { salt: b"salt-1".to_vec(), iterations: 16 };
        let first = cache.keys(&credential("one"), &salt).await;
        assert!(Arc::ptr_eq(&first, &cache.keys(&credential("one"), &salt).await), "a second login reuses the keys");
        let other_password = cache.keys(&credential("two"), &salt).await;
        assert_ne!(first.client_key, other_password.client_key);
        let other_salt = cache.keys(&credential("one"), &Salt { salt: b"salt-2".to_vec(), iterations: 16 }).await;
        assert_ne!(first.client_key, other_salt.client_key);
        // Older entries give way to newer ones.
        for i in 0..CACHE_ENTRIES {
            cache.keys(&credential(&format!("later-{i}")), &salt).await;
        }
        assert!(!Arc::ptr_eq(&first, &cache.keys(&credential("one"), &salt).await));
    }

    #[test]
    fn keys_never_print() {
        let keys = ScramKeys::derive("pw", b"salt", 1);
        assert_eq!(format!("{keys:?}"), "ScramKeys(<redacted>)");
    }
}
