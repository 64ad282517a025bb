//! Latency histograms kept by pgwarden itself, for the two latencies recorded on every
//! transaction (borrow and database response). A record is one bucket search and two relaxed
//! atomic adds, with no clock read and nothing to drain later; the exporter's own histograms
//! cost about four times that per value (a timestamp for idle tracking, a lock-free queue push,
//! a drain at upkeep). Rendered in the Prometheus text format next to the exporter's output.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub struct LatencyHistogram {
    name: &'static str,
    help: &'static str,
    /// Upper bounds in microseconds, ascending; `counts` has one more slot, for +Inf.
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> LatencyHistogram {
        debug_assert!(bounds.is_sorted());
        LatencyHistogram { name, help, bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }

    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let us = ns as f64 / 1e3;
        let i = self.bounds.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Counts a zero-length latency (an idle connection borrowed at once).
    pub fn record_zero(&self) {
        self.counts[0].fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the histogram in the Prometheus text format (cumulative buckets, µs).
    pub fn render(&self, out: &mut String) {
        let name = self.name;
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", self.help);
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}"),
                None => _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}"),
            }
        }
        let sum_us = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e3;
        let _ = writeln!(out, "{name}_sum {sum_us}\n{name}_count {cumulative}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = LatencyHistogram::new("Lat", "help", &[50.0, 100.0]);
        h.record_zero();
        h.record(Duration::from_micros(50));
        h.record(Duration::from_micros(51));
        h.record(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("# TYPE Lat histogram"), "{out}");
        assert!(out.contains("Lat_bucket{le=\"50\"} 2\n"), "{out}");
        assert!(out.contains("Lat_bucket{le=\"100\"} 3\n"), "{out}");
        assert!(out.contains("Lat_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("Lat_sum 1000101\n"), "{out}");
        assert!(out.contains("Lat_count 4\n"), "{out}");
    }
}
