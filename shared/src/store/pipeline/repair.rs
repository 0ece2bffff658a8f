//! Repair: re-open the failed stages of a run, record by record, and what follows them.

use super::{stages_of, StageStatus};
use crate::error::StoreError;
use crate::pipeline::plan::StageState;
use crate::pipeline::Pipeline;
use crate::store::{sql, Store};

impl Store {
    /// Repairs a run: the failed records of its failed stages (or of `only`) go back to
    /// pending, a stage its failure limit paused is resumed, and the stages after them that
    /// were skipped or upstream_failed wait again. Stages that succeeded are not touched.
    /// Harmless twice: a second repair finds nothing failed.
    pub async fn pipeline_repair(
        &self,
        run: &str,
        only: Option<&str>,
    ) -> Result<Repair, StoreError> {
        let id = self
            .pipeline_run_id(run)
            .await?
            .ok_or_else(|| StoreError::Invalid(format!("pipeline run {run:?} does not exist")))?;
        self.repair_run(id, only).await
    }

    /// Repairs the run `id` (see [`Store::pipeline_repair`]).
    pub(super) async fn repair_run(
        &self,
        id: i64,
        only: Option<&str>,
    ) -> Result<Repair, StoreError> {
        let ctx = "repairing the pipeline run";
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let row = tx
            .query_one(sql!("pipeline_run_lock_wait"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let run: String = row.get(1);
        let pipeline: Pipeline = serde_json::from_value(row.get(0)).map_err(|e| {
            StoreError::Invalid(format!("run {run}: stored definition unreadable: {e}"))
        })?;
        if let Some(stage) = only {
            if pipeline.stage(stage).is_none() {
                return Err(StoreError::Invalid(format!(
                    "run {run} has no stage {stage:?} (stages: {})",
                    pipeline
                        .stages
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let stages: Vec<StageStatus> = stages_of(&*tx, id).await?;
        let failed: Vec<&StageStatus> = stages
            .iter()
            .filter(|s| s.state() == StageState::Failed)
            .filter(|s| only.is_none_or(|o| o == s.stage))
            .collect();
        let mut repair = Repair::default();
        for stage in &failed {
            if stage.has_batch {
                if stage.batch_state.as_deref() == Some("paused") {
                    self.resume(&stage.batch).await?;
                }
                repair.records += self.retry_failed(&stage.batch, false).await?;
                set_stage(&tx, id, &stage.stage, StageState::Running).await?;
            } else {
                // Its prepare failed: prepare it again.
                set_stage(&tx, id, &stage.stage, StageState::Preparing).await?;
            }
            repair.stages.push(stage.stage.clone());
        }
        // Everything downstream of a re-opened stage that did not run waits again.
        let mut reopened: Vec<String> = repair.stages.clone();
        loop {
            let next = stages.iter().find(|s| {
                matches!(s.state(), StageState::Skipped | StageState::UpstreamFailed)
                    && !reopened.contains(&s.stage)
                    && s.depends_on.iter().any(|d| reopened.contains(d))
            });
            let Some(next) = next else { break };
            set_stage(&tx, id, &next.stage, StageState::Waiting).await?;
            reopened.push(next.stage.clone());
            repair.waiting.push(next.stage.clone());
        }
        if !repair.stages.is_empty() {
            tx.execute(sql!("pipeline_run_reopen"), &[&id])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
        } else {
            tx.execute(sql!("pipeline_run_repaired"), &[&id])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
        }
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        repair.run_id = id;
        Ok(repair)
    }
}

/// What a repair re-opened.
#[derive(Debug, Clone, Default)]
pub struct Repair {
    pub run_id: i64,
    /// Failed records sent back to pending.
    pub records: u64,
    /// Failed stages re-opened.
    pub stages: Vec<String>,
    /// Skipped or upstream_failed stages after them, waiting again.
    pub waiting: Vec<String>,
}

async fn set_stage(
    tx: &deadpool_postgres::Transaction<'_>,
    run_id: i64,
    stage: &str,
    state: StageState,
) -> Result<(), StoreError> {
    let reason: Option<String> = None;
    tx.execute(
        sql!("pipeline_stage_set"),
        &[&run_id, &stage, &state.as_str(), &reason],
    )
    .await
    .map_err(|e| StoreError::db("repairing the pipeline run", e))?;
    Ok(())
}
