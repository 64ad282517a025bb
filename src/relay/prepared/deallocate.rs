//! SQL `DEALLOCATE name` of a statement the client prepared at the protocol level (a named
//! Parse), and `DEALLOCATE ALL`. psycopg 3 evicts statements from its cache with the first (on
//! libpq before 17) and sends the second after every rollback; PgBouncer passes the first on,
//! where the backend knows the statement under another name (26000). pgwarden answers both
//! itself, as PostgreSQL would: the client's names go (the backend's copies stay for the
//! clients sharing them), or, in a failed transaction, the error PostgreSQL gives (25P02) and
//! nothing goes (for any `DEALLOCATE` then). Only a Query that says just that is answered
//! here; anything else (comments, more statements) reaches the backend, and so does
//! `DEALLOCATE ALL` in a session pinned to its backend, which may hold SQL-level statements of
//! the client's.

use std::borrow::Cow;

use bytes::BytesMut;

use super::ClientStatements;
use crate::protocol::messages::{self, Severity};
use crate::protocol::{SqlState, TxStatus};

/// PostgreSQL's longest identifier (NAMEDATALEN - 1): a longer name is cut there, for
/// statements as for everything else, so it is left to the backend.
const MAX_NAME: usize = 63;

/// If `sql` (a Query's text, without its NUL) is only `DEALLOCATE [PREPARE] name` of one of
/// the client's statements (or, with `all_too`, `DEALLOCATE [PREPARE] ALL`), answers it into
/// `out` (as for a transaction in `status`) and returns true. In a failed transaction, where
/// PostgreSQL refuses any statement, any `DEALLOCATE` is answered so.
pub fn answer(client: &mut ClientStatements, sql: &[u8], status: TxStatus, all_too: bool, out: &mut BytesMut) -> bool {
    let target = match deallocated(sql) {
        Some(target) if status == TxStatus::Failed => target,
        Some(Target::All) if all_too => Target::All,
        Some(Target::Name(name)) if client.by_name.contains_key(&*name) => Target::Name(name),
        _ => return false,
    };
    if status == TxStatus::Failed {
        messages::error_response(
            out,
            Severity::Error,
            SqlState::IN_FAILED_SQL_TRANSACTION.code(),
            "current transaction is aborted, commands ignored until end of transaction block",
        );
    } else {
        match target {
            Target::Name(name) => {
                client.remove(&name);
                messages::command_complete(out, "DEALLOCATE");
            }
            Target::All => {
                client.clear();
                messages::command_complete(out, "DEALLOCATE ALL");
            }
        }
    }
    messages::ready_for_query(out, status);
    true
}

/// What a `DEALLOCATE` drops.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Name(Cow<'a, [u8]>),
    All,
}

/// What `sql` deallocates, if it is just `DEALLOCATE [PREPARE] name|ALL`, an optional `;` and
/// blanks. An unquoted name is folded to lower case, as PostgreSQL reads it.
fn deallocated(sql: &[u8]) -> Option<Target<'_>> {
    let sql = sql.trim_ascii();
    let sql = sql.strip_suffix(b";").unwrap_or(sql);
    let (keyword, rest) = identifier(sql)?;
    if !keyword.is_word(b"deallocate") {
        return None;
    }
    let (mut name, mut rest) = identifier(rest)?;
    if name.is_word(b"prepare") && !rest.trim_ascii().is_empty() {
        (name, rest) = identifier(rest)?;
    }
    if !rest.trim_ascii().is_empty() {
        return None;
    }
    if name.is_word(b"all") {
        return Some(Target::All);
    }
    (!name.text.is_empty() && name.text.len() <= MAX_NAME).then_some(Target::Name(name.text))
}

/// An identifier as PostgreSQL reads it.
struct Identifier<'a> {
    text: Cow<'a, [u8]>,
    quoted: bool,
}

impl Identifier<'_> {
    /// Whether it is this keyword (quoted, it is a name).
    fn is_word(&self, keyword: &[u8]) -> bool {
        !self.quoted && *self.text == *keyword
    }
}

/// The identifier at the start of `sql` (after blanks), and what follows it. Unquoted: ASCII
/// letters, digits, `_` and `$`, folded to lower case.
fn identifier(sql: &[u8]) -> Option<(Identifier<'_>, &[u8])> {
    let sql = sql.trim_ascii_start();
    if let Some(quoted) = sql.strip_prefix(b"\"") {
        let mut text = Vec::new();
        let mut at = 0;
        loop {
            let close = at + quoted[at..].iter().position(|&b| b == b'"')?;
            text.extend_from_slice(&quoted[at..close]);
            if quoted.get(close + 1) == Some(&b'"') {
                text.push(b'"');
                at = close + 2;
            } else {
                return Some((Identifier { text: Cow::Owned(text), quoted: true }, &quoted[close + 1..]));
            }
        }
    }
    if !sql.first().is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_') {
        return None;
    }
    let len = sql.iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b == b'$').count();
    let (word, rest) = sql.split_at(len);
    // Glued to something else (`x.y`, `x(`, a non-ASCII letter): not a plain name.
    if rest.first().is_some_and(|b| !b.is_ascii_whitespace() && *b != b'"') {
        return None;
    }
    let text = if word.iter().any(u8::is_ascii_uppercase) { Cow::Owned(word.to_ascii_lowercase()) } else { Cow::Borrowed(word) };
    Some((Identifier { text, quoted: false }, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(sql: &str) -> Option<String> {
        match deallocated(sql.as_bytes())? {
            Target::Name(n) => Some(String::from_utf8(n.into_owned()).unwrap()),
            Target::All => Some("<all>".into()),
        }
    }

    #[test]
    fn reads_one_deallocate_of_one_name() {
        assert_eq!(name("DEALLOCATE _pg3_12").as_deref(), Some("_pg3_12"));
        assert_eq!(name("  deallocate prepare S1 ;\n").as_deref(), Some("s1"), "folded, as PostgreSQL reads it");
        assert_eq!(name(r#"DEALLOCATE "S""1""#).as_deref(), Some(r#"S"1"#), "quoted: as written");
        assert_eq!(name(r#"DEALLOCATE PREPARE"x y""#).as_deref(), Some("x y"));
        assert_eq!(name("DEALLOCATE prepare").as_deref(), Some("prepare"), "PREPARE alone is the name");
        assert_eq!(name("DEALLOCATE \"all\"").as_deref(), Some("all"), "quoted: a name");
        assert_eq!(name("DEALLOCATE ALL").as_deref(), Some("<all>"));
        assert_eq!(name("deallocate prepare all;").as_deref(), Some("<all>"));
        for other in [
            "DEALLOCATE ALL s1",
            "DEALLOCATE",
            "DEALLOCATE s1; SELECT 1",
            "DEALLOCATE s1 s2",
            "DEALLOCATE /* c */ s1",
            "DEALLOCATE s1 -- c",
            "DEALLOCATE x.y",
            "DEALLOCATE \"open",
            "DEALLOCATE \"\"",
            "\"DEALLOCATE\" s1",
            "DEALLOCATEs1",
            "SELECT 1",
            "DEALLOCATE sé",
            "",
        ] {
            assert_eq!(name(other), None, "{other:?}");
        }
        let long = format!("DEALLOCATE {}", "a".repeat(64));
        assert_eq!(name(&long), None, "past PostgreSQL's identifier length: the backend's");
        assert!(name(&format!("DEALLOCATE {}", "a".repeat(63))).is_some());
    }
}
