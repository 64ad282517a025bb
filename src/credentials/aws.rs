//! The `aws` credential source: an RDS secret in AWS Secrets Manager, read with the standard
//! credential chain and region (and the standard `AWS_ENDPOINT_URL_SECRETS_MANAGER` /
//! `AWS_ENDPOINT_URL` overrides, or `endpoint_url` from the config).
//!
//! Each fetch asks `DescribeSecret` which version carries which stage, and calls
//! `GetSecretValue` (always with an explicit `VersionStage`) only for stages whose version
//! moved since the last fetch; the rest come from the previous snapshot. So a steady secret
//! costs one cheap call per refresh. Errors say which call failed and how, never the secret.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata};

use super::{BoxFuture, Credential, CredentialError, CredentialSource, StagedSecret, parse_secret_json};

pub const CURRENT: &str = "AWSCURRENT";
pub const PENDING: &str = "AWSPENDING";
pub const PREVIOUS: &str = "AWSPREVIOUS";

/// Builds a Secrets Manager client from the standard AWS configuration chain, with bounded
/// timeouts so an unreachable endpoint fails a refresh instead of stalling it.
pub async fn client(endpoint_url: Option<&str>, region: Option<&str>) -> Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(Duration::from_secs(5))
        .operation_timeout(Duration::from_secs(12))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts);
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    Client::new(&loader.load().await)
}

/// Turns an SDK error into a [`CredentialError`] that names the call and the service's error
/// code (e.g. `AccessDeniedException`, `ResourceNotFoundException`) or HTTP status, or the
/// transport failure. Transient: no response, throttling, or a 5xx.
pub fn aws_error<E>(op: &'static str, e: aws_sdk_secretsmanager::error::SdkError<E>) -> CredentialError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    // Some endpoints (moto, proxies) answer in XML, which the JSON protocol cannot parse: take
    // the <Code> from the body then.
    let xml_code = e.raw_response().and_then(|r| r.body().bytes()).and_then(xml_error_code);
    let code = e.as_service_error().and_then(|s| s.code()).map(str::to_owned).or(xml_code);
    let detail = match (&code, status) {
        (Some(code), _) => {
            let message = e.as_service_error().and_then(|s| s.message()).unwrap_or_default();
            format!("{code} (HTTP {}){}{message}", status.unwrap_or(0), if message.is_empty() { "" } else { ": " })
        }
        (None, Some(status)) => format!("HTTP {status}"),
        (None, None) => DisplayErrorContext(&e).to_string(),
    };
    let transient = match status {
        None => true,
        Some(s) => s == 429 || s >= 500 || code.as_deref() == Some("ThrottlingException"),
    };
    CredentialError::Aws { op, transient, detail }
}

fn xml_error_code(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = &text[start..start + len];
    (code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')).then(|| code.to_owned())
}

/// What was fetched last: version id per stage, and the secret those versions hold.
struct Seen {
    versions: HashMap<&'static str, String>,
    secret: StagedSecret,
}

pub struct SecretsManagerSource {
    client: Client,
    secret_id: String,
    last: Mutex<Option<Seen>>,
}

impl SecretsManagerSource {
    pub fn new(client: Client, secret_id: String) -> SecretsManagerSource {
        SecretsManagerSource { client, secret_id, last: Mutex::new(None) }
    }

    /// Version id of each stage, from `DescribeSecret`.
    async fn stage_versions(&self) -> Result<HashMap<&'static str, String>, CredentialError> {
        let out = self.client.describe_secret().secret_id(&self.secret_id).send().await.map_err(|e| aws_error("DescribeSecret", e))?;
        let mut versions = HashMap::new();
        for (version, stages) in out.version_ids_to_stages().into_iter().flatten() {
            for stage in [CURRENT, PENDING, PREVIOUS] {
                if stages.iter().any(|s| s == stage) {
                    versions.insert(stage, version.clone());
                }
            }
        }
        Ok(versions)
    }

    async fn get(&self, stage: &'static str) -> Result<Credential, CredentialError> {
        let out = self
            .client
            .get_secret_value()
            .secret_id(&self.secret_id)
            .version_stage(stage)
            .send()
            .await
            .map_err(|e| aws_error("GetSecretValue", e))?;
        let text = out.secret_string().ok_or(CredentialError::NotAString)?;
        // A stage holds one plain RDS secret.
        Ok(parse_secret_json(text)?.current)
    }

    async fn fetch_inner(&self) -> Result<StagedSecret, CredentialError> {
        let versions = self.stage_versions().await?;
        if !versions.contains_key(CURRENT) {
            return Err(CredentialError::MissingStage(CURRENT));
        }
        let previous = {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            last.as_ref().map(|seen| (seen.versions.clone(), seen.secret.clone()))
        };
        let unchanged = |stage: &'static str, old: &Option<(HashMap<&'static str, String>, StagedSecret)>| {
            old.as_ref().is_some_and(|(v, _)| v.get(stage) == versions.get(stage))
        };
        if unchanged(CURRENT, &previous) && unchanged(PENDING, &previous) && unchanged(PREVIOUS, &previous) {
            if let Some((_, secret)) = previous {
                return Ok(secret);
            }
        }
        let old = previous.as_ref().map(|(_, s)| s);
        let fetch = async |stage: &'static str, cached: Option<&Credential>| -> Result<Option<Credential>, CredentialError> {
            if !versions.contains_key(stage) {
                return Ok(None);
            }
            match cached {
                Some(c) if unchanged(stage, &previous) => Ok(Some(c.clone())),
                _ => self.get(stage).await.map(Some),
            }
        };
        let current = fetch(CURRENT, old.map(|s| &s.current)).await?.ok_or(CredentialError::MissingStage(CURRENT))?;
        // A pending or previous version that cannot be read is not fatal: AWSCURRENT still is.
        let pending = match fetch(PENDING, old.and_then(|s| s.pending.as_ref())).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(secret = %self.secret_id, error = %e, "cannot read AWSPENDING; using AWSCURRENT only");
                None
            }
        };
        let previous_stage = match fetch(PREVIOUS, old.and_then(|s| s.previous.as_ref())).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(secret = %self.secret_id, error = %e, "cannot read AWSPREVIOUS");
                None
            }
        };
        let secret = StagedSecret { current, pending, previous: previous_stage };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Seen { versions, secret: secret.clone() });
        Ok(secret)
    }
}

impl CredentialSource for SecretsManagerSource {
    fn fetch(&self) -> BoxFuture<'_, Result<StagedSecret, CredentialError>> {
        Box::pin(self.fetch_inner())
    }

    fn describe(&self) -> String {
        format!("secretsmanager:{}", self.secret_id)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn xml_error_codes_are_read_and_bounded() {
        let body = b"<ErrorResponse><Errors><Error><Code>AccessDenied</Code><Message>no</Message></Error></Errors></ErrorResponse>";
        assert_eq!(super::xml_error_code(body).as_deref(), Some("AccessDenied"));
        assert_eq!(super::xml_error_code(b"<Code>not a code!</Code>"), None);
        assert_eq!(super::xml_error_code(b"{}"), None);
    }
}
