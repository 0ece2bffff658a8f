//! The operator dashboard of `coordinator serve`, on the same listener as `/metrics`: batches,
//! a batch's failures grouped by cause, record search, pipeline runs, workers, and (with
//! `--dashboard-actions`) the CLI's actions behind credentials. Pages are rendered on the
//! server; the stylesheet ships in the binary, and no page runs a script.

mod actions;
pub mod auth;
mod batches;
mod chart;
mod html;
mod pipelines;
mod records;
mod workers;

use crate::serve::Shared;
use auth::Identity;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use html::esc;
use std::sync::Arc;
use std::time::SystemTime;
use tally::{Store, StoreError};

/// Seconds after which list pages reload themselves.
const REFRESH_S: u32 = 10;
/// Rows per page of batches, runs and records.
const PAGE: i64 = 50;

/// The dashboard's routes, served with `serve`'s shared state.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(batches::index))
        .route("/batches/{name}", get(batches::batch))
        .route("/batches/{name}/records", get(records::search))
        .route("/batches/{name}/record", get(records::detail))
        .route("/pipelines", get(pipelines::index))
        .route("/runs/{name}", get(pipelines::run))
        .route("/workers", get(workers::index))
        .route(
            "/actions/{kind}",
            get(actions::confirm).post(actions::perform),
        )
        .route("/login", get(actions::login_form).post(actions::login))
        .route("/logout", axum::routing::post(actions::logout))
        .route("/assets/tally.css", get(|| async { html::stylesheet() }))
        .fallback(|| async { Fail::NotFound("no such page".into()).into_response() })
}

/// Why a page could not be shown.
#[derive(Debug)]
pub(crate) enum Fail {
    NotFound(String),
    Bad(String),
    Forbidden(String),
    /// The database failed: the page says so without details (which may name the server);
    /// serve's log has them.
    Down,
    /// serve has not connected to PostgreSQL yet.
    Connecting,
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        match e {
            StoreError::BatchNotFound(b) => Fail::NotFound(format!("batch {b} does not exist")),
            StoreError::Invalid(m) | StoreError::Conflict(m) => Fail::Bad(m),
            e => {
                tracing::warn!("dashboard: {e}");
                Fail::Down
            }
        }
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let (status, title, text) = match self {
            Fail::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m),
            Fail::Bad(m) => (StatusCode::BAD_REQUEST, "Refused", m),
            Fail::Forbidden(m) => (StatusCode::FORBIDDEN, "Forbidden", m),
            Fail::Down => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Database unavailable",
                "PostgreSQL did not answer; the details are in serve's log.".into(),
            ),
            Fail::Connecting => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Starting",
                "serve is still connecting to PostgreSQL; try again in a moment.".into(),
            ),
        };
        html::page(
            status,
            title,
            None,
            "",
            &format!(
                "<h1>{}</h1><p class=\"error\">{}</p>",
                esc(title),
                esc(&text)
            ),
        )
    }
}

/// The store, once `serve` has connected.
/// A form field that was filled in: `None` when absent or blank. Kept as typed (a record id
/// may hold spaces).
fn given(s: &Option<String>) -> Option<String> {
    s.as_ref().filter(|v| !v.trim().is_empty()).cloned()
}

fn store(shared: &Shared) -> Result<&Store, Fail> {
    shared.store.get().ok_or(Fail::Connecting)
}

/// Who is looking at a page, and what they may do.
pub(crate) struct Viewer {
    /// `--dashboard-actions` is on.
    pub actions: bool,
    pub who: Option<Identity>,
}

impl Viewer {
    fn of(shared: &Shared, headers: &HeaderMap) -> Viewer {
        let auth = shared.dashboard.as_ref();
        Viewer {
            actions: auth.is_some(),
            who: auth.and_then(|a| a.identify(headers, SystemTime::now())),
        }
    }

    /// The header's sign-in state.
    fn badge(&self) -> String {
        match (&self.who, self.actions) {
            (Some(w), _) => format!(
                "{} <form method=\"post\" action=\"/logout\" class=\"inline\"><button>Sign out</button></form>",
                esc(&w.user)
            ),
            (None, true) => "<a href=\"/login\">Sign in</a>".into(),
            (None, false) => "read-only".into(),
        }
    }

    /// A link to an action's confirmation, when actions are on.
    fn action_link(&self, label: &str, kind: &str, params: &[(&str, &str)]) -> String {
        if !self.actions {
            return String::new();
        }
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", html::url_value(v)))
            .collect();
        format!(
            "<a class=\"button\" href=\"/actions/{kind}?{}\">{}</a>",
            esc(&query.join("&")),
            esc(label)
        )
    }

    fn page(&self, title: &str, refresh: Option<u32>, body: &str) -> Response {
        html::page(StatusCode::OK, title, refresh, &self.badge(), body)
    }
}
