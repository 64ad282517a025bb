//! Named prepared statements under transaction pooling (PgBouncer's `max_prepared_statements`;
//! RDS Proxy pins the session instead, as pgwarden does when the setting is 0). A client's
//! named statements are remembered per session, by the client's name, as the Parse it sent;
//! each backend holds its own copies under names of its own (`pgwarden_<n>`), keyed by that
//! Parse and the client's session settings (`search_path` changes what a statement means), so
//! clients preparing the same statement share one copy. The relay rewrites the statement name in
//! every Parse, Bind, Describe and Close; a Bind or Describe of a statement the backend does not
//! have yet is preceded by a Parse of it; a backend over its limit closes its least recently
//! used statement. The answers to those added messages (ParseComplete, CloseComplete) are taken
//! out of the stream the client sees, in order ([`Expect`]).
//!
//! A client Close of a named statement only forgets the client's name (the backend's copy may
//! serve others) and still reaches the backend, under a name no statement has, for its
//! CloseComplete. Like PgBouncer, a Parse of a name already in use ends the session (42P05):
//! PostgreSQL's in-band error cannot be reproduced once the Parse is not passed on as is.
//! Must not: read or change anything but statement names, or touch sockets.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, BytesMut};

use crate::backend::settings::Settings;
use crate::protocol::{ProtocolError, backend_tag};

/// Backends' own statement names start with this; a client's name that does is never passed on.
const SERVER_PREFIX: &[u8] = b"pgwarden_";
/// The name a client's Close of a named statement reaches the backend with: never prepared,
/// so the backend answers CloseComplete and closes nothing.
const NO_STATEMENT: &[u8] = b"pgwarden_";
/// Most named statements one client may hold at once.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;

const PARSE_COMPLETE: u8 = b'1';
const CLOSE_COMPLETE: u8 = b'3';

fn hasher() -> &'static std::collections::hash_map::RandomState {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// A statement as a client defined it.
#[derive(Debug)]
pub struct Statement {
    /// The Parse body after the name: the SQL, its NUL, the parameter types.
    definition: Box<[u8]>,
    /// The client's session settings when it was parsed.
    settings: u64,
    hash: u64,
}

/// A shared [`Statement`]; equal when the definitions and settings are.
#[derive(Clone, Debug)]
pub struct StatementRef(Arc<Statement>);

impl StatementRef {
    fn new(definition: &[u8], settings: u64) -> StatementRef {
        let mut h = hasher().build_hasher();
        h.write(definition);
        h.write_u64(settings);
        StatementRef(Arc::new(Statement { definition: definition.into(), settings, hash: h.finish() }))
    }
}

impl PartialEq for StatementRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash && self.0.settings == other.0.settings && self.0.definition == other.0.definition)
    }
}

impl Eq for StatementRef {}

impl Hash for StatementRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

/// A fingerprint of a client's session settings, whatever their order.
fn settings_fingerprint(settings: &Settings) -> u64 {
    settings
        .iter()
        .map(|(name, value)| {
            let mut h = hasher().build_hasher();
            h.write(name.as_bytes());
            h.write_u8(0);
            h.write(value.as_bytes());
            h.finish()
        })
        .fold(0, u64::wrapping_add)
}

/// One client's named statements, by the client's names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<Box<[u8]>, StatementRef>,
}

impl ClientStatements {
    /// Forgets every statement (the client ran `DISCARD ALL` or `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The statements one backend holds under its own names.
#[derive(Debug, Default)]
pub struct BackendStatements {
    slots: HashMap<StatementRef, Slot>,
    next_id: u64,
    /// Counts relays, to know which statements the current one uses.
    clock: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u64,
    used: u64,
}

impl BackendStatements {
    /// The backend's statements are gone (`DISCARD ALL`, `DEALLOCATE`): forget them all. Names
    /// are never reused, so one that survived cannot be confused with a new one.
    pub fn clear(&mut self) {
        self.slots.clear();
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// A relay starts using this backend; returns its tick.
    pub fn start_relay(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn touch(&mut self, stmt: &StatementRef, now: u64) -> Option<u64> {
        let slot = self.slots.get_mut(stmt)?;
        slot.used = now;
        Some(slot.id)
    }

    fn insert(&mut self, stmt: StatementRef, now: u64) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.slots.insert(stmt, Slot { id, used: now });
        id
    }

    /// If over `max`, removes the least recently used statement the current relay (`now`) has
    /// not used, and returns its id (to be closed on the backend). Statements the relay uses
    /// stay: closing one would close the portals bound from it.
    fn evict(&mut self, max: usize, now: u64) -> Option<u64> {
        if self.slots.len() <= max {
            return None;
        }
        let (victim, slot) = self.slots.iter().filter(|(_, s)| s.used < now).min_by_key(|(_, s)| s.used)?;
        let (victim, id) = (victim.clone(), slot.id);
        self.slots.remove(&victim);
        Some(id)
    }

    /// Forgets `stmt` if the backend holds it as `id` (its Parse failed).
    fn forget(&mut self, stmt: &StatementRef, id: u64) {
        if self.slots.get(stmt).is_some_and(|s| s.id == id) {
            self.slots.remove(stmt);
        }
    }
}

/// What the backend owes a tracked relay, in order, and where COPY FROM STDIN stands.
#[derive(Debug, Default)]
pub struct Pipeline {
    expect: VecDeque<Expect>,
    /// CopyDone and CopyFail messages the client sent.
    client_copy_ends: u32,
    /// CopyInResponses the backend sent.
    copies_started: u32,
    pub counts: Counts,
}

/// What a relay did with statements, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub client_parses: u64,
    pub backend_parses: u64,
    pub evictions: u64,
}

impl Pipeline {
    pub fn is_empty(&self) -> bool {
        self.expect.is_empty()
    }
}

/// An answer the backend owes for a message the relay passed on or added, in order.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete. `added`: a Parse the relay sent (its answer is dropped). `defines`: what
    /// to forget should the Parse fail.
    Parse { added: bool, defines: Option<Defines> },
    /// CloseComplete; `added`: the relay's own Close (its answer is dropped).
    Close { added: bool },
    /// ReadyForQuery (Sync, Query, FunctionCall): after an error the backend skips the
    /// extended-protocol messages up to here. A Sync's holds how many COPYs the client had
    /// ended when it sent it: one sent during COPY FROM STDIN is ignored by the backend.
    Ready { sync_copy_ends: Option<u32> },
}

/// `DEALLOCATE` and `DISCARD ALL` a client runs as SQL: whatever they name, the backend's
/// statements may be gone; with `ALL`, the client's too. (`DEALLOCATE name` of a statement the
/// client prepared with Parse reaches the backend as it is, which knows no such name: 26000.)
#[derive(Debug, Default)]
pub struct Forgets {
    backend: bool,
    client: bool,
}

impl Forgets {
    /// Reads a Query's text.
    pub fn note(&mut self, sql: &[u8]) {
        let mut words = sql.split(|b| !(b.is_ascii_alphanumeric() || *b == b'_')).filter(|w| !w.is_empty());
        while let Some(word) = words.next() {
            let deallocate = word.eq_ignore_ascii_case(b"deallocate");
            if !deallocate && !word.eq_ignore_ascii_case(b"discard") {
                continue;
            }
            let mut next = words.next();
            if deallocate && next.is_some_and(|w| w.eq_ignore_ascii_case(b"prepare")) {
                next = words.next();
            }
            let all = next.is_some_and(|w| w.eq_ignore_ascii_case(b"all"));
            self.backend |= deallocate || all;
            self.client |= all;
        }
    }

    pub fn apply(self, client: &mut ClientStatements, backend: &mut BackendStatements) {
        if self.backend {
            backend.clear();
        }
        if self.client {
            client.clear();
        }
    }
}

/// The statement a named Parse defines on the backend (as `id`), and the client's name for it
/// (none for a Parse the relay added).
#[derive(Debug)]
pub struct Defines {
    stmt: StatementRef,
    id: u64,
    client_name: Option<Box<[u8]>>,
}

/// What the relay does with a backend message, per [`Rewriter::answer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Pass,
    Drop,
}

/// Rewrites a tracked client's extended-protocol messages for one backend, one relay.
pub struct Rewriter<'a> {
    pub client: &'a mut ClientStatements,
    pub backend: &'a mut BackendStatements,
    pub pipeline: &'a mut Pipeline,
    /// The client's settings, for the statements it defines (`None` when only reading answers).
    pub settings: Option<&'a Settings>,
    pub max: usize,
    /// This relay's tick on the backend ([`BackendStatements::start_relay`]).
    pub now: u64,
}

impl Rewriter<'_> {
    /// A whole Parse (`body` after the 5-byte header): passed on under the backend's name.
    pub fn parse(&mut self, body: &[u8], out: &mut BytesMut) -> Result<(), ProtocolError> {
        let (name, definition) = split_cstr(body)?;
        if name.is_empty() {
            put_message(out, b'P', &[body]);
            self.pipeline.expect.push_back(Expect::Parse { added: false, defines: None });
            return Ok(());
        }
        if self.client.by_name.contains_key(name) {
            return Err(ProtocolError::DuplicateStatement);
        }
        if self.client.by_name.len() >= MAX_CLIENT_STATEMENTS {
            return Err(ProtocolError::TooManyStatements { max: MAX_CLIENT_STATEMENTS });
        }
        self.pipeline.counts.client_parses += 1;
        let stmt = StatementRef::new(definition, self.settings.map_or(0, settings_fingerprint));
        self.client.by_name.insert(name.into(), stmt.clone());
        let id = match self.backend.touch(&stmt, self.now) {
            // Already there: closed and parsed again, so the client gets its ParseComplete
            // from the backend, in order.
            Some(id) => {
                self.add_close(id, out);
                id
            }
            None => self.backend_insert(stmt.clone(), out),
        };
        put_named(out, b'P', &[], id, definition);
        self.pipeline.expect.push_back(Expect::Parse { added: false, defines: Some(Defines { stmt, id, client_name: Some(name.into()) }) });
        Ok(())
    }

    /// A whole Bind: the statement name (the body's second string) becomes the backend's.
    pub fn bind(&mut self, body: &[u8], out: &mut BytesMut) -> Result<(), ProtocolError> {
        let (portal, rest) = split_cstr(body)?;
        let (name, params) = split_cstr(rest)?;
        let portal_and_nul = &body[..portal.len() + 1];
        match self.backend_name_for(name, out) {
            Some(id) => put_named(out, b'B', portal_and_nul, id, params),
            None if name.starts_with(SERVER_PREFIX) => put_message(out, b'B', &[portal_and_nul, NO_STATEMENT, b"\0", params]),
            None => put_message(out, b'B', &[body]),
        }
        Ok(())
    }

    /// A whole Describe or Close (`tag`): of a statement ('S'), the name becomes the backend's.
    pub fn describe_or_close(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) -> Result<(), ProtocolError> {
        let close = tag == b'C';
        if close {
            self.pipeline.expect.push_back(Expect::Close { added: false });
        }
        let (kind, name) = match body.split_first() {
            Some((b'S', rest)) => (b'S', split_cstr(rest)?.0),
            // A portal (or nonsense, which the backend refuses): as it is.
            _ => {
                put_message(out, tag, &[body]);
                return Ok(());
            }
        };
        if name.is_empty() {
            put_message(out, tag, &[body]);
        } else if close {
            // The client's name goes; the backend's copy stays for other clients.
            self.client.by_name.remove(name);
            put_message(out, tag, &[&[kind], NO_STATEMENT, b"\0"]);
        } else {
            match self.backend_name_for(name, out) {
                Some(id) => put_named(out, tag, &[kind], id, &[]),
                None if name.starts_with(SERVER_PREFIX) => put_message(out, tag, &[&[kind], NO_STATEMENT, b"\0"]),
                None => put_message(out, tag, &[body]),
            }
        }
        Ok(())
    }

    /// A message that ends in ReadyForQuery (Query, Sync, FunctionCall) was passed on.
    pub fn ready(&mut self, sync: bool) {
        let sync_copy_ends = sync.then_some(self.pipeline.client_copy_ends);
        self.pipeline.expect.push_back(Expect::Ready { sync_copy_ends });
    }

    /// The client ended a COPY FROM STDIN (CopyDone or CopyFail).
    pub fn copy_end(&mut self) {
        self.pipeline.client_copy_ends += 1;
    }

    /// The backend started a COPY FROM STDIN: the Syncs the client sent since the command and
    /// before its end of this COPY get no answer (tokio-postgres and libpq send one with the
    /// command). Returns how many were expected.
    pub fn copy_started(&mut self) -> u32 {
        // (Copies end in order: this one's end is the client's next after the earlier ones'.)
        let before_this_end = self.pipeline.copies_started;
        self.pipeline.copies_started += 1;
        let waiting = self.pipeline.expect.len();
        self.pipeline.expect.retain(|e| !matches!(e, Expect::Ready { sync_copy_ends: Some(n) } if *n <= before_this_end));
        (waiting - self.pipeline.expect.len()) as u32
    }

    /// The backend's name for the client's statement `name`, parsing it there first (into
    /// `out`) if the backend lacks it. `None`: the client has no such statement.
    fn backend_name_for(&mut self, name: &[u8], out: &mut BytesMut) -> Option<u64> {
        let stmt = self.client.by_name.get(name)?.clone();
        if let Some(id) = self.backend.touch(&stmt, self.now) {
            return Some(id);
        }
        let id = self.backend_insert(stmt.clone(), out);
        self.pipeline.counts.backend_parses += 1;
        put_named(out, b'P', &[], id, &stmt.0.definition);
        self.pipeline.expect.push_back(Expect::Parse { added: true, defines: Some(Defines { stmt, id, client_name: None }) });
        Some(id)
    }

    /// Gives `stmt` a backend name, first closing the backend's least recently used statement
    /// if that puts it over the limit.
    fn backend_insert(&mut self, stmt: StatementRef, out: &mut BytesMut) -> u64 {
        let id = self.backend.insert(stmt, self.now);
        if let Some(old) = self.backend.evict(self.max, self.now) {
            self.pipeline.counts.evictions += 1;
            self.add_close(old, out);
        }
        id
    }

    fn add_close(&mut self, id: u64, out: &mut BytesMut) {
        put_named(out, b'C', b"S", id, &[]);
        self.pipeline.expect.push_back(Expect::Close { added: true });
    }

    /// Books a backend message (`tag`) against what is expected; says whether the client sees it.
    pub fn answer(&mut self, tag: u8) -> Result<Answer, ProtocolError> {
        match tag {
            // (A ReadyForQuery still expected before it was never coming: answers are in order.)
            PARSE_COMPLETE => match self.pop_past_ready() {
                Some(Expect::Parse { added, .. }) => Ok(if added { Answer::Drop } else { Answer::Pass }),
                _ => Err(ProtocolError::Malformed("ParseComplete for no Parse")),
            },
            CLOSE_COMPLETE => match self.pop_past_ready() {
                Some(Expect::Close { added }) => Ok(if added { Answer::Drop } else { Answer::Pass }),
                _ => Err(ProtocolError::Malformed("CloseComplete for no Close")),
            },
            backend_tag::ERROR_RESPONSE => {
                // The failed message and the rest up to the next Sync got or get no answer.
                while matches!(self.pipeline.expect.front(), Some(Expect::Parse { .. } | Expect::Close { .. })) {
                    if let Some(Expect::Parse { defines: Some(Defines { stmt, id, client_name }), .. }) = self.pipeline.expect.pop_front() {
                        self.backend.forget(&stmt, id);
                        if let Some(name) = client_name
                            && self.client.by_name.get(&name).is_some_and(|s| *s == stmt)
                        {
                            self.client.by_name.remove(&name);
                        }
                    }
                }
                Ok(Answer::Pass)
            }
            backend_tag::READY_FOR_QUERY => {
                while let Some(e) = self.pipeline.expect.pop_front() {
                    if matches!(e, Expect::Ready { .. }) {
                        break;
                    }
                }
                Ok(Answer::Pass)
            }
            _ => Ok(Answer::Pass),
        }
    }
}

impl Rewriter<'_> {
    fn pop_past_ready(&mut self) -> Option<Expect> {
        while matches!(self.pipeline.expect.front(), Some(Expect::Ready { .. })) {
            self.pipeline.expect.pop_front();
        }
        self.pipeline.expect.pop_front()
    }
}

/// The C string at the start of `body`, and what follows its NUL.
fn split_cstr(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let nul = body.iter().position(|&b| b == 0).ok_or(ProtocolError::Malformed("missing string terminator"))?;
    Ok((&body[..nul], &body[nul + 1..]))
}

/// Writes a message made of `parts`.
fn put_message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(5 + len);
    out.put_u8(tag);
    out.put_i32((4 + len) as i32);
    for p in parts {
        out.put_slice(p);
    }
}

/// Writes `tag`, `before`, the backend statement name `id` (NUL-terminated), `after`.
fn put_named(out: &mut BytesMut, tag: u8, before: &[u8], id: u64, after: &[u8]) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = id;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put_message(out, tag, &[before, SERVER_PREFIX, &digits[at..], b"\0", after]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewriter<'a>(
        client: &'a mut ClientStatements,
        backend: &'a mut BackendStatements,
        pipeline: &'a mut Pipeline,
        max: usize,
    ) -> Rewriter<'a> {
        let now = backend.start_relay();
        Rewriter { client, backend, pipeline, settings: None, max, now }
    }

    /// (tag, body) of each message in `out`.
    fn messages(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = i32::from_be_bytes(out[at + 1..at + 5].try_into().unwrap()) as usize;
            v.push((out[at], out[at + 5..at + 1 + len].to_vec()));
            at += 1 + len;
        }
        v
    }

    #[test]
    fn parse_then_bind_elsewhere_parses_it_on_the_new_backend_first() {
        let (mut client, mut first, mut second, mut expect) =
            (ClientStatements::default(), BackendStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        rewriter(&mut client, &mut first, &mut expect, 10).parse(b"s1\0SELECT $1\0\0\x01\0\0\0\x17", &mut out).unwrap();
        assert_eq!(messages(&out), vec![(b'P', b"pgwarden_1\0SELECT $1\0\0\x01\0\0\0\x17".to_vec())]);
        let mut r = rewriter(&mut client, &mut first, &mut expect, 10);
        assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);

        // The next transaction runs on another backend: the statement is parsed there first.
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut second, &mut expect, 10);
        r.bind(b"\0s1\0\0\0\0\x01\0\0\0\x0142\0\0", &mut out).unwrap();
        r.ready(true);
        assert_eq!(
            messages(&out),
            vec![
                (b'P', b"pgwarden_1\0SELECT $1\0\0\x01\0\0\0\x17".to_vec()),
                (b'B', b"\0pgwarden_1\0\0\0\0\x01\0\0\0\x0142\0\0".to_vec()),
            ]
        );
        assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Drop, "the added Parse's answer is not the client's");
        assert_eq!(r.answer(b'2').unwrap(), Answer::Pass);
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert!(expect.is_empty());
        // Now the second backend has it: the Bind goes alone.
        let mut out = BytesMut::new();
        rewriter(&mut client, &mut second, &mut expect, 10).bind(b"\0s1\0\0\0\0\0\0\0", &mut out).unwrap();
        assert_eq!(messages(&out), vec![(b'B', b"\0pgwarden_1\0\0\0\0\0\0\0".to_vec())]);
    }

    #[test]
    fn clients_preparing_the_same_statement_share_the_backends_copy() {
        let (mut a, mut b, mut backend, mut expect) =
            (ClientStatements::default(), ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        rewriter(&mut a, &mut backend, &mut expect, 10).parse(b"x\0SELECT 1\0\0\0", &mut out).unwrap();
        let mut out = BytesMut::new();
        rewriter(&mut b, &mut backend, &mut expect, 10).bind(b"\0x\0\0\0\0\0\0\0", &mut out).unwrap();
        assert_eq!(messages(&out), vec![(b'B', b"\0x\0\0\0\0\0\0\0".to_vec())], "b has no statement x: as it is");
        let mut out = BytesMut::new();
        rewriter(&mut b, &mut backend, &mut expect, 10).parse(b"y\0SELECT 1\0\0\0", &mut out).unwrap();
        // The backend has it: closed and parsed again under the same name, for b's ParseComplete.
        assert_eq!(
            messages(&out),
            vec![(b'C', b"Spgwarden_1\0".to_vec()), (b'P', b"pgwarden_1\0SELECT 1\0\0\0".to_vec())]
        );
        assert_eq!(backend.len(), 1);
    }

    #[test]
    fn a_different_search_path_is_a_different_statement() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        rewriter(&mut client, &mut backend, &mut expect, 10).parse(b"a\0SELECT * FROM t\0\0\0", &mut out).unwrap();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        let mut other = Settings::default();
        other.set("search_path", "elsewhere");
        r.settings = Some(&other);
        r.parse(b"b\0SELECT * FROM t\0\0\0", &mut out).unwrap();
        assert_eq!(backend.len(), 2);
    }

    #[test]
    fn a_failed_parse_leaves_no_statement_and_skipped_ones_are_forgotten() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.parse(b"bad\0SELEC 1\0\0\0", &mut out).unwrap();
        r.parse(b"good\0SELECT 1\0\0\0", &mut out).unwrap();
        r.ready(true);
        r.parse(b"later\0SELECT 2\0\0\0", &mut out).unwrap();
        r.ready(true);
        // The first Parse fails; the second is skipped up to the Sync.
        assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass, "the next Sync's Parse ran");
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert!(expect.is_empty());
        assert_eq!(client.len(), 1, "only 'later' exists");
        assert_eq!(backend.len(), 1);
        // A name whose Parse failed may be used again.
        let mut out = BytesMut::new();
        rewriter(&mut client, &mut backend, &mut expect, 10).parse(b"bad\0SELECT 3\0\0\0", &mut out).unwrap();
    }

    #[test]
    fn a_name_in_use_ends_the_session_and_close_frees_it() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.parse(b"s\0SELECT 1\0\0\0", &mut out).unwrap();
        assert_eq!(r.parse(b"s\0SELECT 2\0\0\0", &mut out), Err(ProtocolError::DuplicateStatement));
        let mut out = BytesMut::new();
        r.describe_or_close(b'C', b"Ss\0", &mut out).unwrap();
        assert_eq!(messages(&out), vec![(b'C', b"Spgwarden_\0".to_vec())], "the backend's copy stays");
        r.parse(b"s\0SELECT 2\0\0\0", &mut out).unwrap();
        assert_eq!(backend.len(), 2);
    }

    #[test]
    fn over_the_limit_the_least_recently_used_statement_not_in_use_is_closed() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        for (i, sql) in [b"a\0SELECT 1\0\0\0", b"b\0SELECT 2\0\0\0"].iter().enumerate() {
            let mut out = BytesMut::new();
            let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
            r.parse(&sql[..], &mut out).unwrap();
            assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);
            assert_eq!(messages(&out).len(), 1, "statement {i} fits");
        }
        // "a" is used again, then a third statement: "b" is the one to go.
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
        r.describe_or_close(b'D', b"Sa\0", &mut out).unwrap();
        r.parse(b"c\0SELECT 3\0\0\0", &mut out).unwrap();
        let m = messages(&out);
        assert_eq!(m[1], (b'C', b"Spgwarden_2\0".to_vec()));
        assert_eq!(m[2].0, b'P');
        assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Drop);
        // Within one relay everything is in use: nothing is closed, the limit waits.
        r.parse(b"d\0SELECT 4\0\0\0", &mut out).unwrap();
        assert_eq!(backend.len(), 3);
        assert_eq!(expect.counts, Counts { client_parses: 4, backend_parses: 0, evictions: 1 });
    }

    #[test]
    fn a_clients_name_that_looks_like_the_backends_is_never_passed_on() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.parse(b"mine\0SELECT 1\0\0\0", &mut out).unwrap();
        let mut out = BytesMut::new();
        r.bind(b"\0pgwarden_1\0\0\0\0\0\0\0", &mut out).unwrap();
        r.describe_or_close(b'D', b"Spgwarden_1\0", &mut out).unwrap();
        assert_eq!(
            messages(&out),
            vec![(b'B', b"\0pgwarden_\0\0\0\0\0\0\0".to_vec()), (b'D', b"Spgwarden_\0".to_vec())]
        );
    }

    #[test]
    fn syncs_sent_into_a_copy_from_stdin_are_not_answered() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        // Bind, Execute (COPY ... FROM STDIN), Sync; CopyData, CopyDone, Sync; Close, Sync.
        r.ready(true);
        r.copy_end();
        r.ready(true);
        r.describe_or_close(b'C', b"Ss\0", &mut out).unwrap();
        r.ready(true);
        assert_eq!(r.copy_started(), 1, "the Sync sent with the COPY is ignored");
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Pass);
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert!(expect.is_empty());
    }

    #[test]
    fn deallocate_and_discard_all_forget_what_they_drop() {
        let forgets = |sql: &str| {
            let mut f = Forgets::default();
            f.note(sql.as_bytes());
            (f.backend, f.client)
        };
        assert_eq!(forgets("DEALLOCATE ALL"), (true, true));
        assert_eq!(forgets("select 1; deallocate prepare all"), (true, true));
        assert_eq!(forgets("DISCARD ALL"), (true, true));
        assert_eq!(forgets("DEALLOCATE s1"), (true, false));
        assert_eq!(forgets("DISCARD PLANS"), (false, false));
        assert_eq!(forgets("SELECT discarded FROM t"), (false, false));
    }

    #[test]
    fn malformed_messages_are_refused_not_passed_on_half_read() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        assert!(r.parse(b"no terminator", &mut out).is_err());
        assert!(r.bind(b"\0s", &mut out).is_err());
        assert!(r.describe_or_close(b'D', b"Sx", &mut out).is_err());
        assert!(r.answer(PARSE_COMPLETE).is_err(), "an answer for nothing");
        assert!(out.is_empty());
    }
}
