//! `worker`: claims records of a queue and processes them until SIGTERM/SIGINT.

use clap::{Parser, ValueEnum};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tally_worker::{Health, NoopHandler, Processor, Worker, WorkerConfig, WorkerError};
use tokio_util::sync::CancellationToken;

/// Exit code for bad usage or configuration (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Backoff between connection attempts while the database is unreachable.
const CONNECT_RETRY_MIN: Duration = Duration::from_millis(250);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, ValueEnum)]
enum HandlerKind {
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
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// PostgreSQL URL, e.g. postgres://user@host:5432/db?sslmode=verify-full
    #[arg(long, env = tally::store::ENV_DATABASE_URL, hide_env_values = true)]
    database_url: Option<String>,
    /// File holding the whole database URL (e.g. a mounted Secret), instead of --database-url.
    #[arg(long, env = tally::store::ENV_DATABASE_URL_FILE, value_name = "PATH")]
    database_url_file: Option<std::path::PathBuf>,
    /// PEM file of the CA certificates that sign the server's certificate.
    #[arg(long, env = tally::store::ENV_DB_CA_FILE, value_name = "PATH")]
    db_ca_file: Option<std::path::PathBuf>,
    /// TLS: disable, prefer, require, verify-ca or verify-full [default: the URL's sslmode,
    /// else prefer].
    #[arg(long, env = tally::store::ENV_DB_SSLMODE, value_parser = clap::builder::ValueParser::new(str::parse::<tally::store::SslMode>))]
    db_sslmode: Option<tally::store::SslMode>,
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
    #[arg(long, env = "TALLY_CONCURRENCY", default_value_t = tally_worker::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Most rows taken per claim.
    #[arg(long, env = "TALLY_CLAIM_SIZE", default_value_t = tally_worker::DEFAULT_CLAIM_SIZE)]
    claim_size: usize,
    /// Records per transaction of the sql handler.
    #[arg(long, env = "TALLY_SQL_CHUNK", default_value_t = tally_worker::DEFAULT_SQL_CHUNK)]
    sql_chunk: usize,
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
    #[arg(long, env = "TALLY_BREAKER_THRESHOLD", default_value_t = tally_worker::DEFAULT_BREAKER_THRESHOLD)]
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
    #[arg(long, env = tally_worker::health::ENV_LISTEN, value_name = "ADDR|off")]
    listen: Option<tally_worker::health::Listen>,
    /// Lease owner name (default: host-pid-random).
    #[arg(long, env = "TALLY_WORKER_ID")]
    worker_id: Option<String>,
    /// Log lines on stderr: text (human-readable) or json (one object per line). The level
    /// comes from RUST_LOG (default info).
    #[arg(long, env = tally::logging::ENV_LOG_FORMAT, value_name = "text|json", default_value_t = tally::logging::DEFAULT_LOG_FORMAT)]
    log_format: tally::logging::LogFormat,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = tally::logging::init(args.log_format, "info") {
        eprintln!("worker: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let mut config = WorkerConfig::new(&args.queue);
    config.concurrency = args.concurrency;
    config.claim_size = args.claim_size;
    config.lease = args.lease;
    config.poll_interval = args.poll_interval;
    config.rescue_interval = args.rescue_interval;
    config.grace_period = args.grace_period;
    config.breaker = tally::BreakerPolicy {
        threshold: args.breaker_threshold,
        cooldown: args.breaker_cooldown,
        max_cooldown: args.breaker_max_cooldown,
    };
    if let Some(id) = args.worker_id {
        config.worker_id = id;
    }
    let mut problems = config.validate().err().unwrap_or_default();
    let db = tally::store::ConnectOptions::from_flags(
        args.database_url.as_deref(),
        args.database_url_file.as_deref(),
        args.db_ca_file.clone(),
        args.db_sslmode,
        args.pgbouncer,
    );
    let db = match db {
        Ok(db) => db,
        Err(e) => {
            problems.push(e.to_string());
            tally::store::ConnectOptions::default()
        }
    };
    let processor = match (args.handler, args.sql) {
        (HandlerKind::Sql, Some(statement)) if !statement.trim().is_empty() => Processor::Sql {
            statement,
            chunk_size: args.sql_chunk.max(1),
        },
        (HandlerKind::Sql, _) => {
            problems.push("--handler sql needs --sql \"<statement>\"".into());
            Processor::Handler(Arc::new(NoopHandler))
        }
        (HandlerKind::Noop, _) => Processor::Handler(Arc::new(NoopHandler)),
        (HandlerKind::Http | HandlerKind::Exec, _) => Processor::Handler(Arc::new(NoopHandler)),
    };
    let processor = match args.handler_flags.handler(args.handler) {
        Ok(Some(handler)) => Processor::Handler(handler),
        Ok(None) => processor,
        Err(more) => {
            problems.extend(more);
            processor
        }
    };
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("worker: {p}");
        }
        return ExitCode::from(EXIT_USAGE);
    }
    // Claims, completions, renewals, rescue, plus one transaction per concurrent SQL chunk.
    let pool_size = config.concurrency.min(64) + 4;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    let health = Health::new();
    let metrics = match tally::metrics::WorkerMetrics::new(&config.queue) {
        Ok(m) => Arc::new(m),
        Err(e) => {
            eprintln!("worker: cannot set up metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let http_stop = CancellationToken::new();
    let listener = match tally_worker::health::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(listener) = listener {
        let (health, metrics, stop) = (health.clone(), metrics.clone(), http_stop.clone());
        tokio::spawn(async move {
            if let Err(e) = tally_worker::health::serve(listener, health, metrics, stop).await {
                tracing::warn!("health endpoints stopped: {e}");
            }
        });
    }
    let _stop_http = http_stop.drop_guard();
    let store = match connect(&db, pool_size, &shutdown, &health).await {
        Ok(Some(store)) => store,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e @ tally::StoreError::BadUrl(_)) => {
            eprintln!("worker: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Worker::new(store, config, processor)
        .with_health(health)
        .with_metrics(metrics)
        .run(shutdown)
        .await
    {
        Ok(_) => ExitCode::SUCCESS,
        Err(WorkerError::Config(problems)) => {
            for p in &problems {
                eprintln!("worker: {p}");
            }
            ExitCode::from(EXIT_USAGE)
        }
        Err(e @ WorkerError::Store(tally::StoreError::Invalid(_))) => {
            eprintln!("worker: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connects, waiting with capped backoff while the server is unreachable (a worker may start
/// before its database, or during a restart). `None` when stopped while waiting.
async fn connect(
    db: &tally::store::ConnectOptions,
    pool_size: usize,
    shutdown: &CancellationToken,
    health: &Health,
) -> Result<Option<tally::Store>, tally::StoreError> {
    let mut delay = CONNECT_RETRY_MIN;
    loop {
        match tally::Store::connect_with(db, pool_size).await {
            Ok(store) => return Ok(Some(store)),
            Err(e) if e.is_transient_connect() => {
                health.set_connected(false);
                tracing::warn!("{e}; retrying in {delay:?}");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(CONNECT_RETRY_MAX);
    }
}

/// First SIGTERM/SIGINT: drain. Second: exit at once (leases then expire as after a crash).
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!(
        "stopping: no new claims, finishing in-flight records (signal again to stop now)"
    );
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
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
    method: Option<tally_worker::handlers::HttpMethod>,
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
        use tally_worker::handlers::{http, ExecConfig, ExecHandler, HttpConfig, HttpHandler};
        let mut problems = Vec::new();
        let is_http = matches!(kind, HandlerKind::Http);
        let is_exec = matches!(kind, HandlerKind::Exec);
        let misplaced = [
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
        for (flag, given, used, by) in misplaced {
            if given && !used {
                problems.push(format!("{flag} is only used by --handler {by}"));
            }
        }
        let handler: Option<Arc<dyn tally::Handler>> = match kind {
            HandlerKind::Http => {
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
            HandlerKind::Exec => match &self.command {
                None => {
                    problems.push("--handler exec needs --command 'program args…'".into());
                    None
                }
                Some(command) => match ExecConfig::from_command_line(command, self.shell) {
                    Ok(mut config) => {
                        config.timeout = self
                            .timeout
                            .unwrap_or(tally_worker::handlers::exec::DEFAULT_TIMEOUT);
                        match ExecHandler::new(config) {
                            Ok(handler) => Some(Arc::new(handler)),
                            Err(e) => {
                                problems.extend(e.0);
                                None
                            }
                        }
                    }
                    Err(e) => {
                        problems.extend(e.0);
                        None
                    }
                },
            },
            HandlerKind::Sql | HandlerKind::Noop => None,
        };
        if problems.is_empty() {
            Ok(handler)
        } else {
            Err(problems)
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
