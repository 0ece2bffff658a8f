//! A worker's start against a database that is not there yet, or never will be.

use std::process::Stdio;
use std::time::{Duration, Instant};
use tally_tests::{
    admin_url, free_port, http_get, prepare_stdin, sample, scrape, with_database, TestDb, WorkerCmd,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_waits_for_an_unreachable_server_and_stops_on_sigterm() {
    // Nothing listens on port 1: the worker must keep retrying, not exit.
    let mut worker = tally_tests::start_worker(
        "postgres://postgres@127.0.0.1:1/nowhere",
        &["--queue", "q", "--handler", "noop"],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    worker.assert_running();
    let started = Instant::now();
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("worker stops within 10s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_gives_up_on_a_missing_database_and_works_on_a_real_one() {
    // A database that does not exist is a permanent error, reported at once; a real one
    // gets its batch processed.
    let missing = with_database(&admin_url(), "tally_no_such_database");
    let out = WorkerCmd::noop(&missing, "q")
        .command()
        .stderr(Stdio::piped())
        .output()
        .expect("run worker");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/tally_no_such_database") && stderr.contains("does not exist"),
        "{stderr}"
    );

    let db = TestDb::new("worker_starts_once_reachable").await;
    let mut worker = WorkerCmd::noop(&db.url, "q").poll("200ms").start();
    prepare_stdin(&db.url, "b", "q", b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n", &[]);
    let (code, stdout, stderr) =
        tally_tests::coordinator(&db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "{stdout} {stderr}");
    worker.signal(libc::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

async fn status_when_up(port: u16, path: &str) -> u16 {
    tally_tests::poll_until(
        "the health endpoint answers",
        Duration::from_secs(10),
        || async { http_status(port, path) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_report_live_but_not_ready_without_a_database() {
    let port = free_port();
    let _worker = WorkerCmd::noop("postgres://postgres@127.0.0.1:1/nowhere", "q")
        .listen(port)
        .start();
    assert_eq!(status_when_up(port, "/healthz").await, 200);
    assert_eq!(status_when_up(port, "/readyz").await, 503);
    assert_eq!(status_when_up(port, "/nope").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_when_connected_and_metrics_count_the_batch() {
    let db = TestDb::new("health_ready").await;
    let port = free_port();
    let _worker = WorkerCmd::noop(&db.url, "q").listen(port).start();
    assert_eq!(status_when_up(port, "/healthz").await, 200);
    // Panics unless /readyz answers 200 within the deadline.
    tally_tests::poll_until("the worker is ready", Duration::from_secs(10), || async {
        (http_status(port, "/readyz") == Some(200)).then_some(())
    })
    .await;

    let input: String = (1..=100)
        .map(|i| format!("{{\"id\":\"secret-{i}\"}}\n"))
        .collect();
    prepare_stdin(&db.url, "b", "q", input.as_bytes(), &[]);
    let (code, out, err) = tally_tests::coordinator(&db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "{out}{err}");
    let metrics = tally_tests::poll_until(
        "completions are counted",
        Duration::from_secs(10),
        || async {
            scrape(port).filter(|body| {
                body.contains("tally_worker_records_completed_total{queue=\"q\"} 100")
            })
        },
    )
    .await;
    for line in [
        "tally_worker_records_claimed_total{queue=\"q\"} 100",
        "tally_worker_records_failed_total{queue=\"q\",reason=\"permanent\"} 0",
        "tally_worker_records_failed_total{queue=\"q\",reason=\"exhausted\"} 0",
        "tally_worker_records_redelivered_total{queue=\"q\"} 0",
        "tally_worker_records_in_flight{queue=\"q\"} 0",
        "tally_worker_ready{queue=\"q\"} 1",
        "tally_worker_handler_duration_seconds_count{queue=\"q\"} 100",
        "# TYPE tally_worker_claim_duration_seconds histogram",
        "tally_worker_build_info{queue=\"q\",version=",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    assert!(
        !metrics.contains("secret-"),
        "record ids never become labels"
    );
}

/// Scrapes until `series` reads `want`; returns the whole scrape.
async fn scrape_when(port: u16, series: &str, want: f64) -> String {
    tally_tests::poll_until(
        &format!("{series} to reach {want}"),
        Duration::from_secs(20),
        || async { scrape(port).filter(|body| sample(body, series) == Some(want)) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_retry_and_redelivery_counters_match_the_database() {
    let db = TestDb::new("metrics_match_db").await;
    let client = db.client().await;
    // Outcome by id prefix: bad- fails permanently, doomed- always fails retryably (SQLSTATE
    // 40001), flaky- fails retryably until its third attempt, anything else succeeds.
    client
        .batch_execute(
            "create function outcome(rid text, bname text) returns int language plpgsql as $$
             declare a int;
             begin
               select r.attempt into a from tally.record r join tally.batch b on b.id = r.batch_id
                where b.name = bname and r.record_id = rid;
               if rid like 'bad-%' then
                 raise exception 'bad record' using errcode = '22023';
               elsif rid like 'doomed-%' or (rid like 'flaky-%' and a < 3) then
                 raise exception 'busy' using errcode = '40001';
               end if;
               return a;
             end $$",
        )
        .await
        .expect("create outcome()");
    let mut input = String::new();
    for (prefix, n) in [("ok", 60), ("flaky", 10), ("doomed", 5), ("bad", 5)] {
        for i in 0..n {
            input.push_str(&format!("{{\"id\":\"{prefix}-{i}\"}}\n"));
        }
    }
    let retry = [
        "--max-attempts",
        "3",
        "--backoff-base",
        "10ms",
        "--backoff-max",
        "50ms",
    ];
    prepare_stdin(&db.url, "b", "q", input.as_bytes(), &retry);
    let port = free_port();
    let _worker = WorkerCmd::sql(&db.url, "q", "select outcome($1, $3)")
        .args(&["--sql-chunk", "7", "--breaker-threshold", "100000"])
        .poll("100ms")
        .listen(port)
        .start();
    let (code, out, err) = tally_tests::coordinator(&db.url, &["wait", "b", "--timeout", "60s"]);
    assert_eq!(code, 3, "finished with failures: {out}{err}");

    let q = |sql: &'static str| {
        let client = &client;
        async move { tally_tests::query_i64(client, sql, &[]).await as f64 }
    };
    let complete = q("select count(*) from tally.record where state = 'complete'").await;
    let exhausted = q("select count(*) from tally.record \
                       where state = 'failed' and last_error like '%attempts exhausted%'")
    .await;
    let permanent = q("select count(*) from tally.record \
                       where state = 'failed' and last_error not like '%attempts exhausted%'")
    .await;
    // No lease expired here, so every attempt after the first followed a retry.
    let later_attempts = q("select coalesce(sum(attempt - 1), 0)::bigint from tally.record").await;
    assert_eq!(
        (complete, exhausted, permanent, later_attempts),
        (70.0, 5.0, 5.0, 30.0),
        "the database holds the expected outcomes"
    );

    let metrics = scrape_when(
        port,
        "tally_worker_records_completed_total{queue=\"q\"}",
        complete,
    )
    .await;
    for (series, want) in [
        (
            "tally_worker_records_failed_total{queue=\"q\",reason=\"exhausted\"}",
            exhausted,
        ),
        (
            "tally_worker_records_failed_total{queue=\"q\",reason=\"permanent\"}",
            permanent,
        ),
        (
            "tally_worker_records_retried_total{queue=\"q\"}",
            later_attempts,
        ),
        (
            "tally_worker_records_redelivered_total{queue=\"q\"}",
            later_attempts,
        ),
        (
            "tally_worker_records_claimed_total{queue=\"q\"}",
            80.0 + later_attempts,
        ),
        ("tally_worker_records_in_flight{queue=\"q\"}", 0.0),
        ("tally_worker_leases_lost_total{queue=\"q\"}", 0.0),
    ] {
        assert_eq!(
            sample(&metrics, series),
            Some(want),
            "{series} in:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains("busy") && !metrics.contains("doomed-"),
        "error texts and record ids never become labels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expiring_on_the_last_attempt_counts_as_exhausted() {
    let db = TestDb::new("metrics_lease_exhausted").await;
    prepare_stdin(
        &db.url,
        "b",
        "q",
        b"{\"id\":\"a\"}\n",
        &["--max-attempts", "1"],
    );
    // A worker that claims the only record and dies: its one attempt is used up.
    let store = db.store().await;
    let client = db.client().await;
    let batch = tally_tests::batch_id(&client, "b").await;
    let claimed = store
        .claim(batch, 10, "dead-worker", Duration::from_secs(600))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    // Its handler started (a row that never started would get its attempt back).
    store
        .start_leases(
            &[(claimed[0].lease_id, 1)],
            "dead-worker",
            Duration::from_secs(600),
        )
        .await
        .expect("announce the start");
    assert_eq!(tally_tests::backdate_lease(&client, claimed[0].id).await, 1);

    let port = free_port();
    let _worker = WorkerCmd::noop(&db.url, "q")
        .args(&["--rescue-interval", "200ms"])
        .listen(port)
        .start();
    let metrics = scrape_when(
        port,
        "tally_worker_records_failed_total{queue=\"q\",reason=\"exhausted\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &metrics,
            "tally_worker_records_failed_total{queue=\"q\",reason=\"permanent\"}"
        ),
        Some(0.0)
    );
    let counts = tally_tests::counts_by_state(&client, "b").await;
    assert_eq!((counts.failed, counts.total()), (1, 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_default_port_means_no_endpoints_but_a_taken_explicit_one_is_bad_usage() {
    let db = TestDb::new("listen_default_taken").await;
    // Hold the default port (if another process holds it already, it is just as taken).
    let _held = std::net::TcpListener::bind("0.0.0.0:9460");
    let scratch = tally_tests::TempDir::new("listen");
    let log = scratch.0.join("worker.log");
    let mut worker = WorkerCmd::noop(&db.url, "q")
        .poll("200ms")
        .env_remove("TALLY_LISTEN")
        .log_to(&log)
        .start();
    prepare_stdin(&db.url, "b", "q", &tally_tests::jsonl_ids(20), &[]);
    let (code, out, err) = tally_tests::coordinator(&db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "the worker works without endpoints: {out}{err}");
    worker.signal(libc::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        stderr.contains("0.0.0.0:9460") && stderr.contains("running without"),
        "{stderr}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for (listen, says) in [(addr.as_str(), addr.as_str()), ("nowhere", "\"nowhere\"")] {
        let out = WorkerCmd::noop(&db.url, "q")
            .args(&["--listen", listen])
            .command()
            .stderr(Stdio::piped())
            .output()
            .expect("run worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "--listen {listen}: {stderr}");
        assert!(stderr.contains(says), "--listen {listen}: {stderr}");
    }
}
