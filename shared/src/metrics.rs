//! Prometheus metrics of one worker, in a registry of its own (several workers may share a
//! process in tests). Names follow Prometheus conventions: one `tally_worker_` prefix, base
//! units, `_total` counters, and no unbounded labels (never record ids or error texts).

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};

/// Counters, gauges and histograms a worker keeps; `render` gives the text format.
pub struct WorkerMetrics {
    registry: Registry,
    pub claimed: IntCounter,
    pub completed: IntCounter,
    pub failed: IntCounter,
    pub retried: IntCounter,
    /// Claimed again after an earlier delivery (attempt > 1).
    pub redelivered: IntCounter,
    pub lost_leases: IntCounter,
    pub released: IntCounter,
    pub rescued: IntCounter,
    pub lease_renewals: IntCounter,
    pub in_flight: IntGauge,
    pub breaker_open: IntGauge,
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
            Opts::new("build_info", "Build of this worker; always 1")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build.set(1);
        registry.register(Box::new(build))?;
        Ok(WorkerMetrics {
            claimed: counter("records_claimed_total", "Records claimed")?,
            completed: counter("records_completed_total", "Records completed")?,
            failed: counter(
                "records_failed_total",
                "Records failed (permanent or attempts exhausted)",
            )?,
            retried: counter(
                "records_retried_total",
                "Records sent back for a retry after a retryable error",
            )?,
            redelivered: counter(
                "records_redelivered_total",
                "Records claimed again after an earlier delivery",
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
