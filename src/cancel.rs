//! Query cancellation. Each client session gets its own BackendKeyData from the proxy (a unique
//! pid and a random secret); while the session holds a backend, its entry points at that
//! backend's real key. A CancelRequest naming a proxy key is forwarded to the backend serving
//! that client right now, or dropped silently if none is (as PostgreSQL does for unknown keys).
//!
//! Sessions live in slots of fixed segments (a proxy pid is a slot number): a transaction
//! points its slot at its backend with two atomic stores and no lock, and an idle client costs
//! one slot (64 bytes), no allocation of its own.
//!
//! Known limit: a cancel that races with the end of a transaction can, in a tiny window,
//! reach the backend after it was handed to another client (PgBouncer has the same window).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::backend::{BackendKey, BackendPid};
use crate::protocol::messages;

/// Slots are added this many at a time, and never move or go away.
const SEGMENT: usize = 256;

/// One session's registration. Only its session (or, while it waits, whoever hands it a
/// backend) writes `target` and `addr`; a cancel reads them.
#[derive(Default)]
struct Slot {
    live: AtomicBool,
    secret: AtomicI32,
    /// The backend's (pid, secret) packed by [`pack`]; 0: no backend now.
    target: AtomicU64,
    /// [`addr_tag`] of `addr`, so that the session checks "same address" without the lock.
    addr_tag: AtomicU64,
    addr: Mutex<Option<SocketAddr>>,
}

fn pack(key: &BackendKey) -> u64 {
    u64::from(key.pid.0 as u32) << 32 | u64::from(key.secret as u32)
}

/// (A key of pid 0 and secret 0 reads as "none": PostgreSQL never uses pid 0.)
fn unpack(v: u64) -> Option<(i32, i32)> {
    (v != 0).then_some(((v >> 32) as u32 as i32, v as u32 as i32))
}

/// An IPv4 address and port exactly; an IPv6 one as a hash (a collision only sends a cancel
/// to the wrong server, which ignores a key it does not know).
fn addr_tag(addr: &SocketAddr) -> u64 {
    match addr {
        SocketAddr::V4(a) => 1 << 63 | u64::from(a.ip().to_bits()) << 16 | u64::from(a.port()),
        SocketAddr::V6(a) => {
            let bits = a.ip().to_bits();
            (((bits >> 64) as u64 ^ bits as u64).rotate_left(16) ^ u64::from(a.port())) & !(1 << 63)
        }
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    segments: RwLock<Vec<Arc<[Slot]>>>,
    /// Slot numbers not in use.
    free: Mutex<Vec<u32>>,
}

/// A session's registration; its slot is freed when dropped.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    segment: Arc<[Slot]>,
    index: u32,
    pub pid: i32,
    pub secret: i32,
}

impl CancelHandle {
    fn slot(&self) -> &Slot {
        &self.segment[self.index as usize % SEGMENT]
    }

    /// Points this session's key at the backend it now holds, or at nothing. No lock unless
    /// the backend's address changed (it is the same database host for every transaction).
    pub fn set_target(&self, key: Option<BackendKey>) {
        point(self.slot(), key);
    }

    /// The slot's pointer alone, for the pool to hold while the session waits for a backend:
    /// whoever hands it one sends its request at once, and points its key there too.
    pub fn target(&self) -> CancelTarget {
        CancelTarget { segment: Arc::clone(&self.segment), index: self.index }
    }
}

/// See [`CancelHandle::target`]. Set only by the hand-over, before the session itself runs
/// again (the pool's slot lock orders the two); it never outlives the session's wait.
pub struct CancelTarget {
    segment: Arc<[Slot]>,
    index: u32,
}

impl CancelTarget {
    pub fn set(&self, key: Option<BackendKey>) {
        point(&self.segment[self.index as usize % SEGMENT], key);
    }
}

fn point(slot: &Slot, key: Option<BackendKey>) {
    let Some(key) = key else {
        slot.target.store(0, Ordering::Release);
        return;
    };
    let tag = addr_tag(&key.addr);
    if slot.addr_tag.load(Ordering::Relaxed) != tag {
        *lock(&slot.addr) = Some(key.addr);
        slot.addr_tag.store(tag, Ordering::Relaxed);
    }
    slot.target.store(pack(&key), Ordering::Release);
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        let slot = self.slot();
        slot.live.store(false, Ordering::Release);
        slot.target.store(0, Ordering::Release);
        lock(&self.registry.free).push(self.index);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CancelRegistry {
    /// Registers a session: its proxy pid (its slot number, plus one) and a random secret.
    /// Slot numbers are reused; the new secret tells a stale key from the new session's.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let secret: i32 = rand::random();
        let index = {
            let mut free = lock(&self.free);
            match free.pop() {
                Some(i) => i,
                None => {
                    let mut segments = self.segments.write().unwrap_or_else(|p| p.into_inner());
                    let first = segments.len() * SEGMENT;
                    segments.push((0..SEGMENT).map(|_| Slot::default()).collect());
                    // Lowest numbers first, so that pids stay small.
                    free.extend((first as u32 + 1..(first + SEGMENT) as u32).rev());
                    first as u32
                }
            }
        };
        let segment = Arc::clone(&self.segments.read().unwrap_or_else(|p| p.into_inner())[index as usize / SEGMENT]);
        let slot = &segment[index as usize % SEGMENT];
        slot.secret.store(secret, Ordering::Relaxed);
        slot.target.store(0, Ordering::Relaxed);
        slot.live.store(true, Ordering::Release);
        // Positive, as PostgreSQL's pids are (a client never holds 2^31 connections).
        let pid = (index as i32).wrapping_add(1).max(1);
        CancelHandle { registry: Arc::clone(self), segment, index, pid, secret }
    }

    /// The backend that proxy key (`pid`, `secret`) points at now, if the key is live.
    fn target(&self, pid: i32, secret: i32) -> Option<BackendKey> {
        let index = usize::try_from(pid).ok()?.checked_sub(1)?;
        let segment = Arc::clone(self.segments.read().unwrap_or_else(|p| p.into_inner()).get(index / SEGMENT)?);
        let slot = &segment[index % SEGMENT];
        let matches = |slot: &Slot| {
            slot.live.load(Ordering::Acquire)
                && bool::from(slot.secret.load(Ordering::Relaxed).to_be_bytes().ct_eq(&secret.to_be_bytes()))
        };
        if !matches(slot) {
            return None;
        }
        let (backend_pid, backend_secret) = unpack(slot.target.load(Ordering::Acquire))?;
        let addr = (*lock(&slot.addr))?;
        // Still the same session (its slot was not freed and reused meanwhile).
        matches(slot).then_some(BackendKey { addr, pid: BackendPid(backend_pid), secret: backend_secret })
    }

    /// Forwards a cancel for proxy key (`pid`, `secret`). Unknown keys are ignored.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let Some(key) = self.target(pid, secret) else {
            tracing::debug!(pid, "cancel request for no running query; ignored");
            return;
        };
        let mut msg = BytesMut::new();
        messages::cancel_request(&mut msg, key.pid.0, key.secret);
        match TcpStream::connect(key.addr).await {
            Ok(mut s) => {
                if let Err(e) = s.write_all(&msg).await {
                    tracing::warn!(error = %e, "could not forward cancel request");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not connect to forward cancel request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: i32, secret: i32, port: u16) -> BackendKey {
        BackendKey { addr: SocketAddr::from(([127, 0, 0, 1], port)), pid: BackendPid(pid), secret }
    }

    #[test]
    fn a_key_points_at_the_backend_of_the_moment() {
        let registry = Arc::new(CancelRegistry::default());
        let a = registry.register();
        let b = registry.register();
        assert_ne!(a.pid, b.pid);
        assert!(a.pid > 0 && b.pid > 0);
        assert_eq!(registry.target(a.pid, a.secret), None, "no backend yet");
        a.set_target(Some(key(0, 1, 5432)));
        assert_eq!(registry.target(a.pid, a.secret), Some(key(0, 1, 5432)));
        a.set_target(Some(key(-7, i32::MIN, 5433)));
        assert_eq!(registry.target(a.pid, a.secret), Some(key(-7, i32::MIN, 5433)), "new address taken");
        assert_eq!(registry.target(a.pid, a.secret.wrapping_add(1)), None, "wrong secret");
        assert_eq!(registry.target(b.pid, b.secret), None, "other sessions untouched");
        assert_eq!(registry.target(0, a.secret), None);
        assert_eq!(registry.target(-1, a.secret), None);
        assert_eq!(registry.target(1 << 30, a.secret), None, "beyond every segment");
        a.set_target(None);
        assert_eq!(registry.target(a.pid, a.secret), None);
    }

    #[test]
    fn a_freed_slot_does_not_answer_to_its_old_key() {
        let registry = Arc::new(CancelRegistry::default());
        let old = registry.register();
        old.set_target(Some(key(42, 7, 5432)));
        let (pid, secret) = (old.pid, old.secret);
        drop(old);
        assert_eq!(registry.target(pid, secret), None, "gone with its session");
        let new = registry.register();
        assert_eq!(new.pid, pid, "slot reused");
        new.set_target(Some(key(43, 8, 5432)));
        if new.secret != secret {
            assert_eq!(registry.target(pid, secret), None, "the old key does not reach the new session");
        }
        assert_eq!(registry.target(new.pid, new.secret), Some(key(43, 8, 5432)));
    }

    #[test]
    fn slots_grow_past_one_segment() {
        let registry = Arc::new(CancelRegistry::default());
        let handles: Vec<CancelHandle> = (0..SEGMENT * 2 + 3).map(|_| registry.register()).collect();
        let mut pids: Vec<i32> = handles.iter().map(|h| h.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        assert_eq!(pids.len(), handles.len(), "unique pids");
        let last = handles.last().unwrap();
        last.set_target(Some(key(9, 9, 6000)));
        assert_eq!(registry.target(last.pid, last.secret), Some(key(9, 9, 6000)));
    }
}
