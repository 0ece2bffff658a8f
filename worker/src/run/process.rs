//! One record through a handler: its context, its outcome (complete, retry with backoff, or
//! fail), and the log line that says which.

use super::state::Shared;
use super::supervise::{panic_message, Fault};
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tally::backoff::full_jitter;
use tally::handler::{storable_message, MAX_RETRY_AFTER};
use tally::{ClaimableBatch, ClaimedRecord, HandlerError, Outcome, RecordContext, RecordState};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Processes one started record with the handler and queues its outcome for writing. The
/// permit is its handler slot, held until the outcome is queued.
pub(super) async fn process_record(
    shared: Arc<Shared>,
    handler: Arc<dyn tally::Handler>,
    batch: Arc<ClaimableBatch>,
    record: ClaimedRecord,
    outcomes: mpsc::UnboundedSender<Outcome>,
    _permit: OwnedSemaphorePermit,
) {
    let ctx = RecordContext {
        idempotency_key: RecordContext::idempotency_key_for(&batch.name, &record.record_id),
        batch: batch.name.clone(),
        record_id: record.record_id.clone(),
        attempt: record.attempt,
        cancel: shared.lease_token(record.lease_id),
    };
    let timer = shared.metrics.handler_seconds.start_timer();
    let result = tokio::select! {
        r = handle_caught(handler.as_ref(), &ctx, &record.payload) => r,
        // Cut short: not a handler duration (a dropped timer would record one).
        _ = shared.hard.cancelled() => {
            timer.stop_and_discard();
            return;
        }
    };
    timer.observe_duration();
    if shared.faulty(Fault::RecordTaskPanics) {
        panic!("injected fault: a record task panics");
    }
    let outcome = match result {
        Ok(()) => Outcome::complete(&record),
        Err(e) => shared.failure(&batch, &record, e),
    };
    log_outcome(&outcome);
    let _ = outcomes.send(outcome);
}

/// Runs the handler; a panic becomes a retryable failure, so that its row is not stranded
/// (renewed forever, never written back).
async fn handle_caught(
    handler: &dyn tally::Handler,
    ctx: &RecordContext,
    payload: &serde_json::Value,
) -> Result<(), HandlerError> {
    let caught = AssertUnwindSafe(handler.handle(ctx, payload))
        .catch_unwind()
        .await;
    caught.unwrap_or_else(|panic| {
        let message = panic_message(&*panic);
        tracing::warn!(batch = %ctx.batch, record_id = %ctx.record_id, "handler panicked: {message}");
        Err(HandlerError::retryable(format!("handler panicked: {message}")))
    })
}

/// A retryable error on the last allowed attempt: the record fails as exhausted.
pub(super) fn attempts_exhausted(
    batch: &ClaimableBatch,
    record: &ClaimedRecord,
    error: &HandlerError,
) -> bool {
    matches!(error, HandlerError::Retryable { .. }) && record.attempt >= batch.max_attempts
}

/// Retry with backoff while attempts remain, else fail; permanent errors fail at once.
pub(super) fn failure_outcome(
    batch: &ClaimableBatch,
    record: &ClaimedRecord,
    error: HandlerError,
) -> Outcome {
    let exhausted = attempts_exhausted(batch, record, &error);
    let (state, message, retry_in) = match error {
        HandlerError::Permanent { message } => (RecordState::Failed, message, Duration::ZERO),
        HandlerError::Retryable { message, .. } if exhausted => (
            RecordState::Failed,
            format!(
                "{message} (attempts exhausted: {} of {})",
                record.attempt, batch.max_attempts
            ),
            Duration::ZERO,
        ),
        HandlerError::Retryable {
            message,
            retry_after,
        } => (
            RecordState::Pending,
            message,
            retry_after.unwrap_or_else(|| {
                full_jitter(record.attempt, batch.backoff_base, batch.backoff_max)
            }),
        ),
    };
    Outcome {
        id: record.id,
        batch_id: record.batch_id,
        attempt: record.attempt,
        lease_id: record.lease_id,
        state,
        // PostgreSQL refuses NUL in text and `now() + delay` past its timestamp range: either
        // would make the write fail, again and again.
        error: Some(storable_message(&message)),
        retry_in: retry_in.min(MAX_RETRY_AFTER),
    }
}

/// The span of one record's processing: its lines carry the batch, record id and attempt.
/// At debug level only, so that a busy worker at `info` does not pay for a span per record.
pub(super) fn record_span(batch: &ClaimableBatch, record: &ClaimedRecord) -> tracing::Span {
    tracing::debug_span!(
        "record",
        batch = %batch.name,
        record_id = %record.record_id,
        attempt = record.attempt
    )
}

/// One debug line per record outcome (inside the record's span).
pub(super) fn log_outcome(outcome: &Outcome) {
    let error = outcome.error.as_deref().unwrap_or_default();
    match outcome.state {
        RecordState::Complete => tracing::debug!(state = "complete", "record complete"),
        RecordState::Pending => tracing::debug!(
            state = "pending",
            error,
            retry_in = ?outcome.retry_in,
            "record failed; retried after the delay"
        ),
        _ => tracing::debug!(state = "failed", reason = error, "record failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(max_attempts: i32) -> ClaimableBatch {
        ClaimableBatch {
            id: 1,
            name: "b".into(),
            max_attempts,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
        }
    }

    fn record(attempt: i32) -> ClaimedRecord {
        ClaimedRecord {
            id: 7,
            batch_id: 1,
            record_id: "r".into(),
            attempt,
            payload: serde_json::Value::Null,
            lease_id: 1,
        }
    }

    #[test]
    fn a_requested_retry_delay_wins_over_the_backoff() {
        let error = HandlerError::Retryable {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(120)),
        };
        let o = failure_outcome(&batch(5), &record(1), error);
        assert_eq!(o.state, RecordState::Pending);
        assert_eq!(o.retry_in, Duration::from_secs(120));
    }

    #[test]
    fn retryable_errors_back_off_within_the_cap_until_attempts_run_out() {
        for attempt in 1..5 {
            let o = failure_outcome(&batch(5), &record(attempt), HandlerError::retryable("x"));
            assert_eq!(o.state, RecordState::Pending);
            assert!(o.retry_in <= Duration::from_secs(8), "{:?}", o.retry_in);
        }
        let o = failure_outcome(&batch(5), &record(5), HandlerError::retryable("x"));
        assert_eq!(o.state, RecordState::Failed);
        assert!(o
            .error
            .unwrap_or_default()
            .contains("attempts exhausted: 5 of 5"));
    }

    #[test]
    fn outcomes_are_made_storable() {
        let error = HandlerError::retry_after("a\0b", Duration::MAX);
        let o = failure_outcome(&batch(5), &record(1), error);
        assert_eq!(o.retry_in, MAX_RETRY_AFTER);
        assert_eq!(o.error.as_deref(), Some("a\u{FFFD}b"));
    }

    #[test]
    fn permanent_errors_fail_at_once() {
        let o = failure_outcome(&batch(5), &record(1), HandlerError::permanent("bad data"));
        assert_eq!(o.state, RecordState::Failed);
        assert_eq!(o.error.as_deref(), Some("bad data"));
    }
}
