//! The claim loop and its helpers: dispatch, batched completion, lease renewal, rescue, drain.

use crate::{listener, Database, Health, Processor, WorkerConfig, WorkerError};
use futures::FutureExt;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally::backoff::full_jitter;
use tally::handler::{storable_message, MAX_RETRY_AFTER};
use tally::metrics::{FailReason, WorkerMetrics};
use tally::{
    BreakerGate, ClaimableBatch, ClaimedRecord, HandlerError, Outcome, RecordContext, RecordState,
    Store,
};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Outcomes written per statement, at most.
const FLUSH_MAX: usize = 1000;
/// How long the completer waits for more outcomes before writing what it has.
const FLUSH_LINGER: Duration = Duration::from_millis(5);
/// Expired leases (claims) taken per rescue statement.
const RESCUE_LIMIT: i64 = 20;
/// Rescue statements per pass, at most.
const RESCUE_PASSES: usize = 100;
/// Pause after a failed database call in the claim loop, doubled up to the maximum.
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Retry wake-ups are rounded up to this step, so that a flush of many retries with jittered
/// delays keeps a few wake-ups rather than one per row; the rounding is also the margin that
/// makes the wake-up fall after the row's `available_at`.
const RETRY_WAKE_STEP: Duration = Duration::from_millis(20);
/// Pending retry wake-ups kept, at most; beyond that the latest are left to the poll.
const RETRY_WAKE_MAX: usize = 10_000;

/// Counts of what one run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Records this worker completed.
    pub completed: u64,
    /// Records this worker failed (permanent errors and spent attempts).
    pub failed: u64,
    /// Records sent back to pending for another attempt.
    pub retried: u64,
    /// Outcomes refused by the fence: the lease had passed to another worker.
    pub lost_leases: u64,
    /// Rows given back unstarted at shutdown.
    pub released: u64,
    /// Rows of dead workers' expired leases this worker returned to pending (or failed).
    pub rescued: u64,
}

fn summary(m: &WorkerMetrics) -> RunSummary {
    RunSummary {
        completed: m.completed.get(),
        failed: m.failed_total(),
        retried: m.retried.get(),
        lost_leases: m.lost_leases.get(),
        released: m.released.get(),
        rescued: m.rescued.get(),
    }
}

/// Counts an outcome that was written.
fn count(shared: &Shared, outcome: &Outcome) {
    let m = &shared.metrics;
    match outcome.state {
        RecordState::Complete => m.completed.inc(),
        RecordState::Pending => m.retried.inc(),
        _ => m.count_failed(shared.fail_reason(outcome)),
    }
}

/// Rows claimed and not yet written back, and the leases (one per claim) holding them.
#[derive(Default)]
struct InFlight {
    /// (row id, attempt) -> lease id. A row retried and claimed again before its earlier
    /// outcome was forgotten has two entries, one per attempt.
    rows: HashMap<(i64, i32), i64>,
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
    /// (row id, attempt) of failures that used up the last attempt, for the metric's reason.
    exhausted: HashSet<(i64, i32)>,
}

/// State shared by the worker's tasks.
struct Shared {
    store: Store,
    config: WorkerConfig,
    metrics: Arc<WorkerMetrics>,
    in_flight: Mutex<InFlight>,
    /// Claimed-but-unwritten rows may not exceed this; claims wait for room.
    room: Arc<Semaphore>,
    /// Handlers (or SQL transactions) running at once.
    handlers: Arc<Semaphore>,
    /// Stop claiming; let started work finish.
    soft: CancellationToken,
    /// Stop everything now (grace period over).
    hard: CancellationToken,
    /// This worker holds the queue's half-open breaker: its next outcome decides.
    probing: AtomicBool,
    /// This worker reported retryable failures and no success since.
    breaker_dirty: AtomicBool,
    health: Arc<Health>,
    /// When rows this worker sent back for a retry become due: the idle claim loop wakes for
    /// the earliest instead of waiting for the poll.
    retries: Mutex<BTreeSet<tokio::time::Instant>>,
    /// Fires when a retry earlier than all those pending was recorded.
    retry_recorded: Notify,
    /// Origin of the wake-up steps (see [`RETRY_WAKE_STEP`]).
    epoch: tokio::time::Instant,
}

impl Shared {
    /// Rows were written back as pending `delay`s from now: wake up when they are due. Called
    /// after the write returned, so each wake-up falls after the statement's `now() + delay`.
    fn note_retries(&self, delays: impl IntoIterator<Item = Duration>) {
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
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.retries.lock().ok().and_then(|r| r.first().copied())
    }

    /// A claim round that began at `at` found every row due by then: forget their wake-ups.
    fn retries_claimed(&self, at: tokio::time::Instant) {
        if let Ok(mut retries) = self.retries.lock() {
            if retries.first().is_some_and(|first| *first <= at) {
                *retries = retries.split_off(&(at + Duration::from_nanos(1)));
            }
        }
    }

    fn track(&self, records: &[ClaimedRecord]) {
        if let Ok(mut f) = self.in_flight.lock() {
            for r in records {
                f.rows.insert((r.id, r.attempt), r.lease_id);
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
    fn note_started<'a>(&self, records: impl IntoIterator<Item = &'a ClaimedRecord>) {
        let again = records.into_iter().filter(|r| r.attempt > 1).count();
        self.metrics.redelivered.inc_by(again as u64);
    }

    /// The outcome for a handler error, remembering whether it used up the last attempt.
    fn failure(
        &self,
        batch: &ClaimableBatch,
        record: &ClaimedRecord,
        error: HandlerError,
    ) -> Outcome {
        if attempts_exhausted(batch, record, &error) {
            if let Ok(mut f) = self.in_flight.lock() {
                f.exhausted.insert((record.id, record.attempt));
            }
        }
        failure_outcome(batch, record, error)
    }

    /// Why a failed outcome failed (see [`Shared::failure`]).
    fn fail_reason(&self, outcome: &Outcome) -> FailReason {
        let exhausted = self
            .in_flight
            .lock()
            .map(|f| f.exhausted.contains(&(outcome.id, outcome.attempt)))
            .unwrap_or(false);
        if exhausted {
            FailReason::Exhausted
        } else {
            FailReason::Permanent
        }
    }

    /// Done with these claimed rows (by id and attempt): frees their room. `settled` says
    /// whether the database no longer has them running under their lease (written, refused
    /// by the fence, or released); a lease is deleted only once all its rows were settled.
    fn forget(&self, rows: impl IntoIterator<Item = (i64, i32)>, settled: bool) {
        let mut n = 0;
        if let Ok(mut f) = self.in_flight.lock() {
            for row in rows {
                n += 1;
                f.exhausted.remove(&row);
                let Some(lease) = f.rows.remove(&row) else {
                    continue;
                };
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
    fn lease_token(&self, lease: i64) -> CancellationToken {
        self.in_flight
            .lock()
            .ok()
            .and_then(|f| f.lease_cancel.get(&lease).cloned())
            .unwrap_or_else(|| self.hard.clone())
    }

    /// These leases were taken over: their handlers' work can no longer be recorded.
    fn cancel_leases(&self, leases: &[i64]) {
        if let Ok(f) = self.in_flight.lock() {
            for lease in leases {
                if let Some(token) = f.lease_cancel.get(lease) {
                    token.cancel();
                }
            }
        }
    }

    /// The fence refused these rows (by id and attempt): the claims holding them were rescued,
    /// so the other rows of those claims are lost too.
    fn cancel_leases_of(&self, rows: impl IntoIterator<Item = (i64, i32)>) {
        let leases: Vec<i64> = match self.in_flight.lock() {
            Ok(f) => rows
                .into_iter()
                .filter_map(|row| f.rows.get(&row).copied())
                .collect(),
            Err(_) => return,
        };
        self.cancel_leases(&leases);
    }

    /// Leases with rows still in flight, and the finished ones (taken).
    fn leases(&self) -> (Vec<i64>, Vec<i64>) {
        match self.in_flight.lock() {
            Ok(mut f) => (
                f.leases.keys().copied().collect(),
                std::mem::take(&mut f.finished_leases),
            ),
            Err(_) => (Vec::new(), Vec::new()),
        }
    }

    fn rows_in_flight(&self) -> usize {
        self.in_flight.lock().map(|f| f.rows.len()).unwrap_or(0)
    }

    /// Rows the fence refused. After a write that failed in transit, the refusal most likely
    /// means that write did commit (its acknowledgement was lost), so it is not a lost lease.
    fn note_refused(&self, refused: &[i64], after_failed_write: bool) {
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

/// A worker bound to a store, a configuration and a processor.
///
/// Build one with [`Worker::builder`] (settings checked at once), or with [`Worker::new`]
/// from a [`WorkerConfig`]; then call [`Worker::run`].
pub struct Worker {
    database: Database,
    /// Pool size when `database` is a URL.
    pool_size: usize,
    config: WorkerConfig,
    processor: Processor,
    health: Arc<Health>,
    metrics: Option<Arc<WorkerMetrics>>,
}

impl Worker {
    /// A worker on an open store; `config` is checked when it runs.
    pub fn new(store: Store, config: WorkerConfig, processor: Processor) -> Self {
        let pool_size = crate::default_pool_size(config.concurrency);
        Worker::with_database(Database::Store(store), pool_size, config, processor)
    }

    pub(crate) fn with_database(
        database: Database,
        pool_size: usize,
        config: WorkerConfig,
        processor: Processor,
    ) -> Self {
        Worker {
            database,
            pool_size,
            config,
            processor,
            health: Health::new(),
            metrics: None,
        }
    }

    /// Counts into `metrics` (e.g. ones already served on `/metrics`) instead of its own.
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reports liveness and readiness to `health` (e.g. one already served on `/readyz`).
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }

    /// Runs until `shutdown` fires, then stops claiming, lets in-flight records finish within
    /// the grace period, gives back rows it never started, and returns what it did.
    pub async fn run(self, shutdown: CancellationToken) -> Result<RunSummary, WorkerError> {
        // Every line of this worker, its tasks and its records' spans carry the queue.
        let span = tracing::info_span!(
            "worker",
            queue = %self.config.queue,
            worker = %self.config.worker_id
        );
        self.run_in_span(shutdown).instrument(span).await
    }

    async fn run_in_span(self, shutdown: CancellationToken) -> Result<RunSummary, WorkerError> {
        self.config.validate().map_err(WorkerError::Config)?;
        let store = self.database.open(self.pool_size).await?;
        store.check_schema().await?;
        if let Processor::Sql { statement, .. } = &self.processor {
            store.check_statement(statement).await?;
        }
        let config = self.config;
        let max_outstanding = config.claim_size.max(config.concurrency) * 2;
        let metrics = match self.metrics {
            Some(m) => m,
            None => Arc::new(
                WorkerMetrics::new(&config.queue)
                    .map_err(|e| WorkerError::Config(vec![format!("metrics: {e}")]))?,
            ),
        };
        let shared = Arc::new(Shared {
            store,
            metrics,
            in_flight: Mutex::new(InFlight::default()),
            room: Arc::new(Semaphore::new(max_outstanding)),
            handlers: Arc::new(Semaphore::new(config.concurrency)),
            soft: shutdown.clone(),
            hard: CancellationToken::new(),
            probing: AtomicBool::new(false),
            breaker_dirty: AtomicBool::new(false),
            health: self.health.clone(),
            retries: Mutex::new(BTreeSet::new()),
            retry_recorded: Notify::new(),
            epoch: tokio::time::Instant::now(),
            config,
        });
        let background = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(
            listener::listen(
                shared.store.clone(),
                shared.config.queue.clone(),
                wake.clone(),
                background.clone(),
            )
            .in_current_span(),
        );
        tasks.spawn(rescue_loop(shared.clone(), background.clone()).in_current_span());
        tasks.spawn(renew_loop(shared.clone(), background.clone()).in_current_span());
        tasks.spawn(progress_loop(shared.clone(), background.clone()).in_current_span());
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let completer = tokio::spawn(complete_loop(shared.clone(), outcomes_rx).in_current_span());

        tracing::info!(
            worker = %shared.config.worker_id,
            queue = %shared.config.queue,
            concurrency = shared.config.concurrency,
            "worker started"
        );
        shared.health.set_poll_interval(shared.config.poll_interval);
        shared.health.set_connected(true);
        claim_loop(&shared, &self.processor, &wake, outcomes_tx).await;
        shared.health.set_draining();

        // Drain: wait for every claimed row to be written back, within the grace period.
        let drained = tokio::time::timeout(
            shared.config.grace_period,
            shared.room.acquire_many(max_outstanding as u32),
        )
        .await;
        if drained.is_err() {
            tracing::warn!(
                in_flight = shared.rows_in_flight(),
                "grace period over: stopping in-flight records; their leases will expire"
            );
            shared.hard.cancel();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), completer).await;
        background.cancel();
        let (_, finished) = shared.leases();
        if let Err(e) = shared
            .store
            .drop_leases(&finished, &shared.config.worker_id)
            .await
        {
            tracing::debug!("dropping finished leases failed: {e}");
        }
        while tasks.join_next().await.is_some() {}
        let summary = summary(&shared.metrics);
        tracing::info!(?summary, "worker stopped");
        Ok(summary)
    }
}

async fn claim_loop(
    shared: &Arc<Shared>,
    processor: &Processor,
    wake: &Notify,
    outcomes: mpsc::UnboundedSender<Outcome>,
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
        let claimed = match claim_round(shared, processor, &mut started, &outcomes).await {
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
    outcomes: &mpsc::UnboundedSender<Outcome>,
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
        dispatch(shared, processor, Arc::new(batch), records, outcomes);
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

fn dispatch(
    shared: &Arc<Shared>,
    processor: &Processor,
    batch: Arc<ClaimableBatch>,
    records: Vec<ClaimedRecord>,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) {
    match processor {
        Processor::Handler(handler) => {
            for record in records {
                let (shared, handler, batch, outcomes) = (
                    shared.clone(),
                    handler.clone(),
                    batch.clone(),
                    outcomes.clone(),
                );
                let span = record_span(&batch, &record);
                tokio::spawn(
                    process_record(shared, handler, batch, record, outcomes).instrument(span),
                );
            }
        }
        Processor::Sql {
            statement,
            chunk_size,
        } => {
            for chunk in records.chunks((*chunk_size).max(1)) {
                let (shared, statement, batch, chunk) = (
                    shared.clone(),
                    statement.clone(),
                    batch.clone(),
                    chunk.to_vec(),
                );
                tokio::spawn(
                    async move {
                        let refs: Vec<&ClaimedRecord> = chunk.iter().collect();
                        let Some(_permit) = start_or_release(&shared, &refs).await else {
                            return;
                        };
                        shared.note_started(refs);
                        run_sql_chunk(&shared, &statement, &batch, &chunk).await;
                    }
                    .in_current_span(),
                );
            }
        }
    }
}

/// Processes one claimed record with the handler and queues its outcome for writing.
async fn process_record(
    shared: Arc<Shared>,
    handler: Arc<dyn tally::Handler>,
    batch: Arc<ClaimableBatch>,
    record: ClaimedRecord,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    let Some(_permit) = start_or_release(&shared, &[&record]).await else {
        return;
    };
    shared.note_started([&record]);
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
    let outcome = match result {
        Ok(()) => Outcome::complete(&record),
        Err(e) => shared.failure(&batch, &record, e),
    };
    log_outcome(&outcome);
    let _ = outcomes.send(outcome);
}

/// Waits for a handler slot; if the worker is stopping first, gives the rows back unstarted.
async fn start_or_release(
    shared: &Arc<Shared>,
    records: &[&ClaimedRecord],
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = shared.soft.cancelled() => {}
        permit = shared.handlers.clone().acquire_owned() => {
            if let Ok(permit) = permit {
                if !shared.soft.is_cancelled() {
                    return Some(permit);
                }
            }
        }
    }
    let held: Vec<(i64, i32)> = records.iter().map(|r| (r.id, r.attempt)).collect();
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
    shared.forget(held.iter().copied(), released);
    None
}

/// A retryable error on the last allowed attempt: the record fails as exhausted.
fn attempts_exhausted(
    batch: &ClaimableBatch,
    record: &ClaimedRecord,
    error: &HandlerError,
) -> bool {
    matches!(error, HandlerError::Retryable { .. }) && record.attempt >= batch.max_attempts
}

/// Retry with backoff while attempts remain, else fail; permanent errors fail at once.
fn failure_outcome(batch: &ClaimableBatch, record: &ClaimedRecord, error: HandlerError) -> Outcome {
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
        state,
        // PostgreSQL refuses NUL in text and `now() + delay` past its timestamp range: either
        // would make the write fail, again and again.
        error: Some(storable_message(&message)),
        retry_in: retry_in.min(MAX_RETRY_AFTER),
    }
}

/// The span of one record's processing: its lines carry the batch, record id and attempt.
/// At debug level only, so that a busy worker at `info` does not pay for a span per record.
fn record_span(batch: &ClaimableBatch, record: &ClaimedRecord) -> tracing::Span {
    tracing::debug_span!(
        "record",
        batch = %batch.name,
        record_id = %record.record_id,
        attempt = record.attempt
    )
}

/// One debug line per record outcome (inside the record's span).
fn log_outcome(outcome: &Outcome) {
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

/// [`log_outcome`] for each record of an SQL chunk.
fn log_chunk_outcomes(
    batch: &ClaimableBatch,
    chunk: &[ClaimedRecord],
    result: &tally::store::TransactionalResult,
) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let failed: HashMap<i64, &Outcome> = result.failed.iter().map(|o| (o.id, o)).collect();
    let lost: HashSet<i64> = result.lost.iter().copied().collect();
    for record in chunk {
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
        let message = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("non-string payload");
        tracing::warn!(batch = %ctx.batch, record_id = %ctx.record_id, "handler panicked: {message}");
        Err(HandlerError::retryable(format!("handler panicked: {message}")))
    })
}

async fn run_sql_chunk(
    shared: &Arc<Shared>,
    statement: &str,
    batch: &ClaimableBatch,
    chunk: &[ClaimedRecord],
) {
    let owner = &shared.config.worker_id;
    let mut delay = ERROR_BACKOFF_MIN;
    let mut retrying = false;
    let started = Instant::now();
    let written = loop {
        let result = shared
            .store
            .run_transactional(&batch.name, chunk, owner, statement, |record, failure| {
                let error = if failure.retryable {
                    HandlerError::retryable(failure.message.clone())
                } else {
                    HandlerError::permanent(failure.message.clone())
                };
                shared.failure(batch, record, error)
            })
            .await;
        match result {
            Ok(result) => {
                let m = &shared.metrics;
                m.completed.inc_by(result.completed);
                for outcome in &result.failed {
                    count(shared, outcome);
                }
                // One transaction served the chunk: spread its time over its records.
                let per_record = started.elapsed().as_secs_f64() / chunk.len().max(1) as f64;
                for _ in chunk {
                    m.handler_seconds.observe(per_record);
                }
                shared.note_refused(&result.lost, retrying);
                log_chunk_outcomes(batch, chunk, &result);
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
                let retried = retried.len();
                report_to_breaker(shared, result.completed, retried as u64).await;
                break true;
            }
            // The transaction did not commit: the rows are still ours until the lease ends.
            Err(e) if !shared.hard.is_cancelled() => {
                tracing::warn!("SQL handler transaction failed ({e}); retrying in {delay:?}");
                retrying = true;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(ERROR_BACKOFF_MAX);
            }
            Err(_) => break false,
        }
    };
    shared.forget(chunk.iter().map(|r| (r.id, r.attempt)), written);
}

/// Pauses batches whose failures passed their limit, so a poisoned batch stops burning work.
async fn check_failure_limits(shared: &Shared, batch_ids: &[i64]) {
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
async fn report_to_breaker(shared: &Shared, successes: u64, retryable_failures: u64) {
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

/// Writes handler outcomes in batches. A write that fails is retried: the fence makes a
/// late write harmless, and until it lands the rows stay leased to this worker.
async fn complete_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Outcome>) {
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
                let lost: HashSet<i64> = lost.into_iter().collect();
                shared.cancel_leases_of(
                    buffer
                        .iter()
                        .filter(|o| lost.contains(&o.id))
                        .map(|o| (o.id, o.attempt)),
                );
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
        shared.forget(buffer.drain(..).map(|o| (o.id, o.attempt)), settled);
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

/// Keeps the leases of rows still being processed, in one statement per pass, and deletes
/// the leases whose rows are all written back.
async fn renew_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.config.lease / 3;
    let owner = &shared.config.worker_id;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (active, finished) = shared.leases();
        if let Err(e) = shared.store.drop_leases(&finished, owner).await {
            // Harmless: the rescuer deletes them once they expire.
            tracing::debug!("dropping finished leases failed: {e}");
        }
        if active.is_empty() {
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

/// Any live worker returns rows of dead ones once their leases expire.
async fn rescue_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(shared.config.rescue_interval) => {}
        }
        for _ in 0..RESCUE_PASSES {
            match shared.store.rescue_expired(RESCUE_LIMIT).await {
                Ok(s) => {
                    check_failure_limits(&shared, &s.batches_with_failures).await;
                    let n = s.to_pending + s.to_failed;
                    shared.metrics.rescued.inc_by(n);
                    // Their lease expired on the last attempt.
                    shared.metrics.failed_exhausted.inc_by(s.to_failed);
                    if n == 0 || stop.is_cancelled() {
                        break;
                    }
                    tracing::info!(
                        back_to_pending = s.to_pending,
                        failed = s.to_failed,
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

async fn progress_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
        }
        let s = summary(&shared.metrics);
        let done = s.completed + s.failed;
        if done != last.1 {
            let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64();
            tracing::info!(
                completed = s.completed,
                failed = s.failed,
                retried = s.retried,
                rate = format!("{rate:.0}/s"),
                "progress"
            );
        }
        last = (Instant::now(), done);
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
