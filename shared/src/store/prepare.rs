//! Prepare: a batch's records written once, in one transaction that holds the batch's
//! prepare lock, and tried again from the start when the session is lost.

use super::load::{self, Progress};
use super::{sql, Store, RETRY_BACKOFF_MAX, RETRY_BACKOFF_MIN};
use crate::error::StoreError;
use crate::input::{Format, ReaderOptions};
use crate::model::{BatchSpec, PrepareOutcome};
use crate::names::validate_name;
use deadpool_postgres::Transaction;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;

/// How long a prepare waits for another session that holds the batch (`--lock-wait`).
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(60);
/// How long a prepare keeps retrying a lost connection (`--retry-for`).
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(300);

/// How a prepare waits for the batch's lock and retries lost connections.
#[derive(Debug, Clone)]
pub struct PreparePolicy {
    /// Wait this long for a session that holds the batch (a prepare still running, or one
    /// whose client died and whose session the server has not ended yet); then fail, naming it.
    pub lock_wait: Duration,
    /// Retry transient errors (connection lost, server restarting) with backoff this long.
    pub retry_for: Duration,
}

impl Default for PreparePolicy {
    fn default() -> Self {
        PreparePolicy {
            lock_wait: DEFAULT_LOCK_WAIT,
            retry_for: DEFAULT_RETRY_FOR,
        }
    }
}

/// The records' input. A file is opened anew by each attempt; a stream can be read only once,
/// so an attempt that lost its connection after it began reading is not retried.
pub enum PrepareInput {
    File(PathBuf),
    Stream(Box<dyn Read + Send>),
}

/// The input of one prepare across its attempts.
struct Input {
    source: PrepareInput,
    consumed: bool,
}

impl Input {
    fn open(&mut self) -> Result<Box<dyn Read + Send>, StoreError> {
        match &mut self.source {
            PrepareInput::File(path) => std::fs::File::open(&*path)
                .map(|f| Box::new(f) as Box<dyn Read + Send>)
                .map_err(|e| StoreError::Invalid(format!("cannot open {}: {e}", path.display()))),
            PrepareInput::Stream(stream) => {
                self.consumed = true;
                Ok(std::mem::replace(stream, Box::new(std::io::empty())))
            }
        }
    }
}

/// What one attempt loads.
enum Load<'a> {
    Records {
        input: &'a mut Input,
        options: ReaderOptions,
        progress: Option<Progress>,
    },
    Query {
        query: &'a str,
        params: &'a [String],
        digest: String,
    },
    /// The failed records of another batch.
    Failed { from: &'a str, digest: String },
}

impl Load<'_> {
    fn source(&self) -> &'static str {
        match self {
            Load::Records { .. } => "file",
            Load::Query { .. } => "query",
            Load::Failed { .. } => "failed",
        }
    }
}

/// An existing batch row.
pub(super) struct ExistingBatch {
    pub(super) id: i64,
    pub(super) queue: String,
    pub(super) state: String,
    source: String,
    id_field: String,
    digest: Option<String>,
    total: i64,
}

/// Either the batch to load into, or the batch found already prepared.
enum Slot {
    Load(i64),
    Existing(ExistingBatch),
}

/// Capped exponential backoff within a deadline, as the worker waits for its database.
struct Retry {
    deadline: Instant,
    delay: Duration,
}

impl Retry {
    fn new(retry_for: Duration) -> Self {
        Retry {
            deadline: Instant::now() + retry_for,
            delay: RETRY_BACKOFF_MIN,
        }
    }

    /// Sleeps before the next attempt; false when that would pass the deadline.
    async fn wait(&mut self, batch: &str, err: &StoreError) -> bool {
        if Instant::now() + self.delay > self.deadline {
            return false;
        }
        tracing::warn!(%batch, "prepare: {err}; trying again in {:?}", self.delay);
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(RETRY_BACKOFF_MAX);
        true
    }
}

impl Store {
    /// Writes a batch from a JSONL or CSV stream, idempotently: the load is one transaction,
    /// so a crash leaves no record behind, and re-running with the same input after success
    /// adds nothing. The batch becomes `ready` (claimable) in the same commit. With the
    /// default [`PreparePolicy`]; see [`Store::prepare_input`].
    pub async fn prepare_from_reader<R: Read + Send + 'static>(
        &self,
        spec: &BatchSpec,
        input: R,
        format: Format,
        max_payload_bytes: usize,
        progress: Option<Progress>,
    ) -> Result<PrepareOutcome, StoreError> {
        let input = PrepareInput::Stream(Box::new(input));
        self.prepare_input(
            spec,
            input,
            format,
            max_payload_bytes,
            progress,
            &PreparePolicy::default(),
        )
        .await
    }

    /// Writes a batch from a file or stream (see [`Store::prepare_from_reader`]). Waits up to
    /// `policy.lock_wait` for a session that holds the batch; a lost connection is retried
    /// from the start within `policy.retry_for`, unless a stream was read already.
    pub async fn prepare_input(
        &self,
        spec: &BatchSpec,
        input: PrepareInput,
        format: Format,
        max_payload_bytes: usize,
        progress: Option<Progress>,
        policy: &PreparePolicy,
    ) -> Result<PrepareOutcome, StoreError> {
        validate_spec(spec)?;
        let mut input = Input {
            source: input,
            consumed: false,
        };
        let options = ReaderOptions {
            format,
            id_field: spec.id_field.clone(),
            max_payload_bytes,
            max_id_bytes: crate::input::DEFAULT_MAX_ID_BYTES,
        };
        let mut retry = Retry::new(policy.retry_for);
        loop {
            let load = Load::Records {
                input: &mut input,
                options: options.clone(),
                progress: progress.clone(),
            };
            match self.prepare_once(spec, load, policy.lock_wait).await {
                Err(e) if e.is_transient() && input.consumed => {
                    tracing::warn!(
                        batch = %spec.name,
                        "prepare lost its connection while reading a stream, which cannot be \
                         read again; nothing was written: run prepare again with the same input"
                    );
                    return Err(e);
                }
                Err(e) if e.is_transient() && retry.wait(&spec.name, &e).await => {}
                other => return other,
            }
        }
    }

    /// Writes a batch from the rows of a query run inside the server: each row becomes a record
    /// whose payload is the row as JSON and whose id is its `id_field` column.
    pub async fn prepare_from_query(
        &self,
        spec: &BatchSpec,
        query: &str,
    ) -> Result<PrepareOutcome, StoreError> {
        self.prepare_query(spec, query, &PreparePolicy::default())
            .await
    }

    /// Like [`Store::prepare_from_query`], waiting and retrying as `policy` says.
    pub async fn prepare_query(
        &self,
        spec: &BatchSpec,
        query: &str,
        policy: &PreparePolicy,
    ) -> Result<PrepareOutcome, StoreError> {
        self.prepare_query_bound(spec, query, &[], policy).await
    }

    /// Like [`Store::prepare_query`], with `$1`, `$2`, … in the query bound to `params` (sent
    /// as text, typed by the server as the query needs). The values are part of the input:
    /// the same query with other values is other input.
    pub async fn prepare_query_bound(
        &self,
        spec: &BatchSpec,
        query: &str,
        params: &[String],
        policy: &PreparePolicy,
    ) -> Result<PrepareOutcome, StoreError> {
        validate_spec(spec)?;
        let query = query.trim().trim_end_matches(';').trim();
        if query.is_empty() {
            return Err(StoreError::Invalid("--from-query is empty".into()));
        }
        let mut input = format!("{}\0{query}", spec.id_field);
        for p in params {
            input.push('\0');
            input.push_str(p);
        }
        let digest = load::hex(&Sha256::digest(input));
        let mut retry = Retry::new(policy.retry_for);
        loop {
            let load = Load::Query {
                query,
                params,
                digest: digest.clone(),
            };
            match self.prepare_once(spec, load, policy.lock_wait).await {
                Err(e) if e.is_transient() && retry.wait(&spec.name, &e).await => {}
                other => return other,
            }
        }
    }

    /// Writes a batch from exactly the failed records of batch `from`, as they are now.
    pub async fn prepare_failed(
        &self,
        spec: &BatchSpec,
        from: &str,
        policy: &PreparePolicy,
    ) -> Result<PrepareOutcome, StoreError> {
        validate_spec(spec)?;
        let digest = load::hex(&Sha256::digest(format!("failed\0{from}")));
        let mut retry = Retry::new(policy.retry_for);
        loop {
            let load = Load::Failed {
                from,
                digest: digest.clone(),
            };
            match self.prepare_once(spec, load, policy.lock_wait).await {
                Err(e) if e.is_transient() && retry.wait(&spec.name, &e).await => {}
                other => return other,
            }
        }
    }

    /// One attempt. The prepare lock is taken before the batch row is created and held until
    /// the load commits, so a `preparing` row nobody holds is an interrupted prepare.
    async fn prepare_once(
        &self,
        spec: &BatchSpec,
        load: Load<'_>,
        lock_wait: Duration,
    ) -> Result<PrepareOutcome, StoreError> {
        let ctx = "starting the prepare";
        let source = load.source();
        let mut client = self.client().await?;
        let mut tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        tx.query(sql!("prepare_session"), &[])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        self.take_prepare_lock(&tx, &spec.name, lock_wait).await?;
        let id = match self.open_batch(spec, source).await? {
            Slot::Load(id) => id,
            Slot::Existing(existing) => {
                let digest = match load {
                    Load::Records { input, .. } => {
                        let reader = input.open()?;
                        tokio::task::spawn_blocking(move || load::hash_all(reader))
                            .await
                            .map_err(|e| StoreError::Invalid(format!("reading the input: {e}")))??
                    }
                    Load::Query { digest, .. } | Load::Failed { digest, .. } => digest,
                };
                return compare_existing(spec, existing, source, &digest);
            }
        };
        if tx
            .query_opt(sql!("batch_lock_preparing"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .is_none()
        {
            return Err(StoreError::Conflict(format!(
                "batch \"{}\" was prepared or purged by another process meanwhile",
                spec.name
            )));
        }
        tx.batch_execute(sql!("load_settings"))
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        tx.execute(sql!("batch_clear_records"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        // The load runs in a savepoint, so that after bad input the same transaction, still
        // holding the lock, removes the batch row it created.
        let loaded = {
            let sp = tx.transaction().await.map_err(|e| StoreError::db(ctx, e))?;
            let loaded = match load {
                Load::Records {
                    input,
                    options,
                    progress,
                } => match input.open() {
                    Ok(reader) => load::load_file(&sp, id, reader, options, progress).await,
                    Err(e) => Err(e),
                },
                Load::Query {
                    query,
                    params,
                    digest,
                } => load::load_query(&sp, id, spec, query, params)
                    .await
                    .map(|records| (records, digest)),
                Load::Failed { from, digest } => load::load_failed(&sp, id, from)
                    .await
                    .map(|records| (records, digest)),
            };
            // On error, dropping the savepoint's transaction rolls back to the savepoint.
            match loaded {
                Ok((records, digest)) => match load::mark_ready(&sp, id, records, &digest).await {
                    Ok(()) => sp
                        .commit()
                        .await
                        .map(|()| records)
                        .map_err(|e| StoreError::db("marking the batch ready", e)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        match loaded {
            Ok(records) => {
                tx.commit()
                    .await
                    .map_err(|e| StoreError::db("committing the batch", e))?;
                Ok(PrepareOutcome::Prepared { records })
            }
            Err(err) if err.is_transient() => Err(err),
            Err(err) => {
                remove_unloaded(tx, &spec.name, id).await;
                tracing::debug!(batch = %spec.name, "prepare failed: {err}");
                Err(err)
            }
        }
    }

    /// Waits up to `wait` for the batch's prepare lock; then names the session holding it.
    async fn take_prepare_lock(
        &self,
        tx: &Transaction<'_>,
        name: &str,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let ctx = "waiting for the batch's prepare lock";
        // lock_timeout 0 would mean no limit: the shortest wait is one millisecond.
        let ms = wait.as_millis().clamp(1, i32::MAX as u128);
        tx.batch_execute(&format!("set local lock_timeout = {ms}"))
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        match tx.query_one(sql!("prepare_lock"), &[&name]).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                return Err(self.held_by(name, Some(wait)).await)
            }
            Err(e) => return Err(StoreError::db(ctx, e)),
        }
        tx.batch_execute("set local lock_timeout to default")
            .await
            .map_err(|e| StoreError::db(ctx, e))
    }

    /// The error for a batch whose prepare lock another session holds.
    pub(super) async fn held_by(&self, name: &str, waited: Option<Duration>) -> StoreError {
        let waited = waited
            .map(|w| format!("; waited {w:?} (--lock-wait) for it"))
            .unwrap_or_default();
        let holder = match self.client().await {
            Ok(client) => client
                .query_opt(sql!("prepare_holder"), &[&name])
                .await
                .ok(),
            Err(_) => None,
        };
        match holder.flatten() {
            Some(row) => {
                let pid: i32 = row.get(0);
                let app: String = row.get(1);
                let addr: String = row.get(2);
                let since: String = row.get(3);
                StoreError::Locked(format!(
                    "batch \"{name}\" is being prepared by another session: pid {pid}, \
                     application_name \"{app}\", client {addr}, in its transaction since \
                     {since}{waited}. If that process is gone, the server ends its session once \
                     it notices; `select pg_terminate_backend({pid})` ends it now"
                ))
            }
            None => StoreError::Locked(format!(
                "batch \"{name}\" was being prepared by another session{waited}; that session \
                 has ended since: run prepare again"
            )),
        }
    }

    /// Creates the batch row (committed as `preparing`, invisible to workers), or finds it.
    /// Runs on its own connection while the caller holds the prepare lock.
    async fn open_batch(&self, spec: &BatchSpec, source: &str) -> Result<Slot, StoreError> {
        let client = self.client().await?;
        let ctx = "creating the batch";
        let base_ms = spec.backoff_base.as_millis() as i64;
        let max_ms = spec.backoff_max.as_millis() as i64;
        let max_failed_ratio = spec.max_failed_ratio;
        let created = client
            .query_opt(
                sql!("batch_create"),
                &[
                    &spec.name,
                    &spec.queue,
                    &source,
                    &spec.id_field,
                    &spec.max_attempts,
                    &base_ms,
                    &max_ms,
                    &spec.max_failed,
                    &max_failed_ratio,
                ],
            )
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        if let Some(row) = created {
            return Ok(Slot::Load(row.get(0)));
        }
        // Back to the pool first: the caller's transaction holds the other connection.
        drop(client);
        let existing = self.get_batch(&spec.name).await?;
        if existing.state == "preparing" {
            // An earlier prepare died before committing its load: take the batch over.
            if existing.queue != spec.queue {
                return Err(StoreError::Conflict(format!(
                    "batch \"{}\" is being prepared for queue \"{}\", not \"{}\"",
                    spec.name, existing.queue, spec.queue
                )));
            }
            return Ok(Slot::Load(existing.id));
        }
        Ok(Slot::Existing(existing))
    }

    pub(super) async fn get_batch(&self, name: &str) -> Result<ExistingBatch, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(sql!("batch_get"), &[&name])
            .await
            .map_err(|e| StoreError::db("reading the batch", e))?
            .ok_or_else(|| StoreError::BatchNotFound(name.to_string()))?;
        Ok(ExistingBatch {
            id: row.get(0),
            queue: row.get(2),
            state: row.get(3),
            source: row.get(4),
            id_field: row.get(5),
            digest: row.get(6),
            total: row.get(7),
        })
    }
}

/// After bad input: removes the `preparing` row, still under the prepare lock, so that
/// nothing is left half-written. A failure here leaves an interrupted batch, which `status`
/// shows and `purge` removes.
async fn remove_unloaded(tx: Transaction<'_>, name: &str, id: i64) {
    let removed = match tx.execute(sql!("batch_delete_preparing"), &[&id]).await {
        Ok(_) => tx.commit().await,
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        tracing::warn!(
            batch = %name,
            "prepare failed, and removing its unloaded batch row failed too: {}; `coordinator \
             status` shows the batch as interrupted",
            crate::error::describe_pg_error(&e)
        );
    }
}

fn compare_existing(
    spec: &BatchSpec,
    existing: ExistingBatch,
    source: &str,
    digest: &str,
) -> Result<PrepareOutcome, StoreError> {
    let same = existing.queue == spec.queue
        && existing.source == source
        && existing.id_field == spec.id_field
        && existing.digest.as_deref() == Some(digest);
    if same {
        return Ok(PrepareOutcome::AlreadyPrepared {
            records: existing.total as u64,
        });
    }
    Err(StoreError::Conflict(format!(
        "batch \"{}\" already exists with a different input (queue \"{}\", {} records from a {}, \
         id field \"{}\"); it was not changed. Use a new batch name for new input",
        spec.name, existing.queue, existing.total, existing.source, existing.id_field
    )))
}

fn validate_spec(spec: &BatchSpec) -> Result<(), StoreError> {
    validate_name("batch", &spec.name).map_err(StoreError::Invalid)?;
    validate_name("queue", &spec.queue).map_err(StoreError::Invalid)?;
    if spec.id_field.is_empty() {
        return Err(StoreError::Invalid("--id-field is empty".into()));
    }
    if spec.max_failed.is_some_and(|n| n < 0) {
        return Err(StoreError::Invalid("--max-failed must be 0 or more".into()));
    }
    if spec
        .max_failed_ratio
        .is_some_and(|r| !(0.0..=1.0).contains(&r))
    {
        return Err(StoreError::Invalid(
            "--max-failed-ratio must be between 0 and 1".into(),
        ));
    }
    if !(1..=1000).contains(&spec.max_attempts) {
        return Err(StoreError::Invalid(format!(
            "--max-attempts is {}; it must be between 1 and 1000",
            spec.max_attempts
        )));
    }
    Ok(())
}
