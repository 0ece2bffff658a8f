//! Starting claimed work. A worker claims ahead of its handlers, so a row may wait in memory
//! before a handler is free. Its attempt must count only once its handler starts: the starter
//! takes work in claim order, waits for handler slots, and announces on each lease how many of
//! its rows (a prefix, in the lease's order) were handed to a handler, before starting them.
//! After a crash the rescue counts an attempt for those rows only and gives the others their
//! attempt back. Work that arrived together is announced in one statement.

use super::process::{process_record, record_span};
use super::sql_chunk::run_sql_chunk;
use super::state::{key, RowKey, Shared};
use super::supervise::{spawn_watched, Duty};
use super::{ERROR_BACKOFF_MAX, ERROR_BACKOFF_MIN};
use crate::Processor;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tally::{ClaimableBatch, ClaimedRecord, Outcome};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::Instrument;

/// Work items announced in one statement, at most.
const START_GROUP_MAX: usize = 1000;

/// Rows of one claim that start together: one record for a handler, a chunk for the SQL
/// handler.
pub(super) struct Work {
    pub(super) batch: Arc<ClaimableBatch>,
    pub(super) records: Vec<ClaimedRecord>,
    /// Position (from 1, in the lease's order) of the last of `records`.
    pub(super) through: i32,
}

impl Work {
    fn lease(&self) -> i64 {
        self.records.first().map_or(0, |r| r.lease_id)
    }
}

/// Splits a claim (rows by id, the lease's order) into work items and queues them.
pub(super) fn dispatch(
    processor: &Processor,
    batch: Arc<ClaimableBatch>,
    records: Vec<ClaimedRecord>,
    work: &mpsc::UnboundedSender<Work>,
) {
    let size = match processor {
        Processor::Handler(_) => 1,
        Processor::Sql { chunk_size, .. } => (*chunk_size).max(1),
    };
    let mut through = 0;
    let mut records = records.into_iter().peekable();
    while records.peek().is_some() {
        let chunk: Vec<ClaimedRecord> = records.by_ref().take(size).collect();
        through += chunk.len() as i32;
        // Refused only when the starter died, which stops the worker: the leases expire.
        let _ = work.send(Work {
            batch: batch.clone(),
            records: chunk,
            through,
        });
    }
}

/// Starts work as handler slots free up, until the worker stops; then gives back, unstarted,
/// everything that is still queued, until the claim loop has gone.
pub(super) async fn start_loop(
    shared: Arc<Shared>,
    processor: Processor,
    mut queue: mpsc::UnboundedReceiver<Work>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    let mut next: Option<Work> = None;
    loop {
        let work = match next.take() {
            Some(work) => work,
            None => tokio::select! {
                biased;
                _ = shared.soft.cancelled() => break,
                work = queue.recv() => match work {
                    Some(work) => work,
                    None => return,
                },
            },
        };
        let permit = tokio::select! {
            biased;
            _ = shared.soft.cancelled() => None,
            permit = shared.handlers.clone().acquire_owned() => permit.ok(),
        };
        let Some(permit) = permit.filter(|_| !shared.soft.is_cancelled()) else {
            next = Some(work);
            break;
        };
        let mut group = vec![(work, permit)];
        while group.len() < START_GROUP_MAX {
            let Ok(work) = queue.try_recv() else { break };
            match shared.handlers.clone().try_acquire_owned() {
                Ok(permit) => group.push((work, permit)),
                Err(_) => {
                    next = Some(work);
                    break;
                }
            }
        }
        let Some(held) = announce(&shared, &group).await else {
            release(&shared, group.into_iter().map(|(work, _)| work)).await;
            break;
        };
        for (work, permit) in group {
            if held.contains(&work.lease()) {
                start(&shared, &processor, work, permit, &outcomes);
            } else {
                // Rescued by another worker while waiting: no longer ours, nothing to write.
                let ids: Vec<i64> = work.records.iter().map(|r| r.id).collect();
                shared.note_refused(&ids, false);
                shared.forget(work.records.iter().map(key), true);
            }
        }
    }
    let mut unstarted: Vec<Work> = next.into_iter().collect();
    loop {
        while let Ok(work) = queue.try_recv() {
            unstarted.push(work);
        }
        release(&shared, unstarted.drain(..)).await;
        match queue.recv().await {
            Some(work) => unstarted.push(work),
            None => return,
        }
    }
}

/// Records on each lease of `group` how far its rows were started. `None` if the worker
/// stopped before that could be written; the leases that are no longer this worker's are
/// missing from the set.
async fn announce(shared: &Shared, group: &[(Work, OwnedSemaphorePermit)]) -> Option<HashSet<i64>> {
    let mut through: HashMap<i64, i32> = HashMap::new();
    for (work, _) in group {
        let at = through.entry(work.lease()).or_default();
        *at = (*at).max(work.through);
    }
    let started: Vec<(i64, i32)> = through.into_iter().collect();
    let cfg = &shared.config;
    let mut delay = ERROR_BACKOFF_MIN;
    loop {
        match shared
            .store
            .start_leases(&started, &cfg.worker_id, cfg.lease)
            .await
        {
            Ok(held) => return Some(held.into_iter().collect()),
            Err(e) => {
                tracing::warn!("recording handler starts failed ({e}); retrying in {delay:?}");
                tokio::select! {
                    _ = shared.soft.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(ERROR_BACKOFF_MAX);
            }
        }
    }
}

fn start(
    shared: &Arc<Shared>,
    processor: &Processor,
    work: Work,
    permit: OwnedSemaphorePermit,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) {
    shared.note_started(&work.records);
    match processor {
        Processor::Handler(handler) => {
            // One record per work item for a handler (see `dispatch`).
            if let Some(record) = work.records.into_iter().next() {
                let span = record_span(&work.batch, &record);
                let task = process_record(
                    shared.clone(),
                    handler.clone(),
                    work.batch,
                    record,
                    outcomes.clone(),
                    permit,
                );
                spawn_watched(shared, "record", Duty::Finite, task.instrument(span));
            }
        }
        Processor::Sql { statement, .. } => {
            let task = run_sql_chunk(
                shared.clone(),
                statement.clone(),
                work.batch,
                work.records,
                outcomes.clone(),
                permit,
            );
            spawn_watched(shared, "SQL chunk", Duty::Finite, task);
        }
    }
}

/// Gives rows back unstarted, without spending their attempt.
async fn release(shared: &Shared, work: impl IntoIterator<Item = Work>) {
    let held: Vec<RowKey> = work
        .into_iter()
        .flat_map(|w| w.records.into_iter().map(|r| key(&r)))
        .collect();
    if held.is_empty() {
        return;
    }
    let released = match shared.store.release(&held, &shared.config.worker_id).await {
        Ok(n) => {
            shared.metrics.released.inc_by(n);
            true
        }
        Err(e) => {
            tracing::warn!("could not release unstarted rows ({e}); their leases will expire");
            false
        }
    };
    shared.forget(held, released);
}
