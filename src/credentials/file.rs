//! The `file` credential source: a JSON file in the RDS secret shape (optionally staged), for
//! development and for deployments that mount secrets as files. Re-read on every refresh, so an
//! atomic rename of a new file is picked up at the next tick.

use std::path::PathBuf;

use super::{BoxFuture, CredentialError, CredentialSource, StagedSecret, parse_secret_json};

pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: PathBuf) -> FileSource {
        FileSource { path }
    }
}

impl CredentialSource for FileSource {
    fn fetch(&self) -> BoxFuture<'_, Result<StagedSecret, CredentialError>> {
        Box::pin(async move {
            let text = tokio::fs::read_to_string(&self.path)
                .await
                .map_err(|source| CredentialError::Io { path: self.path.clone(), source })?;
            parse_secret_json(&text)
        })
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
}
