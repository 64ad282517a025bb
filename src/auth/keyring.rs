//! The registry of AWS access keys pgwarden trusts to sign IAM auth tokens, and their policy.
//! SigV4 is a shared-secret signature, so a verifier must hold each signer's secret access key:
//! the keyring maps an access key id to that secret, the principal (IAM ARN) it stands for, and
//! the `rds-db:connect` resources it may use (`arn:aws:rds-db:<region>:<account>:dbuser:<proxy
//! id>/<db user>`, with IAM-style `*` and `?` wildcards). It is parsed from JSON (a file, or a
//! Secrets Manager secret's `SecretString`: the verifier reads either) and swapped whole on
//! reload. Secrets never reach a log line or `Debug`.

use std::collections::HashMap;

use secrecy::SecretString;
use serde::Deserialize;

/// One trusted access key.
pub struct TrustedKey {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    /// For temporary credentials: the session token the signer must present.
    pub session_token: Option<SecretString>,
    /// The IAM principal this key stands for, for the audit log.
    pub principal: String,
    /// Resource patterns this key may `rds-db:connect` to.
    pub allow: Vec<String>,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("access_key_id", &self.access_key_id)
            .field("principal", &self.principal)
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// serde's message names the field and position; it never quotes a value.
    #[error("keyring is not valid JSON of the expected shape: {0}")]
    Shape(String),
    #[error("keyring entry {index}: {reason}")]
    Entry { index: usize, reason: &'static str },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyring {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    access_key_id: String,
    secret_access_key: SecretString,
    #[serde(default)]
    session_token: Option<SecretString>,
    principal: String,
    allow: Vec<String>,
}

/// The keys, by access key id.
#[derive(Debug, Default)]
pub struct Keyring {
    keys: HashMap<String, TrustedKey>,
}

impl Keyring {
    pub fn from_json(text: &str) -> Result<Keyring, KeyringError> {
        let raw: RawKeyring = serde_json::from_str(text).map_err(|e| KeyringError::Shape(redacted_serde_error(&e)))?;
        let mut keys = HashMap::new();
        for (index, k) in raw.keys.into_iter().enumerate() {
            let bad = |reason| KeyringError::Entry { index, reason };
            if k.access_key_id.is_empty() || !k.access_key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(bad("access_key_id must be letters and digits"));
            }
            if k.principal.is_empty() {
                return Err(bad("principal must not be empty"));
            }
            if k.allow.iter().any(|p| !p.starts_with("arn:aws") && p != "*") {
                return Err(bad("allow patterns are ARNs like arn:aws:rds-db:<region>:<account>:dbuser:<proxy id>/<user>"));
            }
            let key = TrustedKey {
                access_key_id: k.access_key_id,
                secret_access_key: k.secret_access_key,
                session_token: k.session_token,
                principal: k.principal,
                allow: k.allow,
            };
            if keys.insert(key.access_key_id.clone(), key).is_some() {
                return Err(bad("access_key_id appears twice"));
            }
        }
        Ok(Keyring { keys })
    }

    pub fn get(&self, access_key_id: &str) -> Option<&TrustedKey> {
        self.keys.get(access_key_id)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// serde_json's message with everything from its first quote on dropped (it quotes names and
/// values, Debug-escaped, and a value could be a secret), plus the position.
fn redacted_serde_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let head = msg.split(['`', '"']).next().unwrap_or_default().trim_end().trim_end_matches(':');
    format!("{head} (line {} column {})", e.line(), e.column())
}

impl TrustedKey {
    /// Whether this key may connect to `resource`, IAM-style: any pattern matches.
    pub fn allows(&self, resource: &str) -> bool {
        self.allow.iter().any(|p| wildcard_match(p.as_bytes(), resource.as_bytes()))
    }
}

/// The resource a client asks for: `arn:aws:rds-db:<region>:<account>:dbuser:<proxy id>/<user>`.
pub fn connect_resource(region: &str, account: &str, proxy_id: &str, db_user: &str) -> String {
    format!("arn:aws:rds-db:{region}:{account}:dbuser:{proxy_id}/{db_user}")
}

/// IAM policy matching: `*` is any run of characters (including none), `?` any one character,
/// everything else literal and case-sensitive. Iterative, linear in practice, no recursion.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, t));
            p += 1;
        } else if let Some((star, matched)) = backtrack {
            p = star + 1;
            t = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"keys": [
        {"access_key_id": "AKIAAPP", "secret_access_key": "s3cr3t-value", "principal": "arn:aws:iam::123456789012:role/app",
         "allow": ["arn:aws:rds-db:us-east-1:123456789012:dbuser:prx-1/app*"]},
        {"access_key_id": "ASIATEMP", "secret_access_key": "t", "session_token": "sess",
         "principal": "arn:aws:sts::123456789012:assumed-role/etl/x", "allow": ["arn:aws:rds-db:*:123456789012:dbuser:prx-1/*"]}
    ]}"#;

    #[test]
    fn keyring_loads_and_matches_policy_patterns() {
        let ring = Keyring::from_json(SAMPLE).unwrap();
        assert_eq!(ring.len(), 2);
        let app = ring.get("AKIAAPP").unwrap();
        assert!(app.allows(&connect_resource("us-east-1", "123456789012", "prx-1", "app")));
        assert!(app.allows(&connect_resource("us-east-1", "123456789012", "prx-1", "app_clone")));
        assert!(!app.allows(&connect_resource("us-east-1", "123456789012", "prx-1", "admin")));
        assert!(!app.allows(&connect_resource("eu-west-1", "123456789012", "prx-1", "app")));
        assert!(!app.allows(&connect_resource("us-east-1", "123456789012", "prx-2", "app")));
        let temp = ring.get("ASIATEMP").unwrap();
        assert!(temp.allows(&connect_resource("eu-west-1", "123456789012", "prx-1", "anyone")));
        assert!(temp.session_token.is_some());
    }

    #[test]
    fn wildcards_follow_iam_rules() {
        assert!(wildcard_match(b"a*c", b"abbbc"));
        assert!(wildcard_match(b"a*", b"a"));
        assert!(wildcard_match(b"a?c", b"abc"));
        assert!(!wildcard_match(b"a?c", b"ac"));
        assert!(!wildcard_match(b"abc", b"ABC"));
        assert!(wildcard_match(b"*/*", b"x/y"));
        assert!(!wildcard_match(b"*/app", b"x/apps"));
    }

    #[test]
    fn keyring_refuses_bad_entries_without_echoing_secrets() {
        let dup = r#"{"keys": [
            {"access_key_id": "A1", "secret_access_key": "x", "principal": "p", "allow": []},
            {"access_key_id": "A1", "secret_access_key": "y", "principal": "p", "allow": []}]}"#;
        assert!(matches!(Keyring::from_json(dup), Err(KeyringError::Entry { index: 1, .. })));
        let unknown = r#"{"keys": [{"access_key_id": "A1", "secret_access_key": "hunter2", "principal": "p", "allow": [], "extra": "hunter3"}]}"#;
        let e = Keyring::from_json(unknown).unwrap_err().to_string();
        assert!(!e.contains("hunter"), "{e}");
        let wrong_type = r#"{"keys": [{"access_key_id": "A1", "secret_access_key": "x", "principal": "p", "allow": "hun\"ter4"}]}"#;
        let e = Keyring::from_json(wrong_type).unwrap_err().to_string();
        assert!(!e.contains("ter4") && e.contains("invalid type") && e.contains("line 1"), "{e}");
        let ring = Keyring::from_json(SAMPLE).unwrap();
        let debug = format!("{ring:?}");
        assert!(!debug.contains("s3cr3t") && !debug.contains("sess\""), "{debug}");
    }
}
