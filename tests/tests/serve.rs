//! `coordinator serve`: per-batch progress on /metrics during and after real batches, read
//! without scanning the records, and alert webhooks sent once across two replicas, with
//! redelivery when the receiver fails.

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_tests::{
    binary, coordinator, coordinator_async, coordinator_with_stdin, jsonl_ids, poll_until,
    start_worker, ChildGuard, TempDir, TestDb,
};

/// A running `coordinator serve` and the address it listens on.
struct Serve {
    _child: ChildGuard,
    base: String,
}

/// Starts `coordinator serve --listen 127.0.0.1:0 ARGS` and reads the address it printed.
fn start_serve(url: &str, args: &[&str]) -> Serve {
    let mut child = Command::new(binary("coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn coordinator serve");
    let stdout = child.stdout.take().expect("serve's stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines
        .next()
        .and_then(|l| l.ok())
        .unwrap_or_else(|| panic!("coordinator serve printed nothing"));
    // Keep draining, so that the process never writes into a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    let addr = first
        .rsplit(' ')
        .next()
        .filter(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    Serve {
        _child: ChildGuard::new("coordinator serve", child),
        base: format!("http://{addr}"),
    }
}

impl Serve {
    async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// One scrape, as series (name with labels) to value.
    async fn scrape(&self) -> HashMap<String, f64> {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        parse_metrics(&text)
    }
}

fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn series(name: &str, batch: &str, queue: &str, state: Option<&str>) -> String {
    match state {
        Some(s) => format!("{name}{{batch=\"{batch}\",queue=\"{queue}\",state=\"{s}\"}}"),
        None => format!("{name}{{batch=\"{batch}\",queue=\"{queue}\"}}"),
    }
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no series {key} in {m:?}"))
}

const STATES: [&str; 5] = ["pending", "running", "complete", "failed", "cancelled"];

/// Every plan node of an EXPLAIN (FORMAT JSON) output that reads `tally.record`.
fn record_scans(plan: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match plan {
        serde_json::Value::Object(map) => {
            if map.get("Relation Name").and_then(|v| v.as_str()) == Some("record") {
                out.push(plan.clone());
            }
            map.values().for_each(|v| record_scans(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| record_scans(v, out)),
        _ => {}
    }
}

/// EXPLAINs every statement of `serve` that reads `tally.record` (custom and generic plans):
/// each must reach records only through the claim index, never by a scan of the table.
async fn assert_no_record_scan(client: &tokio_postgres::Client) {
    let reading: Vec<_> = tally::store::progress::SERVE_STATEMENTS
        .iter()
        .filter(|(_, sql)| sql.contains("tally.record"))
        .collect();
    let names: Vec<&str> = reading.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        ["serve_scrape", "serve_observe_batches"],
        "the statements of serve that read tally.record (each takes the retention in seconds)"
    );
    for (name, sql) in reading {
        client
            .batch_execute(&format!("deallocate all; prepare p(float8) as {sql}"))
            .await
            .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
        for mode in ["force_custom_plan", "force_generic_plan"] {
            client
                .batch_execute(&format!("set plan_cache_mode = {mode}"))
                .await
                .unwrap();
            let plan: serde_json::Value = client
                .query_one("explain (format json) execute p(86400)", &[])
                .await
                .unwrap_or_else(|e| panic!("explain {name}: {e}"))
                .get(0);
            let mut scans = Vec::new();
            record_scans(&plan, &mut scans);
            assert!(!scans.is_empty(), "{name} reads tally.record: {plan}");
            for scan in scans {
                let node = scan["Node Type"].as_str().unwrap_or_default();
                assert!(
                    matches!(node, "Index Scan" | "Index Only Scan")
                        && scan["Index Name"] == "record_claim",
                    "{name} ({mode}) reads tally.record with {node} instead of the claim index: {plan}"
                );
            }
        }
    }
    client
        .batch_execute("deallocate all; reset plan_cache_mode")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_metrics_follow_a_batch_and_match_status_without_scanning_records() {
    let db = TestDb::new("serve_metrics").await;
    let client = db.client().await;
    let (code, _, err) = coordinator_with_stdin(
        &db.url,
        &["prepare", "b-1", "--queue", "q", "--from-file", "-"],
        Some(&jsonl_ids(3000)),
    );
    assert_eq!(code, 0, "{err}");
    client.batch_execute("analyze tally.record").await.unwrap();
    assert_no_record_scan(&client).await;

    let serve = start_serve(&db.url, &["--check-interval", "200ms"]);
    poll_until("serve ready", Duration::from_secs(20), || async {
        (serve.get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(serve.get("/healthz").await.0, 200);
    let m = serve.scrape().await;
    assert_eq!(value(&m, "tally_serve_up"), 1.0);
    let records = |state| series("tally_batch_records", "b-1", "q", Some(state));
    assert_eq!(value(&m, &records("pending")), 3000.0);
    assert_eq!(
        value(
            &m,
            &series("tally_batch_records_expected", "b-1", "q", None)
        ),
        3000.0
    );
    assert_eq!(
        value(&m, &series("tally_batch_state", "b-1", "q", Some("ready"))),
        1.0
    );
    assert_eq!(value(&m, "tally_queue_breaker_open{queue=\"q\"}"), 0.0);
    assert!(
        value(
            &m,
            &series("tally_batch_oldest_pending_age_seconds", "b-1", "q", None)
        ) >= 0.0
    );

    // About a millisecond per record, so that the run spans many scrapes.
    let _worker = start_worker(
        &db.url,
        &[
            "--queue",
            "q",
            "--handler",
            "sql",
            "--sql",
            "select pg_sleep(0.001)",
            "--concurrency",
            "2",
            "--claim-size",
            "100",
            "--sql-chunk",
            "20",
        ],
    );
    // During the run every scrape accounts for every record.
    let midway = std::sync::atomic::AtomicBool::new(false);
    let m = poll_until("complete reaches 3000", Duration::from_secs(60), || async {
        let m = serve.scrape().await;
        let sum: f64 = STATES.iter().map(|s| value(&m, &records(s))).sum();
        assert_eq!(sum, 3000.0, "records by state add up to the total: {m:?}");
        let complete = value(&m, &records("complete"));
        if complete > 0.0 && complete < 3000.0 {
            midway.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        (complete == 3000.0).then_some(m)
    })
    .await;
    assert!(
        midway.into_inner(),
        "no scrape saw the batch part-way through"
    );
    let (code, out, err) = coordinator_async(&db.url, &["status", "b-1", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    for state in STATES {
        assert_eq!(
            value(&m, &records(state)),
            status[state].as_f64().unwrap(),
            "{state}: /metrics against coordinator status --json {status}"
        );
    }
    let shown = status["state"].as_str().unwrap();
    assert_eq!(shown, "complete");
    assert_eq!(
        value(&m, &series("tally_batch_state", "b-1", "q", Some(shown))),
        1.0
    );
    assert_eq!(
        value(
            &m,
            &series("tally_batch_completion_ratio", "b-1", "q", None)
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            &series("tally_batch_oldest_pending_age_seconds", "b-1", "q", None)
        ),
        0.0
    );
    assert!(value(&m, "tally_serve_scrape_duration_seconds_count") >= 1.0);
    client.batch_execute("analyze tally.record").await.unwrap();
    assert_no_record_scan(&client).await;
}

/// What the webhook receiver got: (idempotency key, body, status answered).
type Received = Arc<Mutex<Vec<(String, serde_json::Value, u16)>>>;

/// A webhook receiver on 127.0.0.1:0 that answers 500 to its first request and 200 after.
async fn start_receiver() -> (String, Received) {
    use axum::http::{HeaderMap, StatusCode};
    let received: Received = Arc::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/hook/secret",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let log = log.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let body: serde_json::Value =
                    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                let mut log = log.lock().unwrap();
                let status = if log.is_empty() { 500 } else { 200 };
                log.push((key, body, status));
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook/secret"), received)
}

/// Accepted alerts (answered 200) with `event` for `batch`.
fn accepted(received: &Received, event: &str, batch: &str) -> Vec<serde_json::Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, b, status)| *status == 200 && b["event"] == event && b["batch"] == batch)
        .map(|(_, b, _)| b.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_alerts_once_across_replicas_and_redelivers_after_a_failure() {
    let db = TestDb::new("serve_alerts").await;
    let (hook, received) = start_receiver().await;
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
    assert_eq!(log[0].2, 500);
    let retried = &log[0].0;
    assert!(!retried.is_empty(), "alerts carry an idempotency key");
    let again: Vec<_> = log.iter().filter(|(k, _, _)| k == retried).collect();
    assert_eq!(
        again.len(),
        2,
        "the failed alert was sent once more: {log:?}"
    );
    assert_eq!(again[1].2, 200);
    let mut keys: Vec<&String> = log.iter().filter(|e| e.2 == 200).map(|e| &e.0).collect();
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

#[test]
fn serve_rejects_bad_options_with_every_problem_named() {
    let (code, _, err) = coordinator(
        "postgres://postgres@127.0.0.1:1/none",
        &[
            "serve",
            "--alert-webhook",
            "ftp://example.com/x",
            "--stall-after",
            "0s",
        ],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--alert-webhook #1"), "{err}");
    assert!(err.contains("--stall-after must be longer than 0"), "{err}");
}
