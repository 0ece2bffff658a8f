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
}

/// Claims records of a queue under a lease and processes them.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// PostgreSQL URL, e.g. postgres://user@host:5432/db
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Queue to take records from.
    #[arg(long, env = "TALLY_QUEUE")]
    queue: String,
    #[arg(long, value_enum, env = "TALLY_HANDLER")]
    handler: HandlerKind,
    /// Statement for --handler sql: $1 record id (text), $2 payload (jsonb), $3 batch (text).
    #[arg(long, env = "TALLY_SQL")]
    sql: Option<String>,
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
    /// draining) on this address, e.g. 0.0.0.0:9464. Off unless given.
    #[arg(long, env = "TALLY_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Lease owner name (default: host-pid-random).
    #[arg(long, env = "TALLY_WORKER_ID")]
    worker_id: Option<String>,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
    if let Some(addr) = args.listen {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("worker: cannot listen on --listen {addr}: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let (health, metrics, stop) = (health.clone(), metrics.clone(), http_stop.clone());
        tokio::spawn(async move {
            if let Err(e) = tally_worker::health::serve(listener, health, metrics, stop).await {
                tracing::warn!("health endpoints stopped: {e}");
            }
        });
    }
    let _stop_http = http_stop.drop_guard();
    let store = match connect(&args.database_url, pool_size, &shutdown, &health).await {
        Ok(Some(store)) => store,
        Ok(None) => return ExitCode::SUCCESS,
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
    url: &str,
    pool_size: usize,
    shutdown: &CancellationToken,
    health: &Health,
) -> Result<Option<tally::Store>, tally::StoreError> {
    let mut delay = CONNECT_RETRY_MIN;
    loop {
        match tally::Store::connect(url, pool_size).await {
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
