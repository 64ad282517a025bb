//! Query cancellation. Each client session gets its own BackendKeyData from the proxy (a unique
//! pid and a random secret); while the session holds a backend, its entry points at that
//! backend's real key. A CancelRequest naming a proxy key is forwarded to the backend serving
//! that client right now, or dropped silently if none is (as PostgreSQL does for unknown keys).
//!
//! One map under one lock, no per-session allocation: an idle client costs one map entry.
//!
//! Known limit: a cancel that races with the end of a transaction can, in a tiny window,
//! reach the backend after it was handed to another client (PgBouncer has the same window).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::backend::BackendKey;
use crate::protocol::messages;

struct Entry {
    secret: i32,
    target: Option<BackendKey>,
}

/// Proxy pids are sequential integers handed out by us, not attacker-chosen keys: a
/// multiplicative hash spreads them, and is far cheaper than SipHash on every transaction.
#[derive(Default)]
struct PidHasher(u64);

impl Hasher for PidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_i32(&mut self, n: i32) {
        self.0 = (n as u32 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Entries = HashMap<i32, Entry, BuildHasherDefault<PidHasher>>;

#[derive(Default)]
pub struct CancelRegistry {
    next_pid: AtomicI32,
    entries: Mutex<Entries>,
}

/// A session's registration; removed from the registry when dropped.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
}

impl CancelHandle {
    /// Points this session's key at the backend it now holds, or at nothing.
    pub fn set_target(&self, key: Option<BackendKey>) {
        if let Some(e) = self.registry.lock().get_mut(&self.pid) {
            e.target = key;
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.pid);
    }
}

impl CancelRegistry {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let secret: i32 = rand::random();
        let mut entries = self.lock();
        // Positive and unique among live sessions (skips any still in use after wrapping).
        let pid = loop {
            let pid = (self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x3fff_ffff) + 1;
            if !entries.contains_key(&pid) {
                break pid;
            }
        };
        entries.insert(pid, Entry { secret, target: None });
        CancelHandle { registry: Arc::clone(self), pid, secret }
    }

    /// Forwards a cancel for proxy key (`pid`, `secret`). Unknown keys are ignored.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = match self.lock().get(&pid) {
            Some(e) if bool::from(e.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) => e.target,
            _ => None,
        };
        let Some(key) = target else {
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
