//! The `worker` command line: its flags (each with an environment variable), their conversion
//! into a [`WorkerConfig`] and a [`Processor`] with every problem reported at once, and the run
//! of one worker process. `main` parses, installs the signal handlers and calls [`run`].

use crate::handlers::{exec, http, ExecConfig, ExecHandler, HttpConfig, HttpHandler, HttpMethod};
use crate::health::{self, Listen};
use crate::{Health, NoopHandler, Processor, Worker, WorkerConfig, WorkerError};
use clap::ValueEnum;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tally::logging::LogFormat;
use tally::store::{ConnectOptions, SslMode};
use tally::StoreError;
use tokio_util::sync::CancellationToken;

/// Exit code of a run that stopped as asked.
pub const EXIT_OK: u8 = 0;
/// Exit code when the database failed or another error stopped the worker.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage or configuration (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// How records are processed (`--handler`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HandlerKind {
    /// Run --sql per record in the transaction that completes it.
    Sql,
    /// Complete every record without doing anything (benchmarks).
    Noop,
    /// Send each payload as JSON to --url.
    Http,
    /// Run --command once per record, the payload as JSON on its stdin.
    Exec,
}

/// Claims records of a queue under a lease and processes them.
#[derive(clap::Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// PostgreSQL URL, e.g. postgres://user@host:5432/db?sslmode=verify-full
    #[arg(long, env = tally::store::ENV_DATABASE_URL, hide_env_values = true)]
    database_url: Option<String>,
    /// File holding the whole database URL (e.g. a mounted Secret), instead of --database-url.
    #[arg(long, env = tally::store::ENV_DATABASE_URL_FILE, value_name = "PATH")]
    database_url_file: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the server's certificate.
    #[arg(long, env = tally::store::ENV_DB_CA_FILE, value_name = "PATH")]
    db_ca_file: Option<PathBuf>,
    /// TLS: disable, prefer, require, verify-ca or verify-full [default: the URL's sslmode,
    /// else prefer].
    #[arg(long, env = tally::store::ENV_DB_SSLMODE, value_parser = clap::builder::ValueParser::new(str::parse::<SslMode>))]
    db_sslmode: Option<SslMode>,
    /// The URL points at PgBouncer in transaction pooling mode: poll instead of LISTEN, and
    /// keep no statement past its transaction.
    #[arg(long, env = tally::store::ENV_PGBOUNCER)]
    pgbouncer: bool,
    /// Queue to take records from.
    #[arg(long, env = "TALLY_QUEUE")]
    queue: String,
    #[arg(long, value_enum, env = "TALLY_HANDLER")]
    handler: HandlerKind,
    /// Statement for --handler sql: $1 record id (text), $2 payload (jsonb), $3 batch (text).
    #[arg(long, env = "TALLY_SQL")]
    sql: Option<String>,
    #[command(flatten)]
    handler_flags: HandlerFlags,
    /// Records (or SQL transactions) processed at once.
    #[arg(long, env = "TALLY_CONCURRENCY", default_value_t = crate::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Most rows taken per claim.
    #[arg(long, env = "TALLY_CLAIM_SIZE", default_value_t = crate::DEFAULT_CLAIM_SIZE)]
    claim_size: usize,
    /// Records per transaction of the sql handler [default: 100].
    // No clap default: a value given to another handler must be seen, to be refused.
    #[arg(long, env = "TALLY_SQL_CHUNK")]
    sql_chunk: Option<usize>,
    /// Lease on claimed rows; renewed while they are processed.
    #[arg(long, env = "TALLY_LEASE", default_value = "60s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Fallback poll when no notification arrives.
    #[arg(long, env = "TALLY_POLL_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// How often to look for expired leases of dead workers.
    #[arg(long, env = "TALLY_RESCUE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    rescue_interval: Duration,
    /// Time given to in-flight records after SIGTERM.
    #[arg(long, env = "TALLY_GRACE_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    grace_period: Duration,
    /// Retryable failures in a row, across all workers, that open the queue's circuit breaker.
    #[arg(long, env = "TALLY_BREAKER_THRESHOLD", default_value_t = crate::DEFAULT_BREAKER_THRESHOLD)]
    breaker_threshold: i64,
    /// How long an open breaker keeps every worker off the queue before one probe.
    #[arg(long, env = "TALLY_BREAKER_COOLDOWN", default_value = "30s", value_parser = humantime::parse_duration)]
    breaker_cooldown: Duration,
    /// Longest cool-down (it doubles after each failed probe).
    #[arg(long, env = "TALLY_BREAKER_MAX_COOLDOWN", default_value = "10m", value_parser = humantime::parse_duration)]
    breaker_max_cooldown: Duration,
    /// Serve /metrics (Prometheus), /healthz (the loop runs) and /readyz (connected, not
    /// draining) on this address, or `off` [default: 0.0.0.0:9460; when another worker on
    /// this host holds it, this one runs without endpoints].
    #[arg(long, env = health::ENV_LISTEN, value_name = "ADDR|off")]
    listen: Option<Listen>,
    /// Lease owner name (default: host-pid-random).
    #[arg(long, env = "TALLY_WORKER_ID")]
    worker_id: Option<String>,
    /// Log lines on stderr: text (human-readable) or json (one object per line). The level
    /// comes from RUST_LOG (default info).
    #[arg(long, env = tally::logging::ENV_LOG_FORMAT, value_name = "text|json", default_value_t = tally::logging::DEFAULT_LOG_FORMAT)]
    log_format: LogFormat,
}

/// What the flags ask for, validated.
pub struct Settings {
    /// The worker's behaviour.
    pub config: WorkerConfig,
    /// Where the database is, and how to reach it.
    pub db: ConnectOptions,
    /// What is done with each record.
    pub processor: Processor,
}

impl Args {
    /// `--log-format`.
    pub fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// The settings the flags describe, or every problem with them at once.
    pub fn settings(&self) -> Result<Settings, Vec<String>> {
        let config = self.config();
        let mut problems = config.validate().err().unwrap_or_default();
        let db = ConnectOptions::from_flags(
            self.database_url.as_deref(),
            self.database_url_file.as_deref(),
            self.db_ca_file.clone(),
            self.db_sslmode,
            self.pgbouncer,
        )
        .unwrap_or_else(|e| {
            problems.push(e.to_string());
            ConnectOptions::default()
        });
        let processor = self.processor().unwrap_or_else(|more| {
            problems.extend(more);
            Processor::Handler(Arc::new(NoopHandler))
        });
        if problems.is_empty() {
            Ok(Settings {
                config,
                db,
                processor,
            })
        } else {
            Err(problems)
        }
    }

    fn config(&self) -> WorkerConfig {
        let mut config = WorkerConfig::new(&self.queue);
        config.concurrency = self.concurrency;
        config.claim_size = self.claim_size;
        config.lease = self.lease;
        config.poll_interval = self.poll_interval;
        config.rescue_interval = self.rescue_interval;
        config.grace_period = self.grace_period;
        config.breaker = tally::BreakerPolicy {
            threshold: self.breaker_threshold,
            cooldown: self.breaker_cooldown,
            max_cooldown: self.breaker_max_cooldown,
        };
        if let Some(id) = &self.worker_id {
            config.worker_id = id.clone();
        }
        config
    }

    /// `--handler` with its flags; every problem at once.
    fn processor(&self) -> Result<Processor, Vec<String>> {
        let mut problems = Vec::new();
        let sql = match (self.handler, &self.sql) {
            (HandlerKind::Sql, Some(statement)) if !statement.trim().is_empty() => {
                Some(Processor::Sql {
                    statement: statement.clone(),
                    chunk_size: self.sql_chunk.unwrap_or(crate::DEFAULT_SQL_CHUNK).max(1),
                })
            }
            (HandlerKind::Sql, _) => {
                problems.push("--handler sql needs --sql \"<statement>\"".into());
                None
            }
            _ => None,
        };
        if !matches!(self.handler, HandlerKind::Sql) {
            for (flag, given) in [
                // An empty value (e.g. TALLY_SQL= passed through by compose) is no statement.
                (
                    "--sql",
                    self.sql.as_deref().is_some_and(|s| !s.trim().is_empty()),
                ),
                ("--sql-chunk", self.sql_chunk.is_some()),
            ] {
                if given {
                    problems.push(format!("{flag} is only used by --handler sql"));
                }
            }
        }
        let handler = self
            .handler_flags
            .handler(self.handler)
            .unwrap_or_else(|more| {
                problems.extend(more);
                None
            });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(match (sql, handler) {
            (_, Some(handler)) => Processor::Handler(handler),
            (Some(sql), None) => sql,
            (None, None) => Processor::Handler(Arc::new(NoopHandler)),
        })
    }
}

/// Runs one worker process as the flags say until `shutdown` fires (the binary cancels it on
/// SIGTERM/SIGINT), and returns its exit code: [`EXIT_USAGE`] for bad flags or a statement
/// the database refuses, [`EXIT_FAILURE`] when the database failed. Problems go to stderr.
pub async fn run(args: Args, shutdown: CancellationToken) -> u8 {
    let Settings {
        config,
        db,
        processor,
    } = match args.settings() {
        Ok(settings) => settings,
        Err(problems) => return report(&problems, EXIT_USAGE),
    };
    // Claims, completions, renewals, rescue, plus one transaction per concurrent SQL chunk.
    let pool_size = config.concurrency.min(64) + 4;
    let health = Health::new();
    let metrics = match tally::metrics::WorkerMetrics::new(&config.queue) {
        Ok(m) => Arc::new(m),
        Err(e) => return report(&[format!("cannot set up metrics: {e}")], EXIT_FAILURE),
    };
    let _endpoints = match health::start(args.listen, health.clone(), metrics.clone()).await {
        Ok(guard) => guard,
        Err(e) => return report(&[e], EXIT_USAGE),
    };
    let waiting = || health.set_connected(false);
    let store = match tally::Store::connect_waiting(&db, pool_size, &shutdown, waiting).await {
        Ok(Some(store)) => store,
        Ok(None) => return EXIT_OK,
        Err(e @ StoreError::BadUrl(_)) => return report(&[e], EXIT_USAGE),
        Err(e) => return report(&[e], EXIT_FAILURE),
    };
    match Worker::new(store, config, processor)
        .with_health(health)
        .with_metrics(metrics)
        .run(shutdown)
        .await
    {
        Ok(_) => EXIT_OK,
        Err(WorkerError::Config(problems)) => report(&problems, EXIT_USAGE),
        Err(e @ WorkerError::Store(StoreError::Invalid(_))) => report(&[e], EXIT_USAGE),
        Err(e) => report(&[e], EXIT_FAILURE),
    }
}

/// Writes each problem to stderr, as `worker: …` or a JSON line in the log format; returns
/// `code`.
fn report(problems: &[impl std::fmt::Display], code: u8) -> u8 {
    for p in problems {
        tally::logging::report("worker", p);
    }
    code
}

/// Prints what clap says about the command line (help and version on stdout, errors on
/// stderr) and returns the exit code. Errors come before `--log-format` is parsed, so the
/// format is read from the raw arguments and the environment: with json, an error is one
/// JSON line holding clap's message.
pub fn usage_error(e: &clap::Error) -> u8 {
    if !e.use_stderr() {
        let _ = e.print();
        return EXIT_OK;
    }
    match tally::logging::format_from_args(std::env::args_os()) {
        LogFormat::Text => {
            let _ = e.print();
        }
        LogFormat::Json => {
            tally::logging::report_in(LogFormat::Json, "worker", clap_message(e));
        }
    }
    EXIT_USAGE
}

/// clap's message without colours and without its `error: ` prefix (the level says it).
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let text = text.trim_end();
    text.strip_prefix("error: ").unwrap_or(text).to_string()
}

/// Flags of the http and exec handlers.
#[derive(clap::Args, Debug)]
struct HandlerFlags {
    /// URL for --handler http; may hold {id}, {batch} and {field} (a top-level payload
    /// field), each filled per record, e.g. `https://api.example.com/orders/{id}`
    #[arg(long, env = "TALLY_HTTP_URL")]
    url: Option<String>,
    /// Request method of --handler http: POST or PUT [default: POST]
    #[arg(long, env = "TALLY_HTTP_METHOD")]
    method: Option<HttpMethod>,
    /// Extra request header of --handler http, 'Name: value'; repeat for more (one per line
    /// in the environment variable).
    #[arg(
        long = "header",
        env = "TALLY_HTTP_HEADERS",
        hide_env_values = true,
        value_name = "NAME: VALUE",
        value_delimiter = '\n'
    )]
    headers: Vec<String>,
    /// Most bytes of a response body read by --handler http, e.g. 64KiB [default: 1MiB]
    #[arg(long, env = "TALLY_HTTP_MAX_BODY", value_parser = parse_size)]
    max_body: Option<usize>,
    /// Command of --handler exec, split into words like a shell does (quotes, backslashes;
    /// no variables, globs or pipes unless --shell), e.g. './import.py --strict'
    #[arg(long, env = "TALLY_EXEC_COMMAND")]
    command: Option<String>,
    /// Run --command with `sh -c` (pipes, redirections, variables).
    #[arg(long, env = "TALLY_EXEC_SHELL")]
    shell: bool,
    /// Time limit of one record for --handler http [default: 30s] or exec [default: 5m];
    /// past it the attempt is retried (exec: the command's process group is killed).
    #[arg(long, env = "TALLY_HANDLER_TIMEOUT", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

impl HandlerFlags {
    /// The http or exec handler, `None` for the others; every problem at once, including
    /// flags given to a handler that does not use them.
    fn handler(&self, kind: HandlerKind) -> Result<Option<Arc<dyn tally::Handler>>, Vec<String>> {
        let mut problems = self.misplaced(kind);
        let handler: Option<Arc<dyn tally::Handler>> = match kind {
            HandlerKind::Http => self.http(&mut problems),
            HandlerKind::Exec => self.exec(&mut problems),
            HandlerKind::Sql | HandlerKind::Noop => None,
        };
        if problems.is_empty() {
            Ok(handler)
        } else {
            Err(problems)
        }
    }

    /// Flags given to a handler that does not use them.
    fn misplaced(&self, kind: HandlerKind) -> Vec<String> {
        let is_http = matches!(kind, HandlerKind::Http);
        let is_exec = matches!(kind, HandlerKind::Exec);
        let flags = [
            ("--url", self.url.is_some(), is_http, "http"),
            ("--method", self.method.is_some(), is_http, "http"),
            ("--header", !self.headers.is_empty(), is_http, "http"),
            ("--max-body", self.max_body.is_some(), is_http, "http"),
            ("--command", self.command.is_some(), is_exec, "exec"),
            ("--shell", self.shell, is_exec, "exec"),
            (
                "--timeout",
                self.timeout.is_some(),
                is_http || is_exec,
                "http or exec",
            ),
        ];
        flags
            .into_iter()
            .filter(|(_, given, used, _)| *given && !used)
            .map(|(flag, _, _, by)| format!("{flag} is only used by --handler {by}"))
            .collect()
    }

    fn http(&self, problems: &mut Vec<String>) -> Option<Arc<dyn tally::Handler>> {
        let mut config = HttpConfig::new(self.url.clone().unwrap_or_default());
        if self.url.is_none() {
            problems.push("--handler http needs --url URL".into());
        }
        config.method = self.method.unwrap_or_default();
        for line in &self.headers {
            match http::parse_header(line) {
                Ok(header) => config.headers.push(header),
                Err(e) => problems.push(e),
            }
        }
        config.timeout = self.timeout.unwrap_or(http::DEFAULT_TIMEOUT);
        config.max_body = self.max_body.unwrap_or(http::DEFAULT_MAX_BODY);
        match (self.url.is_some(), HttpHandler::new(config)) {
            (true, Ok(handler)) => Some(Arc::new(handler)),
            (true, Err(e)) => {
                problems.extend(e.0);
                None
            }
            (false, _) => None,
        }
    }

    fn exec(&self, problems: &mut Vec<String>) -> Option<Arc<dyn tally::Handler>> {
        let Some(command) = &self.command else {
            problems.push("--handler exec needs --command 'program args…'".into());
            return None;
        };
        let handler = ExecConfig::from_command_line(command, self.shell).and_then(|mut config| {
            config.timeout = self.timeout.unwrap_or(exec::DEFAULT_TIMEOUT);
            ExecHandler::new(config)
        });
        match handler {
            Ok(handler) => Some(Arc::new(handler)),
            Err(e) => {
                problems.extend(e.0);
                None
            }
        }
    }
}

/// A byte size such as `1048576`, `64KiB` or `1MiB`.
fn parse_size(text: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = text
        .parse()
        .map_err(|e| format!("{text:?} is not a size such as 64KiB or 1MiB: {e}"))?;
    usize::try_from(size.as_u64()).map_err(|_| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_documented_sql_chunk_default_is_the_real_one() {
        let args = Args::try_parse_from(["worker", "--queue", "q", "--handler", "sql"]).unwrap();
        assert_eq!(args.sql_chunk, None);
        assert_eq!(
            crate::DEFAULT_SQL_CHUNK,
            100,
            "update --sql-chunk's help text"
        );
    }
}
