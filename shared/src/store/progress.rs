//! What `coordinator serve` reads and keeps: per-batch progress for `/metrics` (O(1) per
//! batch, from the maintained counts and the claim index, never a scan of the records), and
//! the observation pass that turns changes of progress into alerts, once across replicas.

use super::{sql, Store};
use crate::error::StoreError;
use std::time::Duration;

/// Every statement `serve` runs against PostgreSQL, by name: the scrape, the observation pass
/// and the alert deliveries. Tests EXPLAIN those that read `tally.record`.
pub const SERVE_STATEMENTS: &[(&str, &str)] = &[
    ("serve_scrape", sql!("serve_scrape")),
    ("serve_breakers", sql!("serve_breakers")),
    ("serve_ping", sql!("serve_ping")),
    ("serve_pipeline_runs", sql!("serve_pipeline_runs")),
    ("serve_watermarks", sql!("serve_watermarks")),
    ("serve_observe_lock", sql!("serve_observe_lock")),
    ("serve_observe_batches", sql!("serve_observe_batches")),
    ("serve_progress_save", sql!("serve_progress_save")),
    ("serve_observe_breakers", sql!("serve_observe_breakers")),
    (
        "serve_queue_progress_save",
        sql!("serve_queue_progress_save"),
    ),
    ("alert_insert", sql!("alert_insert")),
    ("alert_attach", sql!("alert_attach")),
    ("alert_watermark", sql!("alert_watermark")),
    ("alert_claim", sql!("alert_claim")),
    ("alert_sent", sql!("alert_sent")),
    ("alert_retry", sql!("alert_retry")),
];

/// Record counts of a batch by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub pending: i64,
    pub running: i64,
    pub complete: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl StateCounts {
    /// Neither pending nor running: nothing is left to process.
    pub fn is_settled(&self) -> bool {
        self.pending + self.running == 0
    }

    /// Complete plus failed: the number whose change is progress.
    pub fn done(&self) -> i64 {
        self.complete + self.failed
    }
}

/// One batch as `/metrics` reports it.
#[derive(Debug, Clone)]
pub struct BatchProgress {
    pub batch: String,
    pub queue: String,
    /// The stored state: preparing, ready, paused or cancelled.
    pub stored_state: String,
    pub paused_reason: Option<String>,
    pub total: i64,
    pub counts: StateCounts,
    /// A record was ever claimed.
    pub started: bool,
    /// Seconds the first record in claim order has been due, if any record is pending.
    pub oldest_pending_age_s: Option<f64>,
}

impl BatchProgress {
    /// The state `coordinator status` shows (see [`derived_state`]).
    pub fn state(&self) -> &'static str {
        derived_state(&self.stored_state, &self.counts, self.started)
    }

    /// (complete + failed) / total; 1 for an empty batch.
    pub fn completion_ratio(&self) -> f64 {
        if self.total <= 0 {
            1.0
        } else {
            self.counts.done() as f64 / self.total as f64
        }
    }
}

/// Every state [`derived_state`] can return, for metrics that list them all.
pub const BATCH_STATES: &[&str] = &[
    "preparing",
    "ready",
    "running",
    "paused",
    "cancelled",
    "complete",
    "complete_with_failures",
];

/// A batch's state as `coordinator status` names it: a ready batch is `running` once a record
/// was claimed, and `complete` or `complete_with_failures` once nothing is pending or running.
pub fn derived_state(stored: &str, counts: &StateCounts, started: bool) -> &'static str {
    match stored {
        "ready" if counts.is_settled() && counts.failed > 0 => "complete_with_failures",
        "ready" if counts.is_settled() => "complete",
        "ready" if started => "running",
        "ready" => "ready",
        "paused" => "paused",
        "cancelled" => "cancelled",
        _ => "preparing",
    }
}

/// A queue's circuit breaker: `closed`, `open` or `half_open`.
#[derive(Debug, Clone)]
pub struct QueueBreaker {
    pub queue: String,
    pub state: String,
}

/// Everything one `/metrics` scrape reads.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub batches: Vec<BatchProgress>,
    pub breakers: Vec<QueueBreaker>,
    pub pipelines: super::pipeline::PipelineScrape,
}

/// What an observation pass noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Every record is complete.
    Finished,
    /// Nothing is left to process, and some records failed.
    FinishedWithFailures,
    /// Paused because more records failed than it tolerates.
    FailureLimit,
    /// A queue's circuit breaker opened.
    BreakerOpen,
    /// Work is pending, but complete + failed has not changed for the stall time.
    Stalled,
}

impl EventKind {
    /// The name in `tally.alert.kind` and in webhook bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Finished => "finished",
            EventKind::FinishedWithFailures => "finished_with_failures",
            EventKind::FailureLimit => "failure_limit",
            EventKind::BreakerOpen => "breaker_open",
            EventKind::Stalled => "stalled",
        }
    }
}

/// An event, with what a message about it needs.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// Unique per event: kind, batch id or queue, and episode.
    pub key: String,
    pub queue: String,
    /// The batch concerned (none for a breaker).
    pub batch: Option<BatchProgress>,
    /// Breaker: its state and failures; stall: seconds without progress.
    pub detail: Option<String>,
}

/// Settings of an observation pass.
#[derive(Debug, Clone, Copy)]
pub struct ObserveSettings {
    /// Pending work with no change of complete + failed for this long is a stall.
    pub stall_after: Duration,
    /// Finished batches stay watched (and reported) this long.
    pub finished_retention: Duration,
}

/// The alerting side of one replica: its webhooks (sha256 of each URL) and the newest alert
/// id when it started.
#[derive(Debug, Clone)]
pub struct AlertTargets {
    pub webhooks: Vec<String>,
    pub watermark: i64,
}

impl Store {
    /// Reads what one `/metrics` scrape reports: every batch unfinished or finished within
    /// `finished_retention`, and every queue's breaker. Costs O(1) per batch.
    pub async fn scrape(&self, finished_retention: Duration) -> Result<Scrape, StoreError> {
        let client = self.client().await?;
        let ctx = "reading progress for /metrics";
        let retention = finished_retention.as_secs_f64();
        let rows = client
            .query(sql!("serve_scrape"), &[&retention])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let batches = rows
            .iter()
            .map(|r| {
                let counts = StateCounts {
                    pending: r.get(5),
                    running: r.get(6),
                    complete: r.get(7),
                    failed: r.get(8),
                    cancelled: r.get(9),
                };
                BatchProgress {
                    batch: r.get(0),
                    queue: r.get(1),
                    stored_state: r.get(2),
                    total: r.get(3),
                    paused_reason: r.get(4),
                    counts,
                    started: r.get(10),
                    oldest_pending_age_s: r.get(11),
                }
            })
            .collect();
        let breakers = client
            .query(sql!("serve_breakers"), &[])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .iter()
            .map(|r| QueueBreaker {
                queue: r.get(0),
                state: r.get(1),
            })
            .collect();
        drop(client);
        let pipelines = self.scrape_pipelines(finished_retention).await?;
        Ok(Scrape {
            batches,
            breakers,
            pipelines,
        })
    }

    /// The database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .query_one(sql!("serve_ping"), &[])
            .await
            .map_err(|e| StoreError::db("checking the database", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pending: i64, complete: i64, failed: i64) -> StateCounts {
        StateCounts {
            pending,
            complete,
            failed,
            ..StateCounts::default()
        }
    }

    #[test]
    fn states_match_coordinator_status() {
        assert_eq!(
            derived_state("ready", &counts(0, 3, 1), true),
            "complete_with_failures"
        );
        assert_eq!(derived_state("ready", &counts(1, 3, 0), true), "running");
        assert_eq!(derived_state("ready", &counts(4, 0, 0), false), "ready");
        assert_eq!(derived_state("paused", &counts(4, 0, 0), true), "paused");
    }
}
