//! Prometheus metrics named after RDS Proxy's CloudWatch metrics, so existing dashboards carry
//! over. Handles are registered once on a recorder owned by this server (no global recorder),
//! so the hot path only touches atomics. Latencies are in microseconds, as CloudWatch's are.
//! Labels never carry secrets.
//!
//! Counters and gauges live in `metrics-exporter-prometheus`'s recorder, except what moves on
//! every transaction: the two latencies ([`LatencyHistogram`]), the query counters and the
//! borrowed-backends gauge ([`hot`]) are pgwarden's own atomics (cheaper per value);
//! [`Metrics::render`] joins both, and [`http`] serves them.

pub mod histogram;
pub mod hot;
pub mod http;

use std::time::Duration;

use metrics::{Counter, Gauge};

use crate::relay::session_state::PinReason;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use histogram::LatencyHistogram;
pub use hot::{HotCounter, HotGauge};

const LATENCY_BUCKETS_US: &[f64] = &[
    50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0, 100_000.0, 250_000.0,
    1_000_000.0, 5_000_000.0, 30_000_000.0, 120_000_000.0,
];

pub struct Metrics {
    pub handle: PrometheusHandle,
    pub client_connections: Gauge,
    pub client_connections_received: Counter,
    pub client_connections_closed: Counter,
    pub client_connections_no_tls: Counter,
    pub client_connections_tls: Counter,
    pub iam_token_cache_hits: Counter,
    pub client_connections_setup_succeeded: Counter,
    pub client_connections_setup_failed_auth: Counter,
    pub database_connections: Gauge,
    pub database_connection_requests: Counter,
    pub database_connection_requests_with_tls: Counter,
    pub database_connections_with_tls: Gauge,
    pub database_connections_setup_succeeded: Counter,
    pub database_connections_setup_failed: Counter,
    pub database_connections_currently_borrowed: HotGauge,
    pub database_connections_currently_session_pinned: Gauge,
    pub database_connections_borrow_latency: LatencyHistogram,
    pub max_database_connections_allowed: Gauge,
    pub query_requests: HotCounter,
    pub query_requests_no_tls: HotCounter,
    pub query_requests_tls: HotCounter,
    pub query_database_response_latency: LatencyHistogram,
    pub borrow_timeouts: Counter,
    /// Backend connections closed so that another pool gets room under
    /// `max_total_backend_connections`.
    pub backend_connections_rebalanced: Counter,
    pub credential_refresh_failures: Counter,
    pub keyring_reload_failures: Counter,
    /// Reloads of the configuration file (SIGHUP) applied, and refused.
    pub config_reloads: Counter,
    pub config_reload_failures: Counter,
    /// Sessions pinned, by reason (in `PinReason::ALL` order).
    session_pins: [Counter; PinReason::ALL.len()],
    /// Named Parses clients sent, Parses pgwarden added on a backend that lacked the
    /// statement, statements a backend closed over `max_prepared_statements`.
    pub prepared_client_parses: Counter,
    pub prepared_backend_parses: Counter,
    pub prepared_evictions: Counter,
    /// Series computed at each scrape by whoever holds the state (the pools: see
    /// [`Metrics::set_scrape_series`]).
    scrape_series: std::sync::OnceLock<ScrapeSeries>,
}

/// A label value as the Prometheus text format wants it (backslash, quote and newline escaped).
pub fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes one metric family in the Prometheus text format: its HELP and TYPE lines, then a
/// series per `(labels, value)`, the labels written as `key="value",...` (values through
/// [`label_value`]).
pub fn write_family(out: &mut String, name: &str, kind: &str, help: &str, series: impl IntoIterator<Item = (String, f64)>) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in series {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Appends series to a scrape's exposition text.
pub type ScrapeSeries = Box<dyn Fn(&mut String) + Send + Sync>;

impl Metrics {
    /// Builds the recorder and its upkeep task (needs a runtime). Serve it with [`http::serve`].
    pub fn start() -> Metrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        let upkeep = recorder.handle();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                upkeep.run_upkeep();
            }
        });
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            use metrics::{counter, describe_counter, describe_gauge, gauge};
            describe_gauge!("ClientConnections", "Client connections currently open.");
            describe_counter!("ClientConnectionsReceived", "Client connections accepted.");
            describe_counter!("ClientConnectionsClosed", "Client connections closed.");
            describe_counter!("ClientConnectionsNoTLS", "Client connections without TLS.");
            describe_counter!("ClientConnectionsTLS", "Client connections that completed a TLS handshake.");
            describe_counter!("pgwarden_iam_token_cache_hits", "IAM logins answered from the token verdict cache.");
            describe_counter!("DatabaseConnectionRequestsWithTLS", "Backend connections attempted with TLS.");
            describe_gauge!("DatabaseConnectionsWithTLS", "Backend connections currently open over TLS.");
            describe_counter!("ClientConnectionsSetupSucceeded", "Client connections that completed login.");
            describe_counter!("ClientConnectionsSetupFailedAuth", "Client logins refused.");
            describe_gauge!("DatabaseConnections", "Backend connections currently open.");
            describe_counter!("DatabaseConnectionRequests", "Backend connections attempted.");
            describe_counter!("DatabaseConnectionsSetupSucceeded", "Backend logins that succeeded.");
            describe_counter!("DatabaseConnectionsSetupFailed", "Backend connects or logins that failed.");
            describe_gauge!(
                "DatabaseConnectionsCurrentlySessionPinned",
                "Backend connections pinned to one client session (state that outlives a transaction)."
            );
            describe_counter!("pgwarden_session_pins", "Client sessions pinned to their backend, by what pinned them.");
            describe_counter!(
                "pgwarden_prepared_statements",
                "Named prepared statements: Parses from clients (client_parse), Parses added on a backend without the statement (backend_parse), statements closed over the limit (evicted)."
            );
            describe_gauge!("MaxDatabaseConnectionsAllowed", "Backend connections the pools may open, all pools (their sizes, up to pool.max_total_backend_connections).");
            describe_counter!("pgwarden_borrow_timeouts", "Clients that gave up waiting for a backend.");
            describe_counter!(
                "pgwarden_backend_connections_rebalanced",
                "Backend connections closed so that another pool's waiting clients get room under pool.max_total_backend_connections."
            );
            describe_counter!("pgwarden_credential_refresh_failures", "Credential refreshes that failed (last good credential kept).");
            describe_counter!("pgwarden_keyring_reload_failures", "IAM keyring reloads that failed (last good keyring kept).");
            describe_counter!("pgwarden_config_reloads", "Reloads of the configuration file (SIGHUP), by result.");
            Metrics {
                handle,
                client_connections: gauge!("ClientConnections"),
                client_connections_received: counter!("ClientConnectionsReceived"),
                client_connections_closed: counter!("ClientConnectionsClosed"),
                client_connections_no_tls: counter!("ClientConnectionsNoTLS"),
                client_connections_tls: counter!("ClientConnectionsTLS"),
                iam_token_cache_hits: counter!("pgwarden_iam_token_cache_hits"),
                database_connection_requests_with_tls: counter!("DatabaseConnectionRequestsWithTLS"),
                database_connections_with_tls: gauge!("DatabaseConnectionsWithTLS"),
                query_requests_tls: HotCounter::new("QueryRequestsTLS", "Queries received over TLS."),
                client_connections_setup_succeeded: counter!("ClientConnectionsSetupSucceeded"),
                client_connections_setup_failed_auth: counter!("ClientConnectionsSetupFailedAuth"),
                database_connections: gauge!("DatabaseConnections"),
                database_connection_requests: counter!("DatabaseConnectionRequests"),
                database_connections_setup_succeeded: counter!("DatabaseConnectionsSetupSucceeded"),
                database_connections_setup_failed: counter!("DatabaseConnectionsSetupFailed"),
                database_connections_currently_borrowed: HotGauge::new(
                    "DatabaseConnectionsCurrentlyBorrowed",
                    "Backend connections lent to a client now.",
                ),
                database_connections_currently_session_pinned: gauge!("DatabaseConnectionsCurrentlySessionPinned"),
                database_connections_borrow_latency: LatencyHistogram::new(
                    "DatabaseConnectionsBorrowLatency",
                    "Time to borrow a backend, in microseconds.",
                    LATENCY_BUCKETS_US,
                ),
                max_database_connections_allowed: gauge!("MaxDatabaseConnectionsAllowed"),
                query_requests: HotCounter::new(
                    "QueryRequests",
                    "Queries (simple Query or extended Sync) received from clients.",
                ),
                query_requests_no_tls: HotCounter::new("QueryRequestsNoTLS", "Queries received over plaintext."),
                query_database_response_latency: LatencyHistogram::new(
                    "QueryDatabaseResponseLatency",
                    "Time from forwarding a request to the first byte of the database's answer, in microseconds.",
                    LATENCY_BUCKETS_US,
                ),
                borrow_timeouts: counter!("pgwarden_borrow_timeouts"),
                backend_connections_rebalanced: counter!("pgwarden_backend_connections_rebalanced"),
                credential_refresh_failures: counter!("pgwarden_credential_refresh_failures"),
                keyring_reload_failures: counter!("pgwarden_keyring_reload_failures"),
                config_reloads: counter!("pgwarden_config_reloads", "result" => "applied"),
                config_reload_failures: counter!("pgwarden_config_reloads", "result" => "refused"),
                session_pins: PinReason::ALL.map(|r| counter!("pgwarden_session_pins", "reason" => r.label())),
                prepared_client_parses: counter!("pgwarden_prepared_statements", "event" => "client_parse"),
                prepared_backend_parses: counter!("pgwarden_prepared_statements", "event" => "backend_parse"),
                prepared_evictions: counter!("pgwarden_prepared_statements", "event" => "evicted"),
                scrape_series: std::sync::OnceLock::new(),
            }
        })
    }

    pub fn session_pins(&self, reason: PinReason) -> &Counter {
        let at = PinReason::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        &self.session_pins[at]
    }

    /// The current exposition text (what `/metrics` serves).
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        for counter in [&self.query_requests, &self.query_requests_tls, &self.query_requests_no_tls] {
            counter.render(&mut out);
        }
        self.database_connections_currently_borrowed.render(&mut out);
        self.database_connections_borrow_latency.render(&mut out);
        self.query_database_response_latency.render(&mut out);
        if let Some(series) = self.scrape_series.get() {
            series(&mut out);
        }
        out
    }

    /// Sets what each scrape appends (once; later calls are ignored).
    pub fn set_scrape_series(&self, series: ScrapeSeries) {
        let _ = self.scrape_series.set(series);
    }
}

/// Decrements a gauge when dropped: ties a gauge to an object's life.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.increment(1.0);
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label_value("plain_user"), "plain_user");
        assert_eq!(super::label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
