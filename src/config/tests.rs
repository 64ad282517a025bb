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
}

#[test]
fn unknown_key_is_refused_with_its_name() {
    let err = parse("[database]\nhost = \"db\"\npassword = \"hunter2\"\n").unwrap_err().to_string();
    assert!(err.contains("password") && err.contains("test.toml:3"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn bad_duration_names_key_and_reason() {
    let err = parse("[database]\nhost = \"db\"\n[pool]\nborrow_timeout = \"12 parsecs\"\n").unwrap_err().to_string();
    assert!(err.starts_with("pool.borrow_timeout: invalid duration"), "{err}");
}

#[test]
fn off_disables_optional_timeouts() {
    let c = parse("[database]\nhost = \"db\"\n[pool]\nidle_client_timeout = \"off\"\n").unwrap();
    assert_eq!(c.pool.idle_client_timeout, None);
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
