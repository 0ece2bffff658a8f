//! Alert webhooks of `coordinator serve`: sent once across two replicas, redelivered when the
//! receiver fails or a replica dies mid-delivery, and never sent twice because the database
//! was briefly out of reach after the webhook took it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_tests::serve::*;
use tally_tests::*;

/// One request the webhook receiver got.
#[derive(Debug, Clone)]
struct Hit {
    /// The `Idempotency-Key` header.
    key: String,
    body: serde_json::Value,
    /// The status answered; 0 for a request held open and never answered.
    status: u16,
    at: Instant,
}

/// What the webhook receiver got, in order of arrival.
type Received = Arc<Mutex<Vec<Hit>>>;

/// How the receiver treats the first request it gets; every later one is answered 200.
#[derive(Debug, Clone, PartialEq)]
enum First {
    /// Answer 500.
    Fail,
    /// Never answer: the sender stays mid-delivery.
    Hold,
    /// Answer 200 like the others.
    Accept,
    /// Answer 200 while holding the delivery's row lock in the database at this URL; then end
    /// the session that waits for it (the sender's, marking it sent), and let go.
    AcceptThenCut(String),
}

/// Sessions ended by [`First::AcceptThenCut`].
static CUT: AtomicI64 = AtomicI64::new(0);

/// Holds every delivery row locked, then in the background ends the sessions waiting for that
/// lock as soon as one shows up (within 10 s), and commits.
async fn lock_then_cut(url: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // Before the answer goes out: the sender's update then waits for this lock.
    client
        .batch_execute("begin; select 1 from tally.alert_delivery for update")
        .await
        .unwrap();
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let ended: i64 = client
                .query_one(
                    "select count(*) from (select pg_terminate_backend(pid) \
                       from pg_stat_activity where datname = current_database() \
                        and wait_event_type = 'Lock' and pid <> pg_backend_pid()) t",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if ended > 0 {
                CUT.fetch_add(ended, Ordering::SeqCst);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.batch_execute("commit").await.unwrap();
    });
}

/// A webhook receiver on 127.0.0.1:0.
async fn start_receiver(first: First) -> (String, Received) {
    use axum::http::{HeaderMap, StatusCode};
    let received: Received = Arc::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/hook/secret",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let log = log.clone();
            let first = first.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body: serde_json::Value =
                    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                let cut_now;
                let status = {
                    let mut log = log.lock().unwrap();
                    cut_now = log.is_empty();
                    let status = match first {
                        First::Fail if log.is_empty() => 500,
                        First::Hold if log.is_empty() => 0,
                        _ => 200,
                    };
                    log.push(Hit {
                        key,
                        body,
                        status,
                        at: Instant::now(),
                    });
                    status
                };
                if status == 0 {
                    std::future::pending::<()>().await;
                }
                if let First::AcceptThenCut(url) = &first {
                    if cut_now {
                        lock_then_cut(url).await;
                    }
                }
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook/secret"), received)
}

/// Accepted alerts (answered 200) with `event` whose body has `field` equal to `value`.
fn accepted_by(
    received: &Received,
    event: &str,
    field: &str,
    value: &str,
) -> Vec<serde_json::Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.status == 200 && h.body["event"] == event && h.body[field] == value)
        .map(|h| h.body.clone())
        .collect()
}

/// Accepted alerts (answered 200) with `event` for `batch`.
fn accepted(received: &Received, event: &str, batch: &str) -> Vec<serde_json::Value> {
    accepted_by(received, event, "batch", batch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_alerts_once_across_replicas_and_redelivers_after_a_failure() {
    let db = TestDb::new("serve_alerts").await;
    let (hook, received) = start_receiver(First::Fail).await;
    let args = [
        "--check-interval",
        "200ms",
        "--stall-after",
        "4s",
        "--alert-webhook",
        hook.as_str(),
    ];
    let _replica_1 = start_serve(&db.url, &args);
    let _replica_2 = start_serve(&db.url, &args);
    let dir = TempDir::new("serve-alerts");
    std::fs::write(dir.0.join("ids.jsonl"), jsonl_ids(300)).unwrap();
    let input = dir.0.join("ids.jsonl");
    let input = input.to_str().unwrap();
    let mut workers = Vec::new();
    for (queue, sql) in [
        ("ok", "select 1"),
        // Every 50th record divides by zero: a permanent failure.
        ("bad", "select 1 / (substr($1, 2)::int % 50)"),
        // About 100 records a second, so that it is still running when stopped.
        ("slow", "select pg_sleep(0.01)"),
    ] {
        workers.push(start_worker(
            &db.url,
            &[
                "--queue",
                queue,
                "--handler",
                "sql",
                "--sql",
                sql,
                "--concurrency",
                "1",
                "--sql-chunk",
                "5",
                "--claim-size",
                "20",
                "--poll-interval",
                "200ms",
            ],
        ));
    }
    for (batch, queue) in [("b-ok", "ok"), ("b-bad", "bad"), ("b-slow", "slow")] {
        let (code, _, err) = coordinator(
            &db.url,
            &[
                "prepare",
                batch,
                "--queue",
                queue,
                "--from-file",
                input,
                "--max-attempts",
                "1",
            ],
        );
        assert_eq!(code, 0, "{err}");
    }
    let client = db.client().await;
    poll_until("some of b-slow done", Duration::from_secs(30), || async {
        let n: i64 = client
            .query_one(
                "select coalesce(sum(n), 0)::bigint from tally.batch_count c \
                   join tally.batch b on b.id = c.batch_id \
                  where b.name = 'b-slow' and c.state = 'complete'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n >= 20).then_some(())
    })
    .await;
    // The slow batch's worker dies mid-batch: its records stay pending and running.
    workers[2].kill();

    poll_until("all alerts", Duration::from_secs(60), || async {
        (!accepted(&received, "finished", "b-ok").is_empty()
            && !accepted(&received, "finished_with_failures", "b-bad").is_empty()
            && !accepted(&received, "stalled", "b-slow").is_empty())
        .then_some(())
    })
    .await;
    // Give both replicas several more rounds in which a duplicate could appear.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ok = accepted(&received, "finished", "b-ok");
    assert_eq!(ok.len(), 1, "one finished alert for b-ok: {ok:?}");
    assert_eq!(ok[0]["counts"]["complete"], 300);
    assert_eq!(ok[0]["queue"], "ok");
    assert!(ok[0]["text"].as_str().unwrap().contains("b-ok"));
    let bad = accepted(&received, "finished_with_failures", "b-bad");
    assert_eq!(bad.len(), 1, "one finished-with-failures alert: {bad:?}");
    assert_eq!(bad[0]["counts"]["failed"], 6);
    assert_eq!(bad[0]["counts"]["complete"], 294);
    let slow = accepted(&received, "stalled", "b-slow");
    assert_eq!(slow.len(), 1, "one stalled alert for b-slow: {slow:?}");
    assert!(
        slow[0]["counts"]["pending"].as_i64().unwrap()
            + slow[0]["counts"]["running"].as_i64().unwrap()
            > 0
    );
    assert!(accepted(&received, "finished", "b-bad").is_empty());
    assert!(accepted(&received, "stalled", "b-ok").is_empty());

    // The first request was answered 500; the same alert came again and was accepted once.
    let log = received.lock().unwrap().clone();
    assert_eq!(log[0].status, 500);
    let retried = &log[0].key;
    assert!(!retried.is_empty(), "alerts carry an idempotency key");
    let again: Vec<_> = log.iter().filter(|h| &h.key == retried).collect();
    assert_eq!(
        again.len(),
        2,
        "the failed alert was sent once more: {log:?}"
    );
    assert_eq!(again[1].status, 200);
    let mut keys: Vec<&String> = log
        .iter()
        .filter(|h| h.status == 200)
        .map(|h| &h.key)
        .collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "no alert accepted twice: {log:?}");
    let sent: i64 = client
        .query_one(
            "select count(*) from tally.alert_delivery where state = 'sent'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sent as usize, n, "every accepted alert is marked sent");
}

/// Arguments of a `serve` replica that checks every 200 ms and alerts `hook`.
fn replica_args<'a>(hook: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--check-interval", "200ms", "--alert-webhook", hook];
    args.extend_from_slice(more);
    args
}

/// Alert rows raised in the database with `kind`.
async fn alerts_raised(client: &tokio_postgres::Client, kind: &str) -> i64 {
    query_i64(
        client,
        "select count(*) from tally.alert where kind = $1",
        &[&kind],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_alerts_once_when_a_batch_hits_its_failure_limit_and_again_when_it_finishes() {
    let db = TestDb::new("serve_failure_limit").await;
    let (hook, received) = start_receiver(First::Accept).await;
    let args = replica_args(&hook, &[]);
    let _replica_1 = start_serve(&db.url, &args);
    let _replica_2 = start_serve(&db.url, &args);
    let (code, _, err) = coordinator_with_stdin(
        &db.url,
        &[
            "prepare",
            "b-limit",
            "--queue",
            "q",
            "--from-file",
            "-",
            "--max-failed",
            "5",
        ],
        Some(&jsonl_ids(300)),
    );
    assert_eq!(code, 0, "{err}");
    // Every 10th record divides by zero: a permanent failure, 30 in all against 5 tolerated.
    // Small claims and chunks, so that the pause comes long before the end.
    let _worker = start_worker(
        &db.url,
        &[
            "--queue",
            "q",
            "--handler",
            "sql",
            "--sql",
            "select 1 / (substr($1, 2)::int % 10)",
            "--concurrency",
            "1",
            "--claim-size",
            "20",
            "--sql-chunk",
            "10",
            "--poll-interval",
            "100ms",
        ],
    );
    let limit = poll_until(
        "the failure_limit alert",
        Duration::from_secs(30),
        || async { accepted(&received, "failure_limit", "b-limit").pop() },
    )
    .await;
    assert_eq!(limit["queue"], "q");
    assert_eq!(limit["state"], "paused", "{limit}");
    let reason = limit["paused_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("too many failures") && reason.contains("5 tolerated"),
        "{limit}"
    );
    assert!(limit["counts"]["failed"].as_i64().unwrap() > 5, "{limit}");
    assert!(
        limit["counts"]["pending"].as_i64().unwrap() > 0,
        "raised while work was left: {limit}"
    );
    let text = limit["text"].as_str().unwrap();
    assert!(text.contains("b-limit") && text.contains("coordinator resume b-limit"));
    let (_, out, _) = coordinator_async(&db.url, &["status", "b-limit", "--json"]).await;
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["state"], "paused", "{status}");

    let (code, out, err) = coordinator_async(&db.url, &["resume", "b-limit"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) =
        coordinator_async(&db.url, &["wait", "b-limit", "--timeout", "60s"]).await;
    assert_eq!(code, 3, "finished with failures: {out}{err}");
    let finished = poll_until(
        "the finished_with_failures alert",
        Duration::from_secs(30),
        || async { accepted(&received, "finished_with_failures", "b-limit").pop() },
    )
    .await;
    assert_eq!(finished["state"], "complete_with_failures", "{finished}");
    assert_eq!(finished["counts"]["failed"], 30, "{finished}");
    assert_eq!(finished["counts"]["complete"], 270, "{finished}");
    assert!(
        finished.get("paused_reason").is_none(),
        "the limit was lifted: {finished}"
    );
    // Give both replicas several more rounds in which a duplicate could appear.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let limits = accepted(&received, "failure_limit", "b-limit");
    assert_eq!(limits.len(), 1, "one failure_limit alert: {limits:?}");
    let finishes = accepted(&received, "finished_with_failures", "b-limit");
    assert_eq!(finishes.len(), 1, "one finishing alert: {finishes:?}");
    assert!(accepted(&received, "finished", "b-limit").is_empty());
    assert!(accepted(&received, "stalled", "b-limit").is_empty());
    let log = received.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "nothing else was sent: {log:?}");
    assert_eq!(log[0].body["event"], "failure_limit");
    assert_ne!(log[0].key, log[1].key);
    let client = db.client().await;
    assert_eq!(alerts_raised(&client, "failure_limit").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_alerts_once_when_a_breaker_opens_and_stays_open_across_probes() {
    let db = TestDb::new("serve_breaker").await;
    let client = db.client().await;
    client
        .batch_execute(
            "create function call_downstream(id text) returns boolean language plpgsql as $$
             begin
                 raise exception 'downstream unavailable for %', id using errcode = '40001';
             end $$;",
        )
        .await
        .unwrap();
    let (hook, received) = start_receiver(First::Accept).await;
    let args = replica_args(&hook, &[]);
    let _replica_1 = start_serve(&db.url, &args);
    let _replica_2 = start_serve(&db.url, &args);
    // Plenty of attempts: the breaker, not the attempt budget, is what stops the work.
    let (code, _, err) = coordinator_with_stdin(
        &db.url,
        &[
            "prepare",
            "b-down",
            "--queue",
            "q-down",
            "--from-file",
            "-",
            "--max-attempts",
            "100",
            "--backoff-base",
            "10ms",
            "--backoff-max",
            "50ms",
        ],
        Some(&jsonl_ids(100)),
    );
    assert_eq!(code, 0, "{err}");
    let _worker = start_worker(
        &db.url,
        &[
            "--queue",
            "q-down",
            "--handler",
            "sql",
            "--sql",
            "select call_downstream($1)",
            "--concurrency",
            "1",
            "--claim-size",
            "5",
            "--sql-chunk",
            "5",
            "--poll-interval",
            "100ms",
            "--breaker-threshold",
            "3",
            "--breaker-cooldown",
            "1s",
            "--breaker-max-cooldown",
            "2s",
        ],
    );
    let alert = poll_until(
        "the breaker_open alert",
        Duration::from_secs(30),
        || async { accepted_by(&received, "breaker_open", "queue", "q-down").pop() },
    )
    .await;
    assert!(alert.get("batch").is_none(), "a queue's alert: {alert}");
    let detail = alert["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("retryable failures in a row"), "{alert}");
    assert!(
        alert["text"]
            .as_str()
            .unwrap()
            .contains("Circuit breaker of queue q-down"),
        "{alert}"
    );
    // A probe fails and reopens the breaker for a doubled cool-down: still the same outage.
    poll_until(
        "a failed probe reopens the breaker",
        Duration::from_secs(30),
        || async {
            let cooldown = query_i64(
                &client,
                "select cooldown_ms from tally.breaker where queue = 'q-down'",
                &[],
            )
            .await;
            (cooldown >= 2000).then_some(())
        },
    )
    .await;
    // Give both replicas several more rounds in which a duplicate could appear.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alerts = accepted_by(&received, "breaker_open", "queue", "q-down");
    assert_eq!(alerts.len(), 1, "one breaker_open alert: {alerts:?}");
    assert_eq!(alerts_raised(&client, "breaker_open").await, 1);
    let log = received.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "nothing else was sent: {log:?}");
    let failed = query_i64(
        &client,
        "select count(*) from tally.record where state = 'failed'",
        &[],
    )
    .await;
    assert_eq!(failed, 0, "the outage used up no record's attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_does_not_send_an_alert_again_when_marking_it_sent_loses_its_session() {
    let db = TestDb::new("serve_cut_sent").await;
    let client = db.client().await;
    let (hook, received) = start_receiver(First::AcceptThenCut(db.url.clone())).await;
    const LEASE: Duration = Duration::from_secs(2);
    let _serve = start_serve(&db.url, &replica_args(&hook, &["--alert-lease", "2s"]));
    let (code, _, err) = coordinator_with_stdin(
        &db.url,
        &["prepare", "b-cut", "--queue", "q", "--from-file", "-"],
        Some(&jsonl_ids(10)),
    );
    assert_eq!(code, 0, "{err}");
    let _worker = start_worker(
        &db.url,
        &[
            "--queue",
            "q",
            "--handler",
            "noop",
            "--poll-interval",
            "100ms",
        ],
    );
    poll_until(
        "the delivery marked sent",
        Duration::from_secs(30),
        || async {
            let state: Option<String> = client
                .query_opt("select state from tally.alert_delivery", &[])
                .await
                .unwrap()
                .map(|r| r.get(0));
            (state.as_deref() == Some("sent")).then_some(())
        },
    )
    .await;
    assert!(
        CUT.load(Ordering::SeqCst) >= 1,
        "the session marking the alert sent was ended"
    );
    // Past the lease, when a delivery still marked pending would be sent again.
    tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
    let log = received.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "the webhook got the alert once: {log:?}");
    assert_eq!(log[0].body["batch"], "b-cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_redelivers_an_alert_once_after_a_replica_dies_mid_delivery() {
    let db = TestDb::new("serve_kill_delivery").await;
    let client = db.client().await;
    let (hook, received) = start_receiver(First::Hold).await;
    const LEASE: Duration = Duration::from_secs(3);
    let args = replica_args(&hook, &["--alert-lease", "3s"]);
    let mut replica_a = start_serve(&db.url, &args);
    let (code, _, err) = coordinator_with_stdin(
        &db.url,
        &["prepare", "b-kill", "--queue", "q", "--from-file", "-"],
        Some(&jsonl_ids(20)),
    );
    assert_eq!(code, 0, "{err}");
    let _worker = start_worker(
        &db.url,
        &[
            "--queue",
            "q",
            "--handler",
            "noop",
            "--poll-interval",
            "100ms",
        ],
    );
    // Replica A is the only one running: its request is the one the receiver holds open.
    let held = poll_until("replica A's request", Duration::from_secs(30), || async {
        received.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(held.status, 0);
    assert_eq!(held.body["event"], "finished", "{:?}", held.body);
    assert_eq!(held.body["batch"], "b-kill");
    // Replica B runs from now on, but the row is A's until the lease passes.
    let _replica_b = start_serve(&db.url, &args);
    replica_a.child.kill();

    let delivered = poll_until("replica B's delivery", Duration::from_secs(30), || async {
        received
            .lock()
            .unwrap()
            .iter()
            .find(|h| h.status == 200)
            .cloned()
    })
    .await;
    assert_eq!(delivered.key, held.key, "the same Idempotency-Key");
    assert_eq!(delivered.body, held.body);
    // A claimed the row just before its request arrived, and B can claim it only once A's
    // lease has passed (a little slack for the request's own latency).
    let gap = delivered.at - held.at;
    assert!(
        gap >= LEASE - Duration::from_millis(300),
        "B sent the alert {gap:?} after A's attempt, within A's {LEASE:?} lease"
    );
    poll_until(
        "the delivery marked sent",
        Duration::from_secs(10),
        || async {
            let row = client
                .query_one("select state, attempts from tally.alert_delivery", &[])
                .await
                .unwrap();
            let (state, attempts): (String, i32) = (row.get(0), row.get(1));
            (state == "sent").then_some(attempts)
        },
    )
    .await;
    // Several more rounds of B in which a duplicate could appear.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = received.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "one held attempt and one accepted: {log:?}");
    assert!(log.iter().all(|h| h.key == held.key), "{log:?}");
    let attempts = query_i64(
        &client,
        "select attempts::bigint from tally.alert_delivery where state = 'sent'",
        &[],
    )
    .await;
    assert_eq!(attempts, 2, "A's attempt and B's");
}

/// Prepares `batch` in queue `queue` with `n` records and runs it to its end with a SQL
/// handler `sql`; returns `coordinator wait`'s exit code.
async fn run_batch(db: &TestDb, batch: &str, queue: &str, n: u32, sql: &str) -> i32 {
    let (code, _, err) = coordinator_with_stdin(
        &db.url,
        &["prepare", batch, "--queue", queue, "--from-file", "-"],
        Some(&jsonl_ids(n)),
    );
    assert_eq!(code, 0, "{err}");
    let _worker = start_worker(
        &db.url,
        &[
            "--queue",
            queue,
            "--handler",
            "sql",
            "--sql",
            sql,
            "--poll-interval",
            "100ms",
        ],
    );
    let (code, out, err) = coordinator_async(&db.url, &["wait", batch, "--timeout", "60s"]).await;
    assert!(code == 0 || code == 3, "{out}{err}");
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_alerts_again_when_retried_records_all_complete_between_two_passes() {
    let db = TestDb::new("serve_refinish").await;
    let (hook, received) = start_receiver(First::Accept).await;
    // r10 and r20 divide by zero: a permanent failure each.
    let divide = "select 1 / (substr($1, 2)::int % 10)";
    {
        let _serve = start_serve(&db.url, &replica_args(&hook, &[]));
        assert_eq!(run_batch(&db, "b-re", "q", 20, divide).await, 3);
        let first = poll_until(
            "the finished_with_failures alert",
            Duration::from_secs(30),
            || async { accepted(&received, "finished_with_failures", "b-re").pop() },
        )
        .await;
        assert_eq!(first["counts"]["failed"], 2, "{first}");
    }
    // The cause is fixed and the failures retried while no replica looks: the next pass sees
    // the same complete + failed as the last one, and the batch finished all along, but it
    // finished anew, now without failures.
    let (code, out, err) = coordinator_async(&db.url, &["retry-failed", "b-re"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = {
        let _worker = start_worker(
            &db.url,
            &[
                "--queue",
                "q",
                "--handler",
                "sql",
                "--sql",
                "select 1",
                "--poll-interval",
                "100ms",
            ],
        );
        coordinator_async(&db.url, &["wait", "b-re", "--timeout", "60s"]).await
    };
    assert_eq!(code, 0, "{out}{err}");
    let _serve = start_serve(&db.url, &replica_args(&hook, &[]));
    let finished = poll_until("the finished alert", Duration::from_secs(30), || async {
        accepted(&received, "finished", "b-re").pop()
    })
    .await;
    assert_eq!(finished["counts"]["complete"], 20, "{finished}");
    assert_eq!(finished["counts"]["failed"], 0, "{finished}");
    // Several more passes in which a duplicate could appear.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(accepted(&received, "finished", "b-re").len(), 1);
    assert_eq!(
        accepted(&received, "finished_with_failures", "b-re").len(),
        1
    );
    let client = db.client().await;
    assert_eq!(alerts_raised(&client, "finished").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_does_not_announce_batches_that_finished_before_its_retention() {
    let db = TestDb::new("serve_old_finish").await;
    let (hook, received) = start_receiver(First::Accept).await;
    assert_eq!(run_batch(&db, "b-old", "q", 10, "select 1").await, 0);
    assert_eq!(run_batch(&db, "b-new", "q", 10, "select 1").await, 0);
    // b-old finished three days ago, long before the 24 h retention; serve never ran since.
    let client = db.client().await;
    client
        .execute(
            "update tally.batch
                set created_at = now() - interval '3 days',
                    ready_at = now() - interval '3 days',
                    started_at = now() - interval '3 days',
                    updated_at = now() - interval '3 days'
              where name = 'b-old'",
            &[],
        )
        .await
        .expect("backdate b-old");
    let _serve = start_serve(&db.url, &replica_args(&hook, &[]));
    poll_until(
        "the finished alert of b-new",
        Duration::from_secs(30),
        || async { accepted(&received, "finished", "b-new").pop() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = received.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "only the recent finish is announced: {log:?}");
    assert_eq!(alerts_raised(&client, "finished").await, 1);
    let seen = query_i64(
        &client,
        "select count(*) from tally.batch_progress p join tally.batch b on b.id = p.batch_id
          where b.name = 'b-old' and p.finished",
        &[],
    )
    .await;
    assert_eq!(seen, 1, "b-old is recorded as seen and finished");
}
