//! `coordinator serve`: per-batch progress on /metrics during and after real batches, read
//! without scanning the records, and its options checked. Alerts are in `alerts.rs`.

use std::time::Duration;
use tally_tests::serve::*;
use tally_tests::*;

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
            "--alert-lease",
            "0s",
        ],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--alert-webhook #1"), "{err}");
    assert!(err.contains("--stall-after must be longer than 0"), "{err}");
    assert!(err.contains("--alert-lease must be longer than 0"), "{err}");
}
