//! The record and batch model shared by coordinator and worker.

use serde::Serialize;
use std::time::Duration;

/// A row's state. Stored as text in `tally.record.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    Pending,
    Running,
    Complete,
    Failed,
    Cancelled,
}

impl RecordState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Pending => "pending",
            RecordState::Running => "running",
            RecordState::Complete => "complete",
            RecordState::Failed => "failed",
            RecordState::Cancelled => "cancelled",
        }
    }
}

/// What to write for a processed record.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: i64,
    pub batch_id: i64,
    /// The attempt the outcome is for (the handler's).
    pub attempt: i32,
    /// The lease the row was claimed under: the fencing token of the write.
    pub lease_id: i64,
    pub state: RecordState,
    pub error: Option<String>,
    pub retry_in: Duration,
}

impl Outcome {
    /// The record was processed: complete it.
    pub fn complete(record: &ClaimedRecord) -> Outcome {
        Outcome {
            id: record.id,
            batch_id: record.batch_id,
            attempt: record.attempt,
            lease_id: record.lease_id,
            state: RecordState::Complete,
            error: None,
            retry_in: Duration::ZERO,
        }
    }
}

/// A row handed to this worker by a claim.
#[derive(Debug, Clone)]
pub struct ClaimedRecord {
    /// Internal row id.
    pub id: i64,
    pub batch_id: i64,
    /// The record's id within its batch.
    pub record_id: String,
    /// The attempt this claim is (1 for the first); counted only once its handler starts.
    pub attempt: i32,
    pub payload: serde_json::Value,
    /// The lease (one per claim) that holds this row; its id is the fencing token every
    /// write about the row must present.
    pub lease_id: i64,
}

/// A batch a worker may claim from.
#[derive(Debug, Clone)]
pub struct ClaimableBatch {
    pub id: i64,
    pub name: String,
    pub max_attempts: i32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

/// Progress of one batch, from the O(1) counters.
#[derive(Debug, Clone, Serialize)]
pub struct BatchStatus {
    pub batch: String,
    pub queue: String,
    /// preparing, interrupted (preparing, but its prepare died: run it again), ready, running,
    /// complete, complete_with_failures, paused or cancelled.
    pub state: String,
    pub total: i64,
    pub pending: i64,
    pub running: i64,
    pub complete: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub max_attempts: i32,
    pub created_at: String,
    /// Records finished per second since the first claim.
    pub rate_per_s: Option<f64>,
    /// Seconds left at that rate.
    pub eta_s: Option<f64>,
    /// Why the batch is paused, when it is.
    pub paused_reason: Option<String>,
    /// The queue's circuit breaker when it is not closed (`open until …` or `half_open`).
    pub breaker: Option<String>,
}

impl BatchStatus {
    /// No row is left to process.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "complete" | "complete_with_failures" | "cancelled"
        )
    }
}

/// A failed record as `coordinator failed` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct FailedRecord {
    pub record_id: String,
    pub attempts: i32,
    pub last_error: String,
    pub failed_at: String,
}

/// Failed records of one cause: their error message with what varies folded away.
#[derive(Debug, Clone, Serialize)]
pub struct FailureGroup {
    /// Short name of the group, for `retry-failed --group`.
    pub key: String,
    /// The message with quoted values, ids and numbers folded.
    pub pattern: String,
    pub count: i64,
    pub first_failed_at: String,
    pub last_failed_at: String,
    /// Up to 5 record ids of the group, in load order.
    pub sample_ids: Vec<String>,
    /// One message of the group as it was.
    pub example: String,
}

/// What `prepare` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareOutcome {
    /// The batch was written now, with this many records.
    Prepared { records: u64 },
    /// The batch already held exactly this input: nothing was added.
    AlreadyPrepared { records: u64 },
}

/// Where a batch's records come from and how they are retried.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    pub name: String,
    pub queue: String,
    pub id_field: String,
    pub max_attempts: i32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Pause the batch once more records than this have failed.
    pub max_failed: Option<i64>,
    /// Pause the batch once more than this share of its records has failed.
    pub max_failed_ratio: Option<f64>,
}

/// What the fleet-wide circuit breaker of a queue lets a worker do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerGate {
    /// Claim as usual.
    Closed,
    /// Claim a single record: this worker probes whether the downstream recovered.
    Probe,
    /// Claim nothing.
    Open,
}

/// When a queue's breaker opens, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    /// Retryable failures in a row, across the fleet, that open the breaker.
    pub threshold: i64,
    /// First cool-down; doubled after each failed probe.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
}

/// What one rescue pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RescueSummary {
    /// Rows whose handler had started, back to pending for another attempt.
    pub to_pending: u64,
    /// Rows whose handler had started on their last attempt.
    pub to_failed: u64,
    /// Rows that never started: back to pending with their attempt given back.
    pub unstarted: u64,
    /// Batches that got failed rows (to check against their failure limit).
    pub batches_with_failures: Vec<i64>,
}

/// A duration as people read it: "45s", "12m 5s", "3h 2m", "4d 1h".
pub fn human_duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, 0, s) => format!("{s}s"),
        (0, 0, m, s) => format!("{m}m {s}s"),
        (0, h, m, _) => format!("{h}h {m}m"),
        (d, h, _, _) => format!("{d}d {h}h"),
    }
}
