use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("test.toml"), Path::new("."))
}

#[test]
fn minimal_config_gets_rds_proxy_defaults() {
    let c = parse("[database]\nhost = \"db\"\n").unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:6432");
    assert_eq!(c.database.port, 5432);
    assert_eq!(c.pool.borrow_timeout, Duration::from_secs(120));
    assert_eq!(c.pool.idle_client_timeout, Some(Duration::from_secs(1800)));
    assert_eq!(c.pool.client_max_lifetime, Some(Duration::from_secs(24 * 3600)));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
    assert_eq!(c.tcp_keepalive, Some(Duration::from_secs(60)));
    assert_eq!(c.database.tcp_keepalive, c.tcp_keepalive, "backend sockets use the same setting");
}

#[test]
fn tcp_keepalive_can_be_off_but_not_sub_second() {
    let c = parse("tcp_keepalive = \"off\"\n[database]\nhost = \"db\"\n").unwrap();
    assert_eq!((c.tcp_keepalive, c.database.tcp_keepalive), (None, None));
    let err = parse("tcp_keepalive = \"500ms\"\n[database]\nhost = \"db\"\n").unwrap_err().to_string();
    assert!(err.starts_with("tcp_keepalive: must be at least 1s"), "{err}");
}

#[test]
fn backend_login_retry_delay_defaults_to_a_second_and_is_never_zero() {
    let c = parse("[database]\nhost = \"db\"\n").unwrap();
    assert_eq!(c.pool.backend_login_retry_delay, Duration::from_secs(1));
    let err = parse("[database]\nhost = \"db\"\n[pool]\nbackend_login_retry_delay = \"0s\"\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.backend_login_retry_delay: must be more than 0"), "{err}");
}

#[test]
fn max_total_backend_connections_is_off_by_default_and_never_zero() {
    let c = parse("[database]\nhost = \"db\"\n").unwrap();
    assert_eq!(c.pool.max_total_backend_connections, None);
    let c = parse("[database]\nhost = \"db\"\n[pool]\nmax_total_backend_connections = 50\n").unwrap();
    assert_eq!(c.pool.max_total_backend_connections, Some(50));
    let err = parse("[database]\nhost = \"db\"\n[pool]\nmax_total_backend_connections = 0\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.max_total_backend_connections: must be at least 1"), "{err}");
}

#[test]
fn durations_longer_than_ten_years_are_refused_with_the_key() {
    let err = parse("[database]\nhost = \"db\"\n[pool]\nborrow_timeout = \"500000000years\"\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.borrow_timeout: \"500000000years\" is longer than 10 years"), "{err}");
    assert!(parse("[database]\nhost = \"db\"\n[pool]\nborrow_timeout = \"3650days\"\n").is_ok());
}

#[test]
fn max_connections_percent_is_a_percentage_and_not_beside_a_count() {
    let c = parse("[database]\nhost = \"db\"\n[pool]\nmax_connections_percent = 90\n").unwrap();
    assert_eq!(c.pool.max_connections_percent, Some(90));
    for bad in ["0", "101"] {
        let err = parse(&format!("[database]\nhost = \"db\"\n[pool]\nmax_connections_percent = {bad}\n")).unwrap_err().to_string();
        assert!(err.starts_with("pool.max_connections_percent: must be between 1 and 100"), "{err}");
    }
    let both = "[database]\nhost = \"db\"\n[pool]\nmax_connections_percent = 50\nmax_total_backend_connections = 9\n";
    let err = parse(both).unwrap_err().to_string();
    assert!(err.starts_with("pool.max_connections_percent: set it or pool.max_total_backend_connections"), "{err}");
}

#[test]
fn session_pinning_filters_take_rds_proxys_one_filter() {
    let c = parse("[database]\nhost = \"db\"\n").unwrap();
    assert!(c.pool.pin_variable_sets, "SETs pin by default, as on RDS Proxy");
    let c = parse("[database]\nhost = \"db\"\n[pool]\nsession_pinning_filters = [\"EXCLUDE_VARIABLE_SETS\"]\n").unwrap();
    assert!(!c.pool.pin_variable_sets);
    let err = parse("[database]\nhost = \"db\"\n[pool]\nsession_pinning_filters = [\"exclude_temp\"]\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.session_pinning_filters: unknown filter \"exclude_temp\""), "{err}");
}

#[test]
fn max_prepared_statements_defaults_to_pgbouncers_and_is_capped() {
    assert_eq!(parse("[database]\nhost = \"db\"\n").unwrap().pool.max_prepared_statements, 200);
    let c = parse("[database]\nhost = \"db\"\n[pool]\nmax_prepared_statements = 0\n").unwrap();
    assert_eq!(c.pool.max_prepared_statements, 0, "0: named statements pin, as on RDS Proxy");
    let err = parse("[database]\nhost = \"db\"\n[pool]\nmax_prepared_statements = 100001\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.max_prepared_statements: must be at most 100000"), "{err}");
}

#[test]
fn shutdown_timeout_and_client_cap_are_checked() {
    let err = parse("shutdown_timeout = \"soon\"\n[database]\nhost = \"db\"\n").unwrap_err().to_string();
    assert!(err.starts_with("shutdown_timeout: invalid duration"), "{err}");
    // The drain counts clients with a u32 semaphore request.
    let err = parse("[database]\nhost = \"db\"\n[pool]\nmax_client_connections = 4294967296\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.max_client_connections: must be between 1 and 4294967295"), "{err}");
}

#[test]
fn unknown_key_is_refused_with_its_name() {
    let err = parse("[database]\nhost = \"db\"\npassword = \"hunter2\"\n").unwrap_err().to_string();
    assert!(err.contains("password") && err.contains("test.toml:3"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn target_session_attrs_take_libpq_names() {
    assert_eq!(parse("[database]\nhost = \"db\"\n").unwrap().database.target_session_attrs, SessionAttrs::Any);
    let c = parse("[database]\nhost = \"db\"\ntarget_session_attrs = \"read-write\"\n").unwrap();
    assert_eq!(c.database.target_session_attrs, SessionAttrs::ReadWrite);
    let err = parse("[database]\nhost = \"db\"\ntarget_session_attrs = \"standby\"\n").unwrap_err().to_string();
    assert!(err.starts_with("database.target_session_attrs: must be"), "{err}");
}

#[test]
fn bad_duration_names_key_and_reason() {
    let err = parse("[database]\nhost = \"db\"\n[pool]\nborrow_timeout = \"12 parsecs\"\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.borrow_timeout: invalid duration"), "{err}");
}

#[test]
fn off_disables_optional_timeouts() {
    let c = parse("[database]\nhost = \"db\"\n[pool]\nidle_client_timeout = \"off\"\nclient_max_lifetime = \"off\"\n").unwrap();
    assert_eq!((c.pool.idle_client_timeout, c.pool.client_max_lifetime), (None, None));
    let err = parse("[database]\nhost = \"db\"\n[pool]\nclient_max_lifetime = \"500ms\"\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.client_max_lifetime: must be at least 1s"), "{err}");
}

#[test]
fn missing_credential_file_is_refused() {
    let err = parse("[database]\nhost = \"db\"\n[[credentials]]\nuser = \"app\"\nsource = \"file\"\npath = \"/nonexistent/x.json\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("credentials[0].path:"), "{err}");
}

#[test]
fn duplicate_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("s.json");
    std::fs::write(&f, "{}").unwrap();
    let entry = format!("[[credentials]]\nuser = \"app\"\nsource = \"file\"\npath = \"{}\"\n", f.display());
    let err = parse(&format!("[database]\nhost = \"db\"\n{entry}{entry}")).unwrap_err().to_string();
    assert!(err.contains("two credential entries"), "{err}");
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgwarden.example.toml");
    Config::from_file(&path).unwrap();
}

fn with_files(extra: &str) -> (tempfile::TempDir, Result<Config, ConfigError>) {
    let dir = tempfile::tempdir().unwrap();
    for f in ["cert.pem", "key.pem", "ca.pem", "keyring.json", "secret.json"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let text = format!("[database]\nhost = \"db\"\n{extra}");
    let parsed = Config::from_toml(&text, Path::new("test.toml"), dir.path());
    (dir, parsed)
}

const IAM: &str = "[iam]\nendpoints = [\"proxy.example.com:5432\", \"LocalHost\"]\nproxy_id = \"prx-1\"\naccount_id = \"123456789012\"\nkeyring = { source = \"file\", path = \"keyring.json\" }\n";
const TLS: &str = "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nrequire = true\n";
const IAM_USER: &str = "[[credentials]]\nuser = \"app\"\nsource = \"file\"\npath = \"secret.json\"\niam_auth = \"required\"\n";

#[test]
fn tls_iam_and_audit_sections_validate_into_typed_settings() {
    let (_dir, c) = with_files(&format!("{TLS}{IAM}[audit]\noutput = \"audit.log\"\n{IAM_USER}"));
    let c = c.unwrap();
    assert!(c.tls.as_ref().unwrap().require);
    let iam = c.iam.unwrap();
    assert_eq!(iam.endpoints, vec![("proxy.example.com".to_owned(), Some(5432)), ("localhost".to_owned(), None)]);
    assert_eq!(iam.max_clock_skew, Duration::from_secs(300));
    assert!(matches!(c.audit, AuditTarget::File(ref p) if p.ends_with("audit.log")));
    assert_eq!(c.credentials[0].iam_auth, IamAuth::Required);
}

#[test]
fn iam_auth_needs_iam_and_tls_sections() {
    let (_dir, c) = with_files(&format!("{TLS}{IAM_USER}"));
    assert!(c.unwrap_err().to_string().starts_with("credentials[0].iam_auth: needs an [iam] section"));
    let (_dir, c) = with_files(&format!("{IAM}{IAM_USER}"));
    assert!(c.unwrap_err().to_string().starts_with("credentials[0].iam_auth: needs a [tls] section"));
}

#[test]
fn keyring_can_be_a_secrets_manager_secret() {
    let toml = IAM.replace("source = \"file\", path = \"keyring.json\"", "source = \"aws\", secret_id = \"pgwarden/keyring\", region = \"eu-west-1\"");
    let (_dir, c) = with_files(&toml);
    match c.unwrap().iam.unwrap().keyring {
        KeyringSourceConfig::Aws { secret_id, region, endpoint_url } => {
            assert_eq!((secret_id.as_str(), region.as_deref(), endpoint_url), ("pgwarden/keyring", Some("eu-west-1"), None));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_tls_and_iam_values_name_their_keys() {
    let cases = [
        ("[tls]\ncert = \"missing.pem\"\nkey = \"key.pem\"\n", "tls.cert:"),
        (&IAM.replace("123456789012", "12345"), "iam.account_id:"),
        (&IAM.replace("\"LocalHost\"", "\"host:notaport\""), "iam.endpoints:"),
        (&IAM.replace("prx-1", "prx/1"), "iam.proxy_id:"),
        (&IAM.replace("keyring.json", "nope.json"), "iam.keyring.path:"),
        (&IAM.replace("source = \"file\"", "source = \"s3\""), "iam.keyring.source:"),
        (&IAM.replace("source = \"file\", path = \"keyring.json\"", "source = \"aws\""), "iam.keyring.secret_id: required"),
        (&IAM.replace("source = \"file\"", "source = \"aws\", secret_id = \"k\""), "iam.keyring.path: only for"),
        (&IAM.replace("source = \"file\"", "source = \"file\", region = \"us-east-1\""), "iam.keyring.secret_id: secret_id, region"),
        (&format!("{IAM_USER}").replace("required", "sometimes"), "credentials[0].iam_auth:"),
        ("[audit]\noutput = \"\"\n", "audit.output:"),
    ];
    for (extra, key) in cases {
        let (_dir, c) = with_files(extra);
        let err = c.unwrap_err().to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
}

#[test]
fn backend_tls_modes_parse_and_verify_modes_need_a_ca() {
    for (mode, want) in [("require", BackendTlsMode::Require), ("verify-ca", BackendTlsMode::VerifyCa), ("verify-full", BackendTlsMode::VerifyFull)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let text = format!("[database]\nhost = \"db\"\ntls = \"{mode}\"\nca_file = \"ca.pem\"\n");
        assert_eq!(Config::from_toml(&text, Path::new("t.toml"), dir.path()).unwrap().database.tls, want);
    }
    let err = parse("[database]\nhost = \"db\"\ntls = \"verify-full\"\n").unwrap_err().to_string();
    assert!(err.starts_with("database.ca_file: required"), "{err}");
    let err = parse("[database]\nhost = \"db\"\ntls = \"prefer\"\n").unwrap_err().to_string();
    assert!(err.starts_with("database.tls:"), "{err}");
}
