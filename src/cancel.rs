//! Query cancellation. Each client session gets its own BackendKeyData from the proxy (a unique
//! pid and a random secret); while the session holds a backend, its slot points at that
//! backend's real key. A CancelRequest naming a proxy key is forwarded to the backend serving
//! that client right now, or dropped silently if none is (as PostgreSQL does for unknown keys).
//!
//! Known limit: a cancel that races with the end of a transaction can, in a tiny window,
//! reach the backend after it was handed to another client (PgBouncer has the same window).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::backend::BackendKey;
use crate::protocol::messages;

#[derive(Default)]
struct Slot {
    target: Mutex<Option<BackendKey>>,
}

#[derive(Default)]
pub struct CancelRegistry {
    next_pid: AtomicI32,
    slots: Mutex<HashMap<i32, (i32, Arc<Slot>)>>,
}

/// A session's registration; removed from the registry when dropped.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    slot: Arc<Slot>,
}

impl CancelHandle {
    /// Points this session's key at the backend it now holds, or at nothing.
    pub fn set_target(&self, key: Option<BackendKey>) {
        *self.slot.target.lock().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.pid);
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        // Positive, unique among live sessions: wraps after 2^31 sessions.
        let pid = (self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x3fff_ffff) + 1;
        let secret: i32 = rand::random();
        let slot = Arc::new(Slot::default());
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).insert(pid, (secret, Arc::clone(&slot)));
        CancelHandle { registry: Arc::clone(self), pid, secret, slot }
    }

    /// Forwards a cancel for proxy key (`pid`, `secret`). Unknown keys are ignored.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(&pid) {
                Some((s, slot)) if bool::from(s.to_be_bytes().ct_eq(&secret.to_be_bytes())) => {
                    *slot.target.lock().unwrap_or_else(|p| p.into_inner())
                }
                _ => None,
            }
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
