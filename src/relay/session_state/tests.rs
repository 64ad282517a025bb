use super::*;

/// What one statement that leaves nothing behind is read as.
const ONE_STATEMENT: SessionEffects =
    SessionEffects { pin: None, sets: Vec::new(), after_reset: Vec::new(), resets_all: false, drops_statements: false, discards_all: false, single: true };

fn pin_reason(sql: &[u8], sets_pin: bool) -> Option<PinReason> {
    session_effects(sql, sets_pin).pin
}

fn reason(sql: &str) -> Option<PinReason> {
    pin_reason(sql.as_bytes(), true)
}

#[test]
fn pin_reason_ordinary_statements_do_not_pin() {
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
        "BEGIN; UPDATE t SET x = 1 WHERE id = $1; COMMIT",
        "INSERT INTO temp VALUES (1)",
        "CREATE TABLE temp (x int)",
        "SET LOCAL statement_timeout = '1s'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET CONSTRAINTS ALL DEFERRED",
        "SELECT pg_advisory_xact_lock(1)",
        "DECLARE c CURSOR FOR SELECT 1",
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
        "SELECT set_config('app.tenant', '42', true)",
        "SELECT pg_catalog.set_config('app.tenant', f(1, 2), TRUE)",
        "PREPARE TRANSACTION 'gid'",
        "UNLISTEN *",
        "select 'SET x = 1; LISTEN y'",
        "select $$ SET x = 1; select pg_advisory_lock(1) $$",
        "select $f$ $$ LISTEN $$ $f$, 1",
        "select \"pg_advisory_lock\"",
        "-- SET statement_timeout = 1\nSELECT 1",
        "/* LISTEN /* nested */ x */ SELECT 1",
        "select E'it\\'s; LISTEN x'",
        "",
    ] {
        assert_eq!(reason(sql), None, "{sql}");
    }
}

#[test]
fn pin_reason_followed_parameters_do_not_pin() {
    for sql in [
        "SET application_name = 'worker'",
        "set session TimeZone to 'UTC'",
        "SET TIME ZONE 'Europe/Paris'",
        "SET NAMES 'UTF8'",
        "SET DateStyle = ISO, MDY",
        "RESET application_name",
        "RESET TIME ZONE",
        "SET intervalstyle TO postgres",
    ] {
        let effects = session_effects(sql.as_bytes(), true);
        assert_eq!((effects.pin, effects.sets.len(), effects.after_reset.len()), (None, 0, 1), "{sql}");
    }
}

#[test]
fn pin_reason_session_state_pins() {
    for (sql, want) in [
        ("SET ROLE reader", PinReason::Set),
        ("SET SESSION AUTHORIZATION bob", PinReason::Set),
        ("set session characteristics as transaction read only", PinReason::Set),
        ("SET \"statement_timeout\" = 1", PinReason::Set),
        ("RESET ROLE", PinReason::Set),
        ("SET session_authorization = 'bob'", PinReason::Set),
        ("reset Session_Authorization", PinReason::Set),
        ("SELECT set_config(current_user || '.x', '1', false)", PinReason::Set),
        ("SELECT set_config('role', 'bob', false)", PinReason::Set),
        ("SELECT set_config('a', 'b', is_local)", PinReason::Set),
        ("PREPARE q(int) AS SELECT $1", PinReason::Prepare),
        ("CREATE TEMP TABLE t (x int)", PinReason::TempObject),
        ("create local temporary table t (x int)", PinReason::TempObject),
        ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", PinReason::TempObject),
        ("SELECT 1 AS x INTO TEMP t", PinReason::TempObject),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", PinReason::HoldCursor),
        ("LISTEN jobs", PinReason::Listen),
        ("LOAD 'auto_explain'", PinReason::Load),
        ("SELECT pg_advisory_lock(1)", PinReason::AdvisoryLock),
        ("select PG_TRY_ADVISORY_LOCK_SHARED(1, 2)", PinReason::AdvisoryLock),
        ("/* c */ -- d\n  listen x", PinReason::Listen),
        ("SELECT 'a''b'; LISTEN x", PinReason::Listen),
        ("SELECT $1; LISTEN x", PinReason::Listen),
    ] {
        assert_eq!(reason(sql), Some(want), "{sql}");
    }
}

#[test]
fn session_effects_name_the_parameters_to_follow() {
    for (sql, want) in [
        ("SET statement_timeout = '1ms'", &["statement_timeout"][..]),
        ("set session search_path to app, public", &["search_path"]),
        ("SET myapp.Tenant = '42'", &["myapp.tenant"]),
        ("SET application_name.x = '1'", &["application_name.x"]),
        ("SET SCHEMA 'app'", &["search_path"]),
        ("SET XML OPTION DOCUMENT", &["xmloption"]),
        ("RESET lock_timeout", &["lock_timeout"]),
        ("SELECT 1; SET statement_timeout = 5", &["statement_timeout"]),
        ("SET a = 1; /* */ SET b.c TO 2;", &["a", "b.c"]),
        ("SET application_name = 'x'; SET TIME ZONE 'UTC'", &[]),
        ("SET LOCAL work_mem = '1GB'", &[]),
        ("SET transaction_isolation = 'serializable'", &[]),
        ("SELECT pg_catalog.set_config('App.Tenant', $1, false)", &["app.tenant"]),
        ("select set_config('statement_timeout', '1s', FALSE), set_config('a.b', 'c', true)", &["statement_timeout"]),
    ] {
        let effects = session_effects(sql.as_bytes(), true);
        assert_eq!(effects.pin, None, "{sql}");
        assert_eq!(effects.sets, want, "{sql}");
    }
    // asyncpg's reset at every pool release: RESET ALL has everything read back, no pin.
    let asyncpg = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nDO $$ BEGIN PERFORM * FROM pg_listening_channels() LIMIT 1; \
        IF FOUND THEN UNLISTEN *; END IF; END; $$;\nRESET ALL;";
    let effects = session_effects(asyncpg.as_bytes(), true);
    assert_eq!((effects.pin, effects.resets_all), (None, true));
    for sql in ["reset all", "SET a = 1; RESET ALL"] {
        assert!(session_effects(sql.as_bytes(), true).resets_all, "{sql}");
        assert!(session_effects(sql.as_bytes(), false).resets_all, "{sql}: followed whatever the filters");
    }
    assert!(!session_effects(b"RESET all_things", true).resets_all);
    // A pin ends the reading: the session keeps its backend, what else it set stays there.
    assert_eq!(session_effects(b"SET a = 1; LISTEN x; SET b = 2", true).pin, Some(PinReason::Listen));
}

#[test]
fn pin_reason_excluding_variable_sets_keeps_the_rest() {
    assert_eq!(pin_reason(b"SET ROLE reader", false), None);
    assert_eq!(session_effects(b"SET statement_timeout = 1", false).sets, ["statement_timeout"]);
    assert_eq!(pin_reason(b"SELECT set_config(f(), 'b', false)", false), None);
    assert_eq!(pin_reason(b"SET ROLE x; LISTEN y", false), Some(PinReason::Listen));
}

/// Whatever bytes a client sends, reading them neither panics nor loops.
#[test]
fn session_effects_survive_random_bytes() {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let alphabet = b"SETsetLISTENtemp_config('\"$;-/*\n\\ (),.\x00\xff0123";
    for len in 0..200 {
        for _ in 0..50 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = session_effects(&bytes, true);
        }
    }
}

/// The first look never clears what the lexer pins.
#[test]
fn may_pin_never_clears_a_pinning_statement() {
    let words = ["SET", "set_config", "x", "(", ")", ",", "true", "false", "'s'", "LISTEN", "temp", "create", "into", "select",
        "with", "hold", "declare", "pg_advisory_lock", ";", "\n", "-- c\n", "/* c */", "$$ a $$", "$1", ".", "RESET", "$", "e'\\''"];
    // Every sequence of up to three of these words, with and without spaces between.
    let mut stack = vec![(String::new(), 0)];
    while let Some((sql, len)) = stack.pop() {
        let effects = session_effects(sql.as_bytes(), true);
        if effects.pin.is_some() || !effects.sets.is_empty() || effects.resets_all {
            assert!(may_pin(sql.as_bytes()), "{sql:?}");
        }
        if len < 3 {
            for w in words {
                stack.push((format!("{sql} {w}"), len + 1));
                stack.push((format!("{sql}{w}"), len + 1));
            }
        }
    }
    assert!(!may_pin(b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;"));
    assert!(!may_pin(b"UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = 7;"));
}

#[test]
fn drops_statements_reads_deallocate_and_discard_all_only_as_statements() {
    assert_eq!(drops_statements(b"DEALLOCATE ALL", false), Some(true));
    assert_eq!(drops_statements(b"select 1; deallocate prepare all", false), Some(true));
    assert_eq!(drops_statements(b"DISCARD ALL", false), Some(true));
    assert_eq!(drops_statements(b"DEALLOCATE s1", false), None, "not one of the proxy's");
    assert_eq!(drops_statements(b"DEALLOCATE PREPARE PGWARDEN_3", false), Some(false));
    assert_eq!(drops_statements(b"DEALLOCATE \"pgwarden_3\"", false), Some(false), "quoted: not read, so maybe");
    assert_eq!(drops_statements(b"DEALLOCATE prepare", false), None);
    assert_eq!(drops_statements(b"DEALLOCATE s1; DISCARD ALL", false), Some(false), "DISCARD ALL fails there");
    assert_eq!(drops_statements(b"DISCARD PLANS", false), None);
    assert_eq!(drops_statements(b"SELECT 'x; DISCARD ALL' /* ; deallocate all */", false), None);
    assert_eq!(drops_statements(b"SELECT discarded FROM t", false), None);
    let effects = session_effects(b"DEALLOCATE pgwarden_1", true);
    assert_eq!((effects.pin, effects.drops_statements), (None, true), "in a Query: followed, in order");
    assert_eq!(parse_effects(b"DEALLOCATE ALL", true).pin, Some(PinReason::Discard), "in a Parse: pinned");
    assert_eq!(session_effects(b"DEALLOCATE s1", true), ONE_STATEMENT, "nothing of the proxy's");
    assert!(session_effects(b"DISCARD ALL", true).drops_statements);
    assert!(!session_effects(b"DISCARD PLANS", true).drops_statements);
}

/// `DISCARD ALL` runs only alone and outside a transaction block: there it drops the client's
/// statements too; elsewhere only the proxy's copies are closed (at no cost if still there).
#[test]
fn drops_statements_counts_discard_all_where_it_runs() {
    assert_eq!(drops_statements(b"  discard ALL ; ", false), Some(true));
    assert_eq!(drops_statements(b"DISCARD ALL", true), Some(false), "known in a transaction block: it fails");
    assert_eq!(drops_statements(b"DISCARD ALL; SELECT 1", false), Some(false), "an implicit block: it fails");
    assert_eq!(drops_statements(b"DEALLOCATE ALL; DISCARD ALL", false), Some(true), "the first runs before the second fails");
    assert_eq!(drops_statements(b"DISCARD ALL; DEALLOCATE ALL", false), Some(false), "the first fails: the second never runs");
    assert_eq!(drops_statements(b"DEALLOCATE ALL", true), Some(true), "DEALLOCATE runs in a transaction");
    assert_eq!(drops_statements(b"DISCARD TEMP", false), None);
}

/// `DISCARD ALL` alone is `RESET ALL` plus `DEALLOCATE ALL`, where it runs; the other
/// `DISCARD`s leave nothing a pooled backend's next client could see.
#[test]
fn session_effects_follow_discard_all_alone() {
    let effects = session_effects(b"/* npgsql */ DISCARD ALL;", true);
    assert_eq!(effects.pin, None);
    assert!(effects.discards_all && effects.resets_all && effects.drops_statements);
    assert!(effects.after_reset.is_empty());
    // Among other statements it fails (an implicit transaction block): only the proxy's copies
    // are closed.
    for sql in ["DISCARD ALL; SELECT 1", "select 1; discard all"] {
        let effects = session_effects(sql.as_bytes(), true);
        assert_eq!((effects.pin, effects.discards_all, effects.resets_all, effects.drops_statements), (None, false, false, true), "{sql}");
    }
    assert_eq!(session_effects(b"SET a.b = 1; DISCARD ALL", true).after_reset, ["a.b"], "what was set before still counts");
    for sql in ["DISCARD PLANS", "DISCARD SEQUENCES", "discard temp", "DISCARD TEMPORARY"] {
        assert_eq!(session_effects(sql.as_bytes(), true), ONE_STATEMENT, "{sql}");
    }
    assert!(!session_effects(b"SELECT 1; SELECT 2", true).single);
    // Judged by where it runs: known to be in a transaction block, nothing; else as read.
    assert_eq!(effects.clone().discard_all_judged(false), effects);
    assert_eq!(effects.clone().discard_all_judged(true), SessionEffects::default());
    let reset = session_effects(b"RESET ALL", true);
    assert_eq!(reset.clone().discard_all_judged(true), reset, "only DISCARD ALL is judged");
    // More than DISCARD ALL in the statement is a syntax error: nothing runs.
    let odd = session_effects(b"DISCARD ALL x", true);
    assert!(!odd.discards_all && !odd.resets_all);
    assert_eq!(drops_statements(b"DISCARD ALL x", false), None);
    assert_eq!(parse_effects(b"DISCARD ALL", true).pin, Some(PinReason::Discard), "in a Parse: pinned");
}

/// Unterminated quotes, comments and dollar bodies end the text; nothing panics.
#[test]
fn pin_reason_truncated_text_is_safe() {
    for sql in ["SELECT 'abc", "SELECT \"abc", "/* open", "select $a$ body", "select $", "select $1", "SELECT E'\\", "--", "set", "set_config(", "x$y$"] {
        let _ = reason(sql);
    }
    // Every prefix of a tricky statement.
    let sql = "SELECT E'a\\'b', $q$ x $q$, \"i\"\"d\" /* /* */ */ -- c\n; SET ROLE r";
    for end in 0..=sql.len() {
        let _ = pin_reason(&sql.as_bytes()[..end], true);
    }
    assert_eq!(reason(sql), Some(PinReason::Set));
}
