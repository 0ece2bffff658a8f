//! `coordinator pipeline`: start a run and follow it, backfill a range, and show a run's
//! stages.

mod backfill;

pub use backfill::BackfillArgs;

use crate::actions::Action;
use crate::{exit, output};
use clap::Subcommand;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tally::pipeline::params::Params;
use tally::pipeline::window;
use tally::pipeline::{Pipeline, PipelineError};
use tally::store::pipeline::{RunStatus, StartOptions};
use tally::{Store, StoreError};

#[derive(Subcommand, Debug)]
pub enum PipelineCommand {
    /// Start the run of a pipeline for the given params, or attach to it if it exists. Its
    /// first stages are prepared at once; `coordinator serve` (or --wait) moves it on.
    Run {
        /// The pipeline file (YAML).
        file: PathBuf,
        /// A parameter of the run, NAME=VALUE; one per name the file's `params` lists.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Run the window after the pipeline's watermark (the end of the latest window up to
        /// which every run succeeded), instead of --param.
        #[arg(long, conflicts_with = "params")]
        next: bool,
        /// With --next, the length of a window_start/window_end window (e.g. 1h); by default
        /// that of the window that ended at the watermark.
        #[arg(long, value_parser = humantime::parse_duration, requires = "next")]
        step: Option<Duration>,
        /// Run a window that already ended (succeeded or failed) again from scratch, into new
        /// batches.
        #[arg(long)]
        reprocess: bool,
        /// Follow the run until it ends. Exit 0: succeeded; 3: failed; 4: --timeout passed.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long (e.g. 2h).
        #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Option<Duration>,
        /// Pause between two looks at the run while waiting.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Accept a changed pipeline file under the same name as its next version.
        #[arg(long)]
        new_version: bool,
    },
    /// One run per date (or per --step window) of a range, at most --max-active at once;
    /// windows whose run exists are skipped unless --reprocess says otherwise. `coordinator
    /// serve` (or --wait) starts the queued runs as others end.
    Backfill(backfill::BackfillArgs),
    /// Redo only what failed: the failed records of failed stages go back to pending, and
    /// the stages after them that did not run wait again. Succeeded stages are not touched.
    Repair {
        run: String,
        /// Repair only this stage (and what follows it).
        #[arg(long)]
        stage: Option<String>,
    },
    /// A run's stages: state, counts and what each waits on.
    Status {
        /// The run's name, as `pipeline run` printed it (e.g. nightly-orders/date=2024-06-01).
        run: String,
        #[arg(long)]
        json: bool,
    },
}

/// The file, checked; its problems are printed one per line and mean exit 64.
pub fn load(file: &std::path::Path) -> Result<Pipeline, u8> {
    tally::pipeline::load_file(file).map_err(|e| report_file(&e))
}

fn report_file(e: &PipelineError) -> u8 {
    for line in e.to_string().lines() {
        tally::logging::report("coordinator", line);
    }
    exit::USAGE
}

/// `--param` values checked against the pipeline's `params`.
pub fn parse_params(pipeline: &Pipeline, given: &[String]) -> Result<Params, StoreError> {
    parse_some_params(pipeline, given, &pipeline.params)
}

/// `--param` values checked against the pipeline's `params`; `required` must all be given.
pub fn parse_some_params(
    pipeline: &Pipeline,
    given: &[String],
    required: &[String],
) -> Result<Params, StoreError> {
    let mut params = Params::new();
    let mut problems = Vec::new();
    for raw in given {
        let Some((name, value)) = raw.split_once('=') else {
            problems.push(format!("--param {raw:?} is not NAME=VALUE"));
            continue;
        };
        if !pipeline.params.iter().any(|p| p == name) {
            problems.push(format!(
                "--param {name}: pipeline {} has no parameter {name:?} (its params: {})",
                pipeline.name,
                shown_params(pipeline)
            ));
        } else if params.insert(name.to_string(), value.to_string()).is_some() {
            problems.push(format!("--param {name} is given twice"));
        }
    }
    for name in required {
        if !params.contains_key(name) {
            problems.push(format!(
                "missing --param {name}=VALUE: pipeline {} binds {} on every run",
                pipeline.name,
                shown_params(pipeline)
            ));
        }
    }
    if problems.is_empty() {
        Ok(params)
    } else {
        Err(StoreError::Invalid(problems.join("\n")))
    }
}

fn shown_params(pipeline: &Pipeline) -> String {
    if pipeline.params.is_empty() {
        "none".into()
    } else {
        pipeline.params.join(", ")
    }
}

/// Runs a pipeline command; `loaded` is the file of `run`, checked already.
pub async fn execute(
    store: &Store,
    command: PipelineCommand,
    loaded: Option<Pipeline>,
) -> Result<u8, StoreError> {
    match command {
        PipelineCommand::Run {
            file,
            params,
            next,
            step,
            reprocess,
            wait,
            timeout,
            interval,
            new_version,
        } => {
            let pipeline = match loaded {
                Some(p) => p,
                None => match load(&file) {
                    Ok(p) => p,
                    Err(code) => return Ok(code),
                },
            };
            let params = if next {
                let next = store.pipeline_next(&pipeline, step).await?;
                let kind = window::kind(&pipeline).unwrap_or(window::WindowKind::Daily);
                eprintln!(
                    "watermark of {} is {}: running the window that follows it",
                    pipeline.name, next.watermark
                );
                window::params_of(kind, &next.window, &Params::new())
            } else {
                parse_params(&pipeline, &params)?
            };
            let options = StartOptions {
                new_version,
                reprocess,
            };
            let run = store.pipeline_start(&pipeline, &params, options).await?;
            println!("{}", run.name);
            match (run.created, run.state.as_str()) {
                (true, _) => eprintln!("run {} started", run.name),
                (false, "running") => eprintln!("run {} is running: attached to it", run.name),
                (false, "queued") => eprintln!(
                    "run {} is queued by a backfill: attached to it; it starts when the \
                     backfill has room",
                    run.name
                ),
                (false, "succeeded") => {
                    eprintln!(
                        "run {} has already succeeded; nothing to do (--reprocess runs it again)",
                        run.name
                    );
                    return Ok(exit::OK);
                }
                (false, state) => {
                    eprintln!(
                        "run {} has already ended: {state} (`pipeline repair` redoes its failed \
                         records; --reprocess runs it again from scratch)",
                        run.name
                    );
                    return Ok(if wait {
                        exit::FINISHED_WITH_FAILURES
                    } else {
                        exit::OK
                    });
                }
            }
            store.advance_run(run.id).await?;
            if !wait {
                return Ok(exit::OK);
            }
            follow(store, run.id, &run.name, timeout, interval).await
        }
        PipelineCommand::Backfill(args) => {
            let pipeline = match loaded {
                Some(p) => p,
                None => match load(&args.file) {
                    Ok(p) => p,
                    Err(code) => return Ok(code),
                },
            };
            backfill::execute(store, &pipeline, args).await
        }
        PipelineCommand::Repair { run, stage } => {
            let done = Action::Repair { run, stage }
                .run(store, &crate::actions::cli_actor())
                .await?;
            println!("{}", done.message);
            Ok(exit::OK)
        }
        PipelineCommand::Status { run, json } => {
            let status = store.pipeline_status(&run).await?;
            if json {
                output::print_json(std::slice::from_ref(&status), true);
            } else {
                print!("{}", render(&status));
            }
            Ok(exit::OK)
        }
    }
}

/// Advances the run until it ends (any other process may advance it meanwhile).
async fn follow(
    store: &Store,
    id: i64,
    name: &str,
    timeout: Option<Duration>,
    interval: Duration,
) -> Result<u8, StoreError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let state = match store.advance_run(id).await {
            Ok(Some(state)) => state,
            Ok(None) => "running".to_string(),
            Err(e) if e.is_transient() => {
                tracing::warn!("advancing run {name}: {e}; trying again");
                "running".to_string()
            }
            Err(e) => return Err(e),
        };
        match state.as_str() {
            "succeeded" | "failed" => {
                let status = store.pipeline_status(name).await?;
                print!("{}", render(&status));
                return Ok(if state == "succeeded" {
                    exit::OK
                } else {
                    exit::FINISHED_WITH_FAILURES
                });
            }
            _ => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tally::logging::report(
                "coordinator",
                format!("timed out waiting for run {name}; it goes on (see `pipeline status`)"),
            );
            return Ok(exit::TIMEOUT);
        }
        tokio::time::sleep(interval).await;
    }
}

/// The run as a small tree: each stage under the stage it waits on last in file order.
pub fn render(status: &RunStatus) -> String {
    let mut out = format!(
        "{}  {}  (pipeline {} version {})\n",
        status.run, status.state, status.pipeline, status.version
    );
    let depth = |name: &str| -> usize {
        fn walk(status: &RunStatus, name: &str, seen: usize) -> usize {
            if seen > status.stages.len() {
                return 0;
            }
            status
                .stages
                .iter()
                .find(|s| s.stage == name)
                .map(|s| {
                    s.depends_on
                        .iter()
                        .map(|d| 1 + walk(status, d, seen + 1))
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(0)
        }
        walk(status, name, 0)
    };
    let names: Vec<String> = status
        .stages
        .iter()
        .map(|s| match depth(&s.stage) {
            0 => s.stage.clone(),
            d => format!("{}└─ {}", "   ".repeat(d - 1), s.stage),
        })
        .collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    for (s, name) in status.stages.iter().zip(&names) {
        let counts = if s.total > 0 {
            format!(
                "{}/{} complete, {} failed, {} to do",
                s.complete,
                s.total,
                s.failed,
                s.pending + s.running
            )
        } else {
            String::new()
        };
        let waits = if s.depends_on.is_empty() || s.state != "waiting" {
            String::new()
        } else {
            format!("  waits on {}", s.depends_on.join(", "))
        };
        let reason = s
            .reason
            .as_deref()
            .map(|r| format!("  ({r})"))
            .unwrap_or_default();
        let pad = width - name.chars().count();
        out.push_str(&format!(
            "  {name}{}  {:<15}  {counts}{waits}{reason}\n",
            " ".repeat(pad),
            s.state
        ));
    }
    out
}
