//! The statements pgwarden keeps: each client's, by the client's names, and each backend's
//! copies, by definition and settings, under the backend's own names, least recently used first
//! to go. Must not: write messages (the rewriter in [`super`] does).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::backend::settings::Settings;
use crate::relay::session_state::SessionEffects;

fn hasher() -> &'static std::collections::hash_map::RandomState {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// A statement as a client defined it.
#[derive(Debug)]
pub struct Statement {
    /// The Parse body after the name: the SQL, its NUL, the parameter types.
    pub(super) definition: Box<[u8]>,
    /// The client's session settings when it was parsed (or a number no other has).
    pub(super) settings: u64,
    pub(super) hash: u64,
    /// What running it does to the session (a `SET` pgwarden follows, state that pins), for
    /// each Bind of it: the Parse that was read for this may have been in another transaction.
    pub(super) effects: Option<Box<SessionEffects>>,
    /// Running it may change settings (`SET LOCAL` too): statements parsed after it in the same
    /// relay are not shared.
    pub(super) may_set: bool,
}

/// A shared [`Statement`]; equal when the definitions and settings are.
#[derive(Clone, Debug)]
pub struct StatementRef(pub(super) Arc<Statement>);

impl StatementRef {
    pub(super) fn new(definition: &[u8], settings: u64, effects: SessionEffects, may_set: bool) -> StatementRef {
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
pub(super) fn settings_fingerprint(settings: &Settings) -> u64 {
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
pub(super) fn unshared_settings() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    (1 << 63) | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One client's named statements, by the client's names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    pub(super) by_name: HashMap<Box<[u8]>, StatementRef>,
    /// Bytes of the definitions held.
    pub(super) bytes: usize,
}

impl ClientStatements {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub(super) fn insert(&mut self, name: &[u8], stmt: StatementRef) {
        self.bytes += stmt.0.definition.len();
        if let Some(old) = self.by_name.insert(name.into(), stmt) {
            self.bytes -= old.0.definition.len();
        }
    }

    pub(super) fn remove(&mut self, name: &[u8]) -> Option<StatementRef> {
        let old = self.by_name.remove(name)?;
        self.bytes -= old.0.definition.len();
        Some(old)
    }

    pub(super) fn clear(&mut self) {
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
    pub(super) to_close: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    pub(super) id: u64,
    pub(super) used: u64,
}

impl BackendStatements {
    /// The backend's statements are gone (a pinned session's `DISCARD ALL` ran): forget them
    /// all. Names are never reused, so one that survived cannot be confused with a new one.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.to_close.clear();
    }

    /// SQL the client sent may drop the backend's statements (`DEALLOCATE ALL`, which may yet
    /// fail): none is used again, and each is closed with the next rewritten message (closing
    /// one already gone is no error), so none is left on the backend uncounted.
    pub fn forget_all(&mut self) {
        self.to_close.extend(self.slots.drain().map(|(_, slot)| slot.id));
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

    pub(super) fn touch(&mut self, stmt: &StatementRef, now: u64) -> Option<u64> {
        let slot = self.slots.get_mut(stmt)?;
        slot.used = now;
        Some(slot.id)
    }

    pub(super) fn insert(&mut self, stmt: StatementRef, now: u64) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.slots.insert(stmt, Slot { id, used: now });
        id
    }

    /// While over `max`, removes the least recently used statement the current relay (`now`)
    /// has not used (closing one would close the portals bound from it), or past twice `max`
    /// any but `keep`: the ids to close on the backend.
    pub(super) fn evict(&mut self, max: usize, now: u64, keep: u64) -> Vec<u64> {
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
    pub(super) fn forget(&mut self, stmt: &StatementRef, id: u64) {
        if self.slots.get(stmt).is_some_and(|s| s.id == id) {
            self.slots.remove(stmt);
        }
    }
}
