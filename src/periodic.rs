//! Upkeep on an interval, tied to an object's life: [`spawn_every`] runs a job every period for
//! as long as its owner is alive (the task holds only a weak reference between runs) and stops
//! once the last strong reference is gone. Used for the keyring and TLS certificate reloads.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs `job(owner)` every `every`, first after one period, until `owner` is dropped.
pub fn spawn_every<T, F, Fut>(owner: &Arc<T>, every: Duration, job: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let weak = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(owner) = weak.upgrade() else { return };
            job(owner).await;
        }
    });
}
