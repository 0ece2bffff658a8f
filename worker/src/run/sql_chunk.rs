//! The SQL handler: a chunk of records in one transaction with their completion. A chunk
//! whose transaction fails as a whole (at COMMIT, or because its session broke) is split in
//! halves until the record that fails alone is found; that record spends its attempt, the
//! others complete. No failure is retried without counting, except not getting a session at
//! all, which spends nothing because nothing ran.

use super::complete::{check_failure_limits, report_to_breaker};
use super::process::{log_outcome, record_span};
use super::state::{count, key, Shared};
use super::{ERROR_BACKOFF_MAX, ERROR_BACKOFF_MIN};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::store::{ChunkError, StatementFailure, TransactionalResult};
use tally::{ClaimableBatch, ClaimedRecord, HandlerError, Outcome, RecordState};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// How one part of a chunk went.
enum Ran {
    /// Committed (or refused by the fence): settled.
    Written,
    /// The worker is stopping hard: nothing was written.
    Stopped,
    /// The statement cannot be prepared: every record fails alike.
    Statement(StatementFailure),
    /// The transaction failed as a whole.
    Failed(StatementFailure),
}

/// Runs a started chunk; `_permit` is its handler slot. Outcomes of records that fail alone
/// go to the completer, which writes them behind the fence.
pub(super) async fn run_sql_chunk(
    shared: Arc<Shared>,
    statement: String,
    batch: Arc<ClaimableBatch>,
    chunk: Vec<ClaimedRecord>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    _permit: OwnedSemaphorePermit,
) {
    // Parts still to run, the next one last.
    let mut parts = vec![chunk];
    while let Some(mut part) = parts.pop() {
        match run_part(&shared, &statement, &batch, &part).await {
            Ran::Written => shared.forget(part.iter().map(key), true),
            Ran::Stopped => shared.forget(part.iter().map(key), false),
            Ran::Failed(failure) if part.len() > 1 => {
                tracing::warn!(
                    records = part.len(),
                    "SQL handler transaction failed ({}); splitting the chunk to find the \
                     record that fails alone",
                    failure.message
                );
                let second = part.split_off(part.len() / 2);
                parts.push(second);
                parts.push(part);
            }
            Ran::Failed(failure) | Ran::Statement(failure) => {
                tracing::warn!(
                    records = part.len(),
                    first = %part.first().map_or("", |r| r.record_id.as_str()),
                    "SQL handler failed for these records, each spending its attempt: {}",
                    failure.message
                );
                for record in &part {
                    let outcome = shared.failure(&batch, record, handler_error(&failure));
                    record_span(&batch, record).in_scope(|| log_outcome(&outcome));
                    if outcomes.send(outcome).is_err() {
                        // The completer is gone (the worker failed): the lease expires.
                        shared.forget([key(record)], false);
                    }
                }
            }
        }
    }
}

fn handler_error(failure: &StatementFailure) -> HandlerError {
    if failure.retryable {
        HandlerError::retryable(failure.message.clone())
    } else {
        HandlerError::permanent(failure.message.clone())
    }
}

/// Runs `part` in one transaction, waiting out failures to get a session.
async fn run_part(
    shared: &Arc<Shared>,
    statement: &str,
    batch: &ClaimableBatch,
    part: &[ClaimedRecord],
) -> Ran {
    let owner = &shared.config.worker_id;
    let mut delay = ERROR_BACKOFF_MIN;
    let mut retrying = false;
    let started = Instant::now();
    loop {
        let result = shared
            .store
            .run_transactional(&batch.name, part, owner, statement, |record, failure| {
                shared.failure(batch, record, handler_error(failure))
            })
            .await;
        match result {
            Ok(result) => {
                account(shared, batch, part, &result, started, retrying).await;
                return Ran::Written;
            }
            // Nothing ran: the rows are still ours until the lease ends.
            Err(ChunkError::Unavailable(e)) => {
                tracing::warn!(
                    "SQL handler could not start its transaction ({e}); retrying in {delay:?}"
                );
                retrying = true;
                tokio::select! {
                    _ = shared.hard.cancelled() => return Ran::Stopped,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(ERROR_BACKOFF_MAX);
            }
            Err(ChunkError::Statement(failure)) => return Ran::Statement(failure),
            Err(ChunkError::Transaction(failure)) => return Ran::Failed(failure),
        }
    }
}

/// Metrics, logs, failure limits, retry wake-ups and the breaker, after a part committed.
async fn account(
    shared: &Arc<Shared>,
    batch: &ClaimableBatch,
    part: &[ClaimedRecord],
    result: &TransactionalResult,
    started: Instant,
    retrying: bool,
) {
    let m = &shared.metrics;
    m.completed.inc_by(result.completed);
    for outcome in &result.failed {
        count(shared, outcome);
    }
    // One transaction served the part: spread its time over its records.
    let per_record = started.elapsed().as_secs_f64() / part.len().max(1) as f64;
    for _ in part {
        m.handler_seconds.observe(per_record);
    }
    shared.note_refused(&result.lost, retrying);
    log_chunk_outcomes(batch, part, result);
    if result.failed.iter().any(|o| o.state == RecordState::Failed) {
        check_failure_limits(shared, &[batch.id]).await;
    }
    let retried: Vec<Duration> = result
        .failed
        .iter()
        .filter(|o| o.state == RecordState::Pending)
        .map(|o| o.retry_in)
        .collect();
    shared.note_retries(retried.iter().copied());
    report_to_breaker(shared, result.completed, retried.len() as u64).await;
}

/// [`log_outcome`] for each record of a part.
fn log_chunk_outcomes(
    batch: &ClaimableBatch,
    part: &[ClaimedRecord],
    result: &TransactionalResult,
) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let failed: HashMap<i64, &Outcome> = result.failed.iter().map(|o| (o.id, o)).collect();
    let lost: HashSet<i64> = result.lost.iter().copied().collect();
    for record in part {
        let _span = record_span(batch, record).entered();
        if lost.contains(&record.id) {
            tracing::debug!("record not written: the lease was lost");
        } else if let Some(outcome) = failed.get(&record.id) {
            log_outcome(outcome);
        } else {
            log_outcome(&Outcome::complete(record));
        }
    }
}
