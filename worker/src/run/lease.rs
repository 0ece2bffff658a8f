//! Keeping this worker's leases, and returning the rows of workers whose leases expired.

use super::complete::check_failure_limits;
use super::state::Shared;
use super::supervise::Fault;
use std::collections::HashSet;
use std::sync::Arc;
use tally::store::dashboard::Heartbeat;
use tokio_util::sync::CancellationToken;

/// Expired leases (claims) taken per rescue statement.
const RESCUE_LIMIT: i64 = 20;
/// Rescue statements per pass, at most.
const RESCUE_PASSES: usize = 100;

/// Keeps the leases of rows still being processed, in one statement per pass, and deletes
/// the leases whose rows are all written back. Stops at once when the worker failed, so that
/// its leases expire.
pub(super) async fn renew_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.config.lease / 3;
    let owner = &shared.config.worker_id;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.fatal.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (active, finished) = shared.leases();
        if let Err(e) = shared.store.drop_leases(&finished, owner).await {
            // Harmless: the rescuer deletes them once they expire.
            tracing::debug!("dropping finished leases failed: {e}");
        }
        if shared.faulty(Fault::RenewStops) {
            return;
        }
        if active.is_empty() || shared.fatal.is_cancelled() {
            continue;
        }
        match shared
            .store
            .renew_leases(&active, owner, shared.config.lease)
            .await
        {
            Ok(kept) => {
                shared.metrics.lease_renewals.inc_by(kept.len() as u64);
                if kept.len() < active.len() {
                    tracing::warn!(
                        lost = active.len() - kept.len(),
                        "leases expired and were rescued before renewal; their rows will be refused"
                    );
                    let kept: HashSet<i64> = kept.into_iter().collect();
                    let lost: Vec<i64> = active.into_iter().filter(|l| !kept.contains(l)).collect();
                    shared.cancel_leases(&lost);
                }
            }
            Err(e) => tracing::warn!("renewing {} leases failed: {e}", active.len()),
        }
    }
}

/// Writes this worker's row for the dashboard's workers page. A failure only delays it.
pub(super) async fn heartbeat(shared: &Shared, stopping: bool) {
    let hb = Heartbeat {
        id: &shared.config.worker_id,
        queue: &shared.config.queue,
        handler: shared.handler_name,
        concurrency: i32::try_from(shared.config.concurrency).unwrap_or(i32::MAX),
        stopping,
    };
    if let Err(e) = shared.store.worker_heartbeat(&hb).await {
        tracing::debug!("writing the worker's heartbeat failed: {e}");
    }
}

/// Any live worker returns rows of dead ones once their leases expire. Each pass also writes
/// this worker's heartbeat.
pub(super) async fn rescue_loop(shared: Arc<Shared>, stop: CancellationToken) {
    heartbeat(&shared, false).await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(shared.config.rescue_interval) => {}
        }
        if shared.faulty(Fault::RescuePanics) {
            panic!("injected fault: the rescue loop panics");
        }
        heartbeat(&shared, false).await;
        for _ in 0..RESCUE_PASSES {
            match shared.store.rescue_expired(RESCUE_LIMIT).await {
                Ok(s) => {
                    check_failure_limits(&shared, &s.batches_with_failures).await;
                    let n = s.to_pending + s.to_failed + s.unstarted;
                    shared.metrics.rescued.inc_by(n);
                    // Their lease expired on the last attempt.
                    shared.metrics.failed_exhausted.inc_by(s.to_failed);
                    if n == 0 || stop.is_cancelled() {
                        break;
                    }
                    tracing::info!(
                        back_to_pending = s.to_pending,
                        failed = s.to_failed,
                        never_started = s.unstarted,
                        "rescued rows with expired leases"
                    );
                }
                Err(e) => {
                    tracing::warn!("rescue pass failed: {e}");
                    break;
                }
            }
        }
    }
}
