//! A poison record and a handler slower than its lease, with real worker processes.

use std::time::Duration;
use tally_tests::{
    admin_url, assert_counts_exact, assert_sink_exactly_once, connect, coordinator, create_sink,
    jsonl_ids, lease_rows, poll_until, prepare_stdin, query_i64, terminate_backends, TestDb,
    WorkerCmd,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_fails_after_its_attempts_without_delaying_the_rest() {
    let db = TestDb::new("poison").await;
    let client = db.client().await;
    client
        .batch_execute(
            "create table sink (record_id text not null);
             -- r7 always fails, with an error that is worth retrying.
             create function deliver(id text) returns boolean language plpgsql as $$
             begin
                 if id = 'r7' then
                     raise exception 'downstream rejects %', id using errcode = '40001';
                 end if;
                 return true;
             end $$;",
        )
        .await
        .unwrap();
    let retry = [
        "--max-attempts",
        "3",
        "--backoff-base",
        "10ms",
        "--backoff-max",
        "20ms",
    ];
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(2000), &retry);
    let _worker = WorkerCmd::sql(&db.url, "q", "insert into sink select $1 where deliver($1)")
        .poll("100ms")
        .start();
    let (code, out, err) = coordinator(&db.url, &["wait", "b", "--timeout", "60s"]);
    assert_eq!(code, 3, "finished with one failure: {out}{err}");
    let store = db.store().await;
    let counts = assert_counts_exact(&store, &client, "b").await;
    assert_eq!((counts.complete, counts.failed), (1999, 1), "{counts:?}");
    let failed = store.failed_records("b", 10).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].record_id, "r7");
    assert_eq!(failed[0].attempts, 3);
    assert!(
        failed[0].last_error.contains("downstream rejects r7")
            && failed[0].last_error.contains("attempts exhausted"),
        "{}",
        failed[0].last_error
    );
    // Its neighbours (in the same chunks) went through on their first attempt.
    let retried = query_i64(
        &client,
        "select count(*) from tally.record where record_id <> 'r7' and attempt <> 1",
        &[],
    )
    .await;
    assert_eq!(retried, 0);
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        1999
    );
    let breaker = query_i64(
        &client,
        "select count(*) from tally.breaker where state <> 'closed'",
        &[],
    )
    .await;
    assert_eq!(breaker, 0, "one poison record does not open the breaker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_lease_keeps_its_rows_by_renewal() {
    let db = TestDb::new("slow_handler").await;
    let client = db.client().await;
    create_sink(&client, "sink").await;
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(4), &[]);
    // Each record takes 1.5 s under a 1 s lease; two workers rescue eagerly.
    let worker = WorkerCmd::sql(
        &db.url,
        "q",
        "insert into sink select $1 from pg_sleep(1.5)",
    )
    .args(&["--concurrency", "1", "--sql-chunk", "1", "--lease", "1s"])
    .args(&["--rescue-interval", "200ms"])
    .poll("100ms");
    let _w1 = worker.start();
    let _w2 = worker.start();
    let (code, out, err) = coordinator(&db.url, &["wait", "b", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_sink_exactly_once(&client, "sink", 4).await;
    let again = query_i64(
        &client,
        "select count(*) from tally.record where attempt <> 1 or last_error is not null",
        &[],
    )
    .await;
    assert_eq!(again, 0, "no lease expired, no record was processed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_a_draining_worker_at_once() {
    let db = TestDb::new("second_signal").await;
    let client = db.client().await;
    create_sink(&client, "sink").await;
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(2), &[]);
    // A 30 s statement under a 60 s grace period: the first SIGTERM alone would wait for it.
    let mut worker = WorkerCmd::sql(&db.url, "q", "insert into sink select $1 from pg_sleep(30)")
        .args(&["--grace-period", "60s"])
        .poll("100ms")
        .start();
    let store = db.store().await;
    tally_tests::poll_until(
        "the record runs",
        std::time::Duration::from_secs(10),
        || async {
            let s = store.batch_status(Some("b")).await.unwrap().remove(0);
            (s.running > 0).then_some(())
        },
    )
    .await;
    worker.signal(libc::SIGTERM);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    worker.assert_running();
    let started = std::time::Instant::now();
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(std::time::Duration::from_secs(5))
        .await
        .expect("the second signal stops the worker at once");
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // Nothing was written for the interrupted record: its lease will expire and it runs again.
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_stopping_worker_could_not_release_are_rescued_later() {
    let db = TestDb::new("unreleased").await;
    let client = db.client().await;
    let admin = connect(&admin_url()).await;
    create_sink(&client, "sink").await;
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(5), &[]);
    // One claim (one lease) of five rows; one runs at a time, the others wait for a slot.
    let first_url = format!("{}?application_name=first-worker", db.url);
    let mut first = WorkerCmd::sql(
        &first_url,
        "q",
        "insert into sink select $1 from pg_sleep(1)",
    )
    .args(&[
        "--concurrency",
        "1",
        "--sql-chunk",
        "1",
        "--claim-size",
        "5",
    ])
    .args(&[
        "--lease",
        "3s",
        "--rescue-interval",
        "1h",
        "--grace-period",
        "20s",
    ])
    .poll("100ms")
    .start();
    poll_until(
        "the worker to claim all rows",
        Duration::from_secs(10),
        || async {
            let running = query_i64(
                &client,
                "select count(*) from tally.record where state = 'running'",
                &[],
            )
            .await;
            (running == 5).then_some(())
        },
    )
    .await;

    // An outage: the worker's sessions end and it cannot connect again. Stopped now, it
    // cannot give back the four rows it never started.
    let database = db.name.as_str();
    admin
        .batch_execute(&format!(
            "alter database \"{database}\" allow_connections false"
        ))
        .await
        .expect("refuse connections");
    assert!(terminate_backends(&client, "first-worker").await > 0);
    first.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    admin
        .batch_execute(&format!(
            "alter database \"{database}\" allow_connections true"
        ))
        .await
        .expect("accept connections");
    // The record that was running is retried once the database is back, and written.
    let status = first
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the worker drains and exits");
    assert!(status.success(), "{status}");
    let running = query_i64(
        &client,
        "select count(*) from tally.record where state = 'running'",
        &[],
    )
    .await;
    assert_eq!(running, 4, "the unreleased rows are still running");
    // Their lease was kept, so that it expires and the rescue finds them.
    assert_eq!(lease_rows(&client).await, Some(1));

    let _second = WorkerCmd::sql(&db.url, "q", "insert into sink select $1")
        .args(&["--rescue-interval", "200ms"])
        .poll("100ms")
        .start();
    let (code, out, err) = coordinator(&db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_sink_exactly_once(&client, "sink", 5).await;
}
