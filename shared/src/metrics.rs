//! Prometheus metrics of one worker, in a registry of its own (several workers may share a
//! process in tests). Names follow Prometheus conventions: one `tally_worker_` prefix, base
//! units, `_total` counters, and no unbounded labels (never record ids or error texts).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Why a record failed: the `reason` label of `tally_worker_records_failed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The handler reported an error that retrying cannot fix.
    Permanent,
    /// The last allowed attempt ended in a retryable error, or its lease expired.
    Exhausted,
}

impl FailReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Permanent => "permanent",
            FailReason::Exhausted => "exhausted",
        }
    }
}

/// Counters, gauges and histograms a worker keeps; `render` gives the text format.
pub struct WorkerMetrics {
    registry: Registry,
    pub claimed: IntCounter,
    pub completed: IntCounter,
    /// `records_failed_total{reason="permanent"}`.
    pub failed_permanent: IntCounter,
    /// `records_failed_total{reason="exhausted"}`, including rows whose lease expired on
    /// their last attempt and that this worker's rescuer failed.
    pub failed_exhausted: IntCounter,
    pub retried: IntCounter,
    /// Handler (or SQL statement) started on a record at attempt > 1: a retry or a delivery
    /// after an expired lease.
    pub redelivered: IntCounter,
    pub lost_leases: IntCounter,
    pub released: IntCounter,
    pub rescued: IntCounter,
    pub lease_renewals: IntCounter,
    pub in_flight: IntGauge,
    pub breaker_open: IntGauge,
    /// 1 while `/readyz` would answer 200 (set when metrics are served).
    pub ready: IntGauge,
    pub handler_seconds: Histogram,
    pub claim_seconds: Histogram,
}

impl WorkerMetrics {
    /// Metrics labelled with `queue` (bounded: one per worker).
    pub fn new(queue: &str) -> Result<WorkerMetrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("tally_worker".into()), None)?;
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("queue", queue);
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(opts(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(opts(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .const_label("queue", queue)
                    .buckets(buckets),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let build = IntGauge::with_opts(
            opts("build_info", "Build of this worker; always 1")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build.set(1);
        registry.register(Box::new(build))?;
        let failed = IntCounterVec::new(
            opts(
                "records_failed_total",
                "Records failed, by reason: permanent error, or attempts exhausted",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(failed.clone()))?;
        Ok(WorkerMetrics {
            claimed: counter("records_claimed_total", "Records claimed")?,
            completed: counter("records_completed_total", "Records completed")?,
            // Both series exist from the start, so that rate() and alerts see a 0, not nothing.
            failed_permanent: failed.with_label_values(&[FailReason::Permanent.as_str()]),
            failed_exhausted: failed.with_label_values(&[FailReason::Exhausted.as_str()]),
            retried: counter(
                "records_retried_total",
                "Records sent back for a retry after a retryable error",
            )?,
            redelivered: counter(
                "records_redelivered_total",
                "Records whose handler started on attempt 2 or later (a retry or an expired lease)",
            )?,
            lost_leases: counter(
                "leases_lost_total",
                "Outcomes refused by the fence: the lease had passed to another worker",
            )?,
            released: counter(
                "records_released_total",
                "Claimed records given back unstarted at shutdown",
            )?,
            rescued: counter(
                "records_rescued_total",
                "Rows of expired leases rescued by this worker",
            )?,
            lease_renewals: counter("lease_renewals_total", "Leases renewed")?,
            in_flight: gauge(
                "records_in_flight",
                "Records claimed and not yet written back",
            )?,
            breaker_open: gauge(
                "breaker_open",
                "1 while the queue's circuit breaker keeps this worker from claiming",
            )?,
            ready: gauge(
                "ready",
                "1 while connected to PostgreSQL and not draining (as /readyz)",
            )?,
            handler_seconds: histogram(
                "handler_duration_seconds",
                "Time to process one record",
                prometheus::exponential_buckets(0.0005, 4.0, 10)?,
            )?,
            claim_seconds: histogram(
                "claim_duration_seconds",
                "Time of one claim statement",
                prometheus::exponential_buckets(0.0005, 2.0, 14)?,
            )?,
            registry,
        })
    }

    /// Counts a failed record.
    pub fn count_failed(&self, reason: FailReason) {
        self.failed(reason).inc();
    }

    /// The counter of records failed for `reason`.
    pub fn failed(&self, reason: FailReason) -> &IntCounter {
        match reason {
            FailReason::Permanent => &self.failed_permanent,
            FailReason::Exhausted => &self.failed_exhausted,
        }
    }

    /// Records failed for any reason.
    pub fn failed_total(&self) -> u64 {
        self.failed_permanent.get() + self.failed_exhausted.get()
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name` (exact, with labels) in `text`.
    fn value(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn failures_are_split_by_reason_and_both_series_exist_at_zero() {
        let m = WorkerMetrics::new("mail").expect("metrics");
        let text = m.render();
        for reason in ["permanent", "exhausted"] {
            let series =
                format!("tally_worker_records_failed_total{{queue=\"mail\",reason=\"{reason}\"}}");
            assert_eq!(value(&text, &series), Some(0.0), "{series} in:\n{text}");
        }
        m.count_failed(FailReason::Permanent);
        m.count_failed(FailReason::Exhausted);
        m.count_failed(FailReason::Exhausted);
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "tally_worker_records_failed_total{queue=\"mail\",reason=\"exhausted\"}"
            ),
            Some(2.0)
        );
        assert_eq!(m.failed_total(), 3);
    }

    #[test]
    fn every_series_has_the_prefix_and_the_queue_label() {
        let m = WorkerMetrics::new("mail").expect("metrics");
        m.handler_seconds.observe(0.01);
        let text = m.render();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(samples.len() > 20, "{text}");
        for line in samples {
            assert!(line.starts_with("tally_worker_"), "{line}");
            assert!(line.contains("queue=\"mail\""), "{line}");
        }
        for name in [
            "records_claimed_total",
            "records_completed_total",
            "records_retried_total",
            "records_redelivered_total",
            "leases_lost_total",
            "lease_renewals_total",
            "records_in_flight",
            "breaker_open",
            "ready",
            "handler_duration_seconds",
            "claim_duration_seconds",
            "build_info",
        ] {
            assert!(
                text.contains(&format!("# TYPE tally_worker_{name} ")),
                "no {name} in:\n{text}"
            );
        }
    }

    #[test]
    fn two_workers_in_one_process_keep_separate_counts() {
        let (a, b) = (
            WorkerMetrics::new("a").expect("a"),
            WorkerMetrics::new("b").expect("b"),
        );
        a.completed.inc();
        assert_eq!((a.completed.get(), b.completed.get()), (1, 0));
    }
}
