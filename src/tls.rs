//! TLS on both sides, with rustls (aws-lc-rs provider, TLS 1.2 and 1.3).
//!
//! Client side: [`ClientTls`] holds the server certificate and key named in the config and
//! re-reads them when the files change, so a renewed certificate takes effect without a
//! restart; connections already up keep the certificate they started with.
//! Backend side: [`BackendTls`] implements libpq's `sslmode` choices `require` (encrypt, trust
//! any certificate), `verify-ca` (the chain must lead to the configured CA bundle) and
//! `verify-full` (that, and the certificate must name the host).
//! Also: certificate generation for `pgwarden dev` and the tests (a CA and a leaf it signs).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{BackendTlsMode, DatabaseConfig, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("certificate and key do not form a usable TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0} is not a valid TLS server name")]
    ServerName(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_owned(), reason: "no PEM certificate found".into() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    // The parse error names the PEM problem, never the key material.
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::Pem { path: path.to_owned(), reason: format!("no usable private key ({e})") })
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(read_certs(cert)?, read_key(key)?)?;
    Ok(Arc::new(config))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The client-facing TLS configuration, reloaded when its files change.
pub struct ClientTls {
    cert: PathBuf,
    key: PathBuf,
    /// Clients that do not ask for TLS are refused.
    pub require: bool,
    current: RwLock<Arc<ServerConfig>>,
    seen: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl ClientTls {
    pub fn load(cfg: &TlsConfig) -> Result<Arc<ClientTls>, TlsError> {
        let current = server_config(&cfg.cert, &cfg.key)?;
        Ok(Arc::new(ClientTls {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            require: cfg.require,
            current: RwLock::new(current),
            seen: Mutex::new((modified(&cfg.cert), modified(&cfg.key))),
        }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner())))
    }

    /// Re-reads the certificate and key if either file changed. A pair that does not load is
    /// logged and ignored: the previous one stays in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = (modified(&self.cert), modified(&self.key));
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return false;
        }
        match server_config(&self.cert, &self.key) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
                *seen = now;
                tracing::info!(cert = %self.cert.display(), "reloaded the TLS certificate");
                true
            }
            Err(e) => {
                // Possibly half-written (cert renewed, key not yet): try again next tick.
                tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the previous one");
                false
            }
        }
    }

    pub fn spawn_reload_loop(self: &Arc<Self>, every: Duration) {
        crate::periodic::spawn_every(self, every, |tls| async move {
            tls.reload_if_changed();
        });
    }
}

/// How pgwarden speaks TLS to the database.
pub struct BackendTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl BackendTls {
    /// `None` when the mode is `disable`.
    pub fn new(db: &DatabaseConfig) -> Result<Option<BackendTls>, TlsError> {
        let provider = provider();
        let roots = || -> Result<Arc<RootCertStore>, TlsError> {
            let mut roots = RootCertStore::empty();
            if let Some(ca) = &db.ca_file {
                for cert in read_certs(ca)? {
                    roots.add(cert).map_err(TlsError::Config)?;
                }
            }
            Ok(Arc::new(roots))
        };
        let verifier: Arc<dyn ServerCertVerifier> = match db.tls {
            BackendTlsMode::Disable => return Ok(None),
            BackendTlsMode::Require => Arc::new(AnyCertificate(Arc::clone(&provider))),
            BackendTlsMode::VerifyCa => Arc::new(ChainOnly(webpki(roots()?, &provider)?)),
            BackendTlsMode::VerifyFull => webpki(roots()?, &provider)?,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let server_name =
            ServerName::try_from(db.host.clone()).map_err(|_| TlsError::ServerName(db.host.clone()))?;
        Ok(Some(BackendTls { connector: TlsConnector::from(Arc::new(config)), server_name }))
    }

    pub fn connector(&self) -> (&TlsConnector, ServerName<'static>) {
        (&self.connector, self.server_name.clone())
    }
}

fn webpki(roots: Arc<RootCertStore>, provider: &Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(provider))
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))
}

/// `sslmode=require`: the connection is encrypted, the certificate is not checked (the
/// handshake signature still is).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

/// `sslmode=verify-ca`: the chain must be valid and lead to the CA bundle; the name is not
/// checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// PEM texts of a freshly made CA and of a server certificate it signed.
pub struct GeneratedCerts {
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
}

/// Makes a throwaway CA and a server certificate for `names` (DNS names or IP addresses), for
/// `pgwarden dev` and the tests.
pub fn generate_certs(names: &[&str]) -> Result<GeneratedCerts, TlsError> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "pgwarden throwaway CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let ca = ca_params.self_signed(&ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("pgwarden"));
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    Ok(GeneratedCerts { ca_cert: ca.pem(), cert: cert.pem(), key: key.serialize_pem() })
}

/// Writes `generate_certs(names)` into `dir` as `ca.crt`, `server.crt`, `server.key` (0600).
pub fn write_generated_certs(dir: &Path, names: &[&str]) -> Result<(PathBuf, PathBuf, PathBuf), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let g = generate_certs(names)?;
    let paths = (dir.join("ca.crt"), dir.join("server.crt"), dir.join("server.key"));
    let write = |path: &Path, text: &str| std::fs::write(path, text).map_err(|source| TlsError::Read { path: path.to_owned(), source });
    write(&paths.0, &g.ca_cert)?;
    write(&paths.1, &g.cert)?;
    write(&paths.2, &g.key)?;
    std::fs::set_permissions(&paths.2, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| TlsError::Read { path: paths.2.clone(), source })?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tls_reloads_a_renewed_certificate_and_keeps_the_old_one_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (_, cert, key) = write_generated_certs(dir.path(), &["localhost"]).unwrap();
        let tls = ClientTls::load(&TlsConfig { cert: cert.clone(), key: key.clone(), require: false, reload_interval: Duration::from_secs(1) }).unwrap();
        assert!(!tls.reload_if_changed(), "nothing changed yet");
        let before = Arc::as_ptr(&tls.current.read().unwrap());
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(!tls.reload_if_changed(), "a broken certificate must not replace a good one");
        assert_eq!(Arc::as_ptr(&tls.current.read().unwrap()), before);
        write_generated_certs(dir.path(), &["localhost"]).unwrap();
        assert!(tls.reload_if_changed());
        assert_ne!(Arc::as_ptr(&tls.current.read().unwrap()), before);
    }

    #[test]
    fn key_file_errors_name_the_file_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (_, cert, key) = write_generated_certs(dir.path(), &["localhost"]).unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n").unwrap();
        let err = ClientTls::load(&TlsConfig { cert, key: key.clone(), require: false, reload_interval: Duration::from_secs(1) })
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("c2VjcmV0") && !err.contains("secret-secret"), "{err}");
    }
}
