//! The rotator behind AWS Lambda: Secrets Manager invokes it with the standard rotation event
//! (`Step`, `SecretId`, `ClientRequestToken`, `RotationToken`) and it runs that one step, as
//! `pgwarden rotate --step ... --token ...` would. The strategy comes from the
//! `PGWARDEN_ROTATION_STRATEGY` environment variable (`single`, the default, or `alternating`).
//! Built only with `--features lambda`.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use pgwarden::rotation::{Rotator, Step, Strategy};
use serde::Deserialize;

/// Secrets Manager's rotation event.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RotationEvent {
    step: String,
    secret_id: String,
    client_request_token: String,
    #[serde(default)]
    rotation_token: Option<String>,
}

async fn handle(event: LambdaEvent<RotationEvent>) -> Result<(), Error> {
    let e = event.payload;
    let step = Step::parse(&e.step).ok_or_else(|| format!("unknown rotation step {:?}", e.step))?;
    let strategy = match std::env::var("PGWARDEN_ROTATION_STRATEGY").as_deref() {
        Ok("alternating") => Strategy::Alternating,
        Ok("single") | Err(_) => Strategy::Single,
        Ok(other) => return Err(format!("PGWARDEN_ROTATION_STRATEGY={other:?}: use single or alternating").into()),
    };
    let client = pgwarden::credentials::aws::client(None, None).await;
    let rotator = Rotator::new(client, e.secret_id, strategy, e.rotation_token);
    rotator.run_step(step, &e.client_request_token).await?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new("info")).with_target(false).without_time().init();
    lambda_runtime::run(service_fn(handle)).await
}
