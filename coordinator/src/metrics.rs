//! What `serve`'s `/metrics` shows: batches, breakers and pipeline runs read by one scrape,
//! and this replica's own counters.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tally::pipeline::plan::{RUN_STATES, STAGE_STATES};
use tally::store::pipeline::PipelineScrape;
use tally::store::progress::{Scrape, BATCH_STATES};

/// Metrics that outlive one scrape.
pub struct ServeMetrics {
    pub scrape_seconds: Histogram,
    pub alerts_raised: IntCounterVec,
    pub deliveries: IntCounterVec,
}

impl ServeMetrics {
    pub fn new() -> Result<ServeMetrics, prometheus::Error> {
        Ok(ServeMetrics {
            scrape_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tally_serve_scrape_duration_seconds",
                    "Database time of one /metrics scrape",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14)?),
            )?,
            alerts_raised: IntCounterVec::new(
                Opts::new(
                    "tally_serve_alerts_raised_total",
                    "Alerts raised by this replica's observations, by event",
                ),
                &["event"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "tally_serve_alert_deliveries_total",
                    "Webhook delivery attempts by this replica, by result (sent, retried, failed)",
                ),
                &["result"],
            )?,
        })
    }
}

/// The text format of one scrape. `None`: the database could not be read (`tally_serve_up`
/// 0, no batch series).
pub fn render(scrape: Option<&Scrape>, m: &ServeMetrics) -> Result<String, prometheus::Error> {
    let registry = Registry::new();
    let batch_labels = ["batch", "queue"];
    let records = IntGaugeVec::new(
        Opts::new("tally_batch_records", "Records of a batch by state"),
        &["batch", "queue", "state"],
    )?;
    let expected = IntGaugeVec::new(
        Opts::new("tally_batch_records_expected", "Records in a batch"),
        &batch_labels,
    )?;
    let state = IntGaugeVec::new(
        Opts::new(
            "tally_batch_state",
            "1 for the batch's current state (as `coordinator status` names it), 0 for the others",
        ),
        &["batch", "queue", "state"],
    )?;
    let ratio = GaugeVec::new(
        Opts::new(
            "tally_batch_completion_ratio",
            "(complete + failed) / total records of a batch",
        ),
        &batch_labels,
    )?;
    let oldest = GaugeVec::new(
        Opts::new(
            "tally_batch_oldest_pending_age_seconds",
            "How long the first record in claim order has been due; 0 when none is pending",
        ),
        &batch_labels,
    )?;
    let breaker = IntGaugeVec::new(
        Opts::new(
            "tally_queue_breaker_open",
            "1 while the queue's circuit breaker is open or half open",
        ),
        &["queue"],
    )?;
    let up = IntGauge::new("tally_serve_up", "1 if this scrape could read the database")?;
    for c in [&records, &expected, &state, &breaker] {
        registry.register(Box::new(c.clone()))?;
    }
    registry.register(Box::new(ratio.clone()))?;
    registry.register(Box::new(oldest.clone()))?;
    registry.register(Box::new(up.clone()))?;
    registry.register(Box::new(m.scrape_seconds.clone()))?;
    registry.register(Box::new(m.alerts_raised.clone()))?;
    registry.register(Box::new(m.deliveries.clone()))?;
    if let Some(scrape) = scrape {
        up.set(1);
        let mut queues: Vec<(&str, bool)> = scrape
            .breakers
            .iter()
            .map(|b| (b.queue.as_str(), b.state != "closed"))
            .collect();
        for b in &scrape.batches {
            let l = [b.batch.as_str(), b.queue.as_str()];
            let c = &b.counts;
            for (name, n) in [
                ("pending", c.pending),
                ("running", c.running),
                ("complete", c.complete),
                ("failed", c.failed),
                ("cancelled", c.cancelled),
            ] {
                records.with_label_values(&[l[0], l[1], name]).set(n);
            }
            expected.with_label_values(&l).set(b.total);
            let current = b.state();
            for s in BATCH_STATES {
                state
                    .with_label_values(&[l[0], l[1], s])
                    .set(i64::from(*s == current));
            }
            ratio.with_label_values(&l).set(b.completion_ratio());
            oldest
                .with_label_values(&l)
                .set(b.oldest_pending_age_s.unwrap_or(0.0));
            if !queues.iter().any(|(q, _)| *q == b.queue) {
                queues.push((b.queue.as_str(), false));
            }
        }
        for (queue, open) in queues {
            breaker.with_label_values(&[queue]).set(i64::from(open));
        }
    }
    if let Some(scrape) = scrape {
        render_pipelines(&registry, &scrape.pipelines)?;
    }
    let mut out = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs queued, running or finished within the retention (the newest few hundred), their
/// stages, and watermarks. Label values are run and stage names from validated files and
/// %-encoded params, and the fixed lists of states.
fn render_pipelines(registry: &Registry, p: &PipelineScrape) -> Result<(), prometheus::Error> {
    let run_state = IntGaugeVec::new(
        Opts::new(
            "tally_pipeline_run_state",
            "1 for the pipeline run's current state, 0 for the others",
        ),
        &["pipeline", "run", "state"],
    )?;
    let stage_state = IntGaugeVec::new(
        Opts::new(
            "tally_pipeline_stage_state",
            "1 for the stage's current state, 0 for the others",
        ),
        &["pipeline", "run", "stage", "state"],
    )?;
    let stage_records = IntGaugeVec::new(
        Opts::new(
            "tally_pipeline_stage_records",
            "Records of a stage's batch by state",
        ),
        &["pipeline", "run", "stage", "state"],
    )?;
    let watermark = GaugeVec::new(
        Opts::new(
            "tally_pipeline_watermark_seconds",
            "End of the latest window up to which every run of the pipeline succeeded, as \
             seconds since the epoch (UTC)",
        ),
        &["pipeline"],
    )?;
    registry.register(Box::new(run_state.clone()))?;
    registry.register(Box::new(stage_state.clone()))?;
    registry.register(Box::new(stage_records.clone()))?;
    registry.register(Box::new(watermark.clone()))?;
    let mut last_run = "";
    for s in &p.stages {
        let (pl, run, stage) = (s.pipeline.as_str(), s.run.as_str(), s.stage.as_str());
        if run != last_run {
            for state in RUN_STATES {
                run_state
                    .with_label_values(&[pl, run, state])
                    .set(i64::from(*state == s.run_state));
            }
            last_run = run;
        }
        for state in STAGE_STATES {
            stage_state
                .with_label_values(&[pl, run, stage, state])
                .set(i64::from(*state == s.state));
        }
        let c = &s.counts;
        for (name, n) in [
            ("pending", c.pending),
            ("running", c.running),
            ("complete", c.complete),
            ("failed", c.failed),
            ("cancelled", c.cancelled),
        ] {
            stage_records
                .with_label_values(&[pl, run, stage, name])
                .set(n);
        }
    }
    for (pipeline, at) in &p.watermarks {
        watermark.with_label_values(&[pipeline]).set(*at);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally::store::pipeline::StageProgress;
    use tally::store::progress::{BatchProgress, QueueBreaker, StateCounts};

    #[test]
    fn renders_every_series_of_a_batch_and_its_queue() {
        let m = ServeMetrics::new().unwrap();
        let scrape = Scrape {
            batches: vec![BatchProgress {
                batch: "b-1".into(),
                queue: "q".into(),
                stored_state: "ready".into(),
                paused_reason: None,
                total: 10,
                counts: StateCounts {
                    pending: 4,
                    running: 1,
                    complete: 4,
                    failed: 1,
                    cancelled: 0,
                },
                started: true,
                oldest_pending_age_s: Some(2.5),
            }],
            breakers: vec![QueueBreaker {
                queue: "other".into(),
                state: "open".into(),
            }],
            pipelines: PipelineScrape {
                stages: vec![StageProgress {
                    pipeline: "p".into(),
                    run: "p/date=2024-06-01".into(),
                    run_state: "running".into(),
                    stage: "load".into(),
                    state: "failed".into(),
                    total: 3,
                    counts: StateCounts {
                        complete: 2,
                        failed: 1,
                        ..StateCounts::default()
                    },
                }],
                watermarks: vec![("p".into(), 1717200000.0)],
            },
        };
        let text = render(Some(&scrape), &m).unwrap();
        for line in [
            r#"tally_batch_records{batch="b-1",queue="q",state="complete"} 4"#,
            r#"tally_batch_records_expected{batch="b-1",queue="q"} 10"#,
            r#"tally_batch_state{batch="b-1",queue="q",state="running"} 1"#,
            r#"tally_batch_state{batch="b-1",queue="q",state="ready"} 0"#,
            r#"tally_batch_completion_ratio{batch="b-1",queue="q"} 0.5"#,
            r#"tally_batch_oldest_pending_age_seconds{batch="b-1",queue="q"} 2.5"#,
            r#"tally_queue_breaker_open{queue="other"} 1"#,
            r#"tally_queue_breaker_open{queue="q"} 0"#,
            "tally_serve_up 1",
            r#"tally_pipeline_run_state{pipeline="p",run="p/date=2024-06-01",state="running"} 1"#,
            r#"tally_pipeline_run_state{pipeline="p",run="p/date=2024-06-01",state="failed"} 0"#,
            r#"tally_pipeline_stage_state{pipeline="p",run="p/date=2024-06-01",stage="load",state="failed"} 1"#,
            r#"tally_pipeline_stage_records{pipeline="p",run="p/date=2024-06-01",stage="load",state="failed"} 1"#,
            r#"tally_pipeline_watermark_seconds{pipeline="p"} 1717200000"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        let down = render(None, &m).unwrap();
        assert!(down.lines().any(|l| l == "tally_serve_up 0"));
        assert!(!down.contains("tally_batch_records{"));
    }
}
