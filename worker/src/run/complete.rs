//! Writing outcomes back: batched, fenced by lease, retried until they land; and what follows
//! a write (failure limits, the circuit breaker).

use super::state::{count, outcome_key, Shared};
use super::supervise::Fault;
use super::{ERROR_BACKOFF_MAX, ERROR_BACKOFF_MIN};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tally::handler::storable_message;
use tally::{Outcome, RecordState};
use tokio::sync::mpsc;

/// Outcomes written per statement, at most.
const FLUSH_MAX: usize = 1000;
/// How long the completer waits for more outcomes before writing what it has.
const FLUSH_LINGER: Duration = Duration::from_millis(5);

/// Writes handler outcomes in batches. A write that fails is retried: the fence makes a
/// late write harmless, and until it lands the rows stay leased to this worker.
pub(super) async fn complete_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Outcome>) {
    let owner = shared.config.worker_id.clone();
    let mut buffer: Vec<Outcome> = Vec::with_capacity(FLUSH_MAX);
    while let Some(first) = rx.recv().await {
        buffer.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_LINGER;
        while buffer.len() < FLUSH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(o)) => buffer.push(o),
                _ => break,
            }
        }
        if shared.faulty(Fault::CompleterPanics) {
            panic!("injected fault: the completer panics");
        }
        let mut delay = ERROR_BACKOFF_MIN;
        let mut retrying = false;
        let written = loop {
            let result = match shared.store.finish(&buffer, &owner).await {
                // One outcome PostgreSQL refuses must not hold up the others for good.
                Err(e) if is_data_error(&e) => {
                    tracing::warn!(
                        "recording {} outcomes failed ({e}); writing them one by one",
                        buffer.len()
                    );
                    finish_each(&shared, &mut buffer, &owner).await
                }
                result => result,
            };
            match result {
                Ok(written) => break Some(written),
                Err(e) if !shared.hard.is_cancelled() => {
                    retrying = true;
                    tracing::warn!("recording {} outcomes failed ({e}); retrying", buffer.len());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(ERROR_BACKOFF_MAX);
                }
                Err(_) => break None,
            }
        };
        let settled = written.is_some();
        if let Some(written) = written {
            let written: HashSet<i64> = written.into_iter().collect();
            let mut lost = Vec::new();
            let mut failed_in = Vec::new();
            let mut retries = Vec::new();
            for outcome in &buffer {
                if written.contains(&outcome.id) {
                    count(&shared, outcome);
                    if outcome.state == RecordState::Pending {
                        retries.push(outcome.retry_in);
                    }
                    if outcome.state == RecordState::Failed
                        && !failed_in.contains(&outcome.batch_id)
                    {
                        failed_in.push(outcome.batch_id);
                    }
                } else {
                    lost.push(outcome.id);
                }
            }
            shared.note_retries(retries);
            shared.note_refused(&lost, retrying);
            if !retrying && !lost.is_empty() {
                // The claims holding them were rescued, so the other rows of those claims
                // are lost too.
                let leases: Vec<i64> = buffer
                    .iter()
                    .filter(|o| !written.contains(&o.id))
                    .map(|o| o.lease_id)
                    .collect();
                shared.cancel_leases(&leases);
            }
            check_failure_limits(&shared, &failed_in).await;
            let count = |state| {
                buffer
                    .iter()
                    .filter(|o| o.state == state && written.contains(&o.id))
                    .count() as u64
            };
            report_to_breaker(
                &shared,
                count(RecordState::Complete),
                count(RecordState::Pending),
            )
            .await;
        }
        shared.forget(buffer.drain(..).map(|o| outcome_key(&o)), settled);
    }
}

/// A data exception (SQLSTATE class 22): the statement fails the same way however often it is
/// retried.
fn is_data_error(e: &tally::StoreError) -> bool {
    e.sqlstate().is_some_and(|code| code.starts_with("22"))
}

/// Writes outcomes one at a time; one PostgreSQL refuses as data is replaced (in `buffer`) by
/// a permanent failure saying why, and written so. Other errors end the pass: the caller
/// retries the buffer.
async fn finish_each(
    shared: &Shared,
    buffer: &mut [Outcome],
    owner: &str,
) -> Result<Vec<i64>, tally::StoreError> {
    let mut written = Vec::new();
    for outcome in buffer.iter_mut() {
        match shared
            .store
            .finish(std::slice::from_ref(outcome), owner)
            .await
        {
            Ok(w) => written.extend(w),
            Err(e) if is_data_error(&e) => {
                tracing::warn!(
                    id = outcome.id,
                    "PostgreSQL refused the outcome of a record ({e}); failing the record"
                );
                *outcome = Outcome {
                    state: RecordState::Failed,
                    error: Some(storable_message(&format!(
                        "the record's outcome could not be stored: {e}"
                    ))),
                    retry_in: Duration::ZERO,
                    ..outcome.clone()
                };
                written.extend(
                    shared
                        .store
                        .finish(std::slice::from_ref(outcome), owner)
                        .await?,
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Pauses batches whose failures passed their limit, so a poisoned batch stops burning work.
pub(super) async fn check_failure_limits(shared: &Shared, batch_ids: &[i64]) {
    for &id in batch_ids {
        match shared.store.pause_if_too_many_failed(id).await {
            Ok(Some(reason)) => tracing::warn!(batch_id = id, "batch paused: {reason}"),
            Ok(None) => {}
            Err(e) => tracing::warn!(batch_id = id, "checking the failure limit failed: {e}"),
        }
    }
}

/// Tells the queue's breaker about successes and retryable failures. Successes are worth a
/// round trip only when they can change something: after this worker reported failures, or
/// when it is probing.
pub(super) async fn report_to_breaker(shared: &Shared, successes: u64, retryable_failures: u64) {
    let probing = shared.probing.load(Ordering::Relaxed);
    let dirty = shared.breaker_dirty.load(Ordering::Relaxed);
    if retryable_failures == 0 && !(successes > 0 && (dirty || probing)) {
        return;
    }
    let cfg = &shared.config;
    match shared
        .store
        .breaker_report(
            &cfg.queue,
            &cfg.worker_id,
            successes as i64,
            retryable_failures as i64,
            &cfg.breaker,
        )
        .await
    {
        Ok(state) => {
            shared
                .breaker_dirty
                .store(successes == 0 && state == "closed", Ordering::Relaxed);
            if state != "half_open" {
                shared.probing.store(false, Ordering::Relaxed);
            }
            match (probing, state.as_str()) {
                (true, "closed") => {
                    tracing::info!(queue = %cfg.queue, "circuit breaker closed: the probe succeeded")
                }
                (_, "open") => {
                    tracing::warn!(queue = %cfg.queue, "circuit breaker open: every worker stops claiming this queue for a cool-down")
                }
                _ => {}
            }
        }
        Err(e) => tracing::warn!("reporting to the circuit breaker failed: {e}"),
    }
}
