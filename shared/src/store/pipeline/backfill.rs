//! Backfills: one run per window of a range, at most `max_active` running at once. The runs
//! are queued in PostgreSQL and started by whichever advancer (`serve`, or `backfill --wait`)
//! holds the backfill's row lock, so no process's memory decides what runs next.

use super::{create_run, define, params_json, rerun, Store};
use crate::error::StoreError;
use crate::pipeline::params::{run_name, Params};
use crate::pipeline::Pipeline;
use crate::store::sql;

/// Backfills looked at per pass of an advancer.
const BACKFILLS_PER_PASS: i64 = 100;

/// What a backfill does with windows whose run exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reprocess {
    /// Skip every window that has a run.
    #[default]
    None,
    /// Repair failed runs (their failed records, and the stages after them).
    Failed,
    /// Repair failed runs, and run succeeded ones again from scratch.
    All,
}

impl Reprocess {
    pub fn parse(s: &str) -> Option<Reprocess> {
        match s {
            "none" => Some(Reprocess::None),
            "failed" => Some(Reprocess::Failed),
            "all" => Some(Reprocess::All),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reprocess::None => "none",
            Reprocess::Failed => "failed",
            Reprocess::All => "all",
        }
    }
}

/// A backfill to plan, and to start unless `dry_run`.
#[derive(Debug, Clone)]
pub struct BackfillRequest<'a> {
    pub pipeline: &'a Pipeline,
    /// The params of each window's run, in window order.
    pub runs: Vec<Params>,
    /// The range and step as given, kept with the backfill.
    pub range: (String, String, String),
    pub max_active: i32,
    pub reprocess: Reprocess,
    pub new_version: bool,
    pub dry_run: bool,
}

/// What a backfill does with one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackfillAction {
    /// No run yet: queue one.
    Start,
    /// Its run failed: repair it (failed records only) when its turn comes.
    Repair,
    /// Its run succeeded: run it again from scratch, into new batches.
    Rerun,
    /// Skipped: its run succeeded.
    SkipSucceeded,
    /// Skipped: its run failed (see --reprocess failed).
    SkipFailed,
    /// Skipped: its run is running or queued already.
    SkipActive,
}

impl BackfillAction {
    pub fn describe(self) -> &'static str {
        match self {
            BackfillAction::Start => "start",
            BackfillAction::Repair => "repair its failed records",
            BackfillAction::Rerun => "run again from scratch",
            BackfillAction::SkipSucceeded => "skip: succeeded",
            BackfillAction::SkipFailed => "skip: failed (--reprocess failed repairs it)",
            BackfillAction::SkipActive => "skip: running or queued already",
        }
    }

    pub fn queues(self) -> bool {
        matches!(
            self,
            BackfillAction::Start | BackfillAction::Repair | BackfillAction::Rerun
        )
    }
}

/// A backfill's plan, and its id unless it was a dry run.
#[derive(Debug, Clone)]
pub struct Backfill {
    pub id: Option<i64>,
    pub plan: Vec<(String, BackfillAction)>,
}

/// A backfill's state and its runs by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillProgress {
    pub finished: bool,
    pub failed: bool,
    pub max_active: i32,
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed_runs: i64,
}

impl Store {
    /// Plans a backfill and, unless `dry_run`, queues its runs and starts the first
    /// `max_active` of them. A dry run writes nothing.
    pub async fn pipeline_backfill(
        &self,
        req: &BackfillRequest<'_>,
    ) -> Result<Backfill, StoreError> {
        let ctx = "starting the backfill";
        let pipeline = req.pipeline;
        let definition = serde_json::to_value(pipeline)
            .map_err(|e| StoreError::Invalid(format!("pipeline definition: {e}")))?;
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let version = define(&tx, pipeline, &definition, req.new_version).await?;
        let mut plan = Vec::new();
        let mut existing = Vec::new();
        for params in &req.runs {
            let name = run_name(&pipeline.name, &pipeline.params, params);
            let row = tx
                .query_opt(
                    sql!("pipeline_run_get"),
                    &[&pipeline.name, &params_json(params)],
                )
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
            let found: Option<(i64, String)> = row.map(|r| (r.get(0), r.get(2)));
            let action = match (found.as_ref().map(|f| f.1.as_str()), req.reprocess) {
                (None, _) => BackfillAction::Start,
                (Some("queued" | "running"), _) => BackfillAction::SkipActive,
                (Some("succeeded"), Reprocess::All) => BackfillAction::Rerun,
                (Some("succeeded"), _) => BackfillAction::SkipSucceeded,
                (Some(_), Reprocess::None) => BackfillAction::SkipFailed,
                (Some(_), _) => BackfillAction::Repair,
            };
            plan.push((name, action));
            existing.push(found.map(|f| f.0));
        }
        if req.dry_run {
            return Ok(Backfill { id: None, plan });
        }
        let queued = plan.iter().filter(|(_, a)| a.queues()).count() as i32;
        let skipped = plan.len() as i32 - queued;
        let id: i64 = tx
            .query_one(
                sql!("pipeline_backfill_create"),
                &[
                    &pipeline.name,
                    &req.range.0,
                    &req.range.1,
                    &req.range.2,
                    &req.max_active,
                    &req.reprocess.as_str(),
                    &queued,
                    &skipped,
                ],
            )
            .await
            .map_err(|e| StoreError::db(ctx, e))?
            .get(0);
        for ((params, (_, action)), run_id) in req.runs.iter().zip(&plan).zip(&existing) {
            match (action, run_id) {
                (BackfillAction::Start, _) => {
                    create_run(
                        &tx,
                        pipeline,
                        params,
                        version,
                        &definition,
                        "queued",
                        Some(id),
                    )
                    .await?;
                }
                (BackfillAction::Repair, Some(run)) => {
                    tx.execute(sql!("pipeline_run_queue"), &[run, &id, &"repair"])
                        .await
                        .map_err(|e| StoreError::db(ctx, e))?;
                }
                (BackfillAction::Rerun, Some(run)) => {
                    rerun(
                        &tx,
                        *run,
                        pipeline,
                        params,
                        version,
                        &definition,
                        "queued",
                        Some(id),
                    )
                    .await?;
                }
                _ => {}
            }
        }
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        drop(client);
        self.promote_backfill(id).await?;
        Ok(Backfill { id: Some(id), plan })
    }

    /// Starts queued runs of a backfill while fewer than its `max_active` run, and ends the
    /// backfill once all its runs have ended. `None` when another process is doing it now.
    pub async fn promote_backfill(&self, id: i64) -> Result<Option<BackfillProgress>, StoreError> {
        let ctx = "starting the backfill's next runs";
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let Some(row) = tx
            .query_opt(sql!("pipeline_backfill_lock"), &[&id])
            .await
            .map_err(|e| StoreError::db(ctx, e))?
        else {
            return Ok(None);
        };
        let state: String = row.get(0);
        let max_active: i32 = row.get(1);
        let mut repairs = Vec::new();
        if state == "running" {
            let progress = progress(&*tx, id).await?;
            let room = i64::from(max_active) - progress.running;
            if room > 0 {
                let next = tx
                    .query(sql!("pipeline_backfill_next"), &[&id, &room])
                    .await
                    .map_err(|e| StoreError::db(ctx, e))?;
                for r in next {
                    let run: i64 = r.get(0);
                    let reprocess: Option<String> = r.get(1);
                    tx.execute(sql!("pipeline_run_start"), &[&run])
                        .await
                        .map_err(|e| StoreError::db(ctx, e))?;
                    if reprocess.as_deref() == Some("repair") {
                        repairs.push(run);
                    }
                }
            }
            tx.execute(sql!("pipeline_backfill_finish"), &[&id])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
        }
        let progress = progress(&*tx, id).await?;
        tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
        drop(client);
        // After the commit, which counted them as running: a repair takes connections of its
        // own. Killed before it, the run's advancer repairs it (`reprocess` stays set).
        for run in repairs {
            if let Err(e) = self.repair_run(run, None).await {
                tracing::warn!(
                    run,
                    "repairing a run of a backfill: {e}; its advancer tries again"
                );
            }
        }
        Ok(Some(progress))
    }

    /// Moves every unfinished backfill on; returns how many were looked at.
    pub(super) async fn promote_backfills(&self) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let ids: Vec<i64> = client
            .query(sql!("pipeline_backfills_running"), &[&BACKFILLS_PER_PASS])
            .await
            .map_err(|e| StoreError::db("listing backfills", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(client);
        for id in &ids {
            if let Err(e) = self.promote_backfill(*id).await {
                tracing::warn!(backfill = id, "starting a backfill's runs: {e}");
            }
        }
        Ok(ids.len())
    }

    /// A backfill's state and its runs by state.
    pub async fn backfill_progress(&self, id: i64) -> Result<BackfillProgress, StoreError> {
        let client = self.client().await?;
        progress(&**client, id).await
    }
}

async fn progress<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    id: i64,
) -> Result<BackfillProgress, StoreError> {
    let r = client
        .query_opt(sql!("pipeline_backfill_progress"), &[&id])
        .await
        .map_err(|e| StoreError::db("reading the backfill", e))?
        .ok_or_else(|| StoreError::Invalid(format!("backfill {id} does not exist")))?;
    let state: String = r.get(0);
    Ok(BackfillProgress {
        finished: state != "running",
        failed: state == "failed",
        max_active: r.get(1),
        queued: r.get(2),
        running: r.get(3),
        succeeded: r.get(4),
        failed_runs: r.get(5),
    })
}
