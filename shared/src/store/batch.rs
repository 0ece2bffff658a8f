//! Batches: prepare (from a file or a query), status, failed records, retry.

use super::progress::{derived_state, StateCounts};
use super::{sql, Store};
use crate::error::{describe_pg_error, StoreError};
use crate::input::{
    encode_copy_text_row, Format, HashingReader, InputError, ReaderOptions, RecordReader,
};
use crate::model::{BatchSpec, BatchStatus, FailedRecord, PrepareOutcome};
use crate::names::validate_name;
use bytes::{Bytes, BytesMut};
use futures::SinkExt;
use sha2::{Digest, Sha256};
use std::io::{BufReader, Read};
use std::sync::{Arc, Mutex};

/// Bytes of COPY data sent per message.
const COPY_CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between the reading thread and the COPY stream: bounds memory.
const COPY_CHUNKS_IN_FLIGHT: usize = 4;

/// Reports records written so far (for a progress bar).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// An existing batch row.
struct ExistingBatch {
    id: i64,
    queue: String,
    state: String,
    source: String,
    id_field: String,
    digest: Option<String>,
    total: i64,
}

/// Either a fresh batch id to load into, or the outcome of finding the batch already prepared.
enum Slot {
    Load(i64),
    Existing(ExistingBatch),
}

/// Where each record's input line is, kept sparse: an entry only where the distance between
/// record number and line number changes (blank lines, multi-line CSV fields).
#[derive(Default)]
struct LineMap(Vec<(u64, u64)>);

impl LineMap {
    fn note(&mut self, ordinal: u64, line: u64) {
        let offset = line - ordinal.min(line);
        if self.0.last().map(|&(o, l)| l - o) != Some(offset) {
            self.0.push((ordinal, line));
        }
    }
    fn line_of(&self, ordinal: u64) -> u64 {
        match self.0.iter().rev().find(|&&(o, _)| o <= ordinal) {
            Some(&(o, l)) => l + (ordinal - o),
            None => ordinal,
        }
    }
}

impl Store {
    /// Writes a batch from a JSONL or CSV stream, idempotently: the load is one transaction,
    /// so a crash leaves no record behind, and re-running with the same input after success
    /// adds nothing. The batch becomes `ready` (claimable) in the same commit.
    pub async fn prepare_from_reader<R: Read + Send + 'static>(
        &self,
        spec: &BatchSpec,
        input: R,
        format: Format,
        max_payload_bytes: usize,
        progress: Option<Progress>,
    ) -> Result<PrepareOutcome, StoreError> {
        validate_spec(spec)?;
        let id = match self.open_batch(spec, "file").await? {
            Slot::Load(id) => id,
            Slot::Existing(existing) => {
                let digest = tokio::task::spawn_blocking(move || hash_all(input))
                    .await
                    .map_err(|e| StoreError::Invalid(format!("reading the input: {e}")))??;
                return self.compare_existing(spec, existing, "file", &digest);
            }
        };
        let options = ReaderOptions {
            format,
            id_field: spec.id_field.clone(),
            max_payload_bytes,
            max_id_bytes: crate::input::DEFAULT_MAX_ID_BYTES,
        };
        let result = self.load_file(id, input, options, progress).await;
        self.finish_load(spec, id, result).await
    }

    /// Writes a batch from the rows of a query run inside the server: each row becomes a record
    /// whose payload is the row as JSON and whose id is its `id_field` column.
    pub async fn prepare_from_query(
        &self,
        spec: &BatchSpec,
        query: &str,
    ) -> Result<PrepareOutcome, StoreError> {
        validate_spec(spec)?;
        let query = query.trim().trim_end_matches(';').trim();
        if query.is_empty() {
            return Err(StoreError::Invalid("--from-query is empty".into()));
        }
        let digest = hex(&Sha256::digest(format!("{}\0{query}", spec.id_field)));
        let id = match self.open_batch(spec, "query").await? {
            Slot::Load(id) => id,
            Slot::Existing(existing) => {
                return self.compare_existing(spec, existing, "query", &digest)
            }
        };
        let result = self.load_query(id, spec, query, digest).await;
        self.finish_load(spec, id, result).await
    }

    /// Creates the batch row (committed as `preparing`, invisible to workers), or finds it.
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

    async fn get_batch(&self, name: &str) -> Result<ExistingBatch, StoreError> {
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

    fn compare_existing(
        &self,
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

    /// Commits a successful load; after a failed one removes the empty `preparing` row so that
    /// nothing is left half-written.
    async fn finish_load(
        &self,
        spec: &BatchSpec,
        id: i64,
        result: Result<u64, StoreError>,
    ) -> Result<PrepareOutcome, StoreError> {
        match result {
            Ok(records) => Ok(PrepareOutcome::Prepared { records }),
            Err(err) => {
                if !matches!(err, StoreError::Conflict(_)) {
                    if let Ok(client) = self.client().await {
                        let _ = client.execute(sql!("batch_delete_preparing"), &[&id]).await;
                    }
                }
                tracing::debug!(batch = %spec.name, "prepare failed: {err}");
                Err(err)
            }
        }
    }

    /// Takes the batch's row lock, so that two prepares of one batch cannot interleave.
    async fn begin_load<'a>(
        &self,
        client: &'a mut deadpool_postgres::Object,
        id: i64,
    ) -> Result<deadpool_postgres::Transaction<'a>, StoreError> {
        let ctx = "starting the load";
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        match tx.query_opt(sql!("batch_lock_preparing"), &[&id]).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(StoreError::Conflict(
                    "the batch was prepared by another process meanwhile".into(),
                ))
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                return Err(StoreError::Conflict(
                    "the batch is being prepared by another process right now".into(),
                ))
            }
            Err(e) => return Err(StoreError::db(ctx, e)),
        }
        tx.batch_execute(sql!("load_settings"))
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        tx.execute(sql!("batch_clear_records"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        Ok(tx)
    }

    async fn load_file<R: Read + Send + 'static>(
        &self,
        id: i64,
        input: R,
        options: ReaderOptions,
        progress: Option<Progress>,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin_load(&mut client, id).await?;
        let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Bytes>(COPY_CHUNKS_IN_FLIGHT);
        let line_map = Arc::new(Mutex::new(LineMap::default()));
        let reader_map = line_map.clone();
        let batch_id = id.to_string();
        let reading = tokio::task::spawn_blocking(move || {
            read_into_chunks(input, options, &batch_id, chunks_tx, &reader_map, progress)
        });

        let sink = tx
            .copy_in(sql!("batch_copy_records"))
            .await
            .map_err(|e| StoreError::db("starting COPY", e))?;
        futures::pin_mut!(sink);
        let mut copy_error = None;
        while let Some(chunk) = chunks_rx.recv().await {
            if let Err(e) = sink.send(chunk).await {
                copy_error = Some(e);
                break;
            }
        }
        // Stop the reader if COPY failed first; its own error, if any, takes precedence.
        drop(chunks_rx);
        let read = reading
            .await
            .map_err(|e| StoreError::Invalid(format!("reading the input: {e}")))?;
        let digest = match read {
            Ok(digest) => digest,
            // Dropping the unfinished sink aborts the COPY; the transaction rolls back.
            Err(input_error) => return Err(input_error.into()),
        };
        let copied = match copy_error {
            Some(e) => Err(e),
            None => sink.as_mut().finish().await,
        };
        let records = copied.map_err(|e| {
            let map = line_map
                .lock()
                .map(|m| LineMap(m.0.clone()))
                .unwrap_or_default();
            copy_failure(&e, &map)
        })?;
        if records == 0 {
            return Err(InputError::Empty.into());
        }
        if let Some((record_id, ordinal)) = find_duplicate(&tx, id).await? {
            let map = line_map
                .lock()
                .map(|m| LineMap(m.0.clone()))
                .unwrap_or_default();
            return Err(InputError::RepeatedId {
                line: map.line_of(ordinal),
                id: record_id,
            }
            .into());
        }
        self.commit_ready(tx, id, records, &digest).await?;
        Ok(records)
    }

    async fn load_query(
        &self,
        id: i64,
        spec: &BatchSpec,
        query: &str,
        digest: String,
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = self.begin_load(&mut client, id).await?;
        // The query is the operator's own SQL, run as written; only values are parameters.
        let statement = format!(
            "insert into tally.record (batch_id, record_id, payload) \
             select $1, s.j ->> $2::text, s.j from (select to_jsonb(q) as j from ({query}) as q) as s"
        );
        let records = tx
            .execute(&statement, &[&id, &spec.id_field])
            .await
            .map_err(|e| query_failure(&e, &spec.id_field))?;
        if records == 0 {
            return Err(StoreError::Invalid(
                "the query returned no rows: a batch needs at least one record".into(),
            ));
        }
        if let Some((record_id, _)) = find_duplicate(&tx, id).await? {
            return Err(StoreError::Invalid(format!(
                "the query returns id {record_id:?} more than once; ids must be unique within a batch"
            )));
        }
        self.commit_ready(tx, id, records, &digest).await?;
        Ok(records)
    }

    async fn commit_ready(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        id: i64,
        records: u64,
        digest: &str,
    ) -> Result<(), StoreError> {
        let ctx = "marking the batch ready";
        let total = records as i64;
        let queue: String = tx
            .query_one(sql!("batch_set_ready"), &[&id, &total, &digest])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .get(0);
        tx.query_one(sql!("notify_work"), &[&queue])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))
    }

    /// Progress of one batch, or of all batches when `name` is `None`.
    pub async fn batch_status(&self, name: Option<&str>) -> Result<Vec<BatchStatus>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(sql!("batch_status"), &[&name])
            .await
            .map_err(|e| StoreError::db("reading batch status", e))?;
        if rows.is_empty() {
            if let Some(name) = name {
                return Err(StoreError::BatchNotFound(name.to_string()));
            }
        }
        Ok(rows
            .iter()
            .map(|row| {
                let stored: String = row.get(2);
                let pending: i64 = row.get(4);
                let running: i64 = row.get(5);
                let complete: i64 = row.get(6);
                let failed: i64 = row.get(7);
                let elapsed: Option<f64> = row.get(9);
                let counts = StateCounts {
                    pending,
                    running,
                    complete,
                    failed,
                    cancelled: row.get(8),
                };
                // started_at is set by the first claim: elapsed is known once started.
                let state = derived_state(&stored, &counts, elapsed.is_some());
                let rate = elapsed
                    .filter(|&s| s > 0.0)
                    .map(|s| (complete + failed) as f64 / s);
                let eta = rate
                    .filter(|&r| r > 0.0 && pending + running > 0)
                    .map(|r| (pending + running) as f64 / r);
                BatchStatus {
                    batch: row.get(0),
                    queue: row.get(1),
                    state: state.to_string(),
                    total: row.get(3),
                    pending,
                    running,
                    complete,
                    failed,
                    cancelled: counts.cancelled,
                    max_attempts: row.get(10),
                    created_at: row.get(11),
                    paused_reason: row.get(12),
                    breaker: row.get(13),
                    rate_per_s: rate,
                    eta_s: eta,
                }
            })
            .collect())
    }

    /// Failed records of a batch, oldest first.
    pub async fn failed_records(
        &self,
        name: &str,
        limit: i64,
    ) -> Result<Vec<FailedRecord>, StoreError> {
        let batch = self.get_batch(name).await?;
        let client = self.client().await?;
        let rows = client
            .query(sql!("record_failed_list"), &[&batch.id, &limit])
            .await
            .map_err(|e| StoreError::db("listing failed records", e))?;
        Ok(rows
            .iter()
            .map(|r| FailedRecord {
                record_id: r.get(0),
                attempts: r.get(1),
                last_error: r.get(2),
                failed_at: r.get(3),
            })
            .collect())
    }

    /// Stops workers from claiming the batch (rows already running finish). Returns false if
    /// it was not `ready`.
    pub async fn pause(&self, name: &str) -> Result<bool, StoreError> {
        self.get_batch(name).await?;
        let client = self.client().await?;
        let rows = client
            .query(sql!("batch_pause"), &[&name])
            .await
            .map_err(|e| StoreError::db("pausing the batch", e))?;
        Ok(!rows.is_empty())
    }

    /// Makes a paused batch claimable again, closes its queue's circuit breaker if open, and
    /// wakes its workers. Returns (batch resumed, breaker closed).
    pub async fn resume(&self, name: &str) -> Result<(bool, bool), StoreError> {
        let batch = self.get_batch(name).await?;
        let client = self.client().await?;
        let ctx = "resuming the batch";
        let resumed = client
            .query_opt(sql!("batch_resume"), &[&name])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .is_some();
        let closed = client
            .query_opt(sql!("breaker_close"), &[&batch.queue])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .is_some();
        if resumed || closed {
            client
                .query_one(sql!("notify_work"), &[&batch.queue])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
        }
        Ok((resumed, closed))
    }

    /// Cancels a batch: its pending and running rows become `cancelled`, in one transaction
    /// with the batch's state. Returns how many rows were cancelled, or `None` if the batch
    /// was not ready or paused.
    pub async fn cancel(&self, name: &str) -> Result<Option<u64>, StoreError> {
        self.get_batch(name).await?;
        let mut client = self.client().await?;
        let ctx = "cancelling the batch";
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let Some(row) = tx
            .query_opt(sql!("batch_cancel"), &[&name])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
        else {
            return Ok(None);
        };
        let id: i64 = row.get(0);
        let n = tx
            .execute(sql!("record_cancel"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        Ok(Some(n))
    }

    /// Pauses the batch if its failures passed its limit; returns the reason when it did.
    pub async fn pause_if_too_many_failed(
        &self,
        batch_id: i64,
    ) -> Result<Option<String>, StoreError> {
        // A worker's statement: through conn(), which keeps it whole behind PgBouncer.
        let client = self.conn().await?;
        let reason = client
            .query_opt(sql!("batch_pause_if_too_many_failed"), &[&batch_id])
            .await
            .map_err(|e| StoreError::db("checking the failure limit", e))?
            .map(|r| r.get(0));
        client.done().await?;
        Ok(reason)
    }

    /// Sends a batch's failed rows back to pending; returns how many. Other batches and other
    /// states are untouched, so running it twice is harmless.
    pub async fn retry_failed(&self, name: &str, reset_attempts: bool) -> Result<u64, StoreError> {
        let batch = self.get_batch(name).await?;
        let client = self.client().await?;
        let ctx = "retrying failed records";
        let n = client
            .execute(sql!("record_retry_failed"), &[&batch.id, &reset_attempts])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        if n > 0 {
            client
                .query_one(sql!("notify_work"), &[&batch.queue])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
        }
        Ok(n)
    }
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

/// Runs on a blocking thread: parses records, encodes COPY rows, hands over full chunks.
/// Returns the input's digest once everything was read.
fn read_into_chunks<R: Read>(
    input: R,
    options: ReaderOptions,
    batch_id: &str,
    chunks: tokio::sync::mpsc::Sender<Bytes>,
    line_map: &Mutex<LineMap>,
    progress: Option<Progress>,
) -> Result<String, InputError> {
    let hashing = HashingReader::new(input);
    let digest = hashing.digest_handle();
    let reader = RecordReader::new(BufReader::with_capacity(256 * 1024, hashing), options);
    let mut buf = BytesMut::with_capacity(COPY_CHUNK_BYTES + 64 * 1024);
    let mut ordinal = 0u64;
    for record in reader {
        let record = record?;
        ordinal += 1;
        if let Ok(mut map) = line_map.lock() {
            map.note(ordinal, record.line);
        }
        encode_copy_text_row(&mut buf, &[batch_id, &record.id, &record.payload]);
        if buf.len() >= COPY_CHUNK_BYTES {
            if chunks.blocking_send(buf.split().freeze()).is_err() {
                // The COPY side stopped; it reports why.
                return Ok(String::new());
            }
            if let Some(p) = &progress {
                p(ordinal);
            }
        }
    }
    if !buf.is_empty() && chunks.blocking_send(buf.split().freeze()).is_err() {
        return Ok(String::new());
    }
    if let Some(p) = &progress {
        p(ordinal);
    }
    Ok(digest.hex())
}

/// A record id loaded twice into batch `id`, with the load position of its second occurrence.
async fn find_duplicate(
    tx: &deadpool_postgres::Transaction<'_>,
    id: i64,
) -> Result<Option<(String, u64)>, StoreError> {
    let ctx = "checking ids are unique";
    let Some(row) = tx
        .query_opt(sql!("batch_find_duplicate"), &[&id])
        .await
        .map_err(|e| StoreError::db(ctx, e))?
    else {
        return Ok(None);
    };
    let record_id: String = row.get(0);
    let second: i64 = tx
        .query_one(sql!("batch_duplicate_row"), &[&id, &record_id])
        .await
        .map_err(|e| StoreError::db(ctx, e))?
        .get(0);
    let ordinal: i64 = tx
        .query_one(sql!("batch_row_ordinal"), &[&id, &second])
        .await
        .map_err(|e| StoreError::db(ctx, e))?
        .get(0);
    Ok(Some((record_id, ordinal.max(0) as u64)))
}

fn hash_all<R: Read>(input: R) -> Result<String, StoreError> {
    let mut hashing = HashingReader::new(input);
    let digest = hashing.digest_handle();
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| StoreError::Input(InputError::Io(e)))?;
    Ok(digest.hex())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Turns a COPY failure into an error naming the input line.
fn copy_failure(err: &tokio_postgres::Error, map: &LineMap) -> StoreError {
    let Some(db) = err.as_db_error() else {
        return StoreError::Db {
            context: "writing records",
            message: describe_pg_error(err),
            code: None,
        };
    };
    let line = db
        .where_()
        .and_then(copy_line_number)
        .map(|ordinal| map.line_of(ordinal));
    let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
    StoreError::Invalid(format!("{at}{}", describe_pg_error(err)))
}

/// The row number in a COPY error context such as `COPY record, line 17, column payload: …`.
fn copy_line_number(context: &str) -> Option<u64> {
    let rest = &context[context.find(", line ")? + ", line ".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn query_failure(err: &tokio_postgres::Error, id_field: &str) -> StoreError {
    use tokio_postgres::error::SqlState;
    match err.code() {
        Some(c) if c == &SqlState::NOT_NULL_VIOLATION => StoreError::Invalid(format!(
            "a row of the query has no value in column \"{id_field}\" (the id field); \
             select it, or name another column with --id-field"
        )),
        _ => StoreError::Invalid(format!("the query failed: {}", describe_pg_error(err))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_copy_row_in_the_error_context() {
        assert_eq!(
            copy_line_number("COPY record, line 17, column payload: \"x\""),
            Some(17)
        );
        assert_eq!(copy_line_number("COPY record, line 3"), Some(3));
        assert_eq!(copy_line_number("something else"), None);
    }

    #[test]
    fn maps_record_numbers_to_lines_across_blank_lines() {
        let mut map = LineMap::default();
        // Records 1, 2 on lines 1, 2; a blank line 3; records 3, 4 on lines 4, 5.
        for (ordinal, line) in [(1, 1), (2, 2), (3, 4), (4, 5)] {
            map.note(ordinal, line);
        }
        assert_eq!(map.line_of(2), 2);
        assert_eq!(map.line_of(4), 5);
        assert_eq!(map.0.len(), 2);
    }
}
