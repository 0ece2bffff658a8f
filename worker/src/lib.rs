//! The Tally worker as a library: claim records of a queue under a lease, process them with a
//! [`Handler`] (or the operator's SQL statement, transactionally), record the outcomes behind
//! the fence, rescue expired leases, and drain on shutdown.
//!
//! ```no_run
//! use std::time::Duration;
//! use tally_worker::{Handler, HandlerError, RecordContext, Worker};
//!
//! struct Print;
//!
//! #[async_trait::async_trait]
//! impl Handler for Print {
//!     async fn handle(&self, ctx: &RecordContext, payload: &serde_json::Value) -> Result<(), HandlerError> {
//!         println!("{} {payload}", ctx.idempotency_key);
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let worker = Worker::builder("postgres://postgres@127.0.0.1/postgres", "emails")
//!     .handler(Print)
//!     .concurrency(8)
//!     .lease(Duration::from_secs(30))
//!     .build()?; // every configuration problem at once
//! let shutdown = tokio_util::sync::CancellationToken::new(); // cancel on SIGTERM to drain
//! let summary = worker.run(shutdown).await?;
//! println!("{} complete, {} failed", summary.completed, summary.failed);
//! # Ok(()) }
//! ```
//!
//! See [`WorkerBuilder`] for every setting, [`Handler`] for how errors are classified, and
//! `worker/examples/custom_handler.rs` for a complete program with signal handling.

mod builder;
pub mod cli;
pub mod handlers;
pub mod health;
mod listener;
mod run;

pub use builder::{default_pool_size, Database, WorkerBuilder};
pub use handlers::{ExecConfig, ExecHandler, HttpConfig, HttpHandler};
pub use health::Health;
#[doc(hidden)]
pub use run::Fault;
pub use run::{RunSummary, Worker};
pub use tally::{Handler, HandlerError, RecordContext};

use std::sync::Arc;
use std::time::Duration;

/// Records processed at once by one worker.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Most rows taken by one claim.
pub const DEFAULT_CLAIM_SIZE: usize = 1000;
/// Rows per transaction of the SQL handler.
pub const DEFAULT_SQL_CHUNK: usize = 100;
/// How long a claimed row stays this worker's without renewal.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// How often an idle worker looks for work when no notification came.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How often each worker looks for expired leases.
pub const DEFAULT_RESCUE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stopping worker lets in-flight records finish.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// Retryable failures in a row, across the fleet, that open a queue's circuit breaker.
pub const DEFAULT_BREAKER_THRESHOLD: i64 = 20;
/// How long an open breaker keeps the fleet off its queue before one probe.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
/// Longest cool-down after repeated failed probes.
pub const DEFAULT_BREAKER_MAX_COOLDOWN: Duration = Duration::from_secs(600);

/// How one worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Queue whose ready batches are claimed.
    pub queue: String,
    /// Lease owner written on claimed rows; unique per process.
    pub worker_id: String,
    /// Records (or SQL transactions) processed at once.
    pub concurrency: usize,
    /// Most rows taken per claim.
    pub claim_size: usize,
    /// Lease on claimed rows, renewed every third of it while they are processed.
    pub lease: Duration,
    /// Fallback poll when no notification arrives.
    pub poll_interval: Duration,
    /// How often to look for expired leases of dead workers.
    pub rescue_interval: Duration,
    /// Time given to in-flight records once shutdown is requested.
    pub grace_period: Duration,
    /// The queue's fleet-wide circuit breaker.
    pub breaker: tally::BreakerPolicy,
}

impl WorkerConfig {
    /// Defaults for `queue`, with a fresh worker id.
    pub fn new(queue: &str) -> Self {
        WorkerConfig {
            queue: queue.to_string(),
            worker_id: default_worker_id(),
            concurrency: DEFAULT_CONCURRENCY,
            claim_size: DEFAULT_CLAIM_SIZE,
            lease: DEFAULT_LEASE,
            poll_interval: DEFAULT_POLL_INTERVAL,
            rescue_interval: DEFAULT_RESCUE_INTERVAL,
            grace_period: DEFAULT_GRACE_PERIOD,
            breaker: tally::BreakerPolicy {
                threshold: DEFAULT_BREAKER_THRESHOLD,
                cooldown: DEFAULT_BREAKER_COOLDOWN,
                max_cooldown: DEFAULT_BREAKER_MAX_COOLDOWN,
            },
        }
    }

    /// Every problem at once, for the caller to report before starting.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = tally::names::validate_name("queue", &self.queue) {
            problems.push(e);
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            problems.push(format!(
                "--concurrency is {}; use 1..=10000",
                self.concurrency
            ));
        }
        if self.claim_size == 0 || self.claim_size > 100_000 {
            problems.push(format!(
                "--claim-size is {}; use 1..=100000",
                self.claim_size
            ));
        }
        if self.lease < Duration::from_secs(1) {
            problems.push("--lease must be at least 1s".to_string());
        }
        if self.poll_interval.is_zero() {
            problems.push("--poll-interval must be above zero".to_string());
        }
        if self.breaker.threshold < 1 {
            problems.push("--breaker-threshold must be at least 1".to_string());
        }
        if self.breaker.max_cooldown < self.breaker.cooldown {
            problems
                .push("--breaker-max-cooldown must not be below --breaker-cooldown".to_string());
        }
        if self.worker_id.is_empty() || self.worker_id.len() > 200 {
            problems.push("--worker-id must be 1..=200 characters".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// `<host>-<pid>-<random>`: tells operators which process held a row.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// What a worker does with the records it claims.
#[derive(Clone)]
pub enum Processor {
    /// Each record is given to the handler; outcomes are written in batches afterwards.
    /// Effects outside PostgreSQL are at-least-once, keyed by the idempotency key.
    Handler(Arc<dyn Handler>),
    /// The operator's statement runs with `$1` record id (text), `$2` payload (jsonb),
    /// `$3` batch (text), in the same transaction as the completion: exactly-once effect.
    Sql {
        /// The statement, run once per record.
        statement: String,
        /// Records per transaction.
        chunk_size: usize,
    },
}

impl Processor {
    /// The handler's kind: `sql`, or the handler's own name.
    pub fn name(&self) -> &'static str {
        match self {
            Processor::Handler(h) => h.name(),
            Processor::Sql { .. } => "sql",
        }
    }
}

/// Does nothing, successfully: for benchmarks and smoke tests.
pub struct NoopHandler;

#[async_trait::async_trait]
impl Handler for NoopHandler {
    async fn handle(&self, _: &RecordContext, _: &serde_json::Value) -> Result<(), HandlerError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "noop"
    }
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Settings that cannot work, every problem found (exit code 64 in the binary).
    #[error("invalid configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The database refused or failed: unreachable, no schema, an invalid statement.
    #[error(transparent)]
    Store(#[from] tally::StoreError),
    /// One of the worker's own tasks died (a panic, or a loop that ended): the worker stopped
    /// renewing its leases and exited, so that other workers rescue its rows.
    #[error("the worker stopped: {0}")]
    Fatal(String),
}
