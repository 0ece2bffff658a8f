//! The worker's Rust API in-process: a worker made with `Worker::builder` runs the example's
//! webhook handler against a real local HTTP server (the classification of its answers ends
//! in the database), and a handler's cancellation token fires when its lease is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::json;
use tally::{Handler, HandlerError, RecordContext};
use tally_tests::*;
use tally_worker::{NoopHandler, RunSummary, Worker, WorkerError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The example a user copies, compiled in here so that its handler is what gets tested.
#[allow(dead_code)]
#[path = "../../worker/examples/custom_handler.rs"]
mod example;

/// Runs `worker` in the background; cancel the token to stop it.
fn spawn_worker(
    worker: Worker,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<RunSummary, WorkerError>>,
) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    (shutdown, task)
}

async fn stop(
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<RunSummary, WorkerError>>,
) -> RunSummary {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("worker stops within 30s")
        .expect("worker task")
        .expect("worker run")
}

/// (state, attempt, last_error) of one record.
async fn record(
    client: &tokio_postgres::Client,
    batch: &str,
    id: &str,
) -> (String, i32, Option<String>) {
    let row = client
        .query_one(
            "select r.state, r.attempt, r.last_error from tally.record r \
               join tally.batch b on b.id = r.batch_id where b.name = $1 and r.record_id = $2",
            &[&batch, &id],
        )
        .await
        .unwrap_or_else(|e| panic!("record {batch}/{id}: {e}"));
    (row.get(0), row.get(1), row.get(2))
}

// ---------------------------------------------------------------------------------------------
// The example's webhook handler against a real HTTP server
// ---------------------------------------------------------------------------------------------

/// Every request the webhook got: idempotency key -> arrival times.
type Calls = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// Answers by the record's `mode`: ok, flaky (503 + Retry-After: 1 the first time), reject
/// (422), down (500 every time).
async fn webhook(
    State(calls): State<Calls>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, HeaderMap, String) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("<none>")
        .to_string();
    let seen_before = {
        let mut calls = calls.lock().expect("calls lock");
        let times = calls.entry(key).or_default();
        times.push(Instant::now());
        times.len() > 1
    };
    let record: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut reply = HeaderMap::new();
    match record["mode"].as_str() {
        Some("ok") => (StatusCode::OK, reply, "ok".into()),
        Some("flaky") if seen_before => (StatusCode::OK, reply, "ok".into()),
        Some("flaky") => {
            reply.insert("retry-after", HeaderValue::from_static("1"));
            (StatusCode::SERVICE_UNAVAILABLE, reply, "busy".into())
        }
        Some("reject") => (
            StatusCode::UNPROCESSABLE_ENTITY,
            reply,
            "no such customer: c-42".into(),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            reply,
            "database is down".into(),
        ),
    }
}

#[tokio::test]
async fn builder_worker_classifies_webhook_answers_into_retries_and_failures() {
    let db = TestDb::new("api_webhook").await;
    let store = db.store().await;
    let client = db.client().await;
    let mut spec = spec("hooks-1", "hooks");
    spec.max_attempts = 3;
    prepare_records(
        &store,
        &spec,
        &[
            json!({"id": "ok", "mode": "ok"}),
            json!({"id": "flaky", "mode": "flaky"}),
            json!({"id": "reject", "mode": "reject"}),
            json!({"id": "down", "mode": "down"}),
        ],
    )
    .await;

    let calls = Calls::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind webhook");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let app = Router::new()
        .route("/hook", post(webhook))
        .with_state(calls.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let handler = example::Webhook::new(&url, Duration::from_secs(10)).expect("http client");
    let worker = Worker::builder(db.url.as_str(), "hooks")
        .handler(handler)
        .concurrency(4)
        .poll_interval(Duration::from_millis(100))
        .build()
        .expect("valid configuration");
    let (shutdown, task) = spawn_worker(worker);
    wait_finished(&client, "hooks-1", Duration::from_secs(60)).await;
    let summary = stop(shutdown, task).await;
    server.abort();

    assert_eq!(
        record(&client, "hooks-1", "ok").await,
        ("complete".into(), 1, None)
    );

    // 503 with Retry-After: retried, not before the delay the server asked for.
    let (state, attempt, _) = record(&client, "hooks-1", "flaky").await;
    assert_eq!((state.as_str(), attempt), ("complete", 2));
    let flaky = calls.lock().unwrap()["hooks-1/flaky"].clone();
    assert_eq!(
        flaky.len(),
        2,
        "two deliveries with the same idempotency key"
    );
    let waited = flaky[1] - flaky[0];
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before Retry-After: 1"
    );

    // 422: permanent, failed at once with the server's message.
    let (state, attempt, error) = record(&client, "hooks-1", "reject").await;
    assert_eq!((state.as_str(), attempt), ("failed", 1));
    let error = error.unwrap_or_default();
    assert!(
        error.contains("HTTP 422") && error.contains("no such customer: c-42"),
        "{error}"
    );
    assert_eq!(
        calls.lock().unwrap()["hooks-1/reject"].len(),
        1,
        "a rejected record is not retried"
    );

    // 500: retryable, until the batch's 3 attempts are spent.
    let (state, attempt, error) = record(&client, "hooks-1", "down").await;
    assert_eq!((state.as_str(), attempt), ("failed", 3));
    let error = error.unwrap_or_default();
    assert!(
        error.contains("HTTP 500") && error.contains("attempts exhausted: 3 of 3"),
        "{error}"
    );
    assert_eq!(calls.lock().unwrap()["hooks-1/down"].len(), 3);

    assert_eq!(
        (summary.completed, summary.failed, summary.retried),
        (2, 2, 3),
        "{summary:?}"
    );
    assert_counts_exact(&store, &client, "hooks-1").await;
}

#[tokio::test]
async fn builder_reports_every_problem_before_touching_the_database() {
    // Port 1 refuses connections: a builder that connected would fail differently.
    let built = Worker::builder(
        "postgres://tally:secret-pw@127.0.0.1:1/none",
        "no such queue!",
    )
    .concurrency(0)
    .claim_size(0)
    .build();
    let Err(WorkerError::Config(problems)) = built else {
        panic!("expected a configuration error");
    };
    assert_eq!(problems.len(), 4, "{problems:?}");
    let all = problems.join("\n");
    for expected in [
        "queue",
        "--concurrency is 0",
        "--claim-size is 0",
        "no handler",
    ] {
        assert!(all.contains(expected), "{expected:?} missing from {all}");
    }
    assert!(!all.contains("secret-pw"));

    // A valid configuration with an unreachable database fails when it runs, naming the
    // server but not the password.
    let worker = Worker::builder("postgres://tally:secret-pw@127.0.0.1:1/none", "q")
        .handler(NoopHandler)
        .build()
        .expect("valid configuration");
    let err = worker
        .run(CancellationToken::new())
        .await
        .expect_err("nothing listens on port 1");
    let message = err.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("secret-pw"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Cancellation when the lease is lost
// ---------------------------------------------------------------------------------------------

/// What the blocking handler saw.
#[derive(Debug)]
enum Seen {
    Started(String, i32),
    Cancelled(String),
}

/// `first` returns when the test says so; every other record waits for its token.
struct WaitForCancel {
    seen: mpsc::UnboundedSender<Seen>,
    release_first: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

#[async_trait::async_trait]
impl Handler for WaitForCancel {
    async fn handle(
        &self,
        ctx: &RecordContext,
        _payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        let _ = self
            .seen
            .send(Seen::Started(ctx.record_id.clone(), ctx.attempt));
        if ctx.record_id == "first" {
            if let Some(release) = self.release_first.lock().await.take() {
                let _ = release.await;
            }
            return Ok(());
        }
        tokio::select! {
            _ = ctx.cancel.cancelled() => {
                let _ = self.seen.send(Seen::Cancelled(ctx.record_id.clone()));
            }
            _ = tokio::time::sleep(Duration::from_secs(120)) => {}
        }
        Ok(())
    }
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>, what: &str) -> Seen {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("handler channel open")
}

#[tokio::test]
async fn a_lost_lease_cancels_the_handlers_of_its_records() {
    let db = TestDb::new("api_lease_lost").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_records(
        &store,
        &spec("lease-1", "lease"),
        &[json!({"id": "first"}), json!({"id": "second"})],
    )
    .await;

    // One claim takes both rows. A 30 s lease is renewed every 10 s; the worker never rescues
    // (another worker will).
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (release_first, release_rx) = tokio::sync::oneshot::channel();
    let handler = WaitForCancel {
        seen: seen_tx,
        release_first: tokio::sync::Mutex::new(Some(release_rx)),
    };
    let first_worker = Worker::builder(store.clone(), "lease")
        .handler(handler)
        .concurrency(2)
        .claim_size(2)
        .lease(Duration::from_secs(30))
        .rescue_interval(Duration::from_secs(3600))
        .poll_interval(Duration::from_millis(100))
        .grace_period(Duration::from_secs(60))
        .worker_id("first-worker")
        .build()
        .expect("valid configuration");
    let (first_stop, first_task) = spawn_worker(first_worker);
    let mut started = Vec::new();
    for _ in 0..2 {
        match next_seen(&mut seen, "both handlers to start").await {
            Seen::Started(id, attempt) => started.push((id, attempt)),
            other => panic!("expected a start, got {other:?}"),
        }
    }
    started.sort();
    assert_eq!(started, vec![("first".into(), 1), ("second".into(), 1)]);
    // Stop claiming (so that the rescued rows go to the other worker) but keep the two
    // records running, their lease renewed, while the worker drains.
    first_stop.cancel();

    // The first worker stalls past its lease: another worker rescues the rows and completes
    // them on attempt 2.
    let row: i64 = client
        .query_one(
            "select id from tally.record where record_id = 'second'",
            &[],
        )
        .await
        .expect("row id")
        .get(0);
    assert_eq!(
        backdate_lease(&client, row).await,
        1,
        "one claim holds both rows"
    );
    let rescuer = Worker::builder(db.url.as_str(), "lease")
        .handler(NoopHandler)
        .rescue_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(100))
        .worker_id("rescuing-worker")
        .build()
        .expect("valid configuration");
    let (rescuer_stop, rescuer_task) = spawn_worker(rescuer);
    wait_finished(&client, "lease-1", Duration::from_secs(60)).await;
    let rescuer_summary = stop(rescuer_stop, rescuer_task).await;
    assert_eq!(rescuer_summary.completed, 2, "{rescuer_summary:?}");

    // The first worker learns of the loss (its next write is refused by the fence, or its
    // next renewal finds the lease gone) and cancels the token of the record still running.
    let _ = release_first.send(());
    match next_seen(&mut seen, "the second handler's token to fire").await {
        Seen::Cancelled(id) => assert_eq!(id, "second"),
        other => panic!("expected a cancellation, got {other:?}"),
    }
    let summary = tokio::time::timeout(Duration::from_secs(30), first_task)
        .await
        .expect("the first worker finishes draining")
        .expect("worker task")
        .expect("worker run");
    assert_eq!(summary.lost_leases, 2, "both outcomes refused: {summary:?}");
    assert_eq!(summary.completed, 0, "{summary:?}");
    for id in ["first", "second"] {
        let (state, attempt, _) = record(&client, "lease-1", id).await;
        assert_eq!((state.as_str(), attempt), ("complete", 2), "record {id}");
    }
    assert_counts_exact(&store, &client, "lease-1").await;
}

#[tokio::test]
async fn a_renewal_that_finds_the_lease_rescued_cancels_the_handler() {
    let db = TestDb::new("api_renewal_lost").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_records(&store, &spec("renew-1", "renew"), &[json!({"id": "only"})]).await;

    // Renewed every second; nothing but a renewal can tell this worker its lease is gone,
    // since its only record never finishes on its own.
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let handler = WaitForCancel {
        seen: seen_tx,
        release_first: tokio::sync::Mutex::new(None),
    };
    let worker = Worker::builder(store.clone(), "renew")
        .handler(handler)
        .lease(Duration::from_secs(3))
        .rescue_interval(Duration::from_secs(3600))
        .poll_interval(Duration::from_millis(100))
        .grace_period(Duration::from_secs(60))
        .build()
        .expect("valid configuration");
    let (stop_claiming, task) = spawn_worker(worker);
    match next_seen(&mut seen, "the handler to start").await {
        Seen::Started(id, 1) => assert_eq!(id, "only"),
        other => panic!("expected the first start, got {other:?}"),
    }
    stop_claiming.cancel();

    let rescuer = Worker::builder(db.url.as_str(), "renew")
        .handler(NoopHandler)
        .rescue_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(100))
        .build()
        .expect("valid configuration");
    let (rescuer_stop, rescuer_task) = spawn_worker(rescuer);
    let row: i64 = client
        .query_one("select id from tally.record where record_id = 'only'", &[])
        .await
        .expect("row id")
        .get(0);
    // A renewal between the backdating and the rescue extends the lease again: backdate
    // until the rescuer wins.
    poll_until(
        "the rescuer to take the record over",
        Duration::from_secs(30),
        || async {
            backdate_lease(&client, row).await;
            let (state, attempt, _) = record(&client, "renew-1", "only").await;
            (state == "complete" && attempt == 2).then_some(())
        },
    )
    .await;
    stop(rescuer_stop, rescuer_task).await;

    match next_seen(&mut seen, "the handler's token to fire").await {
        Seen::Cancelled(id) => assert_eq!(id, "only"),
        other => panic!("expected a cancellation, got {other:?}"),
    }
    let summary = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the worker finishes draining")
        .expect("worker task")
        .expect("worker run");
    assert_eq!(
        (summary.lost_leases, summary.completed),
        (1, 0),
        "{summary:?}"
    );
    assert_eq!(
        record(&client, "renew-1", "only").await,
        ("complete".into(), 2, None)
    );
}

// ---------------------------------------------------------------------------------------------
// Outcomes PostgreSQL could not store as given
// ---------------------------------------------------------------------------------------------

/// Fails records by their `mode`: a message with NUL bytes, a retry asked for `Duration::MAX`
/// from now, a 100 KB message; completes the rest.
struct Unstorable;

#[async_trait::async_trait]
impl Handler for Unstorable {
    async fn handle(
        &self,
        _ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        match payload.get("mode").and_then(|m| m.as_str()) {
            Some("nul") => Err(HandlerError::permanent("bad\0byte")),
            Some("forever") => Err(HandlerError::retry_after("later", Duration::MAX)),
            Some("long") => Err(HandlerError::permanent("x".repeat(100_000))),
            _ => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_postgresql_would_refuse_are_cleaned_and_do_not_stall_the_worker() {
    let db = TestDb::new("unstorable").await;
    let store = db.store().await;
    let client = db.client().await;
    let mut records = vec![
        json!({"id": "nul", "mode": "nul"}),
        json!({"id": "forever", "mode": "forever"}),
        json!({"id": "long", "mode": "long"}),
    ];
    records.extend((0..50).map(|i| json!({"id": format!("ok{i}")})));
    prepare_records(&store, &spec("unstorable-1", "unstorable"), &records).await;
    let worker = Worker::builder(store.clone(), "unstorable")
        .handler(Unstorable)
        .poll_interval(Duration::from_millis(100))
        .build()
        .expect("valid configuration");
    let (shutdown, task) = spawn_worker(worker);
    // Everything is written back; the huge retry waits as pending.
    let counts = poll_until(
        "every outcome to be written",
        Duration::from_secs(30),
        || async {
            let c = counts_by_state(&client, "unstorable-1").await;
            (c.running == 0 && c.complete + c.failed + c.pending == 53 && c.pending == 1)
                .then_some(c)
        },
    )
    .await;
    let summary = stop(shutdown, task).await;
    assert_eq!((counts.complete, counts.failed), (50, 2), "{counts:?}");
    assert_eq!(summary.completed, 50, "{summary:?}");

    let (state, _, error) = record(&client, "unstorable-1", "nul").await;
    assert_eq!(state, "failed");
    assert_eq!(error.as_deref(), Some("bad\u{FFFD}byte"));

    let (state, _, error) = record(&client, "unstorable-1", "long").await;
    assert_eq!(state, "failed");
    let error = error.unwrap_or_default();
    assert!(
        error.len() <= tally::handler::MAX_ERROR_MESSAGE_BYTES && error.starts_with("xxx"),
        "{} bytes",
        error.len()
    );

    // Due within the 24 h cap (and not much sooner).
    let (state, attempt, _) = record(&client, "unstorable-1", "forever").await;
    assert_eq!((state.as_str(), attempt), ("pending", 1));
    let due_in_s = client
        .query_one(
            "select extract(epoch from available_at - now())::float8 from tally.record \
              where record_id = 'forever'",
            &[],
        )
        .await
        .expect("available_at")
        .get::<_, f64>(0);
    let cap = tally::handler::MAX_RETRY_AFTER.as_secs_f64();
    assert!(
        due_in_s <= cap && due_in_s > cap - 120.0,
        "due in {due_in_s} s"
    );
}
