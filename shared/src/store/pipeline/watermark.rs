//! Watermarks of incremental pipelines: the end of the latest window up to which every run
//! succeeded. It moves in the transaction that finishes a run, so it never passes a window
//! whose records are not all done; `pipeline run --next` runs the window after it.

use crate::error::StoreError;
use crate::pipeline::window::{self, Window, WindowKind};
use crate::pipeline::Pipeline;
use crate::store::{sql, Store};
use chrono::TimeDelta;
use std::time::Duration;

/// The window `--next` runs.
#[derive(Debug, Clone)]
pub struct NextWindow {
    pub watermark: String,
    pub window: Window,
}

/// Moves the pipeline's watermark over the runs that succeeded after it. Locks the pipeline's
/// row first: the chain is then read in a snapshot that holds every run that finished before.
pub(super) async fn advance_watermark(
    tx: &deadpool_postgres::Transaction<'_>,
    pipeline: &str,
) -> Result<Option<String>, StoreError> {
    let ctx = "advancing the pipeline's watermark";
    tx.query_opt(sql!("pipeline_lock"), &[&pipeline])
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
    Ok(tx
        .query_opt(sql!("pipeline_watermark_advance"), &[&pipeline])
        .await
        .map_err(|e| StoreError::db(ctx, e))?
        .map(|r| r.get(0)))
}

impl Store {
    /// The pipeline's watermark (`YYYY-MM-DD HH:MM:SS`), if it has one.
    pub async fn pipeline_watermark(&self, pipeline: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(sql!("pipeline_watermark"), &[&pipeline])
            .await
            .map_err(|e| StoreError::db("reading the pipeline's watermark", e))?
            .and_then(|r| r.get(0)))
    }

    /// The window after the pipeline's watermark: a day for a `date` pipeline; for a
    /// window_start/window_end one, `step`, or the length of the window that ended at it.
    pub async fn pipeline_next(
        &self,
        pipeline: &Pipeline,
        step: Option<Duration>,
    ) -> Result<NextWindow, StoreError> {
        let kind = window::kind(pipeline).ok_or_else(|| {
            StoreError::Invalid(format!(
                "--next: pipeline {} has no window params; give it `date`, or `window_start` \
                 and `window_end`",
                pipeline.name
            ))
        })?;
        let others = window::other_params(pipeline, kind);
        if !others.is_empty() {
            return Err(StoreError::Invalid(format!(
                "--next: pipeline {} has params besides its window ({}): one watermark cannot \
                 follow several of them; start its runs with --param",
                pipeline.name,
                others.join(", ")
            )));
        }
        let client = self.client().await?;
        let row = client
            .query_opt(sql!("pipeline_watermark"), &[&pipeline.name])
            .await
            .map_err(|e| StoreError::db("reading the pipeline's watermark", e))?;
        let watermark: Option<String> = row.as_ref().and_then(|r| r.get(0));
        let last_len: Option<f64> = row.as_ref().and_then(|r| r.get(1));
        let Some(watermark) = watermark else {
            return Err(StoreError::Invalid(format!(
                "--next: pipeline {} has no watermark yet: none of its windows succeeded from \
                 its first one on. Run the first window with --param (or a backfill), then \
                 --next follows it",
                pipeline.name
            )));
        };
        let start = window::parse_time(&watermark).ok_or_else(|| {
            StoreError::Invalid(format!("stored watermark {watermark:?} is unreadable"))
        })?;
        let step = match (kind, step) {
            (WindowKind::Span, None) => match last_len {
                Some(secs) if secs >= 1.0 => TimeDelta::seconds(secs as i64),
                _ => window::step_of(kind, None).map_err(StoreError::Invalid)?,
            },
            _ => window::step_of(kind, step).map_err(StoreError::Invalid)?,
        };
        Ok(NextWindow {
            watermark,
            window: Window {
                start,
                end: start + step,
            },
        })
    }
}
