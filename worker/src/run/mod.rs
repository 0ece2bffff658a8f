//! The worker's run: its tasks (claim loop, starter, completer, lease renewal, rescue,
//! listener, progress), all watched, and the drain at shutdown.

mod claim;
mod complete;
mod lease;
mod process;
mod sql_chunk;
mod start;
mod state;
mod supervise;

pub use supervise::Fault;

use crate::{listener, Database, Health, Processor, WorkerConfig, WorkerError};
use state::Shared;
use std::sync::Arc;
use std::time::{Duration, Instant};
use supervise::{spawn_watched, Duty};
use tally::metrics::WorkerMetrics;
use tally::Store;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Pause after a failed database call, doubled up to the maximum (as `prepare` retries).
use tally::store::{
    RETRY_BACKOFF_MAX as ERROR_BACKOFF_MAX, RETRY_BACKOFF_MIN as ERROR_BACKOFF_MIN,
};
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Retry wake-ups are rounded up to this step, so that a flush of many retries with jittered
/// delays keeps a few wake-ups rather than one per row; the rounding is also the margin that
/// makes the wake-up fall after the row's `available_at`.
const RETRY_WAKE_STEP: Duration = Duration::from_millis(20);
/// Pending retry wake-ups kept, at most; beyond that the latest are left to the poll.
const RETRY_WAKE_MAX: usize = 10_000;

/// Claimed-but-unwritten rows a worker holds at most: two claims ahead of its handlers.
fn max_outstanding(config: &WorkerConfig) -> usize {
    config.claim_size.max(config.concurrency) * 2
}

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
    fault: Option<Fault>,
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
            fault: None,
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

    /// Injects a fault into one of the worker's own tasks, to test that it is noticed.
    /// Debug builds only.
    #[cfg(debug_assertions)]
    #[doc(hidden)]
    pub fn inject_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// Runs until `shutdown` fires, then stops claiming, lets in-flight records finish within
    /// the grace period, gives back rows it never started, and returns what it did. If one of
    /// its own tasks dies, it stops at once without renewing its leases and returns
    /// [`WorkerError::Fatal`].
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
        let max_outstanding = max_outstanding(&config);
        let metrics = match self.metrics {
            Some(m) => m,
            None => Arc::new(
                WorkerMetrics::new(&config.queue)
                    .map_err(|e| WorkerError::Config(vec![format!("metrics: {e}")]))?,
            ),
        };
        let shared = Arc::new(Shared::new(
            store,
            config,
            metrics,
            self.health.clone(),
            &shutdown,
            self.fault,
            self.processor.name(),
        ));
        let background = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let listener = listener::listen(
            shared.store.clone(),
            shared.config.queue.clone(),
            wake.clone(),
            background.clone(),
        );
        let until_stopped = || Duty::UntilStopped(background.clone());
        let mut tasks = vec![
            spawn_watched(&shared, "listener", Duty::Optional, listener),
            spawn_watched(
                &shared,
                "rescue",
                until_stopped(),
                lease::rescue_loop(shared.clone(), background.clone()),
            ),
            spawn_watched(
                &shared,
                "lease renewal",
                until_stopped(),
                lease::renew_loop(shared.clone(), background.clone()),
            ),
            spawn_watched(
                &shared,
                "progress",
                Duty::Optional,
                progress_loop(shared.clone(), background.clone()),
            ),
        ];
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        let completer = spawn_watched(
            &shared,
            "completer",
            Duty::Finite,
            complete::complete_loop(shared.clone(), outcomes_rx),
        );
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        tasks.push(spawn_watched(
            &shared,
            "starter",
            Duty::Finite,
            start::start_loop(shared.clone(), self.processor.clone(), work_rx, outcomes_tx),
        ));

        tracing::info!(
            worker = %shared.config.worker_id,
            queue = %shared.config.queue,
            concurrency = shared.config.concurrency,
            "worker started"
        );
        shared.health.set_poll_interval(shared.config.poll_interval);
        shared.health.set_connected(true);
        claim::claim_loop(&shared, &self.processor, &wake, work_tx).await;
        if !shared.fatal.is_cancelled() {
            shared.health.set_draining();
            // Drain: wait for every claimed row to be written back, within the grace period.
            tokio::select! {
                _ = shared.room.acquire_many(max_outstanding as u32) => {}
                _ = shared.fatal.cancelled() => {}
                _ = tokio::time::sleep(shared.config.grace_period) => {
                    tracing::warn!(
                        in_flight = shared.rows_in_flight(),
                        "grace period over: stopping in-flight records; their leases will expire"
                    );
                    shared.hard.cancel();
                }
            }
        }
        if let Some(reason) = shared.fatal_reason() {
            // Leases are neither renewed nor dropped: they expire, and other workers rescue
            // the rows (giving back the attempts of those that never started).
            background.cancel();
            return Err(WorkerError::Fatal(reason));
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
        for task in tasks {
            let _ = task.await;
        }
        if let Some(reason) = shared.fatal_reason() {
            return Err(WorkerError::Fatal(reason));
        }
        lease::heartbeat(&shared, true).await;
        let summary = summary(&shared.metrics);
        tracing::info!(?summary, "worker stopped");
        Ok(summary)
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
