//! Counters and gauges moved on every transaction (queries counted, backends borrowed), kept by
//! pgwarden itself as plain atomics: one relaxed add each, where the exporter's handles cost a
//! dynamic call and, for a gauge, a compare-and-swap loop on a float. Rendered in the
//! Prometheus text format next to the exporter's output, under the same names as before.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonic counter.
pub struct HotCounter {
    name: &'static str,
    help: &'static str,
    value: AtomicU64,
}

impl HotCounter {
    pub const fn new(name: &'static str, help: &'static str) -> HotCounter {
        HotCounter { name, help, value: AtomicU64::new(0) }
    }

    pub fn increment(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        write_one(out, self.name, self.help, "counter", self.value.load(Ordering::Relaxed));
    }
}

/// A gauge that goes up and down by whole steps.
pub struct HotGauge {
    name: &'static str,
    help: &'static str,
    value: AtomicI64,
}

impl HotGauge {
    pub const fn new(name: &'static str, help: &'static str) -> HotGauge {
        HotGauge { name, help, value: AtomicI64::new(0) }
    }

    pub fn increment(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
    }

    pub fn decrement(&self) {
        self.value.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        write_one(out, self.name, self.help, "gauge", self.value.load(Ordering::Relaxed));
    }
}

/// One single-value metric in the exposition format.
fn write_one(out: &mut String, name: &str, help: &str, kind: &str, value: impl Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_in_the_exposition_format() {
        let c = HotCounter::new("QueryRequests", "Queries.");
        c.increment(2);
        c.increment(3);
        let g = HotGauge::new("Borrowed", "Lent now.");
        g.increment();
        g.increment();
        g.decrement();
        let mut out = String::new();
        c.render(&mut out);
        g.render(&mut out);
        assert_eq!(
            out,
            "# HELP QueryRequests Queries.\n# TYPE QueryRequests counter\nQueryRequests 5\n\n\
             # HELP Borrowed Lent now.\n# TYPE Borrowed gauge\nBorrowed 1\n\n"
        );
    }
}
