//! `coordinator pipeline backfill`: one run per window of a range, at most --max-active at
//! once, driven from PostgreSQL (any `serve`, or this command with --wait, starts the next).

use super::parse_some_params;
use crate::exit;
use clap::Args;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tally::pipeline::window;
use tally::pipeline::Pipeline;
use tally::store::pipeline::{BackfillRequest, Reprocess};
use tally::{Store, StoreError};

#[derive(Args, Debug)]
pub struct BackfillArgs {
    /// The pipeline file (YAML).
    pub file: PathBuf,
    /// The first date (YYYY-MM-DD), or for window_start/window_end pipelines the start of the
    /// first window.
    #[arg(long)]
    pub from: String,
    /// The last date, included; or the end of the last window.
    #[arg(long)]
    pub to: String,
    /// The length of a window_start/window_end window (e.g. 1h). A date pipeline runs one
    /// day per run.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub step: Option<Duration>,
    /// Runs that may be running at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub max_active: i32,
    /// Windows whose run exists: none skips them; failed repairs the failed ones (their
    /// failed records only); all also runs the succeeded ones again from scratch.
    #[arg(long, default_value = "none", value_parser = ["none", "failed", "all"])]
    pub reprocess: String,
    /// Print the plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The pipeline's other params, NAME=VALUE, the same for every window.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Follow the backfill until every run ended. Exit 0: all succeeded; 3: some failed;
    /// 4: --timeout passed.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
    pub timeout: Option<Duration>,
    /// Pause between two passes while waiting.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Accept a changed pipeline file under the same name as its next version.
    #[arg(long)]
    pub new_version: bool,
}

pub async fn execute(
    store: &Store,
    pipeline: &Pipeline,
    args: BackfillArgs,
) -> Result<u8, StoreError> {
    let kind = window::kind(pipeline).ok_or_else(|| {
        StoreError::Invalid(format!(
            "pipeline {} has no window params to backfill: give it `date`, or `window_start` \
             and `window_end`",
            pipeline.name
        ))
    })?;
    let others = window::other_params(pipeline, kind);
    let fixed = parse_some_params(pipeline, &args.params, &others)?;
    if let Some(name) = fixed.keys().find(|k| !others.contains(k)) {
        return Err(StoreError::Invalid(format!(
            "--param {name}: the backfill sets it for each window"
        )));
    }
    let windows =
        window::plan(kind, &args.from, &args.to, args.step).map_err(StoreError::Invalid)?;
    let runs = windows
        .iter()
        .map(|w| window::params_of(kind, w, &fixed))
        .collect();
    let step = match (kind, args.step) {
        (window::WindowKind::Span, Some(s)) => humantime::format_duration(s).to_string(),
        _ => "1d".to_string(),
    };
    let reprocess = Reprocess::parse(&args.reprocess).unwrap_or_default();
    let req = BackfillRequest {
        pipeline,
        runs,
        range: (args.from.clone(), args.to.clone(), step),
        max_active: args.max_active,
        reprocess,
        new_version: args.new_version,
        dry_run: args.dry_run,
    };
    let backfill = store.pipeline_backfill(&req).await?;
    let queued = backfill.plan.iter().filter(|(_, a)| a.queues()).count();
    let width = backfill
        .plan
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(0);
    for (name, action) in &backfill.plan {
        println!("{name:<width$}  {}", action.describe());
    }
    let Some(id) = backfill.id else {
        println!(
            "dry run: {queued} of {} windows would run, at most {} at once; nothing was written",
            backfill.plan.len(),
            args.max_active
        );
        return Ok(exit::OK);
    };
    println!(
        "backfill {id}: {queued} run(s) queued, {} skipped, at most {} at once",
        backfill.plan.len() - queued,
        args.max_active
    );
    if !args.wait {
        if queued > 0 {
            eprintln!("`coordinator serve` starts the queued runs as others end (or pass --wait)");
        }
        return Ok(exit::OK);
    }
    let deadline = args.timeout.map(|t| Instant::now() + t);
    loop {
        if let Err(e) = store.advance_pipelines().await {
            if !e.is_transient() {
                return Err(e);
            }
            tracing::warn!("advancing the backfill: {e}; trying again");
        }
        let p = store.backfill_progress(id).await?;
        if p.finished {
            println!(
                "backfill {id} {}: {} run(s) succeeded, {} failed",
                if p.failed { "failed" } else { "succeeded" },
                p.succeeded,
                p.failed_runs
            );
            return Ok(if p.failed {
                exit::FINISHED_WITH_FAILURES
            } else {
                exit::OK
            });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tally::logging::report(
                "coordinator",
                format!(
                    "timed out waiting for backfill {id} ({} queued, {} running); it goes on",
                    p.queued, p.running
                ),
            );
            return Ok(exit::TIMEOUT);
        }
        tokio::time::sleep(args.interval).await;
    }
}
