//! The client's side of a session as the relay sees it: its socket, what has been read from it
//! and not yet forwarded, and what the session took from the configuration when it started
//! (a reload changes that for later sessions only). Every idle client keeps one of these, so
//! it is kept small: 32-bit limits, a four-byte deadline.

use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::TrackedClient;
use crate::config::PoolConfig;
use crate::protocol::MessageScanner;
use crate::stream::Stream;

/// The client's socket and what has been read from it but not yet forwarded.
pub struct ClientSide {
    pub stream: Stream,
    pub buf: BytesMut,
    pub scanner: MessageScanner,
    /// The client's named prepared statements and what goes with them, once it has one (see
    /// [`super::prepared`]).
    pub tracked: Option<Box<TrackedClient>>,
    /// Taken when the session starts.
    pub limits: RelayLimits,
    /// When the connection reaches `pool.client_max_lifetime` (it is closed at its next
    /// transaction boundary from then on).
    pub expires: Option<Expiry>,
}

impl ClientSide {
    /// Whether the connection has reached its lifetime at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| now >= e.instant())
    }

    /// After a read: it did not fill the buffer, so it emptied the socket (plain TCP only;
    /// rustls may hold more decrypted bytes than one read takes).
    pub(super) fn read_emptied_socket(&self) -> bool {
        self.stream.is_plain() && self.buf.len() < self.buf.capacity()
    }
}

/// The pool settings a session's relay follows, as they were when the session started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// `pool.max_message_bytes`: the longest message body either side may send (at most 1 GiB).
    pub max_message_bytes: u32,
    /// `pool.max_prepared_statements` (0: named statements pin the session instead; at most
    /// 100,000).
    pub max_prepared_statements: u32,
    /// Whether a SET the proxy does not follow pins (`pool.session_pinning_filters`).
    pub pin_variable_sets: bool,
}

impl RelayLimits {
    pub fn of(pool: &PoolConfig) -> RelayLimits {
        // (Both bounded by `config`.)
        RelayLimits {
            max_message_bytes: u32::try_from(pool.max_message_bytes).unwrap_or(u32::MAX),
            max_prepared_statements: u32::try_from(pool.max_prepared_statements).unwrap_or(u32::MAX),
            pin_variable_sets: pool.pin_variable_sets,
        }
    }
}

/// A point in time to the whole second (rounded up), in four bytes: seconds since the process
/// first asked for one. Long enough for 136 years of uptime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry(NonZeroU32);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Expiry {
    /// `after` from `now`; `None` if that is past what four bytes hold.
    pub fn after(now: Instant, after: Duration) -> Option<Expiry> {
        let at = now.checked_add(after)?.saturating_duration_since(epoch());
        let secs = at.as_secs() + u64::from(at.subsec_nanos() > 0);
        u32::try_from(secs.max(1)).ok().and_then(NonZeroU32::new).map(Expiry)
    }

    pub fn instant(self) -> Instant {
        epoch() + Duration::from_secs(u64::from(self.0.get()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_is_never_early_and_at_most_a_second_late() {
        // (The epoch first: one set after `now` would count from itself.)
        epoch();
        let now = Instant::now();
        for after in [Duration::from_millis(1), Duration::from_millis(300), Duration::from_secs(24 * 3600)] {
            let at = Expiry::after(now, after).unwrap().instant();
            assert!(at >= now + after && at <= now + after + Duration::from_secs(1), "{after:?}");
        }
        assert_eq!(Expiry::after(now, Duration::from_secs(200 * 365 * 24 * 3600)), None);
        assert_eq!(std::mem::size_of::<Option<Expiry>>(), 4);
    }
}
