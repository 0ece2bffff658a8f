//! `coordinator serve`: per-batch progress on `/metrics` for Prometheus, `/healthz` and
//! `/readyz`, the operator dashboard at `/`, and alert webhooks. Any number of replicas may run: a scrape only reads, and
//! observations and deliveries are coordinated in PostgreSQL.

use crate::alerts::{self, Deliverer};
use crate::dashboard::auth::{self, Auth};
use crate::metrics::{render, ServeMetrics};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use clap::Args;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::heartbeat::Heartbeat;
use tally::store::progress::{AlertTargets, ObserveSettings};
use tally::store::ConnectOptions;
use tally::{Store, StoreError};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// Address `/metrics`, `/healthz` and `/readyz` are served on.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9461";
/// How long a finished batch stays on `/metrics`.
pub const DEFAULT_FINISHED_RETENTION: &str = "24h";
/// Pending work with no record finishing for this long raises a `stalled` alert.
pub const DEFAULT_STALL_AFTER: &str = "10m";
/// How often progress is compared and due alerts are sent.
pub const DEFAULT_CHECK_INTERVAL: &str = "10s";
/// How long a claimed alert delivery belongs to its replica: if that replica dies
/// mid-delivery, another one sends the alert once this has passed.
pub const DEFAULT_ALERT_LEASE: &str = "60s";
/// A scrape or readiness check that takes longer fails (before Prometheus' default 10 s
/// scrape timeout, so that it still gets `tally_serve_up 0`).
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections: scrapes, readiness, the observation pass and deliveries.
const POOL_SIZE: usize = 4;

/// Alert webhook URLs, comma-separated, used when no `--alert-webhook` is given.
pub const WEBHOOKS_ENV: &str = "TALLY_ALERT_WEBHOOKS";

/// The webhook URLs: the `--alert-webhook` values as given (each one URL, commas and all),
/// or else `env` (the value of [`WEBHOOKS_ENV`]) split at commas, empty entries skipped.
fn webhook_urls(
    flags: &[String],
    env: Result<String, std::env::VarError>,
) -> Result<Vec<String>, String> {
    if !flags.is_empty() {
        return Ok(flags.to_vec());
    }
    match env {
        Ok(list) => Ok(list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect()),
        Err(std::env::VarError::NotPresent) => Ok(Vec::new()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{WEBHOOKS_ENV} is not valid UTF-8")),
    }
}

/// Options of `coordinator serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address for /metrics, /healthz and /readyz (port 0: any free port, printed on start).
    #[arg(long, env = "TALLY_SERVE_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// How long finished batches stay on /metrics.
    #[arg(long, env = "TALLY_FINISHED_RETENTION", default_value = DEFAULT_FINISHED_RETENTION,
          value_parser = humantime::parse_duration)]
    finished_retention: Duration,
    /// Webhook URL for alerts (Slack-compatible JSON); repeat for several. Without the flag:
    /// TALLY_ALERT_WEBHOOKS, comma-separated.
    // Not clap's `env`: its delimiter would split flag values too, and a URL's query may
    // hold a comma. The variable is read in `webhook_urls`.
    #[arg(long = "alert-webhook")]
    alert_webhooks: Vec<String>,
    /// Raise `stalled` when work is pending but no record finished for this long.
    #[arg(long, env = "TALLY_STALL_AFTER", default_value = DEFAULT_STALL_AFTER,
          value_parser = humantime::parse_duration)]
    stall_after: Duration,
    /// How often progress is compared and due alerts are sent.
    #[arg(long, env = "TALLY_CHECK_INTERVAL", default_value = DEFAULT_CHECK_INTERVAL,
          value_parser = humantime::parse_duration)]
    check_interval: Duration,
    /// How long a replica holds an alert delivery it claimed (it bounds the request too).
    #[arg(long, env = "TALLY_ALERT_LEASE", default_value = DEFAULT_ALERT_LEASE,
          value_parser = humantime::parse_duration)]
    alert_lease: Duration,
    /// Enable the dashboard's actions (retry-failed, pause, resume, cancel, pipeline repair)
    /// for users with credentials: TALLY_DASHBOARD_TOKEN and/or --dashboard-users.
    #[arg(long, env = "TALLY_DASHBOARD_ACTIONS")]
    dashboard_actions: bool,
    /// File of dashboard users, one `user:password` or `user:sha256:<hex>` per line.
    #[arg(long, env = "TALLY_DASHBOARD_USERS")]
    dashboard_users: Option<std::path::PathBuf>,
}

/// What the HTTP handlers share with the background loop.
pub(crate) struct Shared {
    pub(crate) store: OnceCell<Store>,
    /// The dashboard's credentials, when its actions are enabled.
    pub(crate) dashboard: Option<Auth>,
    metrics: ServeMetrics,
    finished_retention: Duration,
    /// When the background loop last went round.
    loop_beat: Heartbeat,
    liveness_window: Duration,
}

/// Runs `serve` until `stop` fires. Bad options are reported all at once before anything
/// starts. The database may be down at start: `/readyz` says so until it answers.
pub async fn run(
    db: &ConnectOptions,
    args: ServeArgs,
    stop: CancellationToken,
) -> Result<u8, StoreError> {
    let mut problems = Vec::new();
    let urls =
        webhook_urls(&args.alert_webhooks, std::env::var(WEBHOOKS_ENV)).unwrap_or_else(|p| {
            problems.push(p);
            Vec::new()
        });
    let hooks = alerts::parse_webhooks(&urls).unwrap_or_else(|p| {
        problems.extend(p);
        Vec::new()
    });
    for (flag, value) in [
        ("--finished-retention", args.finished_retention),
        ("--stall-after", args.stall_after),
        ("--check-interval", args.check_interval),
        ("--alert-lease", args.alert_lease),
    ] {
        if value.is_zero() {
            problems.push(format!("{flag} must be longer than 0"));
        }
    }
    let dashboard = if args.dashboard_actions {
        let token = std::env::var(auth::TOKEN_ENV).ok();
        Auth::new(token, args.dashboard_users.as_deref())
            .map(Some)
            .unwrap_or_else(|p| {
                problems.push(p);
                None
            })
    } else {
        if args.dashboard_users.is_some() {
            problems.push("--dashboard-users is given without --dashboard-actions".into());
        }
        None
    };
    if !problems.is_empty() {
        return Err(StoreError::Invalid(problems.join("; ")));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            StoreError::Invalid(format!("cannot listen on --listen {}: {e}", args.listen))
        })?;
    let metrics = ServeMetrics::new()
        .map_err(|e| StoreError::Invalid(format!("cannot set up metrics: {e}")))?;
    let shared = Arc::new(Shared {
        store: OnceCell::new(),
        dashboard,
        metrics,
        finished_retention: args.finished_retention,
        loop_beat: Heartbeat::default(),
        // One pass may spend a few webhook timeouts delivering before it beats again.
        liveness_window: args.check_interval * 3
            + alerts::DEFAULT_WEBHOOK_TIMEOUT * alerts::CLAIMS_PER_PASS as u32
            + Duration::from_secs(60),
    });
    let local = listener.local_addr().unwrap_or(args.listen);
    println!("coordinator serve: listening on {local}");
    let app = Router::new()
        .route("/metrics", get(metrics_endpoint))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(crate::dashboard::routes())
        .with_state(shared.clone());
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
    });
    let result = watch(db, &args, hooks, &shared, &stop).await;
    stop.cancel();
    match http.await {
        Ok(Err(e)) => tracing::warn!("HTTP server stopped: {e}"),
        Err(e) => tracing::warn!("HTTP server task failed: {e}"),
        Ok(Ok(())) => {}
    }
    result.map(|()| crate::exit::OK)
}

/// Connects, then observes and delivers every check interval until stopped.
async fn watch(
    db: &ConnectOptions,
    args: &ServeArgs,
    hooks: Vec<alerts::Webhook>,
    shared: &Shared,
    stop: &CancellationToken,
) -> Result<(), StoreError> {
    let Some(store) = connect(db, shared, stop).await? else {
        return Ok(());
    };
    let store = shared.store.get_or_init(|| async { store }).await.clone();
    let watermark = store.alert_watermark().await?;
    let targets = AlertTargets {
        webhooks: hooks.iter().map(|h| h.key.clone()).collect(),
        watermark,
    };
    let deliverer = Deliverer::new(
        store.clone(),
        hooks,
        args.alert_lease,
        shared.metrics.deliveries.clone(),
    )
    .map_err(StoreError::Invalid)?;
    let settings = ObserveSettings {
        stall_after: args.stall_after,
        finished_retention: args.finished_retention,
    };
    // Pipeline runs move on in a task of their own: preparing a stage's batch may take long,
    // and must not hold up observations, alerts or /healthz.
    let advancer = {
        let (store, stop, interval) = (store.clone(), stop.clone(), args.check_interval);
        tokio::spawn(async move {
            loop {
                if let Err(e) = store.advance_pipelines().await {
                    tracing::warn!("advancing pipeline runs: {e}");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        })
    };
    let _advancer = AbortOnDrop(advancer);
    loop {
        match store.observe(settings, &targets, &alerts::body).await {
            Ok(Some(events)) => {
                for e in &events {
                    tracing::info!("alert {}: {}", e.kind.as_str(), e.key);
                    shared
                        .metrics
                        .alerts_raised
                        .with_label_values(&[e.kind.as_str()])
                        .inc();
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("observing progress: {e}"),
        }
        if let Err(e) = deliverer.deliver_due().await {
            tracing::warn!("delivering alerts: {e}");
        }
        shared.loop_beat.beat();
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(args.check_interval) => {}
        }
    }
}

/// Connects and checks the schema, waiting with capped backoff while the server is
/// unreachable. `None` when stopped while waiting.
async fn connect(
    db: &ConnectOptions,
    shared: &Shared,
    stop: &CancellationToken,
) -> Result<Option<Store>, StoreError> {
    let waiting = || shared.loop_beat.beat();
    let store = Store::connect_waiting(db, POOL_SIZE, stop, waiting).await?;
    if let Some(store) = &store {
        store.check_schema().await?;
    }
    Ok(store)
}

/// Stops `serve` on the first SIGTERM or SIGINT; a second one exits at once.
pub async fn stop_on_signal(stop: CancellationToken) {
    tally::shutdown::on_signals(stop, "finishing the observation pass").await
}

async fn metrics_endpoint(
    State(shared): State<Arc<Shared>>,
) -> ([(&'static str, &'static str); 1], String) {
    let scrape = match shared.store.get() {
        Some(store) => {
            let started = Instant::now();
            let result =
                tokio::time::timeout(DB_TIMEOUT, store.scrape(shared.finished_retention)).await;
            shared
                .metrics
                .scrape_seconds
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(Ok(scrape)) => Some(scrape),
                Ok(Err(e)) => {
                    tracing::warn!("scrape: {e}");
                    None
                }
                Err(_) => {
                    tracing::warn!("scrape: the database did not answer within {DB_TIMEOUT:?}");
                    None
                }
            }
        }
        None => None,
    };
    let text = render(scrape.as_ref(), &shared.metrics)
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
}

async fn healthz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if shared.loop_beat.silent_for() < shared.liveness_window {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "observation loop stalled\n",
        )
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let Some(store) = shared.store.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to PostgreSQL yet\n".into(),
        );
    };
    match tokio::time::timeout(DB_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: PostgreSQL did not answer in time\n".into(),
        ),
    }
}

/// Aborts a background task when the loop that owns it returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_flags_keep_their_commas_and_the_env_list_is_split() {
        let url = "https://hooks.example.com/x?channels=a,b".to_string();
        let env = Ok("https://a.example.com/1, https://b.example.com/2,".to_string());
        assert_eq!(
            webhook_urls(std::slice::from_ref(&url), env.clone()).unwrap(),
            std::slice::from_ref(&url),
            "a flag value is one URL, and the flag wins over the variable"
        );
        assert_eq!(
            webhook_urls(&[], env).unwrap(),
            ["https://a.example.com/1", "https://b.example.com/2"]
        );
        assert!(webhook_urls(&[], Err(std::env::VarError::NotPresent))
            .unwrap()
            .is_empty());
    }
}
