//! `/metrics` for Prometheus, and `/healthz` and `/readyz` for orchestrators: liveness is "the
//! worker's loop ran recently" (not the database: a database outage must not get every worker
//! restarted), readiness is "connected to PostgreSQL and not draining".

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally::heartbeat::Heartbeat;
use tally::metrics::WorkerMetrics;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A loop silent for longer than this (or three poll intervals, if longer) is reported dead.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(60);

/// Where the endpoints listen unless `--listen` (env [`ENV_LISTEN`]) says otherwise. Several
/// workers on one host: the first takes the port, the others run without endpoints.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9460);
/// Environment variable of `--listen`.
pub const ENV_LISTEN: &str = "TALLY_LISTEN";

/// What `--listen` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// `off`: no endpoints.
    Off,
    /// An address given explicitly: failing to bind it is a usage error.
    At(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.trim().parse().map(Listen::At).map_err(|_| {
            format!("{s:?} is neither `off` nor an address such as 0.0.0.0:9460 or [::1]:9460")
        })
    }
}

/// Why the endpoints could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on --listen {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the endpoints' socket. `None` (`--listen` not given) means the default address,
/// which may be taken by another worker on this host: then the worker runs without
/// endpoints, with a warning. An explicit address that cannot be bound is an error.
pub async fn bind(listen: Option<Listen>) -> Result<Option<tokio::net::TcpListener>, ListenError> {
    let (addr, explicit) = match listen {
        Some(Listen::Off) => return Ok(None),
        Some(Listen::At(addr)) => (addr, true),
        None => (DEFAULT_LISTEN, false),
    };
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(source) if explicit => Err(ListenError { addr, source }),
        Err(e) => {
            tracing::warn!(
                "cannot listen on the default address {addr} ({e}): running without \
                 /metrics, /healthz and /readyz; give each worker its own --listen, or \
                 --listen off"
            );
            Ok(None)
        }
    }
}

/// What the worker's tasks tell the health endpoints.
#[derive(Debug, Default)]
pub struct Health {
    loop_beat: Heartbeat,
    /// 0 until set: [`LIVENESS_WINDOW`].
    window_ms: AtomicU64,
    connected: AtomicBool,
    draining: AtomicBool,
    /// One of the worker's own tasks died: not live, whatever else holds.
    failed: AtomicBool,
}

impl Health {
    /// Live (as of now), not connected, not draining.
    pub fn new() -> Arc<Health> {
        let health = Health::default();
        health.beat();
        Arc::new(health)
    }

    /// The loop is alive.
    pub fn beat(&self) {
        self.loop_beat.beat();
    }

    /// The last database call succeeded (or failed).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        self.beat();
    }

    /// The worker stopped claiming and is finishing its in-flight work.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The worker failed and is exiting: neither live nor ready from now on.
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// An idle loop beats once per poll interval: allow three of them before calling it dead.
    pub fn set_poll_interval(&self, poll: Duration) {
        let window = LIVENESS_WINDOW.max(poll.saturating_mul(3));
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.window_ms.store(ms, Ordering::Relaxed);
    }

    /// The loop beat within the liveness window, or the worker is draining (bounded by the
    /// grace period; restarting it then would only cut the drain short).
    pub fn is_live(&self) -> bool {
        let window = match self.window_ms.load(Ordering::Relaxed) {
            0 => LIVENESS_WINDOW,
            ms => Duration::from_millis(ms),
        };
        !self.failed.load(Ordering::Relaxed)
            && (self.draining.load(Ordering::Relaxed) || self.loop_beat.silent_for() < window)
    }

    /// `Err` with the reason when not ready.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.failed.load(Ordering::Relaxed) {
            Err("failed: one of the worker's tasks died")
        } else if self.draining.load(Ordering::Relaxed) {
            Err("draining")
        } else if !self.connected.load(Ordering::Relaxed) {
            Err("not connected to PostgreSQL")
        } else {
            Ok(())
        }
    }
}

#[derive(Clone)]
struct Endpoints {
    health: Arc<Health>,
    metrics: Arc<WorkerMetrics>,
}

async fn metrics(State(e): State<Endpoints>) -> ([(&'static str, &'static str); 1], String) {
    e.metrics.ready.set(i64::from(e.health.readiness().is_ok()));
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        e.metrics.render(),
    )
}

async fn healthz(State(Endpoints { health, .. }): State<Endpoints>) -> (StatusCode, &'static str) {
    if health.is_live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "worker loop stalled\n")
    }
}

async fn readyz(State(Endpoints { health, .. }): State<Endpoints>) -> (StatusCode, String) {
    match health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Serves the endpoints on `listener` until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    worker_metrics: Arc<WorkerMetrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoints {
            health,
            metrics: worker_metrics,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Binds as [`bind`] does and serves the endpoints in the background until the returned
/// guard is dropped (`None`: nothing was bound).
pub async fn start(
    listen: Option<Listen>,
    health: Arc<Health>,
    worker_metrics: Arc<WorkerMetrics>,
) -> Result<Option<DropGuard>, ListenError> {
    let Some(listener) = bind(listen).await? else {
        return Ok(None);
    };
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, health, worker_metrics, stop).await {
            tracing::warn!("health endpoints stopped: {e}");
        }
    });
    Ok(Some(guard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        (status, body.unwrap_or_default())
    }

    #[test]
    fn listen_takes_off_or_an_address_and_names_bad_input() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen::Off));
        assert_eq!(
            "127.0.0.1:9".parse::<Listen>(),
            Ok(Listen::At(SocketAddr::from(([127, 0, 0, 1], 9))))
        );
        let err = "localhost".parse::<Listen>().unwrap_err();
        assert!(
            err.contains("\"localhost\"") && err.contains("off"),
            "{err}"
        );
        assert_eq!(DEFAULT_LISTEN.port(), 9460);
    }

    #[tokio::test]
    async fn a_taken_explicit_address_is_an_error_and_off_binds_nothing() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = taken.local_addr().expect("addr");
        let err = bind(Some(Listen::At(addr)))
            .await
            .expect_err("port is taken");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(bind(Some(Listen::Off)).await.expect("off").is_none());
    }

    #[test]
    fn live_while_beating_or_draining_and_ready_only_when_connected() {
        let health = Health::new();
        assert!(health.is_live());
        assert_eq!(health.readiness(), Err("not connected to PostgreSQL"));
        health.set_connected(true);
        assert_eq!(health.readiness(), Ok(()));
        // A beat older than the window: stalled.
        health
            .loop_beat
            .backdate(LIVENESS_WINDOW + Duration::from_millis(1));
        assert!(!health.is_live());
        // A long poll interval widens the window.
        health.set_poll_interval(Duration::from_secs(60));
        assert!(health.is_live());
        health.set_poll_interval(Duration::from_secs(1));
        assert!(!health.is_live());
        health.set_draining();
        assert!(health.is_live(), "a draining worker is not restarted");
        assert_eq!(health.readiness(), Err("draining"));
    }

    #[tokio::test]
    async fn a_failed_worker_answers_503_on_both_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let health = Health::new();
        health.set_connected(true);
        let metrics = Arc::new(WorkerMetrics::new("q").expect("metrics"));
        tokio::spawn(serve(
            listener,
            health.clone(),
            metrics,
            CancellationToken::new(),
        ));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        health.set_failed();
        assert_eq!(get(addr, "/healthz").await.0, 503);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("failed"), "{body}");
        // Draining does not make a failed worker live again.
        health.set_draining();
        assert!(!health.is_live());
    }

    #[tokio::test]
    async fn endpoints_answer_over_http_and_metrics_carry_readiness() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let health = Health::new();
        let metrics = Arc::new(WorkerMetrics::new("q").expect("metrics"));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, health.clone(), metrics, stop.clone()));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("not connected"), "{body}");
        let (_, text) = get(addr, "/metrics").await;
        assert!(text.contains("tally_worker_ready{queue=\"q\"} 0"), "{text}");

        health.set_connected(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (_, text) = get(addr, "/metrics").await;
        assert!(text.contains("tally_worker_ready{queue=\"q\"} 1"), "{text}");
        assert_eq!(get(addr, "/nope").await.0, 404);

        stop.cancel();
        server.await.expect("join").expect("serve");
    }
}
