//! The coordinator's commands, callable from tests as well as from `main`.

mod actions;
mod alerts;
mod dashboard;
mod metrics;
mod output;
mod pipeline;
mod serve;

use actions::Action;
use clap::{Args, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::input::{Format, DEFAULT_MAX_PAYLOAD_BYTES};
use tally::store::ConnectOptions;
use tally::{BatchSpec, PrepareOutcome, Store, StoreError};

/// Exit codes, documented in the README; schedulers branch on them.
pub mod exit {
    /// Done; for `wait`: every record is complete.
    pub const OK: u8 = 0;
    /// A runtime error (database error, conflict, missing batch).
    pub const ERROR: u8 = 1;
    /// `wait`: the batch finished, and some records failed.
    pub const FINISHED_WITH_FAILURES: u8 = 3;
    /// `wait`: the timeout passed before the batch finished.
    pub const TIMEOUT: u8 = 4;
    /// Bad usage: arguments or names.
    pub const USAGE: u8 = 64;
    /// Bad input data: malformed, duplicate, empty or oversized records.
    pub const DATA: u8 = 65;
    /// PostgreSQL is unreachable, refuses the login, or has no Tally schema.
    pub const UNAVAILABLE: u8 = 69;
}

/// Default pause between two looks at a batch in `wait`.
pub const DEFAULT_WAIT_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Prepare batches of records, watch them and retry their failures"
)]
pub struct Cli {
    /// PostgreSQL URL, e.g. postgres://user@host:5432/db?sslmode=verify-full
    #[arg(long, global = true, env = tally::store::ENV_DATABASE_URL, hide_env_values = true)]
    database_url: Option<String>,
    /// File holding the whole database URL (e.g. a mounted Secret), instead of --database-url.
    #[arg(long, global = true, env = tally::store::ENV_DATABASE_URL_FILE, value_name = "PATH")]
    database_url_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the server's certificate.
    #[arg(long, global = true, env = tally::store::ENV_DB_CA_FILE, value_name = "PATH")]
    db_ca_file: Option<PathBuf>,
    /// TLS: disable, prefer, require, verify-ca or verify-full [default: the URL's sslmode,
    /// else prefer].
    #[arg(long, global = true, env = tally::store::ENV_DB_SSLMODE, value_parser = clap::builder::ValueParser::new(str::parse::<tally::store::SslMode>))]
    db_sslmode: Option<tally::store::SslMode>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply pending schema migrations (safe to run from several replicas at once).
    Migrate,
    /// Write one outbox row per input record; idempotent.
    Prepare(PrepareArgs),
    /// State, counts, rate and ETA of one batch or all.
    Status {
        batch: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Block until a batch finishes. Exit 0: all complete; 3: finished with failures; 4: timeout.
    Wait {
        batch: String,
        /// Give up after this long (e.g. 30m).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Pause between looks.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        interval: Duration,
    },
    /// List failed records with their attempts and last error, or (--group-by error) their
    /// causes.
    Failed {
        batch: String,
        #[arg(long)]
        json: bool,
        /// Records listed, or with --group-by, groups listed.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// `error`: one line per cause (the message with quoted values, ids and numbers
        /// folded), with its count, first and last failure, sample ids and the key that
        /// `retry-failed --group` takes.
        #[arg(long, value_parser = ["error"])]
        group_by: Option<String>,
    },
    /// Stop workers from claiming a batch; running records finish.
    Pause { batch: String },
    /// Let workers claim a paused batch again, and close its queue's circuit breaker.
    Resume { batch: String },
    /// Cancel a batch: its pending and running records become cancelled.
    Cancel { batch: String },
    /// Serve per-batch progress on /metrics (Prometheus), /healthz and /readyz, and send
    /// alert webhooks; runs until SIGTERM. Several replicas may run at once.
    Serve(serve::ServeArgs),
    /// Remove finished batches, or batches whose prepare was interrupted, with their records
    /// (alerts stay). Batches with records pending or running are refused.
    Purge {
        /// Batches to remove.
        #[arg(required_unless_present = "interrupted")]
        batches: Vec<String>,
        /// Also remove every batch whose prepare was interrupted (`status` shows them).
        #[arg(long)]
        interrupted: bool,
    },
    /// Pipelines: runs of batches that depend on each other (see docs/pipelines.md).
    Pipeline {
        #[command(subcommand)]
        command: pipeline::PipelineCommand,
    },
    /// Send a batch's failed records back to pending.
    RetryFailed {
        batch: String,
        /// Give each record its full attempt budget again (default: one more attempt).
        #[arg(long)]
        reset_attempts: bool,
        /// Only the failed records of this cause: a key from `failed --group-by error`.
        #[arg(long)]
        group: Option<String>,
    },
}

#[derive(Args, Debug)]
struct PrepareArgs {
    /// Batch name: letters, digits, '.', '_', '-', ':'.
    batch: String,
    #[arg(long)]
    queue: String,
    /// Input file, or '-' for standard input.
    #[arg(
        long,
        conflicts_with = "from_query",
        required_unless_present = "from_query"
    )]
    from_file: Option<PathBuf>,
    /// A SELECT whose rows become the records, run inside PostgreSQL.
    #[arg(long)]
    from_query: Option<String>,
    #[arg(long, default_value = "jsonl")]
    format: Format,
    /// Field (or column) holding each record's unique id.
    #[arg(long, default_value = "id")]
    id_field: String,
    #[arg(long, default_value_t = 5)]
    max_attempts: i32,
    /// First retry delay; doubles per attempt, with full jitter.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    backoff_base: Duration,
    /// Longest retry delay.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    backoff_max: Duration,
    /// Pause the batch once more than this many records have failed (resume lifts it).
    #[arg(long)]
    max_failed: Option<i64>,
    /// Pause the batch once more than this share (0..1) of its records has failed.
    #[arg(long)]
    max_failed_ratio: Option<f64>,
    /// Largest accepted record, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    max_payload_bytes: usize,
    /// How long to wait for another session that holds the batch (a prepare still running,
    /// or a killed one whose session the server has not ended yet).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    lock_wait: Duration,
    /// How long to keep retrying a lost connection or a restarting server, from the start.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
}

/// Runs one command; returns the process exit code. Messages go to stderr (as JSON lines when
/// logging was set up with the JSON format), results to stdout.
pub async fn run(cli: Cli) -> u8 {
    match execute(cli).await {
        Ok(code) => code,
        Err(e) => {
            tally::logging::report("coordinator", &e);
            exit_code_of(&e)
        }
    }
}

/// Progress may be drawn on stderr: it is a terminal, and not reserved for JSON log lines.
fn interactive_stderr() -> bool {
    std::io::stderr().is_terminal()
        && tally::logging::installed_format() != Some(tally::logging::LogFormat::Json)
}

fn exit_code_of(e: &StoreError) -> u8 {
    match e {
        StoreError::BadUrl(_) | StoreError::Invalid(_) | StoreError::NoRecords(_) => exit::USAGE,
        StoreError::Input(_) => exit::DATA,
        StoreError::Connect { .. }
        | StoreError::SchemaMissing { .. }
        | StoreError::SchemaOutdated { .. } => exit::UNAVAILABLE,
        _ => exit::ERROR,
    }
}

async fn connect(db: &tally::store::ConnectOptions, schema: bool) -> Result<Store, StoreError> {
    connect_retrying(db, schema, Duration::ZERO).await
}

/// Like [`connect`], trying again for up to `retry_for` while the session is lost or the
/// server restarts (an unreachable server is reported at once, as before).
async fn connect_retrying(
    db: &tally::store::ConnectOptions,
    schema: bool,
    retry_for: Duration,
) -> Result<Store, StoreError> {
    let deadline = Instant::now() + retry_for;
    let mut delay = tally::store::RETRY_BACKOFF_MIN;
    loop {
        let attempt = async {
            let store = Store::connect_with(db, 2).await?;
            if schema {
                store.check_schema().await?;
            }
            Ok::<_, StoreError>(store)
        }
        .await;
        match attempt {
            Err(e @ StoreError::Db { .. })
                if e.is_transient() && Instant::now() + delay < deadline =>
            {
                tracing::warn!("{e}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(tally::store::RETRY_BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

async fn execute(cli: Cli) -> Result<u8, StoreError> {
    let db = tally::store::ConnectOptions::from_flags(
        cli.database_url.as_deref(),
        cli.database_url_file.as_deref(),
        cli.db_ca_file.clone(),
        cli.db_sslmode,
        false,
    )
    // Every command connects. A database flag that cannot be used is bad usage (exit 64),
    // whatever went wrong reading it; a bad URL keeps its own message.
    .map_err(|e| match e {
        StoreError::BadUrl(m) => StoreError::BadUrl(m),
        other => StoreError::Invalid(other.to_string()),
    })?;
    match cli.command {
        Command::Migrate => {
            let store = connect(&db, false).await?;
            let applied = store.migrate().await?;
            if applied.is_empty() {
                println!("schema of {} is up to date", store.target());
            } else {
                println!("applied to {}: {}", store.target(), applied.join(", "));
            }
            Ok(exit::OK)
        }
        Command::Prepare(args) => {
            let store = connect_retrying(&db, true, args.retry_for).await?;
            prepare(&store, args).await
        }
        Command::Status { batch, json } => {
            let store = connect(&db, true).await?;
            let statuses = store.batch_status(batch.as_deref()).await?;
            if json {
                output::print_json(&statuses, batch.is_some());
            } else {
                output::print_status_table(&statuses);
            }
            Ok(exit::OK)
        }
        Command::Wait {
            batch,
            timeout,
            interval,
        } => wait(&connect(&db, true).await?, &batch, timeout, interval).await,
        Command::Failed {
            batch,
            json,
            limit,
            group_by: Some(_),
        } => {
            let store = connect(&db, true).await?;
            let groups = store.failure_groups(&batch, limit.max(0)).await?;
            if json {
                output::print_json(&groups, false);
            } else {
                output::print_failure_groups(&groups);
            }
            Ok(exit::OK)
        }
        Command::Failed {
            batch, json, limit, ..
        } => {
            let store = connect(&db, true).await?;
            let failed = store.failed_records(&batch, limit.max(0)).await?;
            if json {
                output::print_json(&failed, false);
            } else {
                output::print_failed_table(&failed);
            }
            Ok(exit::OK)
        }
        Command::Pause { batch } => act(&db, Action::Pause { batch }).await,
        Command::Resume { batch } => act(&db, Action::Resume { batch }).await,
        Command::Cancel { batch } => act(&db, Action::Cancel { batch }).await,
        Command::Serve(args) => {
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(serve::stop_on_signal(stop.clone()));
            serve::run(&db, args, stop).await
        }
        Command::Purge {
            batches,
            interrupted,
        } => purge(&connect(&db, true).await?, batches, interrupted).await,
        Command::Pipeline { command } => {
            // A bad file is reported before any connection is made.
            let loaded = match &command {
                pipeline::PipelineCommand::Run { file, .. }
                | pipeline::PipelineCommand::Backfill(pipeline::BackfillArgs { file, .. }) => {
                    match pipeline::load(file) {
                        Ok(p) => Some(p),
                        Err(code) => return Ok(code),
                    }
                }
                _ => None,
            };
            pipeline::execute(&connect(&db, true).await?, command, loaded).await
        }
        Command::RetryFailed {
            batch,
            reset_attempts,
            group,
        } => {
            let action = Action::RetryFailed {
                batch,
                group,
                reset_attempts,
            };
            act(&db, action).await
        }
    }
}

/// Takes an operator action as the CLI's user, and prints what it did.
async fn act(db: &ConnectOptions, action: Action) -> Result<u8, StoreError> {
    let store = connect(db, true).await?;
    let done = action.run(&store, &actions::cli_actor()).await?;
    println!("{}", done.message);
    Ok(exit::OK)
}

async fn prepare(store: &Store, args: PrepareArgs) -> Result<u8, StoreError> {
    let spec = BatchSpec {
        name: args.batch.clone(),
        queue: args.queue,
        id_field: args.id_field,
        max_attempts: args.max_attempts,
        backoff_base: args.backoff_base,
        backoff_max: args.backoff_max,
        max_failed: args.max_failed,
        max_failed_ratio: args.max_failed_ratio,
    };
    let policy = tally::store::PreparePolicy {
        lock_wait: args.lock_wait,
        retry_for: args.retry_for,
    };
    let started = Instant::now();
    let outcome = match (args.from_file, args.from_query) {
        (Some(path), _) => {
            let progress = output::progress_bar(interactive_stderr());
            let callback = progress
                .clone()
                .map(|bar| Arc::new(move |n: u64| bar.set_position(n)) as tally::store::Progress);
            let input = if path.as_os_str() == "-" {
                tally::store::PrepareInput::Stream(Box::new(std::io::stdin()))
            } else {
                tally::store::PrepareInput::File(path.clone())
            };
            let result = store
                .prepare_input(
                    &spec,
                    input,
                    args.format,
                    args.max_payload_bytes,
                    callback,
                    &policy,
                )
                .await;
            if let Some(bar) = progress {
                bar.finish_and_clear();
            }
            result.map_err(|e| name_file(e, &path))?
        }
        (None, Some(query)) => store.prepare_query(&spec, &query, &policy).await?,
        (None, None) => {
            return Err(StoreError::Invalid(
                "give --from-file <path|-> or --from-query \"<SELECT …>\"".into(),
            ))
        }
    };
    let secs = started.elapsed().as_secs_f64();
    match outcome {
        PrepareOutcome::Prepared { records } => println!(
            "batch {} prepared: {records} records in {secs:.1}s ({:.0} records/s); ready",
            args.batch,
            records as f64 / secs.max(1e-9)
        ),
        PrepareOutcome::AlreadyPrepared { records } => println!(
            "batch {} was already prepared from this input ({records} records); nothing added",
            args.batch
        ),
    }
    Ok(exit::OK)
}

/// Purges the named batches, then (with `interrupted`) every interrupted one. Goes on past
/// a batch that cannot be purged, and fails at the end if any could not.
async fn purge(
    store: &Store,
    mut batches: Vec<String>,
    interrupted: bool,
) -> Result<u8, StoreError> {
    if interrupted {
        for status in store.batch_status(None).await? {
            if status.state == "interrupted" && !batches.contains(&status.batch) {
                batches.push(status.batch);
            }
        }
        if batches.is_empty() {
            println!("no interrupted batches");
        }
    }
    let mut refused = 0;
    for batch in &batches {
        match store.purge(batch).await {
            Ok(records) => println!("batch {batch} purged: {records} records removed"),
            Err(e) => {
                tally::logging::report("coordinator", &e);
                refused += 1;
            }
        }
    }
    if refused > 0 {
        return Err(StoreError::Conflict(format!(
            "{refused} of {} batches were not purged (see above)",
            batches.len()
        )));
    }
    Ok(exit::OK)
}

/// Puts the file's name in front of input errors ("data.jsonl: line 3: …").
fn name_file(e: StoreError, path: &std::path::Path) -> StoreError {
    let name = if path.as_os_str() == "-" {
        "<stdin>".to_string()
    } else {
        path.display().to_string()
    };
    match e {
        StoreError::Input(input) => StoreError::Input(input.in_file(&name)),
        StoreError::Invalid(msg) if msg.starts_with("line ") => {
            StoreError::Input(tally::input::InputError::Rejected(format!("{name}: {msg}")))
        }
        other => other,
    }
}

async fn wait(
    store: &Store,
    batch: &str,
    timeout: Option<Duration>,
    interval: Duration,
) -> Result<u8, StoreError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let interactive = interactive_stderr();
    loop {
        let statuses = store.batch_status(Some(batch)).await?;
        let Some(status) = statuses.first() else {
            return Err(StoreError::BatchNotFound(batch.to_string()));
        };
        if interactive {
            eprint!("\r{}   ", output::status_line(status));
        }
        if status.state == "interrupted" {
            if interactive {
                eprintln!();
            }
            return Err(StoreError::Conflict(format!(
                "batch {batch} was interrupted while being prepared: run prepare again, or \
                 remove it with `coordinator purge {batch}`"
            )));
        }
        if status.is_finished() {
            if interactive {
                eprintln!();
            }
            println!("{}", output::status_line(status));
            return Ok(if status.failed > 0 || status.state == "cancelled" {
                exit::FINISHED_WITH_FAILURES
            } else {
                exit::OK
            });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if interactive {
                eprintln!();
            }
            let line = output::status_line(status);
            tally::logging::report(
                "coordinator",
                format!("timed out waiting for batch {batch}: {line}"),
            );
            return Ok(exit::TIMEOUT);
        }
        tokio::time::sleep(interval).await;
    }
}
