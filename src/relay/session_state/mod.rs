//! Reads the SQL a client sends just far enough to tell what it leaves on its backend beyond
//! the transaction. Parameters it `SET`s (or `RESET`s) are named, so that the session can read
//! their values back and make them follow the client from backend to backend (`backend::settings`)
//! instead of pinning, where RDS Proxy pins (its users' top complaint: drivers' own `SET`s
//! pin every session). The parameters every server reports back with ParameterStatus
//! (application_name, TimeZone, ...) follow without that: the relay sees their new values.
//! `RESET ALL` (asyncpg's pool runs it at every release) has every parameter the client carries
//! read back; `DEALLOCATE` in a Query is reported for the relay to forget the statements it
//! drops. Other state pins the session to its backend until it ends, as on RDS Proxy: `SET
//! ROLE`, `set_config(.., false)` whose name is not a literal, `PREPARE`, temporary tables,
//! cursors `WITH HOLD`, `LISTEN`, `LOAD`, `DEALLOCATE` or `DISCARD ALL` in a Parse, session-level
//! advisory locks. `DISCARD ALL` in a Query (Npgsql's and Rails' reset of a reused pooled
//! connection) is followed as `RESET ALL` and `DEALLOCATE ALL` together where it runs: alone,
//! outside a transaction block.
//!
//! A lexer, not a parser: it skips comments, quoted strings and identifiers and dollar-quoted
//! bodies, and looks at the first words of each statement and at function names anywhere.
//! What runs inside functions and `DO` blocks is not seen. Must not: look past the text it is
//! given, or allocate but for the names of parameters set.

use crate::backend::settings::is_valid_name;
use lexer::{Lexer, Token, is_word_start};

mod lexer;

/// Why a session keeps its backend until it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinReason {
    /// A protocol-level named prepared statement (Parse with a name).
    NamedStatement,
    /// `SET`/`RESET` of a parameter the proxy does not follow, `SET ROLE`, `set_config(.., false)`.
    Set,
    /// SQL `PREPARE`.
    Prepare,
    TempObject,
    HoldCursor,
    Listen,
    Load,
    /// `DEALLOCATE` or `DISCARD ALL` in a Parse.
    Discard,
    AdvisoryLock,
    /// A statement longer than the proxy reads: what it does is unknown.
    Unread,
}

impl PinReason {
    /// The metric label and log field.
    pub fn label(self) -> &'static str {
        match self {
            PinReason::NamedStatement => "named_statement",
            PinReason::Set => "set",
            PinReason::Prepare => "prepare",
            PinReason::TempObject => "temp_object",
            PinReason::HoldCursor => "hold_cursor",
            PinReason::Listen => "listen",
            PinReason::Load => "load",
            PinReason::Discard => "discard",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::Unread => "unread",
        }
    }

    pub const ALL: [PinReason; 10] = [
        PinReason::NamedStatement,
        PinReason::Set,
        PinReason::Prepare,
        PinReason::TempObject,
        PinReason::HoldCursor,
        PinReason::Listen,
        PinReason::Load,
        PinReason::Discard,
        PinReason::AdvisoryLock,
        PinReason::Unread,
    ];
}

/// Settings a client may carry from backend to backend (startup ones and SETs); a client that
/// sets more keeps its backend instead (pinned), so that no client makes every hand-over long.
/// Readers stop naming parameters past it.
pub const MAX_FOLLOWED_SETTINGS: usize = 64;

/// Parameters every supported server reports with ParameterStatus when they change: the relay
/// sees their new values itself. (search_path is reported only from PostgreSQL 18.)
const FOLLOWED: &[&[u8]] =
    &[b"application_name", b"client_encoding", b"datestyle", b"intervalstyle", b"timezone", b"standard_conforming_strings"];

/// The names of the proxy's own statements start so (`relay::prepared`).
const PROXY_PREFIX: &[u8] = b"pgwarden_";

const ADVISORY_LOCKS: &[&[u8]] =
    &[b"pg_advisory_lock", b"pg_advisory_lock_shared", b"pg_try_advisory_lock", b"pg_try_advisory_lock_shared"];

/// What a statement text leaves on its backend beyond the transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionEffects {
    /// State that keeps the session on this backend (the first found).
    pub pin: Option<PinReason>,
    /// Parameters set or reset (lower-cased names) whose values the proxy must read back and
    /// carry to the client's next backend.
    pub sets: Vec<String>,
    /// Parameters set or reset, reported ones included, after the text's last `RESET ALL` (in
    /// all of it if it has none): the client's own after a `RESET ALL` (see `resets_all`).
    pub after_reset: Vec<String>,
    /// `RESET ALL`: the client returns to its startup settings, but for what it sets after.
    pub resets_all: bool,
    /// `DEALLOCATE ALL`, `DISCARD ALL`, or `DEALLOCATE` of a name that may be the proxy's: its
    /// copies of statements on the backend may be gone.
    pub drops_statements: bool,
    /// `DISCARD ALL` (Npgsql's and Rails' reset when a pooled connection is reused), alone in
    /// the text: it resets all and drops all statements (`resets_all`, `drops_statements`)
    /// if it runs, which it does only outside a transaction block; the caller, which knows,
    /// says what it did ([`SessionEffects::discard_all_judged`]). With more statements it
    /// never runs (an implicit transaction block), and is not counted.
    pub discards_all: bool,
    /// The text is one statement. Known only where the text was read to its end: false when
    /// the first look found nothing worth reading or a pin stopped the reading.
    pub single: bool,
}

impl SessionEffects {
    /// What a `DISCARD ALL` alone in its Query did: nothing if the session is known to be in
    /// a transaction block (`in_block`: it fails, 25001 or 25P02), else as read. Behind
    /// requests not yet answered it is taken to run: drivers send it between transactions,
    /// and forgetting statements that are still there costs a 26000 where keeping ones that
    /// are gone would cost the session (42P05 at their next Parse).
    pub fn discard_all_judged(self, in_block: bool) -> Self {
        if self.discards_all && in_block { SessionEffects::default() } else { self }
    }
}

/// What `sql` (one Query's text, or a Parse's, without the NUL) does to its session. With
/// `sets_pin` false (RDS Proxy's `EXCLUDE_VARIABLE_SETS` filter) parameter changes the proxy
/// cannot follow (`SET ROLE`, `set_config`) do not pin either: the operator
/// accepts that they stay on the backend.
pub fn session_effects(sql: &[u8], sets_pin: bool) -> SessionEffects {
    session_effects_looked(sql, sets_pin, may_pin(sql))
}

/// [`session_effects`] of text whose first look ([`may_pin`]) said `may`.
pub(super) fn session_effects_looked(sql: &[u8], sets_pin: bool, may: bool) -> SessionEffects {
    let mut effects = SessionEffects::default();
    if !may {
        return effects;
    }
    let mut statement = Statement::default();
    let mut statements = 0;
    for token in Lexer::new(sql) {
        if token == Token::Punct(b';') {
            statements += usize::from(statement.seen > 0);
            statement.judge_head(sets_pin, &mut effects);
            if effects.pin.is_some() {
                return effects;
            }
            statement = Statement::default();
            continue;
        }
        statement.push(token, sets_pin, &mut effects);
        if effects.pin.is_some() {
            return effects;
        }
    }
    statements += usize::from(statement.seen > 0);
    statement.judge_head(sets_pin, &mut effects);
    effects.single = statements == 1;
    if effects.discards_all {
        // Alone, it is RESET ALL with DEALLOCATE ALL; among others, an implicit transaction
        // block, where it fails: nothing but the proxy's copies closed (at no cost).
        effects.discards_all = statements == 1;
        effects.resets_all |= effects.discards_all;
    }
    effects
}

/// [`session_effects`] of a Parse's SQL: a statement that drops prepared statements pins there
/// (where its Execute falls among the messages the relay rewrites is not followed).
pub fn parse_effects(sql: &[u8], sets_pin: bool) -> SessionEffects {
    let mut effects = session_effects(sql, sets_pin);
    if effects.drops_statements {
        effects.pin = effects.pin.or(Some(PinReason::Discard));
    }
    effects
}

/// Whether `sql` drops prepared statements the proxy keeps: `Some(true)` if a statement drops
/// them all (`DEALLOCATE [PREPARE] ALL`; `DISCARD ALL` alone in a Query of a session not
/// known to be `in_block`, see [`SessionEffects::discard_all_judged`]), `Some(false)` if one
/// may drop one of them (`DEALLOCATE pgwarden_3`; a `DISCARD ALL` that fails: the proxy's
/// copies are closed, which costs nothing if they are still there), `None` if none does.
/// Statements after a `DISCARD ALL` that is not alone never run. Read with the lexer, so
/// comments and strings do not count.
pub fn drops_statements(sql: &[u8], in_block: bool) -> Option<bool> {
    drops_statements_looked(sql, may_pin(sql), in_block)
}

/// [`drops_statements`] of text whose first look ([`may_pin`]) said `may`.
pub(super) fn drops_statements_looked(sql: &[u8], may: bool, in_block: bool) -> Option<bool> {
    if !may {
        return None;
    }
    let mut drops = None;
    let mut statements = 0;
    let mut discards_all = false;
    let mut ignored = SessionEffects::default();
    let mut statement = Statement::default();
    let mut judge = |statement: &Statement<'_>, drops: &mut Option<bool>| {
        statements += usize::from(statement.seen > 0);
        if discards_all {
            // (Not alone, it failed: what follows it never ran.)
        } else if statement.is_discard_all() {
            discards_all = true;
        } else if let Some(all) = statement.drop_target() {
            *drops = Some(all || drops.unwrap_or(false));
        }
    };
    for token in Lexer::new(sql) {
        if token == Token::Punct(b';') {
            judge(&statement, &mut drops);
            statement = Statement::default();
            continue;
        }
        statement.push(token, false, &mut ignored);
    }
    judge(&statement, &mut drops);
    if discards_all {
        drops = Some(drops.unwrap_or(false) || (!in_block && statements == 1));
    }
    drops
}

/// A cheap first look, for the statements of every transaction: whether `sql` has a word that
/// can pin where it can pin (a statement's first word for SET, PREPARE and the like; anywhere
/// for TEMP, HOLD and the functions). It may say yes to a word in a comment or a string, which
/// the lexer then reads past; it never says no where the lexer would pin.
pub(super) fn may_pin(sql: &[u8]) -> bool {
    // (`$` ends a word here: it joins words only in the lexer's view, never into a pinning one.)
    const WORDY: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            table[b] = is_word_start(b as u8) || (b as u8).is_ascii_digit();
            b += 1;
        }
        table
    };
    let mut at = 0;
    while at < sql.len() {
        if !WORDY[sql[at] as usize] {
            at += 1;
            continue;
        }
        let start = at;
        while at < sql.len() && WORDY[sql[at] as usize] {
            at += 1;
        }
        let word = &sql[start..at];
        let pins = match word.len() {
            3 => is(word, b"set") && may_start_statement(&sql[..start]),
            4 => is(word, b"temp") || is(word, b"hold") || (is(word, b"load") && may_start_statement(&sql[..start])),
            5 => is(word, b"reset") && may_start_statement(&sql[..start]),
            6 => is(word, b"listen") && may_start_statement(&sql[..start]),
            7 => (is(word, b"prepare") || is(word, b"discard")) && may_start_statement(&sql[..start]),
            9 => is(word, b"temporary"),
            10 => is(word, b"set_config") || (is(word, b"deallocate") && may_start_statement(&sql[..start])),
            16..=27 => ADVISORY_LOCKS.iter().any(|f| is(word, f)),
            _ => false,
        };
        if pins {
            return true;
        }
    }
    false
}

/// Whether a statement may start after `before`: only blanks since the text's start, a `;`,
/// a comment's end (`*/`, or the line break after `--`). `UPDATE t SET` is not one.
fn may_start_statement(before: &[u8]) -> bool {
    for &b in before.iter().rev() {
        match b {
            b' ' | b'\t' | b'\r' | 0x0c => {}
            b'\n' | b';' | b'/' => return true,
            _ => return false,
        }
    }
    true
}

/// What is known of the statement being read.
#[derive(Default)]
struct Statement<'a> {
    /// Its first tokens, enough to read `SET SESSION app.tenant = ...`.
    head: [Option<Token<'a>>; 6],
    seen: usize,
    previous_word: &'a [u8],
    set_config: SetConfigCall<'a>,
}

/// Where a `set_config(name, value, is_local)` call is: `is_local = true` is the transaction's;
/// `false` with a literal name is followed like `SET`; anything else pins.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum SetConfigCall<'a> {
    #[default]
    None,
    /// The function's name was read; its `(` is next.
    Named,
    /// Inside the parentheses, at this depth, after this many top-level commas; the first
    /// argument, if it is one string literal.
    Args { depth: u32, commas: u32, name: FirstArg<'a> },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FirstArg<'a> {
    Unread,
    Literal(&'a [u8]),
    Expression,
}

impl<'a> Statement<'a> {
    /// Reads one token; answers for what can be decided on the token alone (function calls,
    /// `TEMP`, `WITH HOLD`). The head is judged when the statement ends.
    fn push(&mut self, token: Token<'a>, sets_pin: bool, effects: &mut SessionEffects) {
        if self.seen < self.head.len() {
            self.head[self.seen] = Some(token);
        }
        self.seen += 1;
        self.follow_set_config(token, sets_pin, effects);
        let Token::Word(word) = token else { return };
        let previous = std::mem::replace(&mut self.previous_word, word);
        let pin = match word.len() {
            4 | 9 if is(word, b"temp") || is(word, b"temporary") => {
                let creates = [&b"create"[..], b"global", b"local", b"replace"].iter().any(|w| is(previous, w));
                let selects_into = is(previous, b"into") && self.first_word_is(b"select");
                (creates || selects_into).then_some(PinReason::TempObject)
            }
            4 if is(word, b"hold") => (is(previous, b"with") && self.first_word_is(b"declare")).then_some(PinReason::HoldCursor),
            10 if is(word, b"set_config") => {
                self.set_config = SetConfigCall::Named;
                None
            }
            16..=27 if ADVISORY_LOCKS.iter().any(|f| is(word, f)) => Some(PinReason::AdvisoryLock),
            _ => None,
        };
        effects.pin = effects.pin.or(pin);
    }

    fn follow_set_config(&mut self, token: Token<'a>, sets_pin: bool, effects: &mut SessionEffects) {
        let unfollowable = sets_pin.then_some(PinReason::Set);
        self.set_config = match (self.set_config, token) {
            (SetConfigCall::None, _) => return,
            (SetConfigCall::Named, Token::Punct(b'(')) => SetConfigCall::Args { depth: 1, commas: 0, name: FirstArg::Unread },
            // A column or something else named set_config.
            (SetConfigCall::Named, _) => SetConfigCall::None,
            (SetConfigCall::Args { depth: 1, commas: 2, name }, token) => {
                match (token, name) {
                    (Token::Word(w), _) if is(w, b"true") => {}
                    (Token::Word(w), FirstArg::Literal(name)) if is(w, b"false") => {
                        note_set(std::str::from_utf8(name).ok().map(str::to_ascii_lowercase), unfollowable, effects)
                    }
                    _ => effects.pin = effects.pin.or(unfollowable),
                }
                SetConfigCall::None
            }
            (SetConfigCall::Args { depth, commas, name }, token) => match (token, depth) {
                (Token::Punct(b'('), _) => SetConfigCall::Args { depth: depth + 1, commas, name },
                // Closed before its third argument: not a call this lexer understands.
                (Token::Punct(b')'), 1) => {
                    effects.pin = effects.pin.or(unfollowable);
                    SetConfigCall::None
                }
                (Token::Punct(b')'), _) => SetConfigCall::Args { depth: depth - 1, commas, name },
                (Token::Punct(b','), 1) => SetConfigCall::Args { depth, commas: commas + 1, name },
                (Token::Str(text), 1) if commas == 0 && name == FirstArg::Unread => {
                    SetConfigCall::Args { depth, commas, name: FirstArg::Literal(text) }
                }
                _ if commas == 0 => SetConfigCall::Args { depth, commas, name: FirstArg::Expression },
                _ => SetConfigCall::Args { depth, commas, name },
            },
        };
    }

    /// The statement's `i`th token, if it is a word.
    fn word(&self, i: usize) -> Option<&'a [u8]> {
        match self.head.get(i).copied().flatten() {
            Some(Token::Word(w)) => Some(w),
            _ => None,
        }
    }

    /// What a `DEALLOCATE` or `DISCARD ALL` drops of the proxy's statements: all (`Some(true)`),
    /// maybe one (`Some(false)`: a name with the proxy's prefix, or one this lexer does not
    /// read, quoted), or none of them (`None`, also for any other statement).
    fn drop_target(&self) -> Option<bool> {
        let is_at = |i: usize, keyword: &[u8]| self.word(i).is_some_and(|w| is(w, keyword));
        if is_at(0, b"discard") {
            return self.is_discard_all().then_some(true);
        }
        if !is_at(0, b"deallocate") {
            return None;
        }
        let at = if is_at(1, b"prepare") && self.seen > 2 { 2 } else { 1 };
        match self.head.get(at).copied().flatten() {
            Some(Token::Word(w)) if is(w, b"all") => Some(true),
            Some(Token::Word(w)) => w.get(..PROXY_PREFIX.len()).is_some_and(|p| is(p, PROXY_PREFIX)).then_some(false),
            _ => Some(false),
        }
    }

    /// `DISCARD ALL`, and nothing more (anything more is a syntax error: nothing runs).
    fn is_discard_all(&self) -> bool {
        self.seen == 2 && self.first_word_is(b"discard") && self.word(1).is_some_and(|w| is(w, b"all"))
    }

    fn first_word_is(&self, keyword: &[u8]) -> bool {
        self.word(0).is_some_and(|w| is(w, keyword))
    }

    /// What the statement's first words say (`SET ...`, `PREPARE ...`, ...), added to `effects`.
    fn judge_head(&self, sets_pin: bool, effects: &mut SessionEffects) {
        let Some(first) = self.word(0) else { return };
        let is_at = |i: usize, keyword: &[u8]| self.word(i).is_some_and(|w| is(w, keyword));
        let unfollowable = sets_pin.then_some(PinReason::Set);
        let (named_at, special) = if is(first, b"set") {
            if is_at(1, b"local") || is_at(1, b"transaction") || is_at(1, b"constraints") {
                return;
            }
            let at = if is_at(1, b"session") { 2 } else { 1 };
            if (is_at(at, b"time") && is_at(at + 1, b"zone")) || is_at(at, b"names") {
                let name = if is_at(at, b"names") { "client_encoding" } else { "timezone" };
                note_set(Some(name.to_owned()), unfollowable, effects);
                return;
            }
            if is_at(at, b"role") || is_at(at, b"authorization") || is_at(at, b"characteristics") {
                effects.pin = effects.pin.or(unfollowable);
                return;
            }
            let special = [(&b"schema"[..], "search_path"), (b"xml", "xmloption")]
                .into_iter()
                .find(|(keyword, _)| is_at(at, keyword))
                .map(|(_, name)| name);
            (at, special)
        } else if is(first, b"reset") {
            if is_at(1, b"time") && is_at(2, b"zone") {
                note_set(Some("timezone".to_owned()), unfollowable, effects);
                return;
            }
            if is_at(1, b"all") {
                // (What was set before it is still read back: the RESET ALL may roll back. Not
                // `role` or `session_authorization`: RESET ALL leaves who the session is.)
                effects.after_reset.clear();
                effects.resets_all = true;
                return;
            }
            if is_at(1, b"role") || is_at(1, b"session") {
                effects.pin = effects.pin.or(unfollowable);
                return;
            }
            (1, None)
        } else {
            // The client's own statements go (SQL-level ones pinned it at their PREPARE); the
            // relay forgets the proxy's copies the statement may drop.
            effects.drops_statements |= self.drop_target().is_some();
            if is(first, b"deallocate") {
                return;
            }
            if is(first, b"discard") {
                // (DISCARD PLANS, SEQUENCES and TEMP leave nothing another client could see:
                // a backend shared between clients holds no temporary objects, they pin.)
                effects.discards_all |= self.is_discard_all();
                return;
            }
            let pins = [
                (&b"prepare"[..], PinReason::Prepare),
                (b"listen", PinReason::Listen),
                (b"load", PinReason::Load),
            ];
            let reason = pins.into_iter().find(|(keyword, _)| is(first, keyword)).map(|(_, reason)| reason);
            if reason == Some(PinReason::Prepare) && is_at(1, b"transaction") {
                return;
            }
            effects.pin = effects.pin.or(reason);
            return;
        };
        if let Some(name) = special {
            note_set(Some(name.to_owned()), unfollowable, effects);
            return;
        }
        note_set(self.parameter_name(named_at), unfollowable, effects);
    }

    /// The parameter named from `head[at]`: `name` or `prefix.name`, lower-cased; `None` if it
    /// is not a plain GUC name.
    fn parameter_name(&self, at: usize) -> Option<String> {
        let first = self.word(at)?;
        let mut name = String::from_utf8_lossy(first).to_ascii_lowercase();
        if self.head.get(at + 1).copied().flatten() == Some(Token::Punct(b'.')) {
            name.push('.');
            name.push_str(&String::from_utf8_lossy(self.word(at + 2)?).to_ascii_lowercase());
        }
        Some(name)
    }
}

/// What setting the parameter `name` (lower-cased; `None` if it could not be read) does.
fn note_set(name: Option<String>, unfollowable: Option<PinReason>, effects: &mut SessionEffects) {
    match name {
        // Reported by the server: the relay sees the new value.
        Some(name) if FOLLOWED.iter().any(|f| is(name.as_bytes(), f)) => push_capped(&mut effects.after_reset, &name),
        // Scoped to the transaction, like SET TRANSACTION.
        Some(name) if name.starts_with("transaction_") => {}
        // Who the session is: not something to re-apply elsewhere.
        Some(name) if name == "role" || name == "session_authorization" => effects.pin = effects.pin.or(unfollowable),
        // (Past the cap the session pins anyway: one name more says so.)
        Some(name) if is_valid_name(&name) => {
            push_capped(&mut effects.after_reset, &name);
            push_capped(&mut effects.sets, &name);
        }
        // A quoted or odd name: not a statement this lexer follows.
        _ => effects.pin = effects.pin.or(unfollowable),
    }
}

/// Adds `name` to `names` unless there, up to one past the cap (which says "too many").
pub(super) fn push_capped(names: &mut Vec<String>, name: &str) {
    if names.len() <= MAX_FOLLOWED_SETTINGS && !names.iter().any(|n| n == name) {
        names.push(name.to_owned());
    }
}

fn is(word: &[u8], keyword: &[u8]) -> bool {
    word.eq_ignore_ascii_case(keyword)
}

#[cfg(test)]
mod tests;
