//! Pipeline alerts: `pipeline_finished`, `pipeline_failed` and `stage_failed`, raised in the
//! transaction that ends the run or fails the stage, so each is raised once (its key holds
//! the run's episode, which every repair and rerun bumps). `serve` delivers them to its
//! webhooks like batch alerts.

use super::StageStatus;
use crate::error::StoreError;
use crate::store::sql;
use tokio_postgres::GenericClient;

/// The run an alert is about.
pub(super) struct RunAlert<'a> {
    pub id: i64,
    pub name: &'a str,
    pub pipeline: &'a str,
    pub episode: i32,
}

/// Raises `pipeline_finished` or `pipeline_failed` for a run that ended in `state`.
pub(super) async fn run_ended<C: GenericClient + Sync>(
    client: &C,
    run: &RunAlert<'_>,
    state: &str,
    stages: &[StageStatus],
) -> Result<(), StoreError> {
    let kind = if state == "succeeded" {
        "pipeline_finished"
    } else {
        "pipeline_failed"
    };
    let failed: Vec<&str> = stages
        .iter()
        .filter(|s| s.state == "failed")
        .map(|s| s.stage.as_str())
        .collect();
    let text = if failed.is_empty() {
        format!("Pipeline run {} {state}", run.name)
    } else {
        format!(
            "Pipeline run {} failed: stage(s) {} failed; fix the cause, then `coordinator \
             pipeline repair {}`",
            run.name,
            failed.join(", "),
            run.name
        )
    };
    let body = serde_json::json!({
        "text": text,
        "event": kind,
        "key": format!("{kind}:{}:{}", run.id, run.episode),
        "pipeline": run.pipeline,
        "run": run.name,
        "state": state,
        "stages": stages.iter().map(|s| serde_json::json!({
            "stage": s.stage,
            "state": s.state,
            "batch": s.batch,
            "total": s.total,
            "complete": s.complete,
            "failed": s.failed,
        })).collect::<Vec<_>>(),
    });
    insert(client, kind, &body, None, None, run.name).await
}

/// Raises `stage_failed` for a stage of a run.
pub(super) async fn stage_failed<C: GenericClient + Sync>(
    client: &C,
    run: &RunAlert<'_>,
    stage: &str,
    queue: &str,
    batch: &str,
    reason: Option<&str>,
    counts: Option<&StageStatus>,
) -> Result<(), StoreError> {
    let reason = reason.unwrap_or("failed");
    let text = format!(
        "Stage {stage} of pipeline run {} failed ({reason}); the stages after it wait on \
         `coordinator pipeline repair {}`",
        run.name, run.name
    );
    let mut body = serde_json::json!({
        "text": text,
        "event": "stage_failed",
        "key": format!("stage_failed:{}:{stage}:{}", run.id, run.episode),
        "pipeline": run.pipeline,
        "run": run.name,
        "stage": stage,
        "batch": batch,
        "queue": queue,
        "state": "failed",
        "reason": reason,
    });
    if let Some(s) = counts {
        body["total"] = s.total.into();
        body["counts"] = serde_json::json!({
            "pending": s.pending,
            "running": s.running,
            "complete": s.complete,
            "failed": s.failed,
            "cancelled": s.cancelled,
        });
    }
    insert(
        client,
        "stage_failed",
        &body,
        Some(batch),
        Some(queue),
        run.name,
    )
    .await
}

async fn insert<C: GenericClient + Sync>(
    client: &C,
    kind: &str,
    body: &serde_json::Value,
    batch: Option<&str>,
    queue: Option<&str>,
    run: &str,
) -> Result<(), StoreError> {
    let key = body["key"].as_str().unwrap_or_default();
    client
        .execute(
            sql!("pipeline_alert_insert"),
            &[&key, &kind, &batch, &queue, &run, &body.to_string()],
        )
        .await
        .map_err(|e| StoreError::db("raising a pipeline alert", e))?;
    Ok(())
}
