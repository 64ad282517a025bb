//! Graceful shutdown. On the first SIGTERM or SIGINT the listener closes (new connections are
//! refused, so a load balancer moves on) and [`Drain`] starts: a client between transactions
//! is told `57P01` ("terminating connection due to administrator command", what PostgreSQL
//! says on a fast shutdown) and closed at once; a client inside a transaction finishes it and
//! is closed when it ends; a client waiting for a backend is served first. pgwarden exits
//! when the last client has gone, at `shutdown_timeout`, or on a second signal, whichever is
//! first. This is PgBouncer's "safe shutdown", bounded in time so that it ends before a
//! container platform's kill (Kubernetes waits 30 s by default).

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Whether the proxy is draining, and a way for idle sessions to hear when it starts.
#[derive(Default)]
pub struct Drain {
    started: AtomicBool,
    notify: Notify,
}

impl Drain {
    /// Starts draining: every session waiting for its client's next transaction wakes up.
    pub fn start(&self) {
        self.started.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Completes once draining has started (at once if it already has).
    pub async fn started_wait(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read: a `start` in between cannot be missed.
        notified.as_mut().enable();
        if self.started.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C) after it is first polled.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waiters_before_and_after_start_complete() {
        let drain = Arc::new(Drain::default());
        let early = tokio::spawn({
            let d = Arc::clone(&drain);
            async move { d.started_wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!drain.started());
        assert!(!early.is_finished());
        drain.start();
        early.await.unwrap();
        assert!(drain.started());
        // A waiter that arrives after the start does not wait.
        drain.started_wait().await;
    }
}
