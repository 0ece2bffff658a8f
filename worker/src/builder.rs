//! [`WorkerBuilder`]: configure a [`Worker`] in code, with every setting checked at once.

use crate::{Health, Processor, Worker, WorkerConfig, WorkerError};
use std::sync::Arc;
use std::time::Duration;
use tally::metrics::WorkerMetrics;
use tally::{BreakerPolicy, Handler, Store};

/// Connections kept besides the handlers' own: claims, completions, renewals and rescue.
const POOL_OVERHEAD: usize = 4;
/// Most connections a worker opens for its handlers by default.
const POOL_HANDLER_MAX: usize = 64;

/// Connection pool size for a worker running `concurrency` records at once.
pub fn default_pool_size(concurrency: usize) -> usize {
    concurrency.min(POOL_HANDLER_MAX) + POOL_OVERHEAD
}

/// Where a worker finds its database: a connected [`Store`], or a URL it connects to when it
/// starts running.
///
/// Built with `.into()` from a [`Store`], a `&str` or a `String`. Its `Debug` output never
/// shows the URL, which may hold a password.
#[derive(Clone)]
// One per worker, moved once: the size of the Store variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Database {
    /// An open pool, e.g. shared with other parts of the program.
    Store(Store),
    /// A PostgreSQL URL such as `postgres://user:password@host:5432/db`.
    Url(String),
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Store(store) => f.debug_tuple("Store").field(store).finish(),
            Database::Url(_) => f.write_str("Url(<redacted>)"),
        }
    }
}

impl From<Store> for Database {
    fn from(store: Store) -> Self {
        Database::Store(store)
    }
}

impl From<&str> for Database {
    fn from(url: &str) -> Self {
        Database::Url(url.to_string())
    }
}

impl From<String> for Database {
    fn from(url: String) -> Self {
        Database::Url(url)
    }
}

impl From<&String> for Database {
    fn from(url: &String) -> Self {
        Database::Url(url.clone())
    }
}

impl Database {
    /// The store, connecting first when given a URL (once: no retry).
    pub(crate) async fn open(self, pool_size: usize) -> Result<Store, tally::StoreError> {
        match self {
            Database::Store(store) => Ok(store),
            Database::Url(url) => Store::connect(&url, pool_size).await,
        }
    }
}

/// Builds a [`Worker`]: start with [`Worker::builder`], set a handler (or an SQL statement)
/// and any settings that differ from the defaults, then call [`build`](Self::build).
///
/// Every setting defaults to the same value as the `worker` binary's flag of the same name
/// (the `DEFAULT_*` constants of this crate).
///
/// ```no_run
/// use std::time::Duration;
/// use tally_worker::{NoopHandler, Worker};
///
/// # async fn run() -> Result<(), tally_worker::WorkerError> {
/// let worker = Worker::builder("postgres://tally@127.0.0.1/tally", "emails")
///     .handler(NoopHandler)
///     .concurrency(32)
///     .lease(Duration::from_secs(30))
///     .build()?;
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// let summary = worker.run(shutdown).await?;
/// println!("{} records completed", summary.completed);
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until .build() and .run()"]
pub struct WorkerBuilder {
    database: Database,
    config: WorkerConfig,
    processor: Option<Processor>,
    sql_chunk: usize,
    pool_size: Option<usize>,
    health: Option<Arc<Health>>,
    metrics: Option<Arc<WorkerMetrics>>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("database", &self.database)
            .field("config", &self.config)
            .field("has_processor", &self.processor.is_some())
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    pub(crate) fn new(database: Database, queue: &str) -> Self {
        WorkerBuilder {
            database,
            config: WorkerConfig::new(queue),
            processor: None,
            sql_chunk: crate::DEFAULT_SQL_CHUNK,
            pool_size: None,
            health: None,
            metrics: None,
        }
    }

    /// Gives each record to `handler`. Effects outside PostgreSQL are at-least-once, keyed by
    /// [`RecordContext::idempotency_key`](tally::RecordContext::idempotency_key).
    pub fn handler(self, handler: impl Handler) -> Self {
        self.shared_handler(Arc::new(handler))
    }

    /// Like [`handler`](Self::handler), for a handler that is already shared.
    pub fn shared_handler(mut self, handler: Arc<dyn Handler>) -> Self {
        self.processor = Some(Processor::Handler(handler));
        self
    }

    /// Runs `statement` for each record in the transaction that completes it (`$1` record id
    /// as text, `$2` payload as jsonb, `$3` batch as text): its effect is applied exactly once.
    pub fn sql(mut self, statement: impl Into<String>) -> Self {
        self.processor = Some(Processor::Sql {
            statement: statement.into(),
            chunk_size: self.sql_chunk,
        });
        self
    }

    /// Records per transaction of [`sql`](Self::sql) (default [`crate::DEFAULT_SQL_CHUNK`]).
    pub fn sql_chunk(mut self, records: usize) -> Self {
        self.sql_chunk = records;
        if let Some(Processor::Sql { chunk_size, .. }) = &mut self.processor {
            *chunk_size = records;
        }
        self
    }

    /// Records processed at once, 1 to 10,000 (default [`crate::DEFAULT_CONCURRENCY`]).
    pub fn concurrency(mut self, records: usize) -> Self {
        self.config.concurrency = records;
        self
    }

    /// Most rows taken per claim, 1 to 100,000 (default [`crate::DEFAULT_CLAIM_SIZE`]).
    pub fn claim_size(mut self, rows: usize) -> Self {
        self.config.claim_size = rows;
        self
    }

    /// Lease on claimed rows, at least 1 s, renewed every third of it while they are processed
    /// (default [`crate::DEFAULT_LEASE`]).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// Fallback poll when no notification arrives (default [`crate::DEFAULT_POLL_INTERVAL`]).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.config.poll_interval = every;
        self
    }

    /// How often to look for expired leases of dead workers (default
    /// [`crate::DEFAULT_RESCUE_INTERVAL`]).
    pub fn rescue_interval(mut self, every: Duration) -> Self {
        self.config.rescue_interval = every;
        self
    }

    /// Time given to in-flight records once shutdown is requested (default
    /// [`crate::DEFAULT_GRACE_PERIOD`]).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.config.grace_period = grace;
        self
    }

    /// The queue's circuit breaker: `threshold` retryable failures in a row open it for
    /// `cooldown`, doubled after each failed probe up to `max_cooldown`.
    pub fn breaker(mut self, threshold: i64, cooldown: Duration, max_cooldown: Duration) -> Self {
        self.config.breaker = BreakerPolicy {
            threshold,
            cooldown,
            max_cooldown,
        };
        self
    }

    /// Lease owner name written on claimed rows; unique per process (default
    /// `<host>-<pid>-<random>`).
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.config.worker_id = id.into();
        self
    }

    /// Most connections of the pool opened for a URL (default: concurrency, at most 64, plus
    /// 4). Ignored when the worker is given a [`Store`].
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.pool_size = Some(connections);
        self
    }

    /// Counts into `metrics` (e.g. ones already served on `/metrics`).
    pub fn metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Reports liveness and readiness to `health` (e.g. one served on `/readyz`).
    pub fn health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Checks every setting and returns the worker, or [`WorkerError::Config`] listing every
    /// problem found. Connects nothing: a URL is parsed here and connected by
    /// [`Worker::run`].
    pub fn build(self) -> Result<Worker, WorkerError> {
        let mut problems = self.config.validate().err().unwrap_or_default();
        match &self.processor {
            None => problems.push("no handler: call .handler(...) or .sql(...)".to_string()),
            Some(Processor::Sql {
                statement,
                chunk_size,
            }) => {
                if statement.trim().is_empty() {
                    problems.push("the SQL statement is empty".to_string());
                }
                if *chunk_size == 0 {
                    problems.push("the SQL chunk size must be at least 1".to_string());
                }
            }
            Some(Processor::Handler(_)) => {}
        }
        if let Database::Url(url) = &self.database {
            // Read as the store reads it (sslmode=verify-full, sslrootcert); the message names
            // the problem, never the URL's password.
            if let Err(e) = tally::store::ConnectOptions::validate_url(url) {
                problems.push(e.to_string());
            }
        }
        if self.pool_size == Some(0) {
            problems.push("max_connections must be at least 1".to_string());
        }
        let processor = match self.processor {
            Some(processor) if problems.is_empty() => processor,
            _ => return Err(WorkerError::Config(problems)),
        };
        let pool_size = self
            .pool_size
            .unwrap_or_else(|| default_pool_size(self.config.concurrency));
        let mut worker = Worker::with_database(self.database, pool_size, self.config, processor);
        if let Some(health) = self.health {
            worker = worker.with_health(health);
        }
        if let Some(metrics) = self.metrics {
            worker = worker.with_metrics(metrics);
        }
        Ok(worker)
    }
}

impl Worker {
    /// Starts configuring a worker for `queue` on `database` (a [`Store`] or a URL).
    pub fn builder(database: impl Into<Database>, queue: &str) -> WorkerBuilder {
        WorkerBuilder::new(database.into(), queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoopHandler;

    fn problems(builder: WorkerBuilder) -> Vec<String> {
        match builder.build() {
            Err(WorkerError::Config(problems)) => problems,
            Err(e) => panic!("expected a configuration error, got {e}"),
            Ok(_) => panic!("expected a configuration error, got a worker"),
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems(
            Worker::builder("postgres://u:pw@host/db", "bad queue!")
                .concurrency(0)
                .lease(Duration::from_millis(10)),
        );
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].contains("queue"), "{found:?}");
        assert!(found.iter().any(|p| p.contains("--concurrency is 0")));
        assert!(found.iter().any(|p| p.contains("--lease")));
        assert!(found.iter().any(|p| p.starts_with("no handler")));
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let found = problems(
            Worker::builder("postgres://u:s3cret@host:notaport/db", "q").handler(NoopHandler),
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("invalid database URL"), "{found:?}");
        assert!(!found[0].contains("s3cret"), "{found:?}");
        let debug = format!("{:?}", Database::from("postgres://u:s3cret@host/db"));
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn tls_settings_in_the_url_are_accepted() {
        for url in [
            "postgres://u:pw@db.example.com/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
            "postgres://u@db.example.com/app?sslmode=verify-ca",
            "host=db.example.com user=u sslmode=verify-full sslrootcert=/etc/ca.pem",
        ] {
            let built = Worker::builder(url, "q").handler(NoopHandler).build();
            assert!(
                built.is_ok(),
                "{url}: {:?}",
                built.err().map(|e| e.to_string())
            );
        }
        let found = problems(
            Worker::builder("postgres://u:s3cret@h/db?sslmode=verify", "q").handler(NoopHandler),
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("sslmode \"verify\""), "{found:?}");
        assert!(!found[0].contains("s3cret"), "{found:?}");
    }

    #[test]
    fn an_empty_statement_or_chunk_is_refused() {
        let found = problems(
            Worker::builder("postgres://h/db", "q")
                .sql(" ")
                .sql_chunk(0),
        );
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn a_valid_configuration_builds() {
        let worker = Worker::builder("postgres://h/db", "emails")
            .handler(NoopHandler)
            .concurrency(4)
            .claim_size(10)
            .worker_id("w-1")
            .build();
        assert!(worker.is_ok());
    }
}
