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
//! CloseComplete; SQL `DEALLOCATE name` of one (and `DEALLOCATE ALL`) is answered by the proxy
//! ([`deallocate`]). Like PgBouncer, a Parse of a name already in use ends the session (42P05):
//! PostgreSQL's in-band error cannot be reproduced once the Parse is not passed on as is.
//! Must not: read or change anything but statement names, or touch sockets.

pub mod deallocate;
mod store;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use bytes::{BufMut, BytesMut};

use super::session_state::SessionEffects;
use crate::backend::settings::Settings;
use crate::protocol::{ProtocolError, backend_tag};
pub use store::{BackendStatements, ClientStatements, StatementRef};
use store::{settings_fingerprint, unshared_settings};

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
            self.backend.forget_all();
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

