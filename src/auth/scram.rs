//! Server side of SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it), sans-io.
//!
//! A [`ScramVerifier`] is derived once per credential generation (the 4096-round PBKDF2 is paid
//! once, not per client); each client login then costs a few HMACs. Channel binding (-PLUS) is
//! not offered on plaintext connections.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const ITERATIONS: u32 = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("client requested channel binding, which this connection cannot offer")]
    ChannelBindingUnsupported,
    #[error("unsupported SASL mechanism")]
    UnsupportedMechanism,
    #[error("SCRAM proof does not match")]
    BadProof,
}

/// What the server keeps of a password: salt, iteration count, StoredKey and ServerKey.
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramVerifier(<redacted>)")
    }
}

pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// PostgreSQL runs SASLprep where it can and falls back to the raw bytes.
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

pub(crate) fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let pass = normalize(password);
    let mut prev = hmac(&pass, &[salt, &[0, 0, 0, 1]]);
    let mut acc = prev;
    for _ in 1..iterations {
        prev = hmac(&pass, &[&prev]);
        for (a, p) in acc.iter_mut().zip(prev) {
            *a ^= p;
        }
    }
    acc
}

impl ScramVerifier {
    /// Derives a verifier with a fresh random salt.
    pub fn new(password: &str) -> ScramVerifier {
        let salt: [u8; 16] = rand::random();
        Self::with_salt(password, &salt, ITERATIONS)
    }

    pub fn with_salt(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, &[b"Server Key"]);
        ScramVerifier { salt: salt.to_vec(), iterations, stored_key, server_key }
    }
}

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal { client_first_bare: String, server_first: String, nonce: String, gs2_header: String },
    Done,
}

/// One SCRAM exchange with one client.
pub struct ScramServer<'v> {
    verifier: &'v ScramVerifier,
    server_nonce: String,
    state: State,
}

impl<'v> ScramServer<'v> {
    pub fn new(verifier: &'v ScramVerifier) -> ScramServer<'v> {
        let raw: [u8; 18] = rand::random();
        Self::with_nonce(verifier, B64.encode(raw))
    }

    /// For tests: a fixed server nonce.
    pub fn with_nonce(verifier: &'v ScramVerifier, server_nonce: String) -> ScramServer<'v> {
        ScramServer { verifier, server_nonce, state: State::AwaitingClientFirst }
    }

    /// Takes the SASLInitialResponse's mechanism and data; returns the server-first-message.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if mechanism != SCRAM_SHA_256 {
            return Err(ScramError::UnsupportedMechanism);
        }
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("authzid is not supported"));
        }
        let gs2_header = format!("{flag},,");
        // client-first-bare: n=<user>,r=<nonce>[,ext]; PostgreSQL ignores the SCRAM user name.
        let mut parts = bare.split(',');
        if !parts.next().is_some_and(|p| p.starts_with("n=")) {
            return Err(ScramError::Malformed("missing user name attribute"));
        }
        let client_nonce = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed("missing or bad client nonce"))?;
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first =
            format!("r={nonce},s={},i={}", B64.encode(&self.verifier.salt), self.verifier.iterations);
        let out = server_first.as_bytes().to_vec();
        self.state =
            State::AwaitingClientFinal { client_first_bare: bare.to_owned(), server_first, nonce, gs2_header };
        Ok(out)
    }

    /// Takes the SASLResponse; returns the server-final-message when the proof is right.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::AwaitingClientFinal { client_first_bare, server_first, nonce, gs2_header } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Malformed("unexpected SCRAM message"));
        };
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(ScramError::Malformed("missing proof"))?;
        let mut parts = without_proof.split(',');
        let binding = parts
            .next()
            .and_then(|p| p.strip_prefix("c="))
            .ok_or(ScramError::Malformed("missing channel binding"))?;
        if binding != B64.encode(gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding does not match the gs2 header"));
        }
        if parts.next().and_then(|p| p.strip_prefix("r=")) != Some(nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64.decode(proof).map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof has the wrong length"));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        let computed: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(computed.ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange against rust-postgres's client implementation.
    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = ScramVerifier::new(server_password);
        let mut server = ScramServer::new(&verifier);
        let mut client = ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let first = server.client_first(SCRAM_SHA_256, client.message())?;
        client.update(&first).expect("client accepts server-first");
        let last = server.client_final(client.message())?;
        client.finish(&last).expect("client verifies the server signature");
        Ok(())
    }

    #[test]
    fn exchange_with_right_password_succeeds() {
        exchange("s3cret-pass", "s3cret-pass").unwrap();
    }

    #[test]
    fn exchange_with_wrong_password_fails_with_bad_proof() {
        assert_eq!(exchange("s3cret-pass", "other"), Err(ScramError::BadProof));
    }

    /// RFC 7677 §3 test vector: user "user", password "pencil".
    #[test]
    fn rfc7677_vector_verifies() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let verifier = ScramVerifier::with_salt("pencil", &salt, 4096);
        let mut server = ScramServer::with_nonce(&verifier, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        let first = server.client_first(SCRAM_SHA_256, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(
            first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = server
            .client_final(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .unwrap();
        assert_eq!(fin, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn client_first_with_channel_binding_is_refused() {
        let verifier = ScramVerifier::with_salt("x", b"salt", 1);
        let mut server = ScramServer::new(&verifier);
        assert_eq!(
            server.client_first(SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBindingUnsupported)
        );
    }

    #[test]
    fn client_final_with_tampered_nonce_is_malformed() {
        let verifier = ScramVerifier::with_salt("x", b"salt", 1);
        let mut server = ScramServer::with_nonce(&verifier, "srv".into());
        server.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").unwrap();
        assert!(matches!(server.client_final(b"c=biws,r=abcXXX,p=AAAA"), Err(ScramError::Malformed(_))));
    }

    #[test]
    fn garbage_is_malformed_not_panic() {
        let verifier = ScramVerifier::with_salt("x", b"salt", 1);
        for junk in [&b""[..], b",", b"n,", b"n,,", b"n,,n=", b"n,,n=u,r=", b"\xff\xfe", b"q,,n=,r=a"] {
            let mut server = ScramServer::new(&verifier);
            assert!(server.client_first(SCRAM_SHA_256, junk).is_err(), "{junk:?}");
        }
        let mut server = ScramServer::new(&verifier);
        assert!(server.client_final(b"c=biws,r=a,p=AAAA").is_err());
    }
}
