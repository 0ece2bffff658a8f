//! What the dashboard of `coordinator serve` reads: pages of batches, a batch's throughput
//! samples and attempts, records by id or error, workers, and the audit of actions. Every
//! query is bounded (a page, or an index range); none scans `tally.record`.

mod records;
mod workers;

pub use records::{RecordDetail, RecordFilter, RecordPage, RecordRow};
pub use workers::{Heartbeat, WorkerRow};

use super::batch::status_from_row;
use super::{sql, Store};
use crate::error::StoreError;
use crate::model::BatchStatus;

/// Batches of at most this many records get an exact attempts histogram; larger ones would
/// read too many rows for a page view.
pub const ATTEMPTS_HISTOGRAM_MAX: i64 = 1_000_000;

/// Which batches a page lists.
#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    pub queue: Option<String>,
    /// Part of the name.
    pub name: Option<String>,
    /// The state as `status` shows it.
    pub state: Option<String>,
    /// Only batches older than this one (the previous page's last `id`).
    pub before: Option<i64>,
    pub limit: i64,
}

/// One batch of a page.
#[derive(Debug, Clone)]
pub struct BatchRow {
    pub id: i64,
    pub status: BatchStatus,
    pub age_s: f64,
}

/// One throughput sample: when (unix seconds), complete + failed, failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: f64,
    pub done: i64,
    pub failed: i64,
}

/// How many records are at one attempt count, by state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptCount {
    pub attempt: i32,
    pub state: String,
    pub records: i64,
}

/// One action taken on a batch or a run.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub at: String,
    pub actor: String,
    pub action: String,
    pub batch: Option<String>,
    pub run: Option<String>,
    pub detail: Option<String>,
    pub rows: i64,
}

/// A backfill with how its runs ended so far.
#[derive(Debug, Clone)]
pub struct BackfillRow {
    pub id: i64,
    pub pipeline: String,
    pub range_from: String,
    pub range_to: String,
    pub step: String,
    pub max_active: i32,
    pub reprocess: String,
    pub runs: i32,
    pub skipped: i32,
    pub state: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub succeeded: i64,
    pub failed: i64,
}

/// One pipeline run of a page.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: i64,
    pub name: String,
    pub pipeline: String,
    pub state: String,
    pub params: String,
    pub attempt: i32,
    pub episode: i32,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub backfill_id: Option<i64>,
    pub stages: i64,
    pub stages_succeeded: i64,
}

impl Store {
    /// Runs a query on `tally.record` with sequential scans off. When one batch holds most of
    /// the table, the planner would rather read the whole table than the batch's index range;
    /// a dashboard page must never read every batch's rows.
    pub(super) async fn query_indexed(
        &self,
        ctx: &'static str,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let db = |e| StoreError::db(ctx, e);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute("set local enable_seqscan = off")
            .await
            .map_err(db)?;
        let rows = tx.query(statement, params).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(rows)
    }

    /// One page of batches, newest first.
    pub async fn dashboard_batches(&self, f: &BatchFilter) -> Result<Vec<BatchRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                sql!("dash_batches"),
                &[&f.queue, &f.name, &f.state, &f.before, &f.limit],
            )
            .await
            .map_err(|e| StoreError::db("listing batches", e))?;
        Ok(rows
            .iter()
            .map(|r| BatchRow {
                id: r.get(15),
                status: status_from_row(r),
                age_s: r.get(16),
            })
            .collect())
    }

    /// A batch's id, by name.
    pub async fn batch_id(&self, name: &str) -> Result<i64, StoreError> {
        Ok(self.get_batch(name).await?.id)
    }

    /// Throughput samples of batch `id` over the last `window_s` seconds, oldest first.
    pub async fn batch_samples(&self, id: i64, window_s: f64) -> Result<Vec<Sample>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(sql!("dash_batch_samples"), &[&id, &window_s])
            .await
            .map_err(|e| StoreError::db("reading throughput samples", e))?;
        Ok(rows
            .iter()
            .map(|r| Sample {
                at: r.get(0),
                done: r.get(1),
                failed: r.get(2),
            })
            .collect())
    }

    /// How many records of batch `id` are at each attempt count. The caller keeps this to
    /// batches of at most [`ATTEMPTS_HISTOGRAM_MAX`] records.
    pub async fn attempts_histogram(&self, id: i64) -> Result<Vec<AttemptCount>, StoreError> {
        let rows = self
            .query_indexed("counting attempts", sql!("dash_attempts"), &[&id])
            .await?;
        Ok(rows
            .iter()
            .map(|r| AttemptCount {
                attempt: r.get(0),
                state: r.get(1),
                records: r.get(2),
            })
            .collect())
    }

    /// Writes one action to the audit table.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        batch: Option<&str>,
        run: Option<&str>,
        detail: Option<&str>,
        rows: i64,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                sql!("audit_insert"),
                &[&actor, &action, &batch, &run, &detail, &rows],
            )
            .await
            .map_err(|e| StoreError::db("writing the audit entry", e))?;
        Ok(())
    }

    /// The latest `limit` actions on a batch or on a run, newest first.
    pub async fn audit_entries(
        &self,
        batch: Option<&str>,
        run: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(sql!("audit_list"), &[&batch, &run, &limit])
            .await
            .map_err(|e| StoreError::db("reading the audit", e))?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                at: r.get(0),
                actor: r.get(1),
                action: r.get(2),
                batch: r.get(3),
                run: r.get(4),
                detail: r.get(5),
                rows: r.get(6),
            })
            .collect())
    }

    /// One page of pipeline runs, newest first: of `pipeline` and in `state` when given, older
    /// than run `before`.
    pub async fn dashboard_runs(
        &self,
        pipeline: Option<&str>,
        state: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(sql!("dash_runs"), &[&pipeline, &state, &before, &limit])
            .await
            .map_err(|e| StoreError::db("listing pipeline runs", e))?;
        Ok(rows
            .iter()
            .map(|r| RunRow {
                id: r.get(0),
                name: r.get(1),
                pipeline: r.get(2),
                state: r.get(3),
                params: r.get(4),
                attempt: r.get(5),
                episode: r.get(6),
                created_at: r.get(7),
                started_at: r.get(8),
                finished_at: r.get(9),
                backfill_id: r.get(10),
                stages: r.get(11),
                stages_succeeded: r.get(12),
            })
            .collect())
    }

    /// The latest `limit` backfills, of `pipeline` when given.
    pub async fn dashboard_backfills(
        &self,
        pipeline: Option<&str>,
        limit: i64,
    ) -> Result<Vec<BackfillRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(sql!("dash_backfills"), &[&pipeline, &limit])
            .await
            .map_err(|e| StoreError::db("listing backfills", e))?;
        Ok(rows
            .iter()
            .map(|r| BackfillRow {
                id: r.get(0),
                pipeline: r.get(1),
                range_from: r.get(2),
                range_to: r.get(3),
                step: r.get(4),
                max_active: r.get(5),
                reprocess: r.get(6),
                runs: r.get(7),
                skipped: r.get(8),
                state: r.get(9),
                created_at: r.get(10),
                finished_at: r.get(11),
                succeeded: r.get(12),
                failed: r.get(13),
            })
            .collect())
    }
}
