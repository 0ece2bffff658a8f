//! Workers as the dashboard lists them: each worker process writes its own row every rescue
//! interval; the rows under its leases say what it holds.

use super::super::{sql, Store};
use crate::error::StoreError;

/// What a worker says of itself.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    pub id: &'a str,
    pub queue: &'a str,
    pub handler: &'a str,
    pub concurrency: i32,
    /// The worker is shutting down.
    pub stopping: bool,
}

/// One worker seen recently.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub id: String,
    pub queue: String,
    pub handler: String,
    pub concurrency: i32,
    pub started_at: String,
    pub seen_ago_s: f64,
    pub stopped: bool,
    /// Rows under its unexpired leases (some may be written back already: a lease is dropped
    /// at the next renewal).
    pub leased_rows: i64,
    pub leases: i64,
    /// Its queue's circuit breaker.
    pub breaker: String,
}

impl Store {
    /// Writes the worker's row: seen now.
    pub async fn worker_heartbeat(&self, hb: &Heartbeat<'_>) -> Result<(), StoreError> {
        let client = self.conn().await?;
        client
            .execute(
                sql!("worker_heartbeat"),
                &[
                    &hb.id,
                    &hb.queue,
                    &hb.handler,
                    &hb.concurrency,
                    &hb.stopping,
                ],
            )
            .await
            .map_err(|e| StoreError::db("writing the worker's heartbeat", e))?;
        client.done().await?;
        Ok(())
    }

    /// Workers seen in the last `within_s` seconds.
    pub async fn dashboard_workers(&self, within_s: f64) -> Result<Vec<WorkerRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(sql!("dash_workers"), &[&within_s])
            .await
            .map_err(|e| StoreError::db("listing workers", e))?;
        Ok(rows
            .iter()
            .map(|r| WorkerRow {
                id: r.get(0),
                queue: r.get(1),
                handler: r.get(2),
                concurrency: r.get(3),
                started_at: r.get(4),
                seen_ago_s: r.get(5),
                stopped: r.get(6),
                leased_rows: r.get(7),
                leases: r.get(8),
                breaker: r.get(9),
            })
            .collect())
    }
}
