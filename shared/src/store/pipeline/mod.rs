//! Pipeline runs in PostgreSQL: starting a run (one per pipeline and params), advancing it
//! from its stored state, and reading it back. Any number of processes may advance runs at
//! once: a run is advanced under its row lock (skipped by the others), and a stage's batch is
//! prepared under the batch's own prepare lock, so none is prepared twice.

mod advance;
mod alerts;
mod backfill;
mod repair;
mod scrape;
mod watermark;

pub use backfill::{Backfill, BackfillAction, BackfillRequest, Reprocess};
pub use repair::Repair;
pub use scrape::{PipelineScrape, StageProgress, MAX_REPORTED_RUNS};
pub use watermark::NextWindow;

use super::{sql, Store};
use crate::error::StoreError;
use crate::pipeline::params::{batch_name, run_name, Params};
use crate::pipeline::plan::StageState;
use crate::pipeline::{window, Pipeline};
use serde::Serialize;

/// The run that `pipeline run` started or attached to.
#[derive(Debug, Clone)]
pub struct RunRef {
    pub id: i64,
    pub name: String,
    pub state: String,
    /// False when the run existed already.
    pub created: bool,
}

/// A run with its stages, for `pipeline status`.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    pub run: String,
    pub pipeline: String,
    pub params: serde_json::Value,
    pub state: String,
    pub version: i32,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub stages: Vec<StageStatus>,
}

/// One stage of a run, with its batch's counts.
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub state: String,
    pub batch: String,
    pub depends_on: Vec<String>,
    pub reason: Option<String>,
    pub total: i64,
    pub pending: i64,
    pub running: i64,
    pub complete: i64,
    pub failed: i64,
    pub cancelled: i64,
    #[serde(skip)]
    batch_state: Option<String>,
    #[serde(skip)]
    paused_reason: Option<String>,
    #[serde(skip)]
    has_batch: bool,
}

impl StageStatus {
    fn from_row(row: &tokio_postgres::Row) -> StageStatus {
        StageStatus {
            stage: row.get(0),
            state: row.get(1),
            batch: row.get(2),
            depends_on: row.get(3),
            reason: row.get(4),
            batch_state: row.get(5),
            paused_reason: row.get(6),
            total: row.get(7),
            pending: row.get(8),
            running: row.get(9),
            complete: row.get(10),
            failed: row.get(11),
            cancelled: row.get(12),
            has_batch: row.get(13),
        }
    }

    fn state(&self) -> StageState {
        StageState::parse(&self.state).unwrap_or(StageState::Waiting)
    }
}

/// A run's stages with their batches, in file order.
async fn stages_of<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    run_id: i64,
) -> Result<Vec<StageStatus>, StoreError> {
    Ok(client
        .query(sql!("pipeline_stages"), &[&run_id])
        .await
        .map_err(|e| StoreError::db("reading the run's stages", e))?
        .iter()
        .map(StageStatus::from_row)
        .collect())
}

/// The params of a run as stored (a JSON object of strings).
fn params_json(params: &Params) -> serde_json::Value {
    serde_json::Value::Object(
        params
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// What to do with a run that exists already.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Accept a changed definition as the pipeline's next version.
    pub new_version: bool,
    /// Run an ended run again from scratch, into new batches.
    pub reprocess: bool,
}

/// Records the pipeline's definition, locks it until the transaction ends, and returns its
/// version: refused when the definition changed, unless `new_version`.
async fn define(
    tx: &deadpool_postgres::Transaction<'_>,
    pipeline: &Pipeline,
    definition: &serde_json::Value,
    new_version: bool,
) -> Result<i32, StoreError> {
    let ctx = "recording the pipeline";
    let digest = pipeline.digest();
    tx.execute(
        sql!("pipeline_define"),
        &[&pipeline.name, &digest, definition],
    )
    .await
    .map_err(|e| StoreError::db(ctx, e))?;
    let row = tx
        .query_one(sql!("pipeline_lock"), &[&pipeline.name])
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
    let (version, stored): (i32, String) = (row.get(0), row.get(1));
    if stored == digest {
        return Ok(version);
    }
    if !new_version {
        return Err(StoreError::Conflict(format!(
            "pipeline {:?} has changed since version {version} was run: run it with \
             --new-version to start version {}, or restore the file",
            pipeline.name,
            version + 1
        )));
    }
    Ok(tx
        .query_one(
            sql!("pipeline_new_version"),
            &[&pipeline.name, &digest, definition],
        )
        .await
        .map_err(|e| StoreError::db(ctx, e))?
        .get(0))
}

/// Creates the stages of a run's attempt, all waiting.
async fn create_stages(
    tx: &deadpool_postgres::Transaction<'_>,
    run_id: i64,
    pipeline: &Pipeline,
    params: &Params,
    attempt: i32,
) -> Result<(), StoreError> {
    let stages: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    let batches: Vec<String> = pipeline
        .stages
        .iter()
        .map(|s| batch_name(&pipeline.name, &pipeline.params, params, &s.name, attempt))
        .collect();
    let deps: Vec<serde_json::Value> = pipeline
        .stages
        .iter()
        .map(|s| serde_json::json!(s.depends_on))
        .collect();
    tx.execute(
        sql!("pipeline_stage_create"),
        &[&run_id, &stages, &batches, &deps],
    )
    .await
    .map_err(|e| StoreError::db("creating the run's stages", e))?;
    Ok(())
}

/// Creates the run of `params` in `state` (`running`, or `queued` by a backfill), or finds the
/// one that exists (locked until the transaction ends).
async fn create_run(
    tx: &deadpool_postgres::Transaction<'_>,
    pipeline: &Pipeline,
    params: &Params,
    version: i32,
    definition: &serde_json::Value,
    state: &str,
    backfill: Option<i64>,
) -> Result<RunRef, StoreError> {
    let ctx = "starting the pipeline run";
    let name = run_name(&pipeline.name, &pipeline.params, params);
    let window = window::kind(pipeline).and_then(|k| window::of_run(k, params));
    let (start, end) = (window.map(|w| w.start_sql()), window.map(|w| w.end_sql()));
    let json = params_json(params);
    let created = tx
        .query_opt(
            sql!("pipeline_run_create"),
            &[
                &pipeline.name,
                &json,
                &name,
                &version,
                definition,
                &state,
                &backfill,
                &start,
                &end,
            ],
        )
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
    if let Some(row) = created {
        let id: i64 = row.get(0);
        create_stages(tx, id, pipeline, params, 1).await?;
        return Ok(RunRef {
            id,
            name,
            state: state.into(),
            created: true,
        });
    }
    let row = tx
        .query_one(sql!("pipeline_run_get"), &[&pipeline.name, &json])
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
    Ok(RunRef {
        id: row.get(0),
        name: row.get(1),
        state: row.get(2),
        created: false,
    })
}

/// Starts an ended run again from scratch: a new attempt whose stages prepare new batches,
/// under the pipeline's current version. False if it was not ended any more.
#[allow(clippy::too_many_arguments)]
async fn rerun(
    tx: &deadpool_postgres::Transaction<'_>,
    run_id: i64,
    pipeline: &Pipeline,
    params: &Params,
    version: i32,
    definition: &serde_json::Value,
    state: &str,
    backfill: Option<i64>,
) -> Result<bool, StoreError> {
    let ctx = "starting the run again";
    let Some(row) = tx
        .query_opt(
            sql!("pipeline_run_rerun"),
            &[&run_id, &state, &version, definition, &backfill],
        )
        .await
        .map_err(|e| StoreError::db(ctx, e))?
    else {
        // Re-opened by a repair meanwhile: it runs already.
        return Ok(false);
    };
    let attempt: i32 = row.get(0);
    tx.execute(sql!("pipeline_stages_clear"), &[&run_id])
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
    tx.execute(sql!("pipeline_watermark_lower"), &[&run_id])
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
    create_stages(tx, run_id, pipeline, params, attempt).await?;
    Ok(true)
}

impl Store {
    /// Starts the run of `pipeline` with `params`, or finds the one that exists; with
    /// `reprocess`, an ended run starts again from scratch. A pipeline whose definition
    /// changed since its last run is refused unless `new_version`.
    pub async fn pipeline_start(
        &self,
        pipeline: &Pipeline,
        params: &Params,
        options: StartOptions,
    ) -> Result<RunRef, StoreError> {
        let ctx = "starting the pipeline run";
        let definition = serde_json::to_value(pipeline)
            .map_err(|e| StoreError::Invalid(format!("pipeline definition: {e}")))?;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let version = define(&tx, pipeline, &definition, options.new_version).await?;
        let mut run =
            create_run(&tx, pipeline, params, version, &definition, "running", None).await?;
        if !run.created && options.reprocess && matches!(run.state.as_str(), "succeeded" | "failed")
        {
            let ended = rerun(
                &tx,
                run.id,
                pipeline,
                params,
                version,
                &definition,
                "running",
                None,
            )
            .await?;
            run.state = "running".into();
            run.created = ended;
        }
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        Ok(run)
    }

    /// A run and its stages, by the run's name.
    pub async fn pipeline_status(&self, run: &str) -> Result<RunStatus, StoreError> {
        let ctx = "reading the pipeline run";
        let client = self.client().await?;
        let row = client
            .query_opt(sql!("pipeline_run_by_name"), &[&run])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .ok_or_else(|| StoreError::Invalid(format!("pipeline run {run:?} does not exist")))?;
        let id: i64 = row.get(0);
        let stages = stages_of(&**client, id).await?;
        Ok(RunStatus {
            run: run.to_string(),
            pipeline: row.get(1),
            params: row.get(2),
            state: row.get(3),
            version: row.get(4),
            created_at: row.get(5),
            finished_at: row.get(6),
            stages,
        })
    }

    /// The id of a run by name.
    pub async fn pipeline_run_id(&self, run: &str) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(sql!("pipeline_run_by_name"), &[&run])
            .await
            .map_err(|e| StoreError::db("reading the pipeline run", e))?
            .map(|r| r.get(0)))
    }
}
