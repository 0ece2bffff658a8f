//! Pipeline runs in PostgreSQL: starting a run (one per pipeline and params), advancing it
//! from its stored state, and reading it back. Any number of processes may advance runs at
//! once: a run is advanced under its row lock (skipped by the others), and a stage's batch is
//! prepared under the batch's own prepare lock, so none is prepared twice.

mod advance;
mod repair;

pub use repair::Repair;

use super::{sql, Store};
use crate::error::StoreError;
use crate::pipeline::params::{batch_name, run_name, Params};
use crate::pipeline::plan::StageState;
use crate::pipeline::Pipeline;
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

impl Store {
    /// Starts the run of `pipeline` with `params`, or finds the one that exists. A pipeline
    /// whose definition changed since its last run is refused unless `new_version`.
    pub async fn pipeline_start(
        &self,
        pipeline: &Pipeline,
        params: &Params,
        new_version: bool,
    ) -> Result<RunRef, StoreError> {
        let ctx = "starting the pipeline run";
        let definition = serde_json::to_value(pipeline)
            .map_err(|e| StoreError::Invalid(format!("pipeline definition: {e}")))?;
        let digest = pipeline.digest();
        let name = run_name(&pipeline.name, &pipeline.params, params);
        let params = params_json(params);
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        tx.execute(
            sql!("pipeline_define"),
            &[&pipeline.name, &digest, &definition],
        )
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
        let row = tx
            .query_one(sql!("pipeline_lock"), &[&pipeline.name])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let (mut version, stored): (i32, String) = (row.get(0), row.get(1));
        if stored != digest {
            if !new_version {
                return Err(StoreError::Conflict(format!(
                    "pipeline {:?} has changed since version {version} was run: run it with \
                     --new-version to start version {}, or restore the file",
                    pipeline.name,
                    version + 1
                )));
            }
            version = tx
                .query_one(
                    sql!("pipeline_new_version"),
                    &[&pipeline.name, &digest, &definition],
                )
                .await
                .map_err(|e| StoreError::db(ctx, e))?
                .get(0);
        }
        let created = tx
            .query_opt(
                sql!("pipeline_run_create"),
                &[&pipeline.name, &params, &name, &version, &definition],
            )
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let run = match created {
            Some(row) => {
                let id: i64 = row.get(0);
                let values: Params = serde_json::from_value(params.clone()).unwrap_or_default();
                let stages: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
                let batches: Vec<String> = pipeline
                    .stages
                    .iter()
                    .map(|s| batch_name(&pipeline.name, &pipeline.params, &values, &s.name))
                    .collect();
                let deps: Vec<serde_json::Value> = pipeline
                    .stages
                    .iter()
                    .map(|s| serde_json::json!(s.depends_on))
                    .collect();
                tx.execute(
                    sql!("pipeline_stage_create"),
                    &[&id, &stages, &batches, &deps],
                )
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
                RunRef {
                    id,
                    name,
                    state: "running".into(),
                    created: true,
                }
            }
            None => {
                let row = tx
                    .query_one(sql!("pipeline_run_get"), &[&pipeline.name, &params])
                    .await
                    .map_err(|e| StoreError::db(ctx, e))?;
                RunRef {
                    id: row.get(0),
                    name: row.get(1),
                    state: row.get(2),
                    created: false,
                }
            }
        };
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
