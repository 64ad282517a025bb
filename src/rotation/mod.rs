//! The rotator: the four Secrets Manager rotation steps for an RDS PostgreSQL secret, as the
//! official rotation templates run them, for `pgwarden rotate` and the Lambda handler.
//!
//! - `createSecret`: a new version (the rotation's `ClientRequestToken`) labelled AWSPENDING,
//!   with a fresh 32-character password (GetRandomPassword, without `:/@"'\`); for the
//!   alternating-users strategy, the other user name (`app` ↔ `app_clone`).
//! - `setSecret`: makes the database accept the pending credential (see [`database`]).
//! - `testSecret`: logs in with the pending credential and runs `SELECT NOW()`.
//! - `finishSecret`: moves AWSCURRENT to the new version (the old one becomes AWSPREVIOUS) and
//!   takes AWSPENDING off it.
//!
//! Every step is idempotent and checks the version's stages first, as the templates do. The
//! password reaches PostgreSQL only as a SCRAM verifier. Must not: log a password.

mod database;

use aws_sdk_secretsmanager::Client;
use secrecy::{ExposeSecret, SecretString};

use crate::credentials::CredentialError;
use crate::credentials::aws::{CURRENT, PENDING, PREVIOUS, aws_error};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// One user; its password changes (ALTER USER).
    Single,
    /// Two users (`app`, `app_clone`) take turns; the master secret (`masterarn`) sets them.
    Alternating,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    CreateSecret,
    SetSecret,
    TestSecret,
    FinishSecret,
}

impl Step {
    pub fn parse(s: &str) -> Option<Step> {
        match s {
            "createSecret" => Some(Step::CreateSecret),
            "setSecret" => Some(Step::SetSecret),
            "testSecret" => Some(Step::TestSecret),
            "finishSecret" => Some(Step::FinishSecret),
            _ => None,
        }
    }

    pub const ALL: [Step; 4] = [Step::CreateSecret, Step::SetSecret, Step::TestSecret, Step::FinishSecret];
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Aws(#[from] CredentialError),
    #[error("secret version {0} is not part of this secret's rotation")]
    UnknownVersion(String),
    #[error("secret version {0} is not AWSPENDING")]
    NotPending(String),
    #[error("the secret value is not an RDS secret JSON object with username and password")]
    BadSecret,
    #[error("alternating-users rotation needs \"masterarn\" in the secret")]
    NoMasterArn,
    #[error("database: {0}")]
    Database(#[from] crate::backend::BackendError),
    #[error("database refused {what}: {code} {message}")]
    Sql { what: &'static str, code: String, message: String },
    #[error("none of AWSCURRENT, AWSPREVIOUS can log in to set the new password")]
    NoWorkingLogin,
}

pub struct Rotator {
    client: Client,
    secret_id: String,
    strategy: Strategy,
    /// Passed through to PutSecretValue, as the rotation event carries it.
    rotation_token: Option<String>,
}

/// A secret version's JSON, kept whole so fields we do not use survive rotation.
#[derive(Clone)]
pub(crate) struct SecretValue(serde_json::Map<String, serde_json::Value>);

impl SecretValue {
    fn parse(text: &str) -> Result<SecretValue, RotationError> {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) if map.get("username").is_some_and(|v| v.is_string()) && map.get("password").is_some_and(|v| v.is_string()) => {
                Ok(SecretValue(map))
            }
            _ => Err(RotationError::BadSecret),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_str())
    }

    pub(crate) fn username(&self) -> &str {
        self.str("username").unwrap_or_default()
    }

    pub(crate) fn password(&self) -> SecretString {
        SecretString::from(self.str("password").unwrap_or_default())
    }

    pub(crate) fn credential(&self) -> crate::credentials::Credential {
        crate::credentials::Credential {
            username: self.username().to_owned(),
            password: self.password(),
            engine: None,
            host: None,
            port: None,
            dbname: None,
            masterarn: None,
        }
    }
}

/// `app` → `app_clone`, `app_clone` → `app` (the alternating-users template's naming).
pub fn other_user(user: &str) -> String {
    match user.strip_suffix("_clone") {
        Some(base) => base.to_owned(),
        None => format!("{user}_clone"),
    }
}

impl Rotator {
    pub fn new(client: Client, secret_id: String, strategy: Strategy, rotation_token: Option<String>) -> Rotator {
        Rotator { client, secret_id, strategy, rotation_token }
    }

    /// Runs all four steps for a new secret version (its id is the steps' ClientRequestToken, a
    /// UUID, not a credential); returns that id.
    pub async fn rotate(&self) -> Result<String, RotationError> {
        let version_id = new_token();
        for step in Step::ALL {
            self.run_step(step, &version_id).await?;
        }
        Ok(version_id)
    }

    /// Runs one step for the secret version `version_id` (the ClientRequestToken), after the
    /// templates' stage checks.
    pub async fn run_step(&self, step: Step, version_id: &str) -> Result<(), RotationError> {
        let stages = self.stages_of(version_id).await?;
        match (&stages, step) {
            // createSecret may make the version itself (pgwarden drives rotation without
            // RotateSecret); every other step needs it to exist and be pending.
            (None, Step::CreateSecret) => {}
            (None, _) => return Err(RotationError::UnknownVersion(version_id.to_owned())),
            (Some(s), _) if s.iter().any(|s| s == CURRENT) => {
                tracing::info!(step = ?step, version_id, "version is already AWSCURRENT; nothing to do");
                return Ok(());
            }
            (Some(s), _) if !s.iter().any(|s| s == PENDING) => return Err(RotationError::NotPending(version_id.to_owned())),
            _ => {}
        }
        tracing::info!(step = ?step, secret = %self.secret_id, version_id, strategy = ?self.strategy, "rotation step");
        match step {
            Step::CreateSecret => self.create_secret(version_id).await,
            Step::SetSecret => self.set_secret(version_id).await,
            Step::TestSecret => self.test_secret(version_id).await,
            Step::FinishSecret => self.finish_secret(version_id).await,
        }
    }

    async fn stages_of(&self, version_id: &str) -> Result<Option<Vec<String>>, RotationError> {
        let out = self.client.describe_secret().secret_id(&self.secret_id).send().await.map_err(|e| aws_error("DescribeSecret", e))?;
        Ok(out.version_ids_to_stages().and_then(|m| m.get(version_id)).cloned())
    }

    pub(crate) async fn get(&self, secret_id: &str, stage: &str, version: Option<&str>) -> Result<Option<SecretValue>, RotationError> {
        let mut req = self.client.get_secret_value().secret_id(secret_id).version_stage(stage);
        if let Some(v) = version {
            req = req.version_id(v);
        }
        match req.send().await {
            Ok(out) => Ok(Some(SecretValue::parse(out.secret_string().ok_or(RotationError::BadSecret)?)?)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => Ok(None),
            Err(e) => Err(aws_error("GetSecretValue", e).into()),
        }
    }

    async fn create_secret(&self, version_id: &str) -> Result<(), RotationError> {
        let current = self.get(&self.secret_id, CURRENT, None).await?.ok_or(RotationError::Aws(CredentialError::MissingStage(CURRENT)))?;
        if self.get(&self.secret_id, PENDING, Some(version_id)).await?.is_some() {
            tracing::info!(version_id, "createSecret: pending version exists already");
            return Ok(());
        }
        let password = self
            .client
            .get_random_password()
            .password_length(32)
            .exclude_characters(":/@\"'\\")
            .send()
            .await
            .map_err(|e| aws_error("GetRandomPassword", e))?;
        let password = password.random_password().ok_or(RotationError::BadSecret)?.to_owned();
        let mut next = current.0.clone();
        next.insert("password".into(), serde_json::Value::String(password));
        if self.strategy == Strategy::Alternating {
            next.insert("username".into(), serde_json::Value::String(other_user(current.username())));
        }
        let text = SecretString::from(serde_json::Value::Object(next).to_string());
        let mut put = self
            .client
            .put_secret_value()
            .secret_id(&self.secret_id)
            .client_request_token(version_id)
            .secret_string(text.expose_secret())
            .version_stages(PENDING);
        if let Some(t) = &self.rotation_token {
            put = put.rotation_token(t);
        }
        put.send().await.map_err(|e| aws_error("PutSecretValue", e))?;
        Ok(())
    }

    async fn pending(&self, version_id: &str) -> Result<SecretValue, RotationError> {
        self.get(&self.secret_id, PENDING, Some(version_id)).await?.ok_or_else(|| RotationError::NotPending(version_id.to_owned()))
    }

    async fn set_secret(&self, version_id: &str) -> Result<(), RotationError> {
        let pending = self.pending(version_id).await?;
        if database::can_log_in(&pending).await {
            tracing::info!(version_id, "setSecret: the pending credential works already");
            return Ok(());
        }
        let current = self.get(&self.secret_id, CURRENT, None).await?;
        match self.strategy {
            Strategy::Single => {
                // The template's fallback: if AWSCURRENT no longer logs in, AWSPREVIOUS may.
                let previous = self.get(&self.secret_id, PREVIOUS, None).await?;
                for login in [current.as_ref(), previous.as_ref()].into_iter().flatten() {
                    if login.username() != pending.username() {
                        continue;
                    }
                    match database::open(login, &pending).await {
                        Ok(mut conn) => return database::set_password(&mut conn, &pending, None).await,
                        Err(e) if e.is_auth_failure() => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(RotationError::NoWorkingLogin)
            }
            Strategy::Alternating => {
                let current = current.ok_or(RotationError::Aws(CredentialError::MissingStage(CURRENT)))?;
                let master_arn = current.str("masterarn").ok_or(RotationError::NoMasterArn)?.to_owned();
                let master = self.get(&master_arn, CURRENT, None).await?.ok_or(RotationError::NoMasterArn)?;
                let mut conn = database::open(&master, &pending).await?;
                database::set_password(&mut conn, &pending, Some(current.username())).await
            }
        }
    }

    async fn test_secret(&self, version_id: &str) -> Result<(), RotationError> {
        let pending = self.pending(version_id).await?;
        let mut conn = database::open(&pending, &pending).await?;
        database::run(&mut conn, "SELECT NOW()", "SELECT NOW()").await
    }

    async fn finish_secret(&self, version_id: &str) -> Result<(), RotationError> {
        let out = self.client.describe_secret().secret_id(&self.secret_id).send().await.map_err(|e| aws_error("DescribeSecret", e))?;
        let current = out
            .version_ids_to_stages()
            .into_iter()
            .flatten()
            .find(|(_, stages)| stages.iter().any(|s| s == CURRENT))
            .map(|(v, _)| v.clone());
        if current.as_deref() != Some(version_id) {
            let mut update = self.client.update_secret_version_stage().secret_id(&self.secret_id).version_stage(CURRENT).move_to_version_id(version_id);
            if let Some(c) = &current {
                update = update.remove_from_version_id(c);
            }
            update.send().await.map_err(|e| aws_error("UpdateSecretVersionStage", e))?;
        }
        // Done rotating: the new version is no longer pending (moto will not start the next
        // rotation while AWSPENDING and AWSCURRENT share a version).
        self.client
            .update_secret_version_stage()
            .secret_id(&self.secret_id)
            .version_stage(PENDING)
            .remove_from_version_id(version_id)
            .send()
            .await
            .map_err(|e| aws_error("UpdateSecretVersionStage", e))?;
        Ok(())
    }
}

/// A random version id in UUID v4 form, as Secrets Manager's ClientRequestToken.
pub fn new_token() -> String {
    let b: [u8; 16] = rand::random();
    let h = crate::auth::sigv4::hex(&b);
    format!("{}-{}-4{}-{:x}{}-{}", &h[0..8], &h[8..12], &h[13..16], 8 | (b[8] & 3), &h[17..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternating_users_flip_between_base_and_clone() {
        assert_eq!(other_user("app"), "app_clone");
        assert_eq!(other_user("app_clone"), "app");
    }

    #[test]
    fn tokens_look_like_uuid_v4() {
        let t = new_token();
        assert_eq!(t.len(), 36);
        assert_eq!(t.as_bytes()[14], b'4');
        assert!(matches!(t.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{t}");
        assert_ne!(t, new_token());
    }

    #[test]
    fn secret_values_need_username_and_password() {
        assert!(SecretValue::parse(r#"{"username":"a","password":"b","host":"h"}"#).is_ok());
        assert!(matches!(SecretValue::parse(r#"{"username":"a"}"#), Err(RotationError::BadSecret)));
        assert!(matches!(SecretValue::parse("[1]"), Err(RotationError::BadSecret)));
    }
}
