//! What the worker's tasks share: the rows in flight and their leases, the semaphores that
//! bound them, the stop tokens, and the retry wake-ups.

use super::supervise::Fault;
use super::{RETRY_WAKE_MAX, RETRY_WAKE_STEP};
use crate::{Health, WorkerConfig};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally::metrics::{FailReason, WorkerMetrics};
use tally::{ClaimableBatch, ClaimedRecord, HandlerError, Outcome, RecordState, Store};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// A claimed row in memory: (row id, lease id). The lease id never repeats, so a row given
/// back and claimed again is a new key even when its attempt number is the same.
pub(super) type RowKey = (i64, i64);

pub(super) fn key(record: &ClaimedRecord) -> RowKey {
    (record.id, record.lease_id)
}

pub(super) fn outcome_key(outcome: &Outcome) -> RowKey {
    (outcome.id, outcome.lease_id)
}

/// Rows claimed and not yet written back, and the leases (one per claim) holding them.
#[derive(Default)]
struct InFlight {
    /// Rows in flight.
    rows: HashSet<RowKey>,
    /// Lease id -> rows of it still in flight.
    leases: HashMap<i64, usize>,
    /// Leases whose rows are all settled (written, refused by the fence, or released), to
    /// delete.
    finished_leases: Vec<i64>,
    /// Leases with a row given up unsettled (still `running` in the database): never deleted,
    /// so that they expire and the rescue (which finds rows through their lease) returns them.
    abandoned_leases: HashSet<i64>,
    /// Lease id -> token given to its records' handlers: fires when the lease is lost.
    lease_cancel: HashMap<i64, CancellationToken>,
    /// Failures that used up the last attempt, for the metric's reason.
    exhausted: HashSet<RowKey>,
}

/// State shared by the worker's tasks.
pub(super) struct Shared {
    pub(super) store: Store,
    pub(super) config: WorkerConfig,
    pub(super) metrics: Arc<WorkerMetrics>,
    in_flight: Mutex<InFlight>,
    /// Claimed-but-unwritten rows may not exceed this; claims wait for room.
    pub(super) room: Arc<Semaphore>,
    /// Handlers (or SQL transactions) running at once.
    pub(super) handlers: Arc<Semaphore>,
    /// Stop claiming; let started work finish.
    pub(super) soft: CancellationToken,
    /// Stop everything now (grace period over, or a fatal failure).
    pub(super) hard: CancellationToken,
    /// One of the worker's own tasks died: stop renewing and exit (see `supervise`).
    pub(super) fatal: CancellationToken,
    pub(super) fatal_reason: Mutex<Option<String>>,
    /// A fault injected by a test (debug builds only).
    pub(super) fault: Option<Fault>,
    /// This worker holds the queue's half-open breaker: its next outcome decides.
    pub(super) probing: AtomicBool,
    /// This worker reported retryable failures and no success since.
    pub(super) breaker_dirty: AtomicBool,
    pub(super) health: Arc<Health>,
    /// The handler's kind, for the worker's row on the dashboard.
    pub(super) handler_name: &'static str,
    /// When rows this worker sent back for a retry become due: the idle claim loop wakes for
    /// the earliest instead of waiting for the poll.
    retries: Mutex<BTreeSet<tokio::time::Instant>>,
    /// Fires when a retry earlier than all those pending was recorded.
    pub(super) retry_recorded: Notify,
    /// Origin of the wake-up steps (see [`RETRY_WAKE_STEP`]).
    epoch: tokio::time::Instant,
}

/// Counts an outcome that was written.
pub(super) fn count(shared: &Shared, outcome: &Outcome) {
    let m = &shared.metrics;
    match outcome.state {
        RecordState::Complete => m.completed.inc(),
        RecordState::Pending => m.retried.inc(),
        _ => m.count_failed(shared.fail_reason(outcome)),
    }
}

impl Shared {
    pub(super) fn new(
        store: Store,
        config: WorkerConfig,
        metrics: Arc<WorkerMetrics>,
        health: Arc<Health>,
        shutdown: &CancellationToken,
        fault: Option<Fault>,
        handler_name: &'static str,
    ) -> Shared {
        Shared {
            store,
            metrics,
            in_flight: Mutex::new(InFlight::default()),
            room: Arc::new(Semaphore::new(super::max_outstanding(&config))),
            handlers: Arc::new(Semaphore::new(config.concurrency)),
            // A child: a fatal failure stops claiming without touching the caller's token.
            soft: shutdown.child_token(),
            hard: CancellationToken::new(),
            fatal: CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            fault,
            probing: AtomicBool::new(false),
            breaker_dirty: AtomicBool::new(false),
            health,
            handler_name,
            retries: Mutex::new(BTreeSet::new()),
            retry_recorded: Notify::new(),
            epoch: tokio::time::Instant::now(),
            config,
        }
    }

    /// Rows were written back as pending `delay`s from now: wake up when they are due. Called
    /// after the write returned, so each wake-up falls after the statement's `now() + delay`.
    pub(super) fn note_retries(&self, delays: impl IntoIterator<Item = Duration>) {
        let now = tokio::time::Instant::now();
        let step = RETRY_WAKE_STEP.as_nanos();
        let mut earlier = false;
        if let Ok(mut retries) = self.retries.lock() {
            let first = retries.first().copied();
            for delay in delays {
                let since = (now + delay).duration_since(self.epoch).as_nanos();
                let steps = since.div_ceil(step) + 1;
                let at = self.epoch + Duration::from_nanos((steps * step) as u64);
                if retries.len() >= RETRY_WAKE_MAX {
                    match retries.last() {
                        Some(&last) if at < last => retries.remove(&last),
                        _ => continue,
                    };
                }
                retries.insert(at);
            }
            earlier = retries.first().copied() != first;
        }
        if earlier {
            self.retry_recorded.notify_one();
        }
    }

    /// The earliest pending retry wake-up.
    pub(super) fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.retries.lock().ok().and_then(|r| r.first().copied())
    }

    /// A claim round that began at `at` found every row due by then: forget their wake-ups.
    pub(super) fn retries_claimed(&self, at: tokio::time::Instant) {
        if let Ok(mut retries) = self.retries.lock() {
            if retries.first().is_some_and(|first| *first <= at) {
                *retries = retries.split_off(&(at + Duration::from_nanos(1)));
            }
        }
    }

    pub(super) fn track(&self, records: &[ClaimedRecord]) {
        if let Ok(mut f) = self.in_flight.lock() {
            for r in records {
                f.rows.insert(key(r));
                *f.leases.entry(r.lease_id).or_default() += 1;
                f.lease_cancel
                    .entry(r.lease_id)
                    .or_insert_with(|| self.hard.child_token());
            }
            self.metrics.in_flight.set(f.rows.len() as i64);
        }
        self.metrics.claimed.inc_by(records.len() as u64);
    }

    /// A handler (or SQL chunk) starts on these records.
    pub(super) fn note_started<'a>(&self, records: impl IntoIterator<Item = &'a ClaimedRecord>) {
        let again = records.into_iter().filter(|r| r.attempt > 1).count();
        self.metrics.redelivered.inc_by(again as u64);
    }

    /// The outcome for a handler error, remembering whether it used up the last attempt.
    pub(super) fn failure(
        &self,
        batch: &ClaimableBatch,
        record: &ClaimedRecord,
        error: HandlerError,
    ) -> Outcome {
        if super::process::attempts_exhausted(batch, record, &error) {
            if let Ok(mut f) = self.in_flight.lock() {
                f.exhausted.insert(key(record));
            }
        }
        super::process::failure_outcome(batch, record, error)
    }

    /// Why a failed outcome failed (see [`Shared::failure`]).
    fn fail_reason(&self, outcome: &Outcome) -> FailReason {
        let exhausted = self
            .in_flight
            .lock()
            .map(|f| f.exhausted.contains(&outcome_key(outcome)))
            .unwrap_or(false);
        if exhausted {
            FailReason::Exhausted
        } else {
            FailReason::Permanent
        }
    }

    /// Done with these claimed rows: frees their room. `settled` says whether the database no
    /// longer has them running under their lease (written, refused by the fence, or released);
    /// a lease is deleted only once all its rows were settled.
    pub(super) fn forget(&self, rows: impl IntoIterator<Item = RowKey>, settled: bool) {
        let mut n = 0;
        if let Ok(mut f) = self.in_flight.lock() {
            for row in rows {
                n += 1;
                f.exhausted.remove(&row);
                if !f.rows.remove(&row) {
                    continue;
                }
                let lease = row.1;
                if !settled {
                    f.abandoned_leases.insert(lease);
                }
                if let Some(left) = f.leases.get_mut(&lease) {
                    *left -= 1;
                    if *left == 0 {
                        f.leases.remove(&lease);
                        f.lease_cancel.remove(&lease);
                        // An abandoned lease is neither renewed nor deleted: it expires.
                        if !f.abandoned_leases.remove(&lease) {
                            f.finished_leases.push(lease);
                        }
                    }
                }
            }
            self.metrics.in_flight.set(f.rows.len() as i64);
        }
        self.room.add_permits(n);
    }

    /// The token for handlers of rows under `lease`: fires on hard stop or when the lease is lost.
    pub(super) fn lease_token(&self, lease: i64) -> CancellationToken {
        self.in_flight
            .lock()
            .ok()
            .and_then(|f| f.lease_cancel.get(&lease).cloned())
            .unwrap_or_else(|| self.hard.clone())
    }

    /// These leases were taken over: their handlers' work can no longer be recorded.
    pub(super) fn cancel_leases(&self, leases: &[i64]) {
        if let Ok(f) = self.in_flight.lock() {
            for lease in leases {
                if let Some(token) = f.lease_cancel.get(lease) {
                    token.cancel();
                }
            }
        }
    }

    /// Leases with rows still in flight, and the finished ones (taken).
    pub(super) fn leases(&self) -> (Vec<i64>, Vec<i64>) {
        match self.in_flight.lock() {
            Ok(mut f) => (
                f.leases.keys().copied().collect(),
                std::mem::take(&mut f.finished_leases),
            ),
            Err(_) => (Vec::new(), Vec::new()),
        }
    }

    pub(super) fn rows_in_flight(&self) -> usize {
        self.in_flight.lock().map(|f| f.rows.len()).unwrap_or(0)
    }

    /// Rows the fence refused. After a write that failed in transit, the refusal most likely
    /// means that write did commit (its acknowledgement was lost), so it is not a lost lease.
    pub(super) fn note_refused(&self, refused: &[i64], after_failed_write: bool) {
        if refused.is_empty() {
            return;
        }
        if after_failed_write {
            tracing::info!(
                count = refused.len(),
                first = refused[0],
                "rows no longer held after a reconnect: the earlier write most likely committed \
                 before the connection dropped, or their leases expired; nothing was written twice"
            );
            return;
        }
        self.metrics.lost_leases.inc_by(refused.len() as u64);
        tracing::warn!(
            count = refused.len(),
            first = refused[0],
            "lease lost: these rows are no longer held by this worker; their result was not written"
        );
    }
}
