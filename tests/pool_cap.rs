//! `pool.max_total_backend_connections`: the cap on backend connections across every pool
//! (RDS Proxy's MaxConnectionsPercent, PgBouncer's max_db_connections). With two users whose
//! pools together could open twice the cap, the sum never passes it, an idle pool's room goes
//! to another pool's waiting clients at once, and a pool kept busy by its own clients still
//! shares the cap with another one's instead of starving it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Harness, first_column as values};
use pgwarden::config::IamAuth;

const SECOND: &str = "second";

/// A harness with pools of `size` and a cap of 2 across them, and a second user.
async fn capped(size: usize) -> (Harness, String) {
    let mut password = String::new();
    let h = Harness::start_full(false, |env, c| {
        c.pool.max_backend_connections = size;
        c.pool.max_total_backend_connections = Some(2);
        c.pool.borrow_timeout = Duration::from_secs(3);
        password = Harness::add_user(env, c, SECOND, IamAuth::Disabled);
    })
    .await;
    (h, password)
}

/// PostgreSQL's count of backends of both users, once it settles at or below `n` (closed
/// connections' processes take a moment to exit).
async fn until_pg_backends_at_most(h: &Harness, n: usize) -> usize {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE usename IN ('{}', '{SECOND}')", h.env.user);
    let mut count = usize::MAX;
    for _ in 0..200 {
        count = h.admin(&sql).parse().unwrap();
        if count <= n {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{count} backends, expected at most {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pools_room_goes_to_another_users_waiting_client() {
    let (h, password) = capped(2).await;
    // The dev user's pool opens both connections the cap allows, then leaves them idle.
    let (a1, a2) = (h.client().await, h.client().await);
    a1.batch_execute("BEGIN; SELECT 1").await.unwrap();
    a2.batch_execute("BEGIN; SELECT 1").await.unwrap();
    a1.batch_execute("COMMIT").await.unwrap();
    a2.batch_execute("COMMIT").await.unwrap();
    // (A backend goes back to its pool just after its client has the answer.)
    h.until_metric("DatabaseConnectionsCurrentlyBorrowed", |v| v == 0.0).await;
    assert_eq!(h.shared.pools.total_open(), 2);
    // The second user's client gets one of them, closed for it, long before any idle timeout.
    let b = common::connect(&h.conn_str_as(SECOND, &password)).await.unwrap();
    assert_eq!(values(&b, "SELECT current_user").await, [SECOND]);
    assert_eq!(h.metric("pgwarden_backend_connections_rebalanced"), 1.0);
    assert_eq!(h.shared.pools.total_open(), 2);
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), 2.0, "two pools of 2, capped at 2");
    assert_eq!(until_pg_backends_at_most(&h, 2).await, 2);
    // The dev user still gets served, by the connection left to it.
    assert_eq!(values(&a1, "SELECT 'again'").await, ["again"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_kept_busy_by_its_own_clients_still_shares_the_cap() {
    // (Pools larger than the cap: the busy pool blocks too, and must not win every turn.)
    let (h, password) = capped(4).await;
    // Six dev clients keep the dev pool's two connections busy and its queue full: each
    // release has a dev client waiting for it.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let client = h.client().await;
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        load.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                client.batch_execute("SELECT pg_sleep(0.005)").await.expect("a dev client is served");
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let dev_pool = h.dev_pool();
    tokio::time::timeout(Duration::from_secs(10), async {
        while dev_pool.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("dev clients queue");
    // Without sharing, every dev release would go to the next dev client and the second
    // user's client would wait out its borrow timeout (3 s).
    let b = common::connect(&h.conn_str_as(SECOND, &password)).await.unwrap();
    let mut most = 0;
    for i in 0..5 {
        assert_eq!(values(&b, &format!("SELECT current_user || '/{i}'")).await, [format!("{SECOND}/{i}")]);
        most = most.max(h.shared.pools.total_open());
    }
    let served_meanwhile = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = load.join_next().await {
        joined.unwrap();
    }
    assert!(most <= 2, "{most} connections open or opening across pools, over the cap");
    assert!(served_meanwhile > 0);
    assert!(h.metric("pgwarden_backend_connections_rebalanced") >= 1.0);
    assert_eq!(h.metric("pgwarden_borrow_timeouts"), 0.0);
    assert!(until_pg_backends_at_most(&h, 2).await <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_busy_pools_share_a_cap_smaller_than_any_one_of_them() {
    let mut passwords = Vec::new();
    let h = Harness::start_full(false, |env, c| {
        c.pool.max_backend_connections = 4;
        c.pool.max_total_backend_connections = Some(3);
        c.pool.borrow_timeout = Duration::from_secs(5);
        for user in ["u1", "u2"] {
            passwords.push((user.to_owned(), Harness::add_user(env, c, user, IamAuth::Disabled)));
        }
    })
    .await;
    let mut conn_strs = vec![h.conn_str()];
    conn_strs.extend(passwords.iter().map(|(user, password)| h.conn_str_as(user, password)));
    // Watches pgwarden's count of connections open or opening, all pools together.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, most, shared) = (Arc::clone(&stop), Arc::clone(&most), Arc::clone(&h.shared));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(shared.pools.total_open(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    // Four clients per user, each running 15 short transactions: every pool wants more than
    // its share the whole time.
    let mut load = tokio::task::JoinSet::new();
    for (u, conn_str) in conn_strs.iter().enumerate() {
        for k in 0..4 {
            let client = common::connect(conn_str).await.unwrap();
            load.spawn(async move {
                for i in 0..15 {
                    let tag = format!("{u}/{k}/{i}");
                    let got = values(&client, &format!("SELECT '{tag}' FROM pg_sleep(0.003)")).await;
                    assert_eq!(got, [tag.as_str()], "each transaction's own answer");
                }
            });
        }
    }
    while let Some(joined) = load.join_next().await {
        joined.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let most = most.load(Ordering::Relaxed);
    assert!((1..=3).contains(&most), "{most} connections open or opening across pools");
    assert!(h.metric("pgwarden_backend_connections_rebalanced") >= 1.0);
    assert_eq!(h.metric("pgwarden_borrow_timeouts"), 0.0);
}

/// A harness capped at 1% of PostgreSQL's `max_connections` (300 in the test clusters: 3,
/// below the pool's size of 5).
async fn capped_at_one_percent() -> Harness {
    Harness::start_with(|c| {
        c.pool.max_connections_percent = Some(1);
        c.pool.borrow_timeout = Duration::from_secs(20);
    })
    .await
}

/// RDS Proxy's form of the cap: a percentage of the database's `max_connections` (300 in the
/// test clusters), read at the first login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percentage_of_max_connections_caps_all_pools() {
    let h = capped_at_one_percent().await;
    let max_connections: usize = h.admin("SHOW max_connections").parse().unwrap();
    let cap = max_connections / 100;
    assert!(cap < h.env.config.pool.max_backend_connections, "the cap, not the pool's size, must be what binds");
    let mut holders = Vec::new();
    for _ in 0..cap {
        let c = h.client().await;
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        holders.push(c);
    }
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), cap as f64);
    let waiting = h.client().await;
    let query = tokio::spawn(async move { values(&waiting, "SELECT 'next'").await });
    common::until_waiting(&h.dev_pool(), 1).await;
    assert_eq!(h.shared.pools.total_open(), cap);
    holders[0].batch_execute("COMMIT").await.unwrap();
    assert_eq!(query.await.unwrap(), ["next"]);
    assert_eq!(h.shared.pools.total_open(), cap);
}

/// A burst of clients at start, before any backend has told the cap: one connection opens to
/// read `max_connections`, the rest wait for the cap, which is never passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_before_the_percentage_is_known_stays_within_it() {
    let h = capped_at_one_percent().await;
    let cap: usize = h.admin("SHOW max_connections").parse::<usize>().unwrap() / 100;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..8 {
        let conn_str = h.conn_str();
        burst.spawn(async move {
            let client = common::connect(&conn_str).await.unwrap();
            values(&client, &format!("SELECT '{i}' FROM pg_sleep(0.05)")).await == [i.to_string()]
        });
    }
    let mut peak = 0;
    while !burst.is_empty() {
        peak = peak.max(h.shared.pools.total_open());
        if let Ok(Some(answered)) = tokio::time::timeout(Duration::from_millis(1), burst.join_next()).await {
            assert!(answered.unwrap(), "each client its own answer");
        }
    }
    assert!(peak <= cap, "{peak} connections open or opening, cap {cap}");
    assert_eq!(h.metric("MaxDatabaseConnectionsAllowed"), cap as f64);
}
