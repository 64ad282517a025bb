//! Named prepared statements under transaction pooling (PgBouncer's `max_prepared_statements`;
//! RDS Proxy pins the session instead, as pgwarden does when the setting is 0). A client's
//! named statements are remembered per session, by the client's name, as the Parse it sent;
//! each backend holds its own copies under names of its own (`pgwarden_<n>`), keyed by that
//! Parse and the client's session settings (a literal is read in the settings of the moment:
//! `'01/02/2024'::date` under another `DateStyle` is another statement), so clients preparing
//! the same statement with the same settings share one copy; one parsed in a transaction that
//! may have changed settings (`SET LOCAL`, ...) is nobody else's. The relay rewrites the
//! statement name in every Parse, Bind, Describe and Close; a Bind or Describe of a statement
//! the backend does not have yet is preceded by a Parse of it; a backend over its limit closes
//! its least recently used statements. The answers to those added messages (ParseComplete,
//! CloseComplete) are taken out of the stream the client sees, in order ([`Expect`]).
//!
//! A client Close of a named statement only forgets the client's name (the backend's copy may
//! serve others) and still reaches the backend, under a name no statement has, for its
//! CloseComplete. Like PgBouncer, a Parse of a name already in use ends the session (42P05):
//! PostgreSQL's in-band error cannot be reproduced once the Parse is not passed on as is.
//! Must not: read or change anything but statement names, or touch sockets.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, BytesMut};

use super::session_state::SessionEffects;
use crate::backend::settings::Settings;
use crate::protocol::{ProtocolError, backend_tag};

/// Backends' own statement names start with this; a client's name that does is never passed on.
const SERVER_PREFIX: &[u8] = b"pgwarden_";
/// The name a client's Close of a named statement reaches the backend with: never prepared,
/// so the backend answers CloseComplete and closes nothing.
const NO_STATEMENT: &[u8] = b"pgwarden_";
/// Most named statements one client may hold at once, and their most bytes.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;
pub const MAX_CLIENT_STATEMENT_BYTES: usize = 32 * 1024 * 1024;

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
    /// The client's session settings when it was parsed (or a number no other has).
    settings: u64,
    hash: u64,
    /// What running it does to the session (a `SET` pgwarden follows, state that pins), for
    /// each Bind of it: the Parse that was read for this may have been in another transaction.
    effects: Option<Box<SessionEffects>>,
    /// Running it may change settings (`SET LOCAL` too): statements parsed after it in the same
    /// relay are not shared.
    may_set: bool,
}

/// A shared [`Statement`]; equal when the definitions and settings are.
#[derive(Clone, Debug)]
pub struct StatementRef(Arc<Statement>);

impl StatementRef {
    fn new(definition: &[u8], settings: u64, effects: SessionEffects, may_set: bool) -> StatementRef {
        let mut h = hasher().build_hasher();
        h.write(definition);
        h.write_u64(settings);
        let effects = (effects != SessionEffects::default()).then(|| Box::new(effects));
        StatementRef(Arc::new(Statement { definition: definition.into(), settings, hash: h.finish(), effects, may_set }))
    }

    /// What running the statement does to the session, if anything.
    pub fn effects(&self) -> Option<&SessionEffects> {
        self.0.effects.as_deref()
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

/// A settings "fingerprint" no fingerprint equals (well, one in 2^63): for a statement parsed
/// where the settings in force are not known, never to be shared.
fn unshared_settings() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    (1 << 63) | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One client's named statements, by the client's names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<Box<[u8]>, StatementRef>,
    /// Bytes of the definitions held.
    bytes: usize,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    fn insert(&mut self, name: &[u8], stmt: StatementRef) {
        self.bytes += stmt.0.definition.len();
        if let Some(old) = self.by_name.insert(name.into(), stmt) {
            self.bytes -= old.0.definition.len();
        }
    }

    fn remove(&mut self, name: &[u8]) -> Option<StatementRef> {
        let old = self.by_name.remove(name)?;
        self.bytes -= old.0.definition.len();
        Some(old)
    }

    fn clear(&mut self) {
        self.by_name.clear();
        self.bytes = 0;
    }
}

/// The statements one backend holds under its own names.
#[derive(Debug, Default)]
pub struct BackendStatements {
    slots: HashMap<StatementRef, Slot>,
    next_id: u64,
    /// Counts relays, to know which statements the current one uses.
    clock: u64,
    /// Statements that may exist on the backend unknown to `slots` (a Parse or Close of them was
    /// skipped after an error): closed with the next rewritten message (closing a statement that
    /// does not exist is no error).
    to_close: Vec<u64>,
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
        self.to_close.clear();
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

    /// While over `max`, removes the least recently used statement the current relay (`now`)
    /// has not used (closing one would close the portals bound from it), or past twice `max`
    /// any but `keep`: the ids to close on the backend.
    fn evict(&mut self, max: usize, now: u64, keep: u64) -> Vec<u64> {
        let mut ids = Vec::new();
        while self.slots.len() > max {
            let hard = self.slots.len() > max.saturating_mul(2);
            let victim = self.slots.iter().filter(|(_, s)| s.id != keep && (hard || s.used < now)).min_by_key(|(_, s)| s.used);
            let Some((victim, slot)) = victim else { break };
            let (victim, id) = (victim.clone(), slot.id);
            self.slots.remove(&victim);
            ids.push(id);
        }
        ids
    }

    /// Forgets `stmt` if the backend holds it as `id`.
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
    /// The relay passed on SQL that may change settings: statements parsed from then on are
    /// not shared.
    settings_unsure: bool,
    /// Bind, Describe, Execute or Flush passed on since the last Sync: their answers are not
    /// tracked, so an error before a Query may be theirs.
    untracked_unsynced: bool,
    /// Queries and FunctionCalls the backend skipped (after an extended-protocol error): their
    /// ReadyForQuery never comes.
    skipped_requests: u32,
    /// A COPY FROM STDIN ended in an error, with no CopyDone or CopyFail to count: which Syncs
    /// the backend ignores is no longer known, so all are awaited (the relay then keeps its
    /// backend to the end of the session, which closes it).
    copy_count_lost: bool,
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

    pub fn settings_unsure(&mut self, unsure: bool) {
        self.settings_unsure |= unsure;
    }

    /// The backend reported an error during a COPY FROM STDIN.
    pub fn copy_failed(&mut self) {
        self.copy_count_lost = true;
    }

    /// Requests the backend skipped since last asked (see [`Rewriter::answer`]).
    pub fn take_skipped_requests(&mut self) -> u32 {
        std::mem::take(&mut self.skipped_requests)
    }

    /// A Bind, Describe, Execute or Flush was passed on (`sync` false); or a Sync. (Not Parse
    /// or Close: their answers are tracked, so an error after them is known not to be theirs.)
    pub fn note_extended(&mut self, sync: bool) {
        self.untracked_unsynced = !sync;
    }

    pub fn untracked_unsynced(&self) -> bool {
        self.untracked_unsynced
    }
}

/// An answer the backend owes for a message the relay passed on or added, in order.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete. `added`: a Parse the relay sent (its answer is dropped). `defines`: what
    /// to undo should the Parse be skipped or fail.
    Parse { added: bool, defines: Option<Defines> },
    /// CloseComplete. `added`: the relay's own Close of statement `id` (its answer is dropped).
    /// `forgot`: the client's name a client Close removed, to restore should it be skipped.
    Close { added: Option<u64>, forgot: Option<(Box<[u8]>, StatementRef)> },
    /// ReadyForQuery: a Sync's (`sync_copy_ends`: how many COPYs the client had ended when it
    /// sent it: one sent during COPY FROM STDIN is ignored by the backend), or a Query's or
    /// FunctionCall's (`in_batch`: sent after a Bind, Describe, Execute or Flush not yet synced).
    Ready { sync_copy_ends: Option<u32>, in_batch: bool },
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
    /// Before a Parse, Bind, Describe or Close (at a message boundary, in a batch the relay does
    /// not end before its Sync): closes what an error left behind.
    pub fn begin(&mut self, out: &mut BytesMut) {
        for id in std::mem::take(&mut self.backend.to_close) {
            self.add_close(id, out);
        }
    }

    /// A whole Parse (`body` after the 5-byte header): passed on under the backend's name.
    /// `effects`: what running its SQL does to the session; `may_set`: whether it may change
    /// settings.
    pub fn parse(&mut self, body: &[u8], effects: SessionEffects, may_set: bool, out: &mut BytesMut) -> Result<(), ProtocolError> {
        let (name, definition) = split_cstr(body)?;
        if name.is_empty() {
            put_message(out, b'P', &[body]);
            self.pipeline.expect.push_back(Expect::Parse { added: false, defines: None });
            return Ok(());
        }
        if self.client.by_name.contains_key(name) {
            return Err(ProtocolError::DuplicateStatement);
        }
        if self.client.by_name.len() >= MAX_CLIENT_STATEMENTS || self.client.bytes + definition.len() > MAX_CLIENT_STATEMENT_BYTES {
            return Err(ProtocolError::TooManyStatements);
        }
        self.pipeline.counts.client_parses += 1;
        let settings = match self.settings {
            Some(_) if self.pipeline.settings_unsure => unshared_settings(),
            Some(settings) => settings_fingerprint(settings),
            None => 0,
        };
        let stmt = StatementRef::new(definition, settings, effects, may_set);
        self.client.insert(name, stmt.clone());
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
    /// Returns the client's statement it binds, if it is one.
    pub fn bind(&mut self, body: &[u8], out: &mut BytesMut) -> Result<Option<StatementRef>, ProtocolError> {
        let (portal, rest) = split_cstr(body)?;
        let (name, params) = split_cstr(rest)?;
        let portal_and_nul = &body[..portal.len() + 1];
        match self.backend_name_for(name, out) {
            Some(id) => put_named(out, b'B', portal_and_nul, id, params),
            None if name.starts_with(SERVER_PREFIX) => put_message(out, b'B', &[portal_and_nul, NO_STATEMENT, b"\0", params]),
            None => put_message(out, b'B', &[body]),
        }
        let stmt = self.client.by_name.get(name).cloned();
        self.pipeline.settings_unsure |= stmt.as_ref().is_some_and(|s| s.0.may_set);
        Ok(stmt)
    }

    /// A whole Describe or Close (`tag`): of a statement ('S'), the name becomes the backend's.
    pub fn describe_or_close(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) -> Result<(), ProtocolError> {
        let close = tag == b'C';
        let (kind, name) = match body.split_first() {
            Some((b'S', rest)) => (b'S', split_cstr(rest)?.0),
            // A portal (or nonsense, which the backend refuses): as it is.
            _ => {
                if close {
                    self.pipeline.expect.push_back(Expect::Close { added: None, forgot: None });
                }
                put_message(out, tag, &[body]);
                return Ok(());
            }
        };
        if close {
            // The client's name goes; the backend's copy stays for other clients.
            let forgot = if name.is_empty() { None } else { self.client.remove(name).map(|stmt| (name.into(), stmt)) };
            self.pipeline.expect.push_back(Expect::Close { added: None, forgot });
            if name.is_empty() {
                put_message(out, tag, &[body]);
            } else {
                put_message(out, tag, &[&[kind], NO_STATEMENT, b"\0"]);
            }
            return Ok(());
        }
        match self.backend_name_for(name, out) {
            Some(id) => put_named(out, tag, &[kind], id, &[]),
            None if name.starts_with(SERVER_PREFIX) => put_message(out, tag, &[&[kind], NO_STATEMENT, b"\0"]),
            None => put_message(out, tag, &[body]),
        }
        Ok(())
    }

    /// SQL the client sent (a Query's, or a Parse's) was read: `may_set` if it may change
    /// settings; `drops` if it deallocates statements (all of them: `Some(true)`).
    pub fn sql(&mut self, may_set: bool, drops: Option<bool>) {
        self.pipeline.settings_unsure |= may_set;
        // The backend's statements may be gone, the client's too if all are.
        if let Some(all) = drops {
            self.backend.clear();
            if all {
                self.client.clear();
            }
        }
    }

    /// A message that ends in ReadyForQuery was passed on: a Sync (`sync`), or a Query or
    /// FunctionCall, `in_batch` if extended-protocol messages before it are not yet synced.
    pub fn ready(&mut self, sync: bool, in_batch: bool) {
        let sync_copy_ends = sync.then_some(self.pipeline.client_copy_ends);
        self.pipeline.expect.push_back(Expect::Ready { sync_copy_ends, in_batch: in_batch && !sync });
    }

    /// The client ended a COPY FROM STDIN (CopyDone or CopyFail).
    pub fn copy_end(&mut self) {
        self.pipeline.client_copy_ends = self.pipeline.client_copy_ends.wrapping_add(1);
    }

    /// The backend started a COPY FROM STDIN: the Syncs the client sent since the command and
    /// before its end of this COPY get no answer (tokio-postgres and libpq send one with the
    /// command). Returns how many were expected.
    pub fn copy_started(&mut self) -> u32 {
        if self.pipeline.copy_count_lost {
            return 0;
        }
        // (Copies end in order: this one's end is the client's next after the earlier ones'.)
        let before_this_end = self.pipeline.copies_started;
        self.pipeline.copies_started = self.pipeline.copies_started.wrapping_add(1);
        let waiting = self.pipeline.expect.len();
        self.pipeline.expect.retain(|e| !matches!(e, Expect::Ready { sync_copy_ends: Some(n), .. } if *n <= before_this_end));
        (waiting - self.pipeline.expect.len()) as u32
    }

    /// The backend name for the client's statement `name`, parsing it there first (into
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

    /// Gives `stmt` a backend name, first closing the backend's least recently used statements
    /// if that puts it over the limit.
    fn backend_insert(&mut self, stmt: StatementRef, out: &mut BytesMut) -> u64 {
        let id = self.backend.insert(stmt, self.now);
        for old in self.backend.evict(self.max, self.now, id) {
            self.pipeline.counts.evictions += 1;
            self.add_close(old, out);
        }
        id
    }

    fn add_close(&mut self, id: u64, out: &mut BytesMut) {
        put_named(out, b'C', b"S", id, &[]);
        self.pipeline.expect.push_back(Expect::Close { added: Some(id), forgot: None });
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
                Some(Expect::Close { added, .. }) => Ok(if added.is_some() { Answer::Drop } else { Answer::Pass }),
                _ => Err(ProtocolError::Malformed("CloseComplete for no Close")),
            },
            backend_tag::ERROR_RESPONSE => {
                // The failed message and the rest up to the next Sync got or get no answer
                // (undone at its ReadyForQuery). A Query or FunctionCall in there was skipped
                // if an extended-protocol message before it failed, answered if it failed.
                let mut extended = false;
                let mut skipped = 0;
                for e in &self.pipeline.expect {
                    match e {
                        Expect::Parse { .. } | Expect::Close { .. } => extended = true,
                        Expect::Ready { sync_copy_ends: Some(_), .. } => break,
                        Expect::Ready { in_batch, .. } => {
                            if !extended && !in_batch {
                                break; // Its own error: its ReadyForQuery comes.
                            }
                            if !extended {
                                return Err(ProtocolError::Malformed(
                                    "an error in a batch mixing extended-protocol messages and a Query",
                                ));
                            }
                            skipped += 1;
                        }
                    }
                }
                if skipped > 0 {
                    // Their ReadyForQuery never comes: the entries go now (the first ones).
                    let mut left = skipped;
                    self.pipeline.expect.retain(|e| {
                        let skip = left > 0 && matches!(e, Expect::Ready { sync_copy_ends: None, .. });
                        left -= u32::from(skip);
                        !skip
                    });
                    self.pipeline.skipped_requests += skipped;
                }
                Ok(Answer::Pass)
            }
            backend_tag::READY_FOR_QUERY => {
                // What is still expected before it was skipped: undone, last first.
                let mut skipped = Vec::new();
                while let Some(e) = self.pipeline.expect.pop_front() {
                    if matches!(e, Expect::Ready { .. }) {
                        break;
                    }
                    skipped.push(e);
                }
                for e in skipped.into_iter().rev() {
                    self.undo(e);
                }
                Ok(Answer::Pass)
            }
            _ => Ok(Answer::Pass),
        }
    }

    /// Undoes what the relay assumed of a message the backend skipped or failed: a Parse
    /// defined no statement (the backend closes the name, in case an earlier copy was left by a
    /// skipped Close); an added Close closed nothing (it is sent again); a client's Close left
    /// the client's statement in place.
    fn undo(&mut self, e: Expect) {
        match e {
            Expect::Parse { defines: Some(d), .. } => {
                self.backend.forget(&d.stmt, d.id);
                self.backend.to_close.push(d.id);
                if let Some(name) = d.client_name
                    && self.client.by_name.get(&name).is_some_and(|s| *s == d.stmt)
                {
                    self.client.remove(&name);
                }
            }
            Expect::Close { added: Some(id), .. } => self.backend.to_close.push(id),
            Expect::Close { forgot: Some((name, stmt)), .. } if !self.client.by_name.contains_key(&name) => {
                self.client.insert(&name, stmt);
            }
            _ => {}
        }
    }

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
        rewriter(&mut client, &mut first, &mut expect, 10).parse(b"s1\0SELECT $1\0\0\x01\0\0\0\x17", Default::default(), false, &mut out).unwrap();
        assert_eq!(messages(&out), vec![(b'P', b"pgwarden_1\0SELECT $1\0\0\x01\0\0\0\x17".to_vec())]);
        let mut r = rewriter(&mut client, &mut first, &mut expect, 10);
        assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);

        // The next transaction runs on another backend: the statement is parsed there first.
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut second, &mut expect, 10);
        r.bind(b"\0s1\0\0\0\0\x01\0\0\0\x0142\0\0", &mut out).unwrap();
        r.ready(true, false);
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
        rewriter(&mut a, &mut backend, &mut expect, 10).parse(b"x\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
        let mut out = BytesMut::new();
        rewriter(&mut b, &mut backend, &mut expect, 10).bind(b"\0x\0\0\0\0\0\0\0", &mut out).unwrap();
        assert_eq!(messages(&out), vec![(b'B', b"\0x\0\0\0\0\0\0\0".to_vec())], "b has no statement x: as it is");
        let mut out = BytesMut::new();
        rewriter(&mut b, &mut backend, &mut expect, 10).parse(b"y\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
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
        rewriter(&mut client, &mut backend, &mut expect, 10).parse(b"a\0SELECT * FROM t\0\0\0", Default::default(), false, &mut out).unwrap();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        let mut other = Settings::default();
        other.set("search_path", "elsewhere");
        r.settings = Some(&other);
        r.parse(b"b\0SELECT * FROM t\0\0\0", Default::default(), false, &mut out).unwrap();
        assert_eq!(backend.len(), 2);
    }

    #[test]
    fn a_failed_parse_leaves_no_statement_and_skipped_ones_are_forgotten() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.parse(b"bad\0SELEC 1\0\0\0", Default::default(), false, &mut out).unwrap();
        r.parse(b"good\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
        r.ready(true, false);
        r.parse(b"later\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
        r.ready(true, false);
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
        rewriter(&mut client, &mut backend, &mut expect, 10).parse(b"bad\0SELECT 3\0\0\0", Default::default(), false, &mut out).unwrap();
    }

    #[test]
    fn a_name_in_use_ends_the_session_and_close_frees_it() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.parse(b"s\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
        assert_eq!(r.parse(b"s\0SELECT 2\0\0\0", Default::default(), false, &mut out), Err(ProtocolError::DuplicateStatement));
        let mut out = BytesMut::new();
        r.describe_or_close(b'C', b"Ss\0", &mut out).unwrap();
        assert_eq!(messages(&out), vec![(b'C', b"Spgwarden_\0".to_vec())], "the backend's copy stays");
        r.parse(b"s\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
        assert_eq!(backend.len(), 2);
    }

    #[test]
    fn over_the_limit_the_least_recently_used_statement_not_in_use_is_closed() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        for (i, sql) in [b"a\0SELECT 1\0\0\0", b"b\0SELECT 2\0\0\0"].iter().enumerate() {
            let mut out = BytesMut::new();
            let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
            r.parse(&sql[..], Default::default(), false, &mut out).unwrap();
            assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);
            assert_eq!(messages(&out).len(), 1, "statement {i} fits");
        }
        // "a" is used again, then a third statement: "b" is the one to go.
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
        r.describe_or_close(b'D', b"Sa\0", &mut out).unwrap();
        r.parse(b"c\0SELECT 3\0\0\0", Default::default(), false, &mut out).unwrap();
        let m = messages(&out);
        assert_eq!(m[1], (b'C', b"Spgwarden_2\0".to_vec()));
        assert_eq!(m[2].0, b'P');
        assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Drop);
        // Within one relay everything is in use: nothing is closed, the limit waits.
        r.parse(b"d\0SELECT 4\0\0\0", Default::default(), false, &mut out).unwrap();
        assert_eq!(backend.len(), 3);
        assert_eq!(expect.counts, Counts { client_parses: 4, backend_parses: 0, evictions: 1 });
    }

    #[test]
    fn a_clients_name_that_looks_like_the_backends_is_never_passed_on() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.parse(b"mine\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
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
        r.ready(true, false);
        r.copy_end();
        r.ready(true, false);
        r.describe_or_close(b'C', b"Ss\0", &mut out).unwrap();
        r.ready(true, false);
        assert_eq!(r.copy_started(), 1, "the Sync sent with the COPY is ignored");
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Pass);
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert!(expect.is_empty());
    }

    #[test]
    fn after_a_copy_ends_in_an_error_no_sync_is_assumed_ignored() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        // Query COPY (bad data, no CopyDone), Query COPY, CopyDone, Sync: the first COPY's
        // error means the client's CopyDone ends the second, so the Sync is answered.
        r.ready(false, false);
        r.ready(false, false);
        r.copy_end();
        r.ready(true, false);
        assert_eq!(r.copy_started(), 0);
        r.pipeline.copy_failed();
        assert_eq!(r.copy_started(), 0, "the Sync is awaited: never too few");
    }

    #[test]
    fn a_statement_parsed_after_binding_one_that_may_set_is_nobody_elses() {
        let (mut a, mut b, mut backend, mut expect) =
            (ClientStatements::default(), ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let settings = Settings::default();
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut a, &mut backend, &mut expect, 10);
        r.settings = Some(&settings);
        r.parse(b"u\0SET datestyle TO 'ISO, DMY'\0\0\0", Default::default(), true, &mut out).unwrap();
        let mut expect = Pipeline::default();
        let mut r = rewriter(&mut a, &mut backend, &mut expect, 10);
        r.settings = Some(&settings);
        r.bind(b"\0u\0\0\0\0\0\0\0", &mut out).unwrap();
        r.parse(b"d\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
        let mut expect = Pipeline::default();
        let mut r = rewriter(&mut b, &mut backend, &mut expect, 10);
        r.settings = Some(&settings);
        let mut out = BytesMut::new();
        r.parse(b"d\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
        assert_eq!(messages(&out).len(), 1, "b's own Parse: not a's copy, parsed under DMY");
    }

    #[test]
    fn deallocate_all_forgets_every_statement_at_once_in_order() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.parse(b"s\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
        r.sql(false, Some(true));
        // The same name again, after DEALLOCATE ALL in the same pipeline: a new statement.
        r.parse(b"s\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
        r.sql(false, Some(false));
        assert_eq!((client.len(), backend.len()), (1, 0), "DEALLOCATE name: the backend's copies may be gone");
    }

    #[test]
    fn a_statement_parsed_after_sql_that_may_set_is_nobody_elses() {
        let (mut a, mut b, mut backend, mut expect) =
            (ClientStatements::default(), ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let settings = Settings::default();
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut a, &mut backend, &mut expect, 10);
        r.settings = Some(&settings);
        r.sql(true, None); // SET LOCAL datestyle = ...
        r.parse(b"x\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
        let mut expect = Pipeline::default();
        let mut r = rewriter(&mut b, &mut backend, &mut expect, 10);
        r.settings = Some(&settings);
        let mut out = BytesMut::new();
        r.parse(b"y\0SELECT '01/02/2024'::date\0\0\0", Default::default(), false, &mut out).unwrap();
        assert_eq!(messages(&out).len(), 1, "a Parse of its own, no Close of a's");
        assert_eq!(backend.len(), 2);
    }

    #[test]
    fn an_error_restores_skipped_closes_and_closes_skipped_parses_later() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 1);
        r.parse(b"a\0SELECT 1\0\0\0", Default::default(), false, &mut out).unwrap();
        assert_eq!(r.answer(PARSE_COMPLETE).unwrap(), Answer::Pass);
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 1);
        // Bind (fails), Close a, Parse b (evicts a: an added Close), Sync.
        r.describe_or_close(b'C', b"Sa\0", &mut out).unwrap();
        r.parse(b"b\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
        r.ready(true, false);
        assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert_eq!(client.len(), 1, "the skipped Close did not close a; b was never parsed");
        // What the error skipped is closed before the next message: a (evicted) and b (skipped).
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 1);
        r.begin(&mut out);
        assert_eq!(messages(&out), vec![(b'C', b"Spgwarden_2\0".to_vec()), (b'C', b"Spgwarden_1\0".to_vec())]);
        assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Drop);
    }

    #[test]
    fn a_query_after_a_failed_parse_is_skipped_up_to_the_sync() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        // Parse (fails), Query, Parse, Sync: PostgreSQL skips the Query and the second Parse.
        r.parse(b"bad\0SELEC\0\0\0", Default::default(), false, &mut out).unwrap();
        r.ready(false, false);
        r.parse(b"s2\0SELECT 2\0\0\0", Default::default(), false, &mut out).unwrap();
        r.ready(true, false);
        assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
        assert_eq!(r.pipeline.take_skipped_requests(), 1, "the Query's ReadyForQuery never comes");
        assert_eq!(r.answer(backend_tag::READY_FOR_QUERY).unwrap(), Answer::Pass);
        assert!(expect.is_empty());
        assert!(client.is_empty(), "neither statement exists");
        // The Query's own error: its ReadyForQuery comes.
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        r.ready(false, false);
        assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass);
        assert_eq!(r.pipeline.take_skipped_requests(), 0);
    }

    #[test]
    fn an_error_with_a_query_after_an_unsynced_bind_is_refused() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        // Bind, Execute, Query, Sync: did the Execute fail (the Query skipped) or the Query?
        r.pipeline.note_extended(false);
        r.ready(false, r.pipeline.untracked_unsynced());
        r.ready(true, false);
        assert!(r.answer(backend_tag::ERROR_RESPONSE).is_err(), "skipped or failed: cannot tell");
        // After a Close (answered first), a Query's error is its own.
        let mut expect = Pipeline::default();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        let mut out = BytesMut::new();
        r.describe_or_close(b'C', b"Sold\0", &mut out).unwrap();
        r.ready(false, r.pipeline.untracked_unsynced());
        assert_eq!(r.answer(CLOSE_COMPLETE).unwrap(), Answer::Pass);
        assert_eq!(r.answer(backend_tag::ERROR_RESPONSE).unwrap(), Answer::Pass, "pgjdbc's dead-statement Closes, then a Query");
    }

    #[test]
    fn past_twice_the_limit_even_statements_in_use_are_closed() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 2);
        for i in 0..10 {
            r.parse(format!("s{i}\0SELECT {i}\0\0\0").as_bytes(), Default::default(), false, &mut out).unwrap();
        }
        assert_eq!(backend.len(), 4, "one relay: up to twice the limit");
    }

    /// Random message bodies and answers in any order: errors, never a panic.
    #[test]
    fn random_messages_and_answers_never_panic() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let settings = Settings::default();
        for _ in 0..20_000 {
            let mut out = BytesMut::new();
            let mut r = rewriter(&mut client, &mut backend, &mut expect, 3);
            r.settings = Some(&settings);
            let len = (next() % 12) as usize;
            // Bytes from a small alphabet, so names repeat and NULs are common.
            let body: Vec<u8> = (0..len).map(|_| b"\0\0Sab1P"[(next() % 7) as usize]).collect();
            match next() % 9 {
                0 => drop(r.parse(&body, Default::default(), false, &mut out)),
                1 => drop(r.bind(&body, &mut out)),
                2 => drop(r.describe_or_close(b'D', &body, &mut out)),
                3 => drop(r.describe_or_close(b'C', &body, &mut out)),
                4 => r.ready(next() % 2 == 0, next() % 2 == 0),
                5 => r.sql(next() % 2 == 0, [None, Some(false), Some(true)][(next() % 3) as usize]),
                6 => r.copy_end(),
                7 => drop(r.copy_started()),
                _ => drop(r.answer(b"123EZ"[(next() % 5) as usize])),
            }
            r.begin(&mut out);
        }
    }

    #[test]
    fn malformed_messages_are_refused_not_passed_on_half_read() {
        let (mut client, mut backend, mut expect) = (ClientStatements::default(), BackendStatements::default(), Pipeline::default());
        let mut out = BytesMut::new();
        let mut r = rewriter(&mut client, &mut backend, &mut expect, 10);
        assert!(r.parse(b"no terminator", Default::default(), false, &mut out).is_err());
        assert!(r.bind(b"\0s", &mut out).is_err());
        assert!(r.describe_or_close(b'D', b"Sx", &mut out).is_err());
        assert!(r.answer(PARSE_COMPLETE).is_err(), "an answer for nothing");
        assert!(out.is_empty());
    }
}
