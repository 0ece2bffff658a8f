//! Runs an operator's SQL statement per record in the same transaction as the record's
//! completion, behind the lease fence: the effect commits exactly when the status does.

use super::record::finish_on;
use super::{query_cached, sql, Store};
use crate::error::{describe_pg_error, StoreError};
use crate::model::{ClaimedRecord, Outcome};
use std::collections::HashSet;
use tokio_postgres::types::Type;

/// Why the statement failed for one record.
#[derive(Debug, Clone)]
pub struct StatementFailure {
    pub message: String,
    pub sqlstate: Option<String>,
    /// Serialization failures, deadlocks, lock timeouts, cancels and lost connections pass;
    /// constraint, data and other errors do not.
    pub retryable: bool,
}

/// What happened to one chunk.
#[derive(Debug, Default)]
pub struct TransactionalResult {
    /// Records whose statement ran and which are now complete.
    pub completed: u64,
    /// Outcomes written for records whose statement failed (retry or failed).
    pub failed: Vec<Outcome>,
    /// Records this worker no longer held (lease lost): nothing was written for them.
    pub lost: Vec<i64>,
}

/// SQLSTATEs after which the same statement may well succeed.
pub fn is_retryable_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03"
    ) || code.starts_with("08")
        || code.starts_with("53")
}

/// Why a chunk did not commit. Nothing of it was written either way.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// None of the operator's statements ran: no connection could be had, or it failed
    /// before the first one. Try the same chunk again later; no attempt was spent.
    #[error("{0}")]
    Unavailable(StoreError),
    /// The statement could not be prepared (a table dropped, a column renamed): it fails
    /// alike for every record of the chunk.
    #[error("the SQL handler statement cannot be prepared: {}", .0.message)]
    Statement(StatementFailure),
    /// The transaction failed after the statements ran: at COMMIT (a deferred constraint),
    /// or its session broke (a statement may have killed its own backend). One of the
    /// records may be the cause; the chunk must be split to find it.
    #[error("the SQL handler transaction failed: {}", .0.message)]
    Transaction(StatementFailure),
}

/// A failure the store reported as an error, classified like a statement's.
fn failure_of_store(err: StoreError) -> StatementFailure {
    match err {
        StoreError::Db { message, code, .. } => StatementFailure {
            retryable: code.as_deref().is_none_or(is_retryable_sqlstate),
            message,
            sqlstate: code,
        },
        other => StatementFailure {
            message: other.to_string(),
            sqlstate: None,
            retryable: true,
        },
    }
}

fn failure_of(err: &tokio_postgres::Error) -> StatementFailure {
    let sqlstate = err.code().map(|c| c.code().to_string());
    let retryable = match &sqlstate {
        Some(code) => is_retryable_sqlstate(code),
        // No SQLSTATE: the connection broke.
        None => true,
    };
    StatementFailure {
        message: describe_pg_error(err),
        sqlstate,
        retryable,
    }
}

/// The session is gone: the connection broke (no SQLSTATE), or the server ended it with a
/// FATAL error (`pg_terminate_backend`, a shutdown). Nothing more can run on it.
fn session_lost(err: &tokio_postgres::Error) -> bool {
    err.code().is_none()
        || err
            .as_db_error()
            .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// The statement itself is wrong: syntax or access (class 42), data (22) or an unsupported
/// feature (0A). Anything else (no SQLSTATE: the connection broke) is the database's.
fn is_statement_error(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|c| is_statement_sqlstate(c.code()))
}

/// SQLSTATE classes that blame the statement: 42, 22 and 0A.
fn is_statement_sqlstate(code: &str) -> bool {
    ["42", "22", "0A"]
        .iter()
        .any(|class| code.starts_with(class))
}

impl Store {
    /// Checks that `statement` parses with `$1` text, `$2` jsonb, `$3` text, before any record
    /// is claimed.
    pub async fn check_statement(&self, statement: &str) -> Result<(), StoreError> {
        let client = self.conn().await?;
        client
            .prepare_typed(statement, &[Type::TEXT, Type::JSONB, Type::TEXT])
            .await
            .map(|_| ())
            .map_err(|e| {
                if is_statement_error(&e) {
                    StoreError::Invalid(format!(
                        "the --sql statement is invalid: {}",
                        describe_pg_error(&e)
                    ))
                } else {
                    // A lost connection or a timeout says nothing about the statement.
                    StoreError::db("checking the --sql statement", e)
                }
            })?;
        client.done().await
    }

    /// Processes `records` of batch `batch` with `statement`. Fast path: every statement and
    /// the completion in one transaction. If any statement fails, that transaction is rolled
    /// back and the chunk is redone with a savepoint per record, so one bad record does not
    /// sink the others. `on_failure` turns a failure into the outcome to write (retry or fail).
    /// A failure of the whole transaction is a [`ChunkError`], saying what the caller may do.
    pub async fn run_transactional(
        &self,
        batch: &str,
        records: &[ClaimedRecord],
        owner: &str,
        statement: &str,
        on_failure: impl Fn(&ClaimedRecord, &StatementFailure) -> Outcome,
    ) -> Result<TransactionalResult, ChunkError> {
        let mut client = self.client().await.map_err(ChunkError::Unavailable)?;
        let pgbouncer = self.pgbouncer;
        if let Some(result) =
            fast_path(&mut client, pgbouncer, batch, records, owner, statement).await?
        {
            return Ok(result);
        }
        slow_path(
            &mut client,
            pgbouncer,
            batch,
            records,
            owner,
            statement,
            on_failure,
        )
        .await
    }
}

const CTX: &str = "running the SQL handler";

async fn lock_held(
    tx: &deadpool_postgres::Transaction<'_>,
    pgbouncer: bool,
    records: &[ClaimedRecord],
    owner: &str,
) -> Result<HashSet<i64>, StoreError> {
    let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
    let leases: Vec<i64> = records.iter().map(|r| r.lease_id).collect();
    let rows = query_cached(
        tx,
        pgbouncer,
        sql!("record_lock_fenced"),
        &[&ids, &leases, &owner],
    )
    .await
    .map_err(|e| StoreError::db(CTX, e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Opens the chunk's transaction, locks the rows still held and prepares the statement.
/// Nothing of the operator's has run yet, so a failure here spends no attempt.
async fn begin<'a>(
    client: &'a mut deadpool_postgres::Object,
    pgbouncer: bool,
    records: &[ClaimedRecord],
    owner: &str,
    statement: &str,
) -> Result<
    (
        deadpool_postgres::Transaction<'a>,
        HashSet<i64>,
        tokio_postgres::Statement,
    ),
    ChunkError,
> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| ChunkError::Unavailable(StoreError::db(CTX, e)))?;
    let held = lock_held(&tx, pgbouncer, records, owner)
        .await
        .map_err(ChunkError::Unavailable)?;
    let stmt = prepare_handler_statement(&tx, pgbouncer, statement).await?;
    Ok((tx, held, stmt))
}

/// `Ok(None)` when a statement failed and the chunk must be redone record by record.
async fn fast_path(
    client: &mut deadpool_postgres::Object,
    pgbouncer: bool,
    batch: &str,
    records: &[ClaimedRecord],
    owner: &str,
    statement: &str,
) -> Result<Option<TransactionalResult>, ChunkError> {
    let (tx, held, stmt) = begin(client, pgbouncer, records, owner, statement).await?;
    let mine: Vec<&ClaimedRecord> = records.iter().filter(|r| held.contains(&r.id)).collect();
    // Issued together, these are pipelined on the connection: one round trip for the chunk.
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 3]> = mine
        .iter()
        .map(|r| [&r.record_id as _, &r.payload as _, &batch as _])
        .collect();
    let runs = params.iter().map(|p| tx.execute(&stmt, p));
    let results = futures::future::join_all(runs).await;
    // Closed before the transaction ends (see prepare_handler_statement).
    drop(stmt);
    if let Some(err) = results.into_iter().find_map(Result::err) {
        if session_lost(&err) {
            // The session itself failed: nothing committed.
            return Err(ChunkError::Transaction(failure_of(&err)));
        }
        drop(tx);
        return Ok(None);
    }
    let outcomes: Vec<Outcome> = mine.iter().map(|r| Outcome::complete(r)).collect();
    let written = finish_on(&tx, pgbouncer, &outcomes, owner)
        .await
        .map_err(|e| ChunkError::Transaction(failure_of_store(e)))?;
    tx.commit()
        .await
        .map_err(|e| ChunkError::Transaction(failure_of(&e)))?;
    Ok(Some(TransactionalResult {
        completed: written.len() as u64,
        failed: Vec::new(),
        lost: records
            .iter()
            .filter(|r| !held.contains(&r.id))
            .map(|r| r.id)
            .collect(),
    }))
}

/// The operator's statement, cached per connection; behind PgBouncer prepared afresh, and
/// dropped (closed) by the caller before its transaction ends, since a prepared statement
/// outlives a rollback and would stay on a server connection that other clients get next.
async fn prepare_handler_statement(
    tx: &deadpool_postgres::Transaction<'_>,
    pgbouncer: bool,
    statement: &str,
) -> Result<tokio_postgres::Statement, ChunkError> {
    let types = [Type::TEXT, Type::JSONB, Type::TEXT];
    let prepared = if pgbouncer {
        tx.prepare_typed(statement, &types).await
    } else {
        tx.prepare_typed_cached(statement, &types).await
    };
    prepared.map_err(|e| {
        if is_statement_error(&e) {
            ChunkError::Statement(failure_of(&e))
        } else {
            ChunkError::Unavailable(StoreError::db(CTX, e))
        }
    })
}

async fn slow_path(
    client: &mut deadpool_postgres::Object,
    pgbouncer: bool,
    batch: &str,
    records: &[ClaimedRecord],
    owner: &str,
    statement: &str,
    on_failure: impl Fn(&ClaimedRecord, &StatementFailure) -> Outcome,
) -> Result<TransactionalResult, ChunkError> {
    let (mut tx, held, stmt) = begin(client, pgbouncer, records, owner, statement).await?;
    let broke = |e: tokio_postgres::Error| ChunkError::Transaction(failure_of(&e));
    let mut outcomes = Vec::with_capacity(records.len());
    let mut failed = Vec::new();
    for r in records.iter().filter(|r| held.contains(&r.id)) {
        let savepoint = tx.savepoint("record").await.map_err(broke)?;
        match savepoint
            .execute(&stmt, &[&r.record_id, &r.payload, &batch])
            .await
        {
            Ok(_) => {
                savepoint.commit().await.map_err(broke)?;
                outcomes.push(Outcome::complete(r));
            }
            Err(err) if session_lost(&err) => return Err(broke(err)),
            Err(err) => {
                savepoint.rollback().await.map_err(broke)?;
                let outcome = on_failure(r, &failure_of(&err));
                failed.push(outcome.clone());
                outcomes.push(outcome);
            }
        }
    }
    drop(stmt);
    finish_on(&tx, pgbouncer, &outcomes, owner)
        .await
        .map_err(|e| ChunkError::Transaction(failure_of_store(e)))?;
    tx.commit().await.map_err(broke)?;
    Ok(TransactionalResult {
        completed: (outcomes.len() - failed.len()) as u64,
        failed,
        lost: records
            .iter()
            .filter(|r| !held.contains(&r.id))
            .map(|r| r.id)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_of_the_statement_make_it_invalid() {
        // syntax error, undefined column, invalid text representation, unsupported feature
        for code in ["42601", "42703", "22P02", "0A000"] {
            assert!(is_statement_sqlstate(code), "{code}");
        }
        // statement timeout, admin shutdown, connection failure, out of memory
        for code in ["57014", "57P01", "08006", "53200"] {
            assert!(!is_statement_sqlstate(code), "{code}");
        }
    }
}
