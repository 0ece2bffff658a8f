//! Real `worker` processes against a real PostgreSQL: exactly-once effects of the sql handler
//! (also under kill -9), retries, retry-failed, hostile ids, graceful stop and LISTEN/NOTIFY.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tally_tests::*;

const EXIT_OK: i32 = 0;
const EXIT_FINISHED_WITH_FAILURES: i32 = 3;

fn sql_worker(url: &str, queue: &str, statement: &str, extra: &[&str]) -> ChildGuard {
    let mut args = vec!["--queue", queue, "--handler", "sql", "--sql", statement];
    if !extra.contains(&"--concurrency") {
        args.extend(["--concurrency", "4"]);
    }
    args.extend_from_slice(extra);
    start_worker(url, &args)
}

/// Waits until `batch` shows progress, failing at once if a worker died on the way (so that a
/// worker that cannot start is reported as such, not as a timeout much later).
async fn await_progress(store: &tally::Store, batch: &str, workers: &mut [ChildGuard]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for w in workers.iter_mut() {
            w.assert_running();
        }
        let s = &store.batch_status(Some(batch)).await.unwrap()[0];
        if s.complete + s.failed > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no progress on {batch} in 30s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn strings(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 6. Exactly-once with three worker processes
// ---------------------------------------------------------------------------------------------

const EO_RECORDS: i64 = 100_000;
const EO_SQL: &str = "insert into sink(record_id, batch) values ($1, $3)";
const EO_SQL_SLOW: &str = "insert into sink(record_id, batch) select $1, $3 from pg_sleep(0.002)";

async fn exactly_once_setup(db: &TestDb, dir: &TempDir) {
    let client = db.client().await;
    // No unique constraint: a second application of a record's effect would show as a duplicate.
    client
        .batch_execute("create table sink (record_id text not null, batch text not null)")
        .await
        .unwrap();
    let path = jsonl_file(&dir.0, "in.jsonl", EO_RECORDS as u64);
    prepare_file(&db.url, "eo", "q", &path.display().to_string(), &[]).await;
}

async fn assert_exactly_once(db: &TestDb) {
    let client = db.client().await;
    let row = client
        .query_one(
            "select count(*), count(distinct record_id), count(*) filter (where batch <> 'eo') \
               from sink",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(1),
        EO_RECORDS,
        "every record's effect applied"
    );
    assert_eq!(row.get::<_, i64>(0), EO_RECORDS, "no effect applied twice");
    assert_eq!(row.get::<_, i64>(2), 0, "$3 is the batch name");
    let missing = query_i64(
        &client,
        "select count(*) from tally.record r where not exists \
           (select 1 from sink s where s.record_id = r.record_id)",
        &[],
    )
    .await;
    assert_eq!(missing, 0);
    let store = db.store().await;
    let c = assert_counts_exact(&store, &client, "eo").await;
    assert_eq!(c.complete, EO_RECORDS, "all records complete: {c:?}");
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where lease_owner is not null",
            &[]
        )
        .await,
        0,
        "no lease left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_exactly_once_three_workers() {
    let db = TestDb::new("heavy_exactly_once").await;
    let dir = TempDir::new("exactly-once");
    exactly_once_setup(&db, &dir).await;
    let mut workers: Vec<ChildGuard> = (1..=3)
        .map(|i| {
            let id = format!("w{i}");
            sql_worker(
                &db.url,
                "q",
                EO_SQL,
                &["--worker-id", &id, "--concurrency", "8"],
            )
        })
        .collect();
    await_progress(&db.store().await, "eo", &mut workers).await;
    let (code, stdout, stderr) = wait_batch(&db.url, "eo", "120s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    for w in &mut workers {
        w.assert_running();
    }
    assert_exactly_once(&db).await;
    let client = db.client().await;
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where attempt <> 1",
            &[]
        )
        .await,
        0,
        "a clean run delivers each record once"
    );
    // Graceful stop of all three.
    for w in &mut workers {
        w.signal(libc::SIGTERM);
    }
    for w in &mut workers {
        let status = w
            .wait_exit(Duration::from_secs(15))
            .await
            .expect("worker stops");
        assert_eq!(status.code(), Some(0), "worker exit status {status}");
    }
    // Stopped cleanly, they leave no lease behind.
    if let Some(n) = lease_rows(&client).await {
        assert_eq!(n, 0, "leases left after a clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_exactly_once_with_a_worker_killed() {
    let db = TestDb::new("heavy_exactly_once_killed").await;
    let dir = TempDir::new("exactly-once-killed");
    exactly_once_setup(&db, &dir).await;
    let client = db.client().await;
    let store = db.store().await;
    let mut workers: Vec<ChildGuard> = (1..=3)
        .map(|i| {
            let id = format!("w{i}");
            // Its own application_name, to find its server sessions.
            let url = format!("{}?application_name={id}", db.url);
            // w1, the one to be killed, is slow (~2 ms per record), so that it always has
            // claimed rows and open transactions when the kill lands.
            let statement = if i == 1 { EO_SQL_SLOW } else { EO_SQL };
            sql_worker(
                &url,
                "q",
                statement,
                &[
                    "--worker-id",
                    &id,
                    "--concurrency",
                    "8",
                    "--lease",
                    "3s",
                    "--rescue-interval",
                    "1s",
                ],
            )
        })
        .collect();
    await_progress(&store, "eo", &mut workers).await;
    // Kill w1 mid-run, while it holds leased rows.
    poll_until(
        "w1 to hold rows mid-run",
        Duration::from_secs(60),
        || async {
            let s = &store.batch_status(Some("eo")).await.unwrap()[0];
            let held = query_i64(
                &client,
                "select count(*) from tally.record where state = 'running' and lease_owner = 'w1'",
                &[],
            )
            .await;
            (s.complete >= 10_000 && held > 0).then_some(())
        },
    )
    .await;
    workers[0].signal(libc::SIGKILL);
    workers[0]
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed worker is gone");
    // Its transactions end on the server when it notices the dead client: committed if the
    // COMMIT was already sent, else rolled back. Count what it left behind after that.
    poll_until("w1's sessions to end", Duration::from_secs(30), || async {
        let n = query_i64(
            &client,
            "select count(*) from pg_stat_activity where application_name = 'w1'",
            &[],
        )
        .await;
        (n == 0).then_some(())
    })
    .await;
    let orphaned = query_i64(
        &client,
        "select count(*) from tally.record where state = 'running' and lease_owner = 'w1'",
        &[],
    )
    .await;
    // Of those, the rows whose handler had started: only they spend an attempt.
    let orphaned_started = query_i64(
        &client,
        "select count(*) from tally.record r join tally.lease l on l.id = r.lease_id \
          where r.state = 'running' and r.lease_owner = 'w1' \
            and array_position(l.record_ids, r.id) <= l.started",
        &[],
    )
    .await;

    let (code, stdout, stderr) = wait_batch(&db.url, "eo", "120s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    workers[1].assert_running();
    workers[2].assert_running();
    assert_exactly_once(&db).await;
    assert!(orphaned > 0, "w1 held no rows when it was killed");
    // The dead worker's rows were rescued after their lease and redelivered: attempt 2.
    let redelivered = query_i64(
        &client,
        "select count(*) from tally.record where attempt >= 2",
        &[],
    )
    .await;
    assert!(
        redelivered >= orphaned_started,
        "{orphaned_started} started rows were orphaned but only {redelivered} redelivered"
    );
    assert!(
        redelivered <= orphaned,
        "{redelivered} rows spent a second attempt, but only {orphaned} were orphaned"
    );
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where attempt > 2",
            &[]
        )
        .await,
        0,
        "one kill costs at most one extra attempt"
    );
    // The dead worker's leases were taken by the rescuers, the live ones' dropped once their
    // rows were written back (at the next renewal pass, every lease / 3).
    if lease_rows(&client).await.is_some() {
        poll_until(
            "all leases to be dropped",
            Duration::from_secs(15),
            || async { (lease_rows(&client).await == Some(0)).then_some(()) },
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// 7. retry-failed
// ---------------------------------------------------------------------------------------------

fn failed_ids(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .expect("failed --json prints an array")
        .iter()
        .map(|f| f["record_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_after_fixing_the_cause() {
    let db = TestDb::new("retry_failed").await;
    let dir = TempDir::new("retry-failed");
    let client = db.client().await;
    let store = db.store().await;
    client
        .batch_execute(
            "create table sink (record_id text not null, batch text not null, n int not null, \
               constraint n_not_tenth check (n % 10 <> 0))",
        )
        .await
        .unwrap();
    let statement = "insert into sink (record_id, batch, n) values ($1, $3, ($2->>'n')::int)";
    let a = jsonl_file(&dir.0, "a.jsonl", 50).display().to_string();
    let b = jsonl_file(&dir.0, "b.jsonl", 20).display().to_string();
    let fast = ["--backoff-base", "10ms", "--backoff-max", "50ms"];
    prepare_file(&db.url, "ba", "qa", &a, &fast).await;
    prepare_file(&db.url, "bb", "qb", &b, &fast).await;
    let _wa = sql_worker(&db.url, "qa", statement, &[]);
    let mut wb = sql_worker(&db.url, "qb", statement, &[]);

    let (code, stdout, stderr) = wait_batch(&db.url, "ba", "60s").await;
    assert_eq!(code, EXIT_FINISHED_WITH_FAILURES, "{stdout} {stderr}");
    let (code, stdout, stderr) = wait_batch(&db.url, "bb", "60s").await;
    assert_eq!(code, EXIT_FINISHED_WITH_FAILURES, "{stdout} {stderr}");
    wb.kill();

    // A check violation is permanent: failed at the first attempt, with the server's message.
    let (code, stdout, stderr) = coordinator_async(&db.url, &["failed", "ba", "--json"]).await;
    assert_eq!(code, EXIT_OK, "{stderr}");
    let list: Value = serde_json::from_str(&stdout).unwrap();
    let expected: BTreeSet<String> = ["r10", "r20", "r30", "r40", "r50"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(failed_ids(&list), expected);
    for f in list.as_array().unwrap() {
        assert_eq!(f["attempts"], 1, "{f}");
        let err = f["last_error"].as_str().unwrap();
        assert!(
            err.contains("violates check constraint") && err.contains("n_not_tenth"),
            "{f}"
        );
        assert!(
            f["failed_at"].as_str().is_some_and(|s| !s.is_empty()),
            "{f}"
        );
    }
    let (code, stdout, _) = coordinator_async(&db.url, &["failed", "ba"]).await;
    assert_eq!(code, EXIT_OK);
    assert!(
        stdout.contains("r30") && stdout.contains("n_not_tenth"),
        "{stdout}"
    );
    assert_eq!(store.failed_records("bb", 100).await.unwrap().len(), 2);

    // Fix the cause, then retry only batch ba.
    client
        .batch_execute("alter table sink drop constraint n_not_tenth")
        .await
        .unwrap();
    let (code, stdout, stderr) = coordinator_async(&db.url, &["retry-failed", "ba"]).await;
    assert_eq!(code, EXIT_OK, "{stderr}");
    assert!(stdout.starts_with("5 "), "{stdout}");
    let bb = assert_counts_exact(&store, &client, "bb").await;
    assert_eq!(bb.failed, 2, "another batch's failed rows stay failed");
    let (code, stdout, _) = coordinator_async(&db.url, &["retry-failed", "ba"]).await;
    assert_eq!(code, EXIT_OK);
    assert!(stdout.starts_with("0 "), "second retry-failed: {stdout}");

    let (code, stdout, stderr) = wait_batch(&db.url, "ba", "60s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    let c = assert_counts_exact(&store, &client, "ba").await;
    assert_eq!(c.complete, 50);
    assert_eq!(
        query_i64(
            &client,
            "select count(distinct record_id) from sink where batch = 'ba'",
            &[]
        )
        .await,
        50
    );
    assert_eq!(
        query_i64(&client, "select count(*) from sink where batch = 'ba'", &[]).await,
        50
    );
    // Without --reset-attempts the retried records used one more attempt.
    let twice = strings(
        &client,
        "select r.record_id from tally.record r join tally.batch b on b.id = r.batch_id \
          where b.name = 'ba' and r.attempt = 2 order by r.record_id",
    )
    .await;
    assert_eq!(twice, ["r10", "r20", "r30", "r40", "r50"]);
    let (_, stdout, _) = coordinator_async(&db.url, &["failed", "ba", "--json"]).await;
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), json!([]));

    // --reset-attempts on the other batch (no worker on its queue now).
    let (code, stdout, stderr) =
        coordinator_async(&db.url, &["retry-failed", "bb", "--reset-attempts"]).await;
    assert_eq!(code, EXIT_OK, "{stderr}");
    assert!(stdout.starts_with("2 "), "{stdout}");
    let reset = client
        .query(
            "select r.state, r.attempt from tally.record r join tally.batch b \
               on b.id = r.batch_id where b.name = 'bb' and r.record_id in ('r10', 'r20')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(reset.len(), 2);
    for row in reset {
        assert_eq!(row.get::<_, String>(0), "pending");
        assert_eq!(
            row.get::<_, i32>(1),
            0,
            "--reset-attempts resets the attempt"
        );
    }
    let c = assert_counts_exact(&store, &client, "bb").await;
    assert_eq!((c.pending, c.failed, c.complete), (2, 0, 18));
    let _wb = sql_worker(&db.url, "qb", statement, &[]);
    let (code, stdout, stderr) = wait_batch(&db.url, "bb", "60s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    assert_eq!(
        query_i64(&client, "select count(*) from sink where batch = 'bb'", &[]).await,
        20
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Retryable SQLSTATEs retry; attempts are bounded
// ---------------------------------------------------------------------------------------------

/// `flaky(id)` raises serialization_failure for record r1 the first two times it is called
/// (once on the worker's fast path, once on its per-record path: one failed attempt), then
/// records the id in `sink`. The sequence is not transactional, so the rollback of the
/// failing attempt does not reset it.
async fn flaky_setup(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "create sequence flaky_calls;
             create table sink (record_id text not null);
             create function flaky(id text) returns void language plpgsql as $$
             begin
                 if id = 'r1' then
                     if nextval('flaky_calls') <= 2 then
                         raise exception 'simulated conflict on %', id
                             using errcode = 'serialization_failure';
                     end if;
                 end if;
                 insert into sink values (id);
             end $$;",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_sql_error_is_retried() {
    let db = TestDb::new("retryable_sql").await;
    let dir = TempDir::new("retryable");
    flaky_setup(&db).await;
    let path = jsonl_file(&dir.0, "in.jsonl", 5).display().to_string();
    prepare_file(
        &db.url,
        "flaky",
        "q",
        &path,
        &["--backoff-base", "10ms", "--backoff-max", "50ms"],
    )
    .await;
    let _w = sql_worker(&db.url, "q", "select flaky($1)", &[]);
    let (code, stdout, stderr) = wait_batch(&db.url, "flaky", "60s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    let client = db.client().await;
    let rows = client
        .query(
            "select record_id, attempt, state from tally.record order by id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected: Vec<(String, i32, String)> = (1..=5)
        .map(|i| {
            let attempt = if i == 1 { 2 } else { 1 };
            (format!("r{i}"), attempt, "complete".to_string())
        })
        .collect();
    assert_eq!(got, expected, "r1 retried once, the others untouched");
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        5
    );
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from sink where record_id = 'r1'",
            &[]
        )
        .await,
        1
    );
    assert_counts_exact(&db.store().await, &client, "flaky").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_sql_error_exhausts_max_attempts() {
    let db = TestDb::new("retryable_exhausted").await;
    let dir = TempDir::new("exhausted");
    flaky_setup(&db).await;
    let path = jsonl_file(&dir.0, "in.jsonl", 5).display().to_string();
    prepare_file(&db.url, "flaky", "q", &path, &["--max-attempts", "1"]).await;
    let _w = sql_worker(&db.url, "q", "select flaky($1)", &[]);
    let (code, stdout, stderr) = wait_batch(&db.url, "flaky", "60s").await;
    assert_eq!(code, EXIT_FINISHED_WITH_FAILURES, "{stdout} {stderr}");
    let client = db.client().await;
    let row = client
        .query_one(
            "select state, attempt, last_error from tally.record where record_id = 'r1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "failed");
    assert_eq!(row.get::<_, i32>(1), 1);
    let last_error: String = row.get(2);
    assert!(last_error.contains("attempts exhausted"), "{last_error}");
    assert!(
        last_error.contains("simulated conflict on r1"),
        "{last_error}"
    );
    assert_eq!(
        strings(&client, "select record_id from sink order by record_id").await,
        ["r2", "r3", "r4", "r5"]
    );
    let c = assert_counts_exact(&db.store().await, &client, "flaky").await;
    assert_eq!((c.complete, c.failed), (4, 1));
}

// ---------------------------------------------------------------------------------------------
// 10. Hostile ids
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_are_stored_and_processed_verbatim() {
    let db = TestDb::new("hostile_ids").await;
    let dir = TempDir::new("hostile");
    let client = db.client().await;
    client
        .batch_execute("create table sink (record_id text not null, payload jsonb not null)")
        .await
        .unwrap();
    let ids: Vec<String> = vec![
        "a'b".into(),
        "x;drop table tally.record;--".into(),
        "ünï€ode".into(),
        "\"quoted\"".into(),
        "z".repeat(1000),
        "tab\there\\back\\slash".into(),
        "\\N".into(),
        "\\.".into(),
        "line\nbreak\r\n".into(),
        "emoji 😀 \u{200b}".into(),
        "$1".into(),
        " leading and trailing ".into(),
        "%s%n{}".into(),
    ];
    let values: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"id": id, "n": i, "echo": id}))
        .collect();
    let path = dir.0.join("hostile.jsonl");
    std::fs::write(&path, jsonl_bytes(&values)).unwrap();
    prepare_file(&db.url, "hostile", "q", &path.display().to_string(), &[]).await;

    let expected: BTreeSet<String> = ids.iter().cloned().collect();
    let stored: BTreeSet<String> = strings(&client, "select record_id from tally.record")
        .await
        .into_iter()
        .collect();
    assert_eq!(stored, expected, "ids stored verbatim");
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where payload->>'id' = record_id \
               and payload->>'echo' = record_id",
            &[]
        )
        .await,
        ids.len() as i64
    );
    assert!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await == 1,
        "the schema survived"
    );

    let _w = sql_worker(
        &db.url,
        "q",
        "insert into sink (record_id, payload) values ($1, $2)",
        &[],
    );
    let (code, stdout, stderr) = wait_batch(&db.url, "hostile", "60s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    let sunk = strings(&client, "select record_id from sink").await;
    assert_eq!(sunk.len(), ids.len(), "each once");
    assert_eq!(sunk.into_iter().collect::<BTreeSet<_>>(), expected);
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from sink where payload->>'id' = record_id",
            &[]
        )
        .await,
        ids.len() as i64
    );
    // `failed` and `status` print them without trouble.
    let (code, _, stderr) = coordinator_async(&db.url, &["status", "hostile", "--json"]).await;
    assert_eq!(code, EXIT_OK, "{stderr}");
    assert_counts_exact(&db.store().await, &client, "hostile").await;
}

// ---------------------------------------------------------------------------------------------
// 13. The noop worker and SIGTERM
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_worker_completes_and_stops_on_sigterm() {
    let db = TestDb::new("noop_sigterm").await;
    let dir = TempDir::new("noop");
    let path = jsonl_file(&dir.0, "in.jsonl", 10_000).display().to_string();
    prepare_file(&db.url, "noop", "q", &path, &[]).await;
    let mut worker = start_worker(
        &db.url,
        &["--queue", "q", "--handler", "noop", "--concurrency", "4"],
    );
    let (code, stdout, stderr) = wait_batch(&db.url, "noop", "60s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    let client = db.client().await;
    let c = assert_counts_exact(&db.store().await, &client, "noop").await;
    assert_eq!(c.complete, 10_000);

    worker.assert_running();
    let started = Instant::now();
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("worker exits within 10s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where state = 'running'",
            &[]
        )
        .await,
        0
    );
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where attempt <> 1",
            &[]
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_drains_and_releases_unstarted_rows() {
    let db = TestDb::new("sigterm_mid_run").await;
    let dir = TempDir::new("sigterm");
    let client = db.client().await;
    let store = db.store().await;
    client
        .batch_execute("create table sink (record_id text not null)")
        .await
        .unwrap();
    let path = jsonl_file(&dir.0, "in.jsonl", 2_000).display().to_string();
    prepare_file(&db.url, "slow", "q", &path, &[]).await;
    // ~20 ms per record, two chunks of 5 at a time: a claim of 500 is mostly unstarted.
    let mut worker = sql_worker(
        &db.url,
        "q",
        "insert into sink select $1 from pg_sleep(0.02)",
        &[
            "--concurrency",
            "2",
            "--sql-chunk",
            "5",
            "--claim-size",
            "500",
        ],
    );
    poll_until("some progress", Duration::from_secs(30), || async {
        let s = &store.batch_status(Some("slow")).await.unwrap()[0];
        (s.complete >= 20 && s.running > 0).then_some(())
    })
    .await;
    let started = Instant::now();
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("worker drains and exits");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let c = assert_counts_exact(&store, &client, "slow").await;
    assert_eq!(c.running, 0, "no row left running: {c:?}");
    assert!(c.pending > 0, "stopped mid-run: {c:?}");
    assert_eq!(c.complete + c.pending, 2_000, "{c:?}");
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where state = 'pending' and attempt <> 0",
            &[]
        )
        .await,
        0,
        "released rows keep their attempt budget"
    );
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        c.complete,
        "effects exactly for the completed rows"
    );
    // Another worker finishes the rest.
    let _w = sql_worker(&db.url, "q", "insert into sink select $1", &[]);
    let (code, stdout, stderr) = wait_batch(&db.url, "slow", "60s").await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    assert_eq!(
        query_i64(&client, "select count(distinct record_id) from sink", &[]).await,
        2_000
    );
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        2_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_rejects_bad_configuration() {
    let db = TestDb::new("worker_bad_config").await;
    for args in [
        vec!["--queue", "a b", "--handler", "noop"],
        vec!["--queue", "q", "--handler", "sql"],
        vec!["--queue", "q", "--handler", "noop", "--concurrency", "0"],
        vec![
            "--queue",
            "q",
            "--handler",
            "sql",
            "--sql",
            "selec nonsense",
        ],
        vec!["--queue", "q", "--handler", "bogus"],
    ] {
        let mut w = start_worker(&db.url, &args);
        let status = w
            .wait_exit(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("{args:?}: worker should refuse to start"));
        assert_eq!(status.code(), Some(64), "{args:?}: {status}");
    }
    let empty = TestDb::empty("worker_no_schema").await;
    let mut w = start_worker(&empty.url, &["--queue", "q", "--handler", "noop"]);
    let status = w
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("worker without schema exits");
    assert!(!status.success(), "{status}");
}

// ---------------------------------------------------------------------------------------------
// 14. LISTEN/NOTIFY wakes an idle worker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_worker() {
    let db = TestDb::new("notify_wakes").await;
    let client = db.client().await;
    let store = db.store().await;
    let mut worker = start_worker(
        &db.url,
        &[
            "--queue",
            "q",
            "--handler",
            "noop",
            "--concurrency",
            "4",
            "--poll-interval",
            "60s",
        ],
    );
    // Wait until its LISTEN has completed (otherwise the notification could come too early).
    poll_until("the worker to LISTEN", Duration::from_secs(15), || async {
        let n = query_i64(
            &client,
            "select count(*) from pg_stat_activity where datname = $1 \
               and query ilike 'listen tally_work%' and state = 'idle'",
            &[&db.name],
        )
        .await;
        (n > 0).then_some(())
    })
    .await;
    // Let the worker settle into its 60 s idle wait.
    worker.assert_running();
    poll_until("the worker to go idle", Duration::from_secs(15), || async {
        let busy = query_i64(
            &client,
            "select count(*) from pg_stat_activity where datname = $1 and pid <> pg_backend_pid() \
               and state <> 'idle' and application_name = 'tally'",
            &[&db.name],
        )
        .await;
        (busy == 0).then_some(())
    })
    .await;

    let started = Instant::now();
    let values: Vec<Value> = (1..=100).map(|i| json!({"id": i})).collect();
    store
        .prepare_from_reader(
            &spec("late", "q"),
            std::io::Cursor::new(jsonl_bytes(&values)),
            tally::input::Format::Jsonl,
            1 << 20,
            None,
        )
        .await
        .unwrap();
    poll_until(
        "the notified worker to finish the batch",
        Duration::from_secs(15),
        || async {
            let s = &store.batch_status(Some("late")).await.unwrap()[0];
            (s.complete == 100).then_some(())
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "woken in {:?}, not by the 60 s poll",
        started.elapsed()
    );
    worker.assert_running();
    assert_counts_exact(&store, &client, "late").await;

    // retry-failed also wakes it: fail one row by hand, retry it, watch it complete.
    client
        .batch_execute(
            "update tally.record set state = 'failed', last_error = 'failed by hand' \
               where record_id = '7'",
        )
        .await
        .unwrap();
    assert_eq!(store.retry_failed("late", false).await.unwrap(), 1);
    poll_until(
        "the retried row to complete",
        Duration::from_secs(15),
        || async {
            let s = &store.batch_status(Some("late")).await.unwrap()[0];
            (s.complete == 100).then_some(())
        },
    )
    .await;
    assert_eq!(
        query_i64(
            &client,
            "select attempt::bigint from tally.record where record_id = '7'",
            &[]
        )
        .await,
        2
    );
}
