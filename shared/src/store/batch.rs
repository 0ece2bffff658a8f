//! Batches after prepare: status, failed records, pause, resume, cancel, retry and purge.

use super::progress::{derived_state, StateCounts};
use super::{sql, Store};
use crate::error::StoreError;
use crate::model::{BatchStatus, FailedRecord, FailureGroup};

impl Store {
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
        Ok(rows.iter().map(status_from_row).collect())
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

    /// Failed records of a batch grouped by cause, the largest `limit` groups first.
    pub async fn failure_groups(
        &self,
        name: &str,
        limit: i64,
    ) -> Result<Vec<FailureGroup>, StoreError> {
        let batch = self.get_batch(name).await?;
        let client = self.client().await?;
        let rows = client
            .query(sql!("record_failed_groups"), &[&batch.id, &limit])
            .await
            .map_err(|e| StoreError::db("grouping failed records", e))?;
        Ok(rows
            .iter()
            .map(|r| FailureGroup {
                key: r.get(0),
                pattern: r.get(1),
                count: r.get(2),
                first_failed_at: r.get(3),
                last_failed_at: r.get(4),
                sample_ids: r.get(5),
                example: r.get(6),
            })
            .collect())
    }

    /// How many failed records of the batch are in error group `key`: what
    /// [`Store::retry_failed_group`] with that key would send back now.
    pub async fn failed_in_group(&self, name: &str, key: &str) -> Result<i64, StoreError> {
        let batch = self.get_batch(name).await?;
        let client = self.client().await?;
        let row = client
            .query_one(sql!("record_failed_group_count"), &[&batch.id, &key])
            .await
            .map_err(|e| StoreError::db("counting an error group", e))?;
        Ok(row.get(0))
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
        self.retry_failed_group(name, reset_attempts, None).await
    }

    /// Like [`Store::retry_failed`], only for the failed records of one cause when `group` (a
    /// key from [`Store::failure_groups`]) is given.
    pub async fn retry_failed_group(
        &self,
        name: &str,
        reset_attempts: bool,
        group: Option<&str>,
    ) -> Result<u64, StoreError> {
        let batch = self.get_batch(name).await?;
        let client = self.client().await?;
        let ctx = "retrying failed records";
        let n = client
            .execute(
                sql!("record_retry_failed"),
                &[&batch.id, &reset_attempts, &group],
            )
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

    /// Removes a batch that is finished or whose prepare was interrupted, with its records,
    /// counts and leases (its alerts stay, as history); returns how many records went. A
    /// batch with records pending or running, or being prepared, is refused.
    pub async fn purge(&self, name: &str) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let ctx = "purging the batch";
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        // The prepare lock: a prepare running now keeps its batch.
        let free: bool = tx
            .query_one(sql!("prepare_try_lock"), &[&name])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .get(0);
        if !free {
            drop(tx);
            return Err(self.held_by(name, None).await);
        }
        let row = tx
            .query_opt(sql!("batch_purge_check"), &[&name])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .ok_or_else(|| StoreError::BatchNotFound(name.to_string()))?;
        let id: i64 = row.get(0);
        let unfinished = |open: i64| {
            StoreError::Conflict(format!(
                "batch {name} has {open} records pending or running, so it cannot be purged: \
                 wait until it finishes, or cancel it first (`coordinator cancel {name}`)"
            ))
        };
        let open: i64 = row.get(2);
        if open > 0 {
            return Err(unfinished(open));
        }
        let deleted = tx
            .query_one(sql!("batch_purge_records"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let (records, open): (i64, i64) = (deleted.get(0), deleted.get(1));
        if open > 0 {
            return Err(unfinished(open));
        }
        tx.execute(sql!("batch_purge"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        Ok(records as u64)
    }
}

/// A batch's status from a row of `batch_status` (or a query with its first 15 columns).
pub(super) fn status_from_row(row: &tokio_postgres::Row) -> BatchStatus {
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
    let interrupted: bool = row.get(14);
    let state = if interrupted {
        "interrupted"
    } else {
        derived_state(&stored, &counts, elapsed.is_some())
    };
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
}
