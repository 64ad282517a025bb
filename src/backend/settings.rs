//! Session settings (GUCs) a client asked for at startup or changed later, and the SQL that
//! brings a backend's applied settings in line with a client's before it is handed over.

/// Reported parameters a client may change with SET; their ParameterStatus updates are tracked
/// so that the next backend this client borrows gets the same values.
const TRACKED_REPORTED: &[&str] =
    &["application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone", "search_path", "standard_conforming_strings"];

/// Name → value, names lower-cased (GUC names are case-insensitive). Few entries: a Vec is faster
/// than a map here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings(Vec<(String, String)>);

impl Settings {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        match self.0.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(slot) => {
                if slot.1 != value {
                    slot.1 = value.to_owned();
                }
            }
            None => self.0.push((name.to_ascii_lowercase(), value.to_owned())),
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Records a ParameterStatus the backend sent while a client held it, if it is one a
    /// client can set. Returns whether it was recorded.
    pub fn track_reported(&mut self, name: &str, value: &str) -> bool {
        if is_tracked_reported(name) {
            self.set(name, value);
            true
        } else {
            false
        }
    }

    /// SQL whose one row holds the current values of `names` (NULL for an unknown one).
    pub fn read_back_sql(names: &[String]) -> String {
        let columns: Vec<String> =
            names.iter().map(|n| format!("pg_catalog.current_setting({}, true)", literal(n))).collect();
        format!("SELECT {}", columns.join(", "))
    }

    /// SQL whose one row holds, for each of `names`, its current value and whether that is the
    /// value `RESET` gives it ('t'/'f', compared in the parameter's base unit: `current_setting`
    /// says "4MB" where `pg_settings` says 4096; NULL for a custom parameter, which `pg_settings`
    /// does not list), in one pass over `pg_settings`.
    pub fn read_back_with_reset_sql(names: &[String]) -> String {
        let columns: Vec<String> = names
            .iter()
            .map(|n| {
                let n = literal(n);
                format!(
                    "pg_catalog.current_setting({n}, true), bool_or(setting IS NOT DISTINCT FROM reset_val) FILTER (WHERE lower(name) = lower({n}))"
                )
            })
            .collect();
        format!("SELECT {} FROM pg_catalog.pg_settings", columns.join(", "))
    }

    /// SQL that turns a backend's `applied` settings into `desired`, or `None` if they match.
    pub fn sync_sql(applied: &Settings, desired: &Settings) -> Option<String> {
        // The common case, checked with plain comparisons: the backend was last synced to a
        // client with the same settings (same names, same order, same values).
        if applied.0 == desired.0 {
            return None;
        }
        let mut sets = Vec::new();
        for (name, value) in desired.iter() {
            if applied.get(name) != Some(value) {
                sets.push(format!("pg_catalog.set_config({}, {}, false)", literal(name), literal(value)));
            }
        }
        let mut resets = String::new();
        for (name, _) in applied.iter() {
            if desired.get(name).is_none() {
                resets.push_str(&format!("RESET {};", identifier(name)));
            }
        }
        if sets.is_empty() && resets.is_empty() {
            return None;
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
            sql.push(';');
        }
        sql.push_str(&resets);
        Some(sql)
    }
}

/// A client's settings: the ones it has now, and (kept from their first change on) the ones it
/// logged in with, which `RESET ALL` returns to. Most clients never change theirs: they pay
/// for one pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientSettings {
    now: Settings,
    startup: Option<Box<Settings>>,
}

impl ClientSettings {
    pub fn new(startup: Settings) -> ClientSettings {
        ClientSettings { now: startup, startup: None }
    }

    pub fn now(&self) -> &Settings {
        &self.now
    }

    /// The settings the client logged in with.
    pub fn startup(&self) -> &Settings {
        self.startup.as_deref().unwrap_or(&self.now)
    }

    /// The settings, to change.
    pub fn change(&mut self) -> &mut Settings {
        if self.startup.is_none() {
            self.startup = Some(Box::new(self.now.clone()));
        }
        &mut self.now
    }

    /// The settings, lent to the pool while the client waits (it gives them back unchanged).
    pub fn lend(&mut self) -> &mut Settings {
        &mut self.now
    }

    /// [`Settings::track_reported`], keeping the startup settings first if it changes them.
    pub fn track_reported(&mut self, name: &str, value: &str) -> bool {
        if !is_tracked_reported(name) {
            return false;
        }
        if self.now.get(name) != Some(value) {
            self.change().set(name, value);
        }
        true
    }
}

/// Whether `name` is a reported parameter a client may change (see [`TRACKED_REPORTED`]).
pub fn is_tracked_reported(name: &str) -> bool {
    TRACKED_REPORTED.iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// An escape-string literal: safe whatever `standard_conforming_strings` is.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn identifier(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// GUC names are letters, digits, `_` and `.` (for extension namespaces).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let mut s = Settings::default();
        for (n, v) in pairs {
            s.set(n, v);
        }
        s
    }

    #[test]
    fn sync_sql_equal_settings_is_none() {
        let a = settings(&[("DateStyle", "ISO"), ("application_name", "x")]);
        let b = settings(&[("application_name", "x"), ("datestyle", "ISO")]);
        assert_eq!(Settings::sync_sql(&a, &b), None);
    }

    #[test]
    fn sync_sql_sets_changed_and_resets_dropped() {
        let applied = settings(&[("application_name", "old"), ("timezone", "UTC")]);
        let desired = settings(&[("application_name", "it's\\new")]);
        assert_eq!(
            Settings::sync_sql(&applied, &desired).unwrap(),
            r#"SELECT pg_catalog.set_config(E'application_name', E'it''s\\new', false);RESET "timezone";"#
        );
    }

    #[test]
    fn track_reported_ignores_server_only_params() {
        let mut s = Settings::default();
        assert!(s.track_reported("TimeZone", "UTC"));
        assert!(!s.track_reported("is_superuser", "on"));
        assert_eq!(s.get("timezone"), Some("UTC"));
    }

    #[test]
    fn read_back_sql_quotes_each_name() {
        assert_eq!(
            Settings::read_back_sql(&["statement_timeout".into(), "app.x'y".into()]),
            "SELECT pg_catalog.current_setting(E'statement_timeout', true), pg_catalog.current_setting(E'app.x''y', true)"
        );
    }

    #[test]
    fn read_back_with_reset_sql_reads_pg_settings_once() {
        assert_eq!(
            Settings::read_back_with_reset_sql(&["app.x'y".into()]),
            "SELECT pg_catalog.current_setting(E'app.x''y', true), bool_or(setting IS NOT DISTINCT FROM reset_val) \
             FILTER (WHERE lower(name) = lower(E'app.x''y')) FROM pg_catalog.pg_settings"
        );
    }

    #[test]
    fn client_settings_keep_the_startup_ones_from_their_first_change() {
        let mut c = ClientSettings::new(settings(&[("application_name", "mine")]));
        assert!(c.track_reported("TimeZone", "UTC"));
        assert!(c.track_reported("application_name", "mine"));
        assert!(!c.track_reported("server_version", "15"), "not one a client sets");
        assert_eq!(c.startup().get("timezone"), None, "the startup settings, not today's");
        assert_eq!(c.now().get("timezone"), Some("UTC"));
        c.change().set("statement_timeout", "1s");
        assert_eq!(c.startup(), &settings(&[("application_name", "mine")]));
    }

    #[test]
    fn is_valid_name_refuses_injection() {
        assert!(is_valid_name("search_path") && is_valid_name("myext.opt"));
        assert!(!is_valid_name("x; drop table t") && !is_valid_name(""));
    }
}
