//! `/metrics` for Prometheus, and `/healthz` and `/readyz` for orchestrators: liveness is "the
//! worker's loop ran recently", readiness is "connected to PostgreSQL and not draining".

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tally::metrics::WorkerMetrics;
use tokio_util::sync::CancellationToken;

/// A loop silent for longer than this is reported dead.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(60);

/// What the worker's tasks tell the health endpoints.
#[derive(Debug, Default)]
pub struct Health {
    last_beat_ms: AtomicU64,
    connected: AtomicBool,
    draining: AtomicBool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    pub fn new() -> Arc<Health> {
        let health = Health::default();
        health.beat();
        Arc::new(health)
    }

    /// The loop is alive.
    pub fn beat(&self) {
        self.last_beat_ms.store(now_ms(), Ordering::Relaxed);
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

    pub fn is_live(&self) -> bool {
        now_ms().saturating_sub(self.last_beat_ms.load(Ordering::Relaxed))
            < LIVENESS_WINDOW.as_millis() as u64
    }

    /// `Err` with the reason when not ready.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
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
