//! A worker with a custom Rust handler: each record is POSTed as JSON to a webhook, and the
//! webhook's answer decides what happens to the record. Copy this file to start your own.
//!
//! - 2xx: the record is complete.
//! - 429 or 503: retried after the server's `Retry-After` (or the batch's backoff).
//! - 408, other 5xx, timeouts, refused connections: retried with the batch's backoff.
//! - other 4xx: the record fails at once, with the status and the start of the body as its
//!   error (`coordinator failed` shows it).
//!
//! Every request carries an `Idempotency-Key: <batch>/<record id>` header, the same on every
//! delivery of a record, so that the receiver can drop a delivery it has already seen (after
//! a crash or an expired lease a record can be delivered again).
//!
//! Run it against a database (any PostgreSQL; here the local one):
//!
//! ```sh
//! cargo build --release --bins
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
//! target/release/coordinator migrate
//! printf '%s\n' '{"id":"1","email":"a@example.com"}' \
//!   '{"id":"2","email":"b@example.com","flaky":true}' '{"id":"3"}' > /tmp/mail.jsonl
//! target/release/coordinator prepare mail-1 --queue emails --from-file /tmp/mail.jsonl
//! cargo run --release -p tally-worker --example custom_handler -- emails
//! ```
//!
//! Without `WEBHOOK_URL`, the example starts a small receiver of its own on 127.0.0.1 that
//! answers 422 for a record without an `email`, and 503 with `Retry-After: 1` on the first
//! delivery of a record marked `"flaky": true`. In a second terminal,
//! `target/release/coordinator wait mail-1` exits 3 (one record failed) and
//! `target/release/coordinator failed mail-1` shows record 3 rejected with HTTP 422. Stop the
//! worker with Ctrl-C (a second Ctrl-C stops it at once). Set `WEBHOOK_URL` to send the
//! records to a real endpoint instead, and `TALLY_LOG_FORMAT=json` for JSON log lines.

use std::process::ExitCode;
use std::time::Duration;

use reqwest::StatusCode;
use tally::{Handler, HandlerError, RecordContext};
use tally_worker::{Worker, WorkerError};
use tokio_util::sync::CancellationToken;

/// Exit code for bad configuration (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// How long one webhook call may take before it counts as a retryable failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Characters of a rejecting response's body kept in the record's error.
const ERROR_BODY_CHARS: usize = 200;

/// Posts each record's payload as JSON to one URL.
pub struct Webhook {
    client: reqwest::Client,
    url: String,
}

impl Webhook {
    /// A handler posting to `url`; a call taking longer than `timeout` is retried.
    pub fn new(url: impl Into<String>, timeout: Duration) -> Result<Webhook, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Webhook {
            client,
            url: url.into(),
        })
    }
}

#[async_trait::async_trait]
impl Handler for Webhook {
    async fn handle(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        let request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("idempotency-key", &ctx.idempotency_key)
            .body(payload.to_string())
            .send();
        // The token fires when the worker stops hard or lost this record's lease: the
        // outcome could not be recorded any more, so stop waiting for it.
        let response = tokio::select! {
            response = request => response,
            _ = ctx.cancel.cancelled() => return Err(HandlerError::retryable("cancelled")),
        };
        let response = match response {
            Ok(response) => response,
            // A malformed URL will not get better; anything else (refused, reset, timed
            // out) may.
            Err(e) if e.is_builder() => {
                return Err(HandlerError::permanent(format!("bad webhook URL: {e}")))
            }
            Err(e) => return Err(HandlerError::retryable(format!("webhook call failed: {e}"))),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = if status.is_success() {
            String::new()
        } else {
            response.text().await.unwrap_or_default()
        };
        classify(status, retry_after.as_deref(), &body)
    }
}

/// What a webhook's answer means for the record.
pub fn classify(
    status: StatusCode,
    retry_after: Option<&str>,
    body: &str,
) -> Result<(), HandlerError> {
    if status.is_success() {
        return Ok(());
    }
    let body: String = body.trim().chars().take(ERROR_BODY_CHARS).collect();
    let message = format!("webhook answered HTTP {}: {body}", status.as_u16());
    match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            // Retry-After in seconds; an HTTP date is left to the batch's backoff here.
            match retry_after.and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(secs) => Err(HandlerError::retry_after(
                    message,
                    Duration::from_secs(secs),
                )),
                None => Err(HandlerError::retryable(message)),
            }
        }
        StatusCode::REQUEST_TIMEOUT => Err(HandlerError::retryable(message)),
        s if s.is_server_error() => Err(HandlerError::retryable(message)),
        // The receiver refused this record as it is: resending it changes nothing.
        _ => Err(HandlerError::permanent(message)),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let format = std::env::var(tally::logging::ENV_LOG_FORMAT)
        .ok()
        .map(|f| f.parse())
        .unwrap_or(Ok(tally::logging::DEFAULT_LOG_FORMAT));
    let logging = format
        .map_err(|e| format!("{}: {e}", tally::logging::ENV_LOG_FORMAT))
        .and_then(|format| tally::logging::init(format, "info").map_err(|e| e.to_string()));
    if let Err(e) = logging {
        eprintln!("custom_handler: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let queue = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "emails".to_string());
    let Ok(database_url) = std::env::var("DATABASE_URL") else {
        eprintln!("custom_handler: set DATABASE_URL, e.g. postgres://postgres@127.0.0.1/postgres");
        return ExitCode::from(EXIT_USAGE);
    };
    let url = match std::env::var("WEBHOOK_URL") {
        Ok(url) => url,
        Err(_) => match demo_receiver::start().await {
            Ok(url) => url,
            Err(e) => {
                eprintln!("custom_handler: cannot start the demo receiver: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let handler = match Webhook::new(&url, REQUEST_TIMEOUT) {
        Ok(handler) => handler,
        Err(e) => {
            eprintln!("custom_handler: cannot set up the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let worker = Worker::builder(database_url, &queue)
        .handler(handler)
        .concurrency(8)
        .lease(Duration::from_secs(30))
        .build();
    let worker = match worker {
        Ok(worker) => worker,
        Err(WorkerError::Config(problems)) => {
            for p in problems {
                eprintln!("custom_handler: {p}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("custom_handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%queue, webhook = %url, "posting records to the webhook");
    let shutdown = CancellationToken::new();
    // First SIGTERM/SIGINT: stop claiming and finish in-flight records. Second: exit at
    // once; the records still leased are rescued by other workers once their leases expire.
    tokio::spawn(tally::shutdown::on_signals(
        shutdown.clone(),
        "finishing in-flight records",
    ));
    match worker.run(shutdown).await {
        Ok(summary) => {
            tracing::info!(?summary, "done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("custom_handler: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A stand-in for a real webhook, so that the example runs on its own.
mod demo_receiver {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::Router;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<HashSet<String>>>;

    /// Serves on a free port of 127.0.0.1 in the background; returns its URL.
    pub async fn start() -> std::io::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/deliver", listener.local_addr()?);
        let app = Router::new()
            .route("/deliver", post(deliver))
            .with_state(Seen::default());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("demo receiver stopped: {e}");
            }
        });
        Ok(url)
    }

    async fn deliver(
        State(seen): State<Seen>,
        headers: HeaderMap,
        body: String,
    ) -> (StatusCode, HeaderMap, String) {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&body) else {
            return (StatusCode::BAD_REQUEST, HeaderMap::new(), "not JSON".into());
        };
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let first_time = seen
            .lock()
            .map(|mut s| s.insert(key.clone()))
            .unwrap_or(true);
        let mut reply = HeaderMap::new();
        let Some(email) = record.get("email").and_then(|e| e.as_str()) else {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                reply,
                "no \"email\" field".into(),
            );
        };
        if first_time && record.get("flaky") == Some(&serde_json::Value::Bool(true)) {
            reply.insert("retry-after", axum::http::HeaderValue::from_static("1"));
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                reply,
                "busy, try again".into(),
            );
        }
        tracing::info!(%key, email, first_time, "demo receiver: delivered");
        (StatusCode::OK, reply, "ok".into())
    }
}
