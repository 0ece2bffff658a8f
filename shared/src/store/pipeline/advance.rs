//! Advancing runs: stage outcomes from their batches, `run_if` decisions, and preparing the
//! stages that may start.

use super::alerts::{self, RunAlert};
use super::watermark::advance_watermark;
use super::{stages_of, StageStatus};
use crate::error::StoreError;
use crate::input::{Format, DEFAULT_MAX_PAYLOAD_BYTES};
use crate::model::BatchSpec;
use crate::pipeline::params::{bind_placeholders, fill_path, Params};
use crate::pipeline::plan::{decide, within_tolerance, Decision, StageState};
use crate::pipeline::{Pipeline, Stage, StageInput};
use crate::store::{sql, PrepareInput, PreparePolicy, Store};
use std::time::Duration;

/// Runs looked at per pass of [`Store::advance_pipelines`].
const RUNS_PER_PASS: i64 = 100;

impl Store {
    /// One pass over unfinished backfills and runs; returns how many runs were looked at.
    /// For `serve`, and the foreground of `pipeline backfill --wait`.
    pub async fn advance_pipelines(&self) -> Result<usize, StoreError> {
        self.promote_backfills().await?;
        let client = self.client().await?;
        let ids: Vec<i64> = client
            .query(sql!("pipeline_runs_running"), &[&RUNS_PER_PASS])
            .await
            .map_err(|e| StoreError::db("listing pipeline runs", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(client);
        for id in &ids {
            if let Err(e) = self.advance_run(*id).await {
                tracing::warn!(run = id, "advancing a pipeline run: {e}");
            }
        }
        // Runs that ended in this pass make room for queued ones at once.
        self.promote_backfills().await?;
        Ok(ids.len())
    }

    /// Moves a run forward from what PostgreSQL holds: stages whose batch finished get their
    /// outcome, stages whose dependencies are done run, skip or fail upstream, and the run
    /// ends when every stage is done. Returns the run's state, or `None` when another process
    /// is advancing it right now.
    pub async fn advance_run(&self, run_id: i64) -> Result<Option<String>, StoreError> {
        let ctx = "advancing the pipeline run";
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let Some(row) = tx
            .query_opt(sql!("pipeline_run_lock"), &[&run_id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
        else {
            return Ok(None);
        };
        let run_name: String = row.get(0);
        let state: String = row.get(1);
        if state != "running" {
            return Ok(Some(state));
        }
        let reprocess: Option<String> = row.get(6);
        if reprocess.as_deref() == Some("repair") {
            // A backfill started it to be repaired, and the repair did not happen yet.
            drop(tx);
            drop(client);
            self.repair_run(run_id, None).await?;
            return Ok(Some("running".into()));
        }
        let pipeline: Pipeline = serde_json::from_value(row.get(2)).map_err(|e| {
            StoreError::Invalid(format!("run {run_name}: stored definition unreadable: {e}"))
        })?;
        let params: Params = serde_json::from_value(row.get(3)).unwrap_or_default();
        let pipeline_name: String = row.get(4);
        let run = RunAlert {
            id: run_id,
            name: &run_name,
            pipeline: &pipeline_name,
            episode: row.get(5),
        };
        let mut stages: Vec<StageStatus> = stages_of(&*tx, run_id).await?;
        let changes = settle(&pipeline, &mut stages);
        for (stage, state, reason) in &changes {
            tx.execute(
                sql!("pipeline_stage_set"),
                &[&run_id, stage, &state.as_str(), reason],
            )
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
            if *state == StageState::Failed {
                let status = stages.iter().find(|s| &s.stage == stage);
                let queue = pipeline
                    .stage(stage)
                    .map(|d| d.queue.as_str())
                    .unwrap_or("");
                let batch = status.map(|s| s.batch.as_str()).unwrap_or("");
                alerts::stage_failed(&*tx, &run, stage, queue, batch, reason.as_deref(), status)
                    .await?;
            }
        }
        let all_done = stages.iter().all(|s| s.state().is_done());
        let mut run_state = "running".to_string();
        if all_done {
            let failed = stages
                .iter()
                .any(|s| matches!(s.state(), StageState::Failed | StageState::UpstreamFailed));
            run_state = if failed { "failed" } else { "succeeded" }.to_string();
            tx.execute(sql!("pipeline_run_finish"), &[&run_id, &run_state])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
            alerts::run_ended(&*tx, &run, &run_state, &stages).await?;
            if run_state == "succeeded" {
                advance_watermark(&tx, &pipeline_name).await?;
            }
        }
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        drop(client);
        for stage in stages.iter().filter(|s| s.state() == StageState::Preparing) {
            if let Some(def) = pipeline.stage(&stage.stage) {
                let source = match &def.input {
                    StageInput::Failed(from) => stages
                        .iter()
                        .find(|s| &s.stage == from)
                        .map(|s| s.batch.clone()),
                    _ => None,
                };
                self.prepare_stage(&run, &params, def, &stage.batch, source.as_deref())
                    .await?;
            }
        }
        Ok(Some(run_state))
    }

    /// Prepares a stage's batch (idempotent: a batch prepared already is found as such). A
    /// batch another process is preparing right now is left to it.
    async fn prepare_stage(
        &self,
        run: &RunAlert<'_>,
        params: &Params,
        stage: &Stage,
        batch: &str,
        source: Option<&str>,
    ) -> Result<(), StoreError> {
        let spec = BatchSpec {
            name: batch.to_string(),
            queue: stage.queue.clone(),
            id_field: stage.id_field.clone(),
            max_attempts: stage.max_attempts,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            max_failed: stage.max_failed,
            max_failed_ratio: stage.max_failed_ratio,
        };
        // Another advancer preparing the same stage holds its lock: leave it to that one.
        let policy = PreparePolicy {
            lock_wait: Duration::from_millis(1),
            retry_for: Duration::ZERO,
        };
        let result = match &stage.input {
            StageInput::Query(query) => {
                let (sql, names) = bind_placeholders(query);
                let values: Vec<String> = names
                    .iter()
                    .map(|n| params.get(n).cloned().unwrap_or_default())
                    .collect();
                self.prepare_query_bound(&spec, &sql, &values, &policy)
                    .await
            }
            StageInput::File(template) => match fill_path(template, params) {
                Ok(path) => {
                    self.prepare_input(
                        &spec,
                        PrepareInput::File(path.into()),
                        Format::Jsonl,
                        DEFAULT_MAX_PAYLOAD_BYTES,
                        None,
                        &policy,
                    )
                    .await
                }
                Err(e) => Err(StoreError::Invalid(e)),
            },
            StageInput::Failed(from) => match source {
                Some(source) => self.prepare_failed(&spec, source, &policy).await,
                None => Err(StoreError::Invalid(format!(
                    "the run has no stage {from:?}"
                ))),
            },
        };
        let (state, reason) = match result {
            Ok(_) => ("running", None),
            Err(StoreError::NoRecords(_)) => ("succeeded", Some("no records to process".into())),
            Err(StoreError::Locked(_)) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::warn!(batch, "preparing a pipeline stage: {e}; trying again later");
                return Ok(());
            }
            Err(e) => ("failed", Some(format!("prepare failed: {e}"))),
        };
        let ctx = "recording a prepared stage";
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let moved = tx
            .execute(
                sql!("pipeline_stage_prepared"),
                &[&run.id, &stage.name, &state, &reason],
            )
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        if moved == 1 && state == "failed" {
            alerts::stage_failed(
                &*tx,
                run,
                &stage.name,
                &stage.queue,
                batch,
                reason.as_deref(),
                None,
            )
            .await?;
        }
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        Ok(())
    }
}

/// Applies outcomes and decisions until nothing changes; returns the stages that moved.
fn settle(
    pipeline: &Pipeline,
    stages: &mut [StageStatus],
) -> Vec<(String, StageState, Option<String>)> {
    let mut changes: Vec<(String, StageState, Option<String>)> = Vec::new();
    loop {
        let mut moved = false;
        for i in 0..stages.len() {
            let Some(def) = pipeline.stage(&stages[i].stage) else {
                continue;
            };
            let next = match stages[i].state() {
                StageState::Preparing | StageState::Running => batch_outcome(def, &stages[i]),
                StageState::Waiting => {
                    let deps: Vec<StageState> = def
                        .depends_on
                        .iter()
                        .filter_map(|d| stages.iter().find(|s| &s.stage == d))
                        .map(|s| s.state())
                        .collect();
                    match decide(def.run_if, &deps) {
                        None => None,
                        Some(Decision::Run) => Some((StageState::Preparing, None)),
                        Some(Decision::Skip) => Some((
                            StageState::Skipped,
                            Some(format!("run_if: {} was not met", def.run_if.as_str())),
                        )),
                        Some(Decision::UpstreamFailed) => Some((
                            StageState::UpstreamFailed,
                            Some("a stage it depends on failed".to_string()),
                        )),
                    }
                }
                _ => None,
            };
            if let Some((state, reason)) = next {
                if state != stages[i].state() {
                    stages[i].state = state.as_str().to_string();
                    stages[i].reason = reason.clone();
                    changes.retain(|(s, _, _)| s != &stages[i].stage);
                    changes.push((stages[i].stage.clone(), state, reason));
                    moved = true;
                }
            }
        }
        if !moved {
            return changes;
        }
    }
}

/// The state a preparing or running stage's batch puts it in, if it changed.
fn batch_outcome(def: &Stage, s: &StageStatus) -> Option<(StageState, Option<String>)> {
    let batch_state = s.batch_state.as_deref()?;
    if !s.has_batch || batch_state == "preparing" {
        return None;
    }
    if batch_state == "cancelled" {
        return Some((StageState::Failed, Some("its batch was cancelled".into())));
    }
    if batch_state == "paused" {
        return match s.paused_reason.as_deref() {
            Some(r) if r.starts_with("too many failures") => {
                Some((StageState::Failed, Some(r.to_string())))
            }
            _ => Some((StageState::Running, None)),
        };
    }
    let finished = s.total > 0 && s.pending + s.running == 0;
    if !finished {
        return Some((StageState::Running, None));
    }
    if within_tolerance(s.total, s.failed, def.max_failed, def.max_failed_ratio) {
        Some((StageState::Succeeded, None))
    } else {
        Some((
            StageState::Failed,
            Some(format!(
                "{} of {} records failed, past its tolerance",
                s.failed, s.total
            )),
        ))
    }
}
