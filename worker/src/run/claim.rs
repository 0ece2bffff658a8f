//! The claim loop: claims from the queue's ready batches as long as there is room, and hands
//! what it claimed to the starter.

use super::start::{dispatch, Work};
use super::state::Shared;
use super::{ERROR_BACKOFF_MAX, ERROR_BACKOFF_MIN};
use crate::Processor;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tally::BreakerGate;
use tokio::sync::{mpsc, Notify};

pub(super) async fn claim_loop(
    shared: &Arc<Shared>,
    processor: &Processor,
    wake: &Notify,
    work: mpsc::UnboundedSender<Work>,
) {
    let cfg = &shared.config;
    let mut started: HashSet<i64> = HashSet::new();
    let mut error_delay = ERROR_BACKOFF_MIN;
    // Claim when there is room for a worthwhile batch, so that claims stay large.
    let min_room = (cfg.claim_size / 2).max(1).min(cfg.claim_size) as u32;
    loop {
        tokio::select! {
            _ = shared.soft.cancelled() => return,
            permit = shared.room.acquire_many(min_room) => drop(permit),
            // Busy with slow records: still alive.
            _ = tokio::time::sleep(cfg.poll_interval) => {
                shared.health.beat();
                continue;
            }
        }
        let round_began = tokio::time::Instant::now();
        let claimed = match claim_round(shared, processor, &mut started, &work).await {
            Ok(n) => {
                shared.health.set_connected(true);
                error_delay = ERROR_BACKOFF_MIN;
                // Rows due by now were claimed here, or are claimed next round (the loop
                // claims again at once while rounds find rows).
                shared.retries_claimed(round_began);
                n
            }
            Err(e) => {
                shared.health.set_connected(false);
                tracing::warn!("claiming failed: {e}; retrying in {error_delay:?}");
                tokio::select! {
                    _ = shared.soft.cancelled() => return,
                    _ = tokio::time::sleep(error_delay) => {}
                }
                error_delay = (error_delay * 2).min(ERROR_BACKOFF_MAX);
                continue;
            }
        };
        if claimed == 0 && !wait_for_work(shared, wake).await {
            return;
        }
    }
}

/// Nothing to claim: waits for a notification, the poll, or the earliest retry this worker
/// wrote back coming due. False when the worker is stopping.
async fn wait_for_work(shared: &Shared, wake: &Notify) -> bool {
    let poll = tokio::time::Instant::now() + shared.config.poll_interval;
    loop {
        let due = shared.next_retry().filter(|at| *at < poll);
        tokio::select! {
            _ = shared.soft.cancelled() => return false,
            _ = wake.notified() => return true,
            _ = tokio::time::sleep_until(poll) => return true,
            _ = tokio::time::sleep_until(due.unwrap_or(poll)), if due.is_some() => return true,
            // A retry earlier than the one waited for was recorded: wait for that one.
            _ = shared.retry_recorded.notified() => {}
        }
    }
}

/// Claims from the queue's ready batches, oldest first, as much as there is room for.
async fn claim_round(
    shared: &Arc<Shared>,
    processor: &Processor,
    started: &mut HashSet<i64>,
    work: &mpsc::UnboundedSender<Work>,
) -> Result<usize, tally::StoreError> {
    let cfg = &shared.config;
    let gate = shared
        .store
        .breaker_gate(&cfg.queue, &cfg.worker_id, cfg.lease)
        .await?;
    shared
        .metrics
        .breaker_open
        .set(i64::from(gate == BreakerGate::Open));
    let cap = match gate {
        BreakerGate::Closed => cfg.claim_size,
        BreakerGate::Open => return Ok(0),
        BreakerGate::Probe => {
            tracing::info!(queue = %cfg.queue, "circuit breaker half-open: probing with one record");
            shared.probing.store(true, Ordering::Relaxed);
            1
        }
    };
    let batches = shared.store.claimable_batches(&cfg.queue).await?;
    let mut total = 0;
    for batch in batches {
        let room = shared
            .room
            .available_permits()
            .min(cap.saturating_sub(total));
        if room == 0 || shared.soft.is_cancelled() {
            break;
        }
        let timer = shared.metrics.claim_seconds.start_timer();
        let records = shared
            .store
            .claim(batch.id, room as i64, &cfg.worker_id, cfg.lease)
            .await?;
        timer.observe_duration();
        if records.is_empty() {
            continue;
        }
        total += records.len();
        // Room was checked above and only this loop takes it: this cannot wait.
        if let Ok(permit) = shared.room.try_acquire_many(records.len() as u32) {
            permit.forget();
        }
        shared.track(&records);
        let batch_id = batch.id;
        dispatch(processor, Arc::new(batch), records, work);
        // After the rows are tracked and dispatched: a failure here must not strand them.
        if started.insert(batch_id) {
            if let Err(e) = shared.store.mark_started(batch_id).await {
                tracing::warn!(
                    batch_id,
                    "recording the batch's start failed ({e}); trying again on its next claim"
                );
                started.remove(&batch_id);
            }
        }
    }
    Ok(total)
}
