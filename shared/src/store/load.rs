//! Loading a batch's records inside the prepare transaction: COPY from a file or stream, or
//! INSERT … SELECT from a query; then the uniqueness check and the switch to `ready`.

use super::sql;
use crate::error::{describe_pg_error, is_transient_sqlstate, StoreError};
use crate::input::{encode_copy_text_row, HashingReader, InputError, ReaderOptions, RecordReader};
use crate::model::BatchSpec;
use bytes::{Bytes, BytesMut};
use deadpool_postgres::Transaction;
use futures::SinkExt;
use std::io::{BufReader, Read};
use std::sync::{Arc, Mutex};
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};

/// Bytes of COPY data sent per message.
const COPY_CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between the reading thread and the COPY stream: bounds memory.
const COPY_CHUNKS_IN_FLIGHT: usize = 4;

/// Reports records written so far (for a progress bar).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Where each record's input line is, kept sparse: an entry only where the distance between
/// record number and line number changes (blank lines, multi-line CSV fields).
#[derive(Default, Clone)]
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

/// COPYs the records of `input` into batch `id`; returns how many, and the input's digest.
pub(super) async fn load_file<R: Read + Send + 'static>(
    tx: &Transaction<'_>,
    id: i64,
    input: R,
    options: ReaderOptions,
    progress: Option<Progress>,
) -> Result<(u64, String), StoreError> {
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
    let lines = || line_map.lock().map(|m| m.clone()).unwrap_or_default();
    let records = copied.map_err(|e| copy_failure(&e, &lines()))?;
    if records == 0 {
        return Err(InputError::Empty.into());
    }
    if let Some((record_id, ordinal)) = find_duplicate(tx, id).await? {
        return Err(InputError::RepeatedId {
            line: lines().line_of(ordinal),
            id: record_id,
        }
        .into());
    }
    Ok((records, digest))
}

/// Inserts the rows of `query` as the records of batch `id`; returns how many.
pub(super) async fn load_query(
    tx: &Transaction<'_>,
    id: i64,
    spec: &BatchSpec,
    query: &str,
    params: &[String],
) -> Result<u64, StoreError> {
    // The query is the operator's own SQL, run as written; only values are parameters. Its
    // own parameters come first ($1..$n), the batch's after them.
    let n = params.len();
    let statement = format!(
        "insert into tally.record (batch_id, record_id, payload) \
         select ${}, s.j ->> ${}::text, s.j from (select to_jsonb(q) as j from ({query}) as q) as s",
        n + 1,
        n + 2
    );
    let texts: Vec<TextParam> = params.iter().map(|p| TextParam(p)).collect();
    let mut args: Vec<&(dyn ToSql + Sync)> =
        texts.iter().map(|t| t as &(dyn ToSql + Sync)).collect();
    args.push(&id);
    args.push(&spec.id_field);
    let records = tx
        .execute(&statement, &args)
        .await
        .map_err(|e| query_failure(&e, &spec.id_field))?;
    if records == 0 {
        return Err(StoreError::NoRecords(
            "the query returned no rows: a batch needs at least one record".into(),
        ));
    }
    if let Some((record_id, _)) = find_duplicate(tx, id).await? {
        return Err(StoreError::Invalid(format!(
            "the query returns id {record_id:?} more than once; ids must be unique within a batch"
        )));
    }
    Ok(records)
}

/// Loads the failed records of batch `from` into batch `id`.
pub(super) async fn load_failed(
    tx: &Transaction<'_>,
    id: i64,
    from: &str,
) -> Result<u64, StoreError> {
    let records = tx
        .execute(sql!("load_failed"), &[&id, &from])
        .await
        .map_err(|e| StoreError::db("copying failed records", e))?;
    if records == 0 {
        return Err(StoreError::NoRecords(format!(
            "batch {from} has no failed records: a batch needs at least one record"
        )));
    }
    Ok(records)
}

/// A parameter sent in text format, so that the server parses it as whatever type the query
/// gives it (`:date::date`, a comparison with an int column, …).
#[derive(Debug)]
struct TextParam<'a>(&'a str);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// Makes the loaded batch claimable and wakes its queue's workers (at commit).
pub(super) async fn mark_ready(
    tx: &Transaction<'_>,
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
    tx: &Transaction<'_>,
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

/// Reads the whole input for its digest (to compare with a batch prepared before).
pub(super) fn hash_all<R: Read>(input: R) -> Result<String, StoreError> {
    let mut hashing = HashingReader::new(input);
    let digest = hashing.digest_handle();
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| StoreError::Input(InputError::Io(e)))?;
    Ok(digest.hex())
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The error is the session's or the server's, not the data's: prepare may run again.
fn lost_session(err: &tokio_postgres::Error) -> bool {
    err.code().is_none_or(|c| is_transient_sqlstate(c.code()))
}

/// Turns a COPY failure into an error naming the input line.
fn copy_failure(err: &tokio_postgres::Error, map: &LineMap) -> StoreError {
    if lost_session(err) {
        return StoreError::db_ref("writing records", err);
    }
    let line = err
        .as_db_error()
        .and_then(|db| db.where_())
        .and_then(copy_line_number)
        .map(|ordinal| map.line_of(ordinal));
    let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
    StoreError::Invalid(format!("{at}{}", describe_pg_error(err)))
}

fn query_failure(err: &tokio_postgres::Error, id_field: &str) -> StoreError {
    use tokio_postgres::error::SqlState;
    if lost_session(err) {
        return StoreError::db_ref("running the query", err);
    }
    match err.code() {
        Some(c) if c == &SqlState::NOT_NULL_VIOLATION => StoreError::Invalid(format!(
            "a row of the query has no value in column \"{id_field}\" (the id field); \
             select it, or name another column with --id-field"
        )),
        _ => StoreError::Invalid(format!("the query failed: {}", describe_pg_error(err))),
    }
}

/// The row number in a COPY error context such as `COPY record, line 17, column payload: …`.
fn copy_line_number(context: &str) -> Option<u64> {
    let rest = &context[context.find(", line ")? + ", line ".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
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
