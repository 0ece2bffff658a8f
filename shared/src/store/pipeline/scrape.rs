//! What `serve`'s `/metrics` reports of pipelines: recent runs with their stages, and
//! watermarks.

use crate::error::StoreError;
use crate::store::progress::StateCounts;
use crate::store::{sql, Store};
use std::time::Duration;

/// Runs reported at most: a backfill of a year must not make a scrape of thousands of series.
pub const MAX_REPORTED_RUNS: i64 = 200;

/// One stage of a reported run.
#[derive(Debug, Clone)]
pub struct StageProgress {
    pub pipeline: String,
    pub run: String,
    pub run_state: String,
    pub stage: String,
    pub state: String,
    pub total: i64,
    pub counts: StateCounts,
}

/// Everything of pipelines one scrape reads.
#[derive(Debug, Clone, Default)]
pub struct PipelineScrape {
    /// Stages of runs that are queued, running or finished within the retention, by run.
    pub stages: Vec<StageProgress>,
    /// (pipeline, watermark as seconds since the epoch).
    pub watermarks: Vec<(String, f64)>,
}

impl Store {
    /// Reads the pipelines part of a scrape.
    pub async fn scrape_pipelines(
        &self,
        finished_retention: Duration,
    ) -> Result<PipelineScrape, StoreError> {
        let ctx = "reading pipeline runs for /metrics";
        let client = self.client().await?;
        let stages = client
            .query(
                sql!("serve_pipeline_runs"),
                &[&finished_retention.as_secs_f64(), &MAX_REPORTED_RUNS],
            )
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .iter()
            .map(|r| StageProgress {
                pipeline: r.get(0),
                run: r.get(1),
                run_state: r.get(2),
                stage: r.get(3),
                state: r.get(4),
                total: r.get(5),
                counts: StateCounts {
                    pending: r.get(6),
                    running: r.get(7),
                    complete: r.get(8),
                    failed: r.get(9),
                    cancelled: r.get(10),
                },
            })
            .collect();
        let watermarks = client
            .query(sql!("serve_watermarks"), &[])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(PipelineScrape { stages, watermarks })
    }
}
