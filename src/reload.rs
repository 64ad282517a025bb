//! Reloading the configuration file while pgwarden serves: on SIGHUP, as PgBouncer reloads
//! its file (RDS Proxy likewise applies a changed target group without a restart). A reload
//! changes the credential entries (users added, removed, or pointed at another source) and
//! every `[pool]` key: the pools' size, timing and the cap on all of them at once (see
//! `Pools::reconfigure`), `max_client_connections` for the next client, and what a session
//! takes when it starts (`login_timeout`, `idle_client_timeout`, `max_message_bytes`,
//! `session_pinning_filters`, `max_prepared_statements`: `SessionDefaults`) for clients that
//! connect after. The database's `max_connections` is read again on the next connection
//! opened (a percentage cap follows a resized instance). The rest is bound at start (the listen address, worker threads, the
//! database, TLS, IAM, metrics, the audit log): a changed value there is named in the log as
//! needing a restart and the running one kept. A file that does not load, or a new credential
//! whose first fetch fails, changes nothing. Connected clients are never dropped: a removed
//! user's sessions run until they end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::auth::UserEntry;
use crate::config::{Config, ConfigError};
use crate::listener::{Shared, StartError, load_user};

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Users whose credential source or refresh interval changed: new logins get new pools;
    /// the old ones serve their sessions until those end.
    pub replaced: Vec<String>,
    /// Users whose `iam_auth` alone changed: new logins follow it; pools unchanged.
    pub updated: Vec<String>,
    pub pool_changed: bool,
    /// Changed keys a reload cannot apply (the running values stay).
    pub needs_restart: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Reloads from `path` on every SIGHUP until the process ends.
pub fn spawn_on_sighup(shared: Arc<Shared>, path: PathBuf) -> std::io::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let _ = reload_file(&shared, &path).await;
        }
    });
    Ok(())
}

/// Reads `path` and applies it ([`reload`]), logging the outcome either way.
pub async fn reload_file(shared: &Shared, path: &Path) -> Result<Reloaded, ReloadError> {
    let outcome = match Config::from_file(path) {
        Ok(config) => reload(shared, config).await.map_err(ReloadError::from),
        Err(e) => Err(e.into()),
    };
    match &outcome {
        Ok(r) => {
            shared.metrics.config_reloads.increment(1);
            if !r.needs_restart.is_empty() {
                tracing::warn!(keys = ?r.needs_restart, "changed settings take effect only after a restart; running values kept");
            }
            tracing::info!(
                path = %path.display(),
                added = ?r.added,
                removed = ?r.removed,
                replaced = ?r.replaced,
                updated = ?r.updated,
                pool_changed = r.pool_changed,
                "configuration reloaded"
            );
        }
        Err(e) => {
            shared.metrics.config_reload_failures.increment(1);
            tracing::error!(path = %path.display(), error = %e, "configuration reload refused; nothing changed");
        }
    }
    outcome
}

/// Applies `new` to a running proxy: see the module doc for what changes.
pub async fn reload(shared: &Shared, new: Config) -> Result<Reloaded, StartError> {
    // One reload at a time: the running configuration is what the next one compares with.
    let mut running = shared.running.lock().await;
    let mut report = Reloaded { needs_restart: restart_only_changes(&running, &new), ..Reloaded::default() };

    // Every new or changed credential is fetched before anything changes.
    let old_users = shared.users();
    let mut users = HashMap::new();
    let mut superseded = Vec::new();
    for c in &new.credentials {
        let old = running.credentials.iter().find(|o| o.user == c.user).zip(old_users.get(&c.user));
        let entry = match old {
            Some((o, entry)) if o == c => Arc::clone(entry),
            Some((o, entry)) if o.source == c.source && o.refresh_interval == c.refresh_interval => {
                // Only `iam_auth` changed: the same credential, the same pools.
                report.updated.push(c.user.clone());
                Arc::new(UserEntry::new(c.user.clone(), Arc::clone(&entry.store), c.iam_auth))
            }
            Some((_, entry)) => {
                report.replaced.push(c.user.clone());
                superseded.push(Arc::clone(&entry.store));
                Arc::new(load_user(c, &shared.metrics).await?)
            }
            None => {
                report.added.push(c.user.clone());
                Arc::new(load_user(c, &shared.metrics).await?)
            }
        };
        users.insert(c.user.clone(), entry);
    }
    for (name, entry) in old_users.iter().filter(|(name, _)| !users.contains_key(*name)) {
        report.removed.push(name.clone());
        superseded.push(Arc::clone(&entry.store));
    }
    report.removed.sort();

    // The old stores first: a login that began before the reload and reaches `Pools::entry`
    // from now on is kept out of the registry. Then new logins find the new entries, and the
    // old stores' pools leave the registry.
    superseded.iter().for_each(|store| store.supersede());
    shared.replace_users(users);
    if !superseded.is_empty() {
        shared.pools.retire_superseded();
    }
    // Every `[pool]` key applies live.
    let pool = new.pool;
    if pool != running.pool {
        report.pool_changed = true;
        shared.pools.reconfigure(&pool);
        shared.session_defaults.set(&pool);
        shared.client_slots.set_max(pool.max_client_connections);
        running.pool = pool;
    }
    shared.pools.reread_database_max();
    running.credentials = new.credentials;
    Ok(report)
}

/// The keys whose new value a reload cannot apply.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("listen", old.listen != new.listen),
        ("worker_threads", old.worker_threads != new.worker_threads),
        ("shutdown_timeout", old.shutdown_timeout != new.shutdown_timeout),
        ("tcp_keepalive", old.tcp_keepalive != new.tcp_keepalive),
        ("database", old.database != new.database),
        ("metrics.listen", old.metrics_listen != new.metrics_listen),
        ("tls", old.tls != new.tls),
        ("iam", old.iam != new.iam),
        ("audit.output", old.audit != new.audit),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_pool: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.json"), "{}").unwrap();
        let text = format!(
            "[database]\nhost = \"127.0.0.1\"\n[pool]\n{extra_pool}\n[[credentials]]\nuser = \"app\"\nsource = \"file\"\npath = \"app.json\"\n"
        );
        Config::from_toml(&text, Path::new("test.toml"), dir.path()).unwrap()
    }

    #[test]
    fn every_pool_key_is_live() {
        let old = config("");
        let new = config(
            "max_backend_connections = 7\nborrow_timeout = \"5s\"\nmin_idle_backend_connections = 2\nbackend_idle_timeout = \"1m\"\n\
             backend_max_lifetime = \"2h\"\nbackend_login_retry_delay = \"3s\"\nlogin_timeout = \"9s\"\nidle_client_timeout = \"off\"\n\
             max_client_connections = 9\nmax_message_bytes = 1024\nmax_prepared_statements = 5\nmax_total_backend_connections = 9\n\
             session_pinning_filters = [\"EXCLUDE_VARIABLE_SETS\"]\nclient_max_lifetime = \"1h\"",
        );
        assert_ne!(old.pool, new.pool);
        assert_eq!(restart_only_changes(&old, &new), Vec::<&str>::new());
    }

    #[test]
    fn bound_keys_are_named() {
        let old = config("");
        let mut moved = old.clone();
        moved.database.port = 5433;
        moved.listen = "127.0.0.1:7000".parse().unwrap();
        moved.worker_threads += 1;
        assert_eq!(restart_only_changes(&old, &moved), ["listen", "worker_threads", "database"]);
    }
}
