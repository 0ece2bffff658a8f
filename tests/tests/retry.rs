//! A worker that sends records back for a retry claims them again when their backoff ends,
//! not at its next poll: every worker here polls only once a minute.

use std::time::{Duration, Instant};
use tally_tests::{assert_counts_exact, coordinator, jsonl_ids, prepare_stdin, query_i64};
use tally_tests::{TestDb, WorkerCmd};

/// Longer than any of these tests may take: a retry picked up by the poll would miss the bound.
const POLL: &str = "60s";
/// The bound on the whole batch, first attempts and retries together.
const BOUND: Duration = Duration::from_secs(20);
/// A backoff of 200 ms to 500 ms between the first and the second attempt.
const BACKOFF: [&str; 4] = ["--backoff-base", "200ms", "--backoff-max", "500ms"];

/// Waits for batch `b` with the coordinator and checks that every record completed at its
/// second attempt, after one retryable failure, within [`BOUND`] of `started`.
async fn assert_completed_by_retry(db: &TestDb, n: i64, started: Instant) {
    let timeout = format!("{}s", BOUND.as_secs());
    let (code, out, err) = coordinator(&db.url, &["wait", "b", "--timeout", &timeout]);
    assert_eq!(
        code, 0,
        "the batch completes within {BOUND:?} (poll every {POLL}): {out}{err}"
    );
    assert!(
        started.elapsed() < BOUND,
        "retries waited {:?}: for the poll, not for their backoff",
        started.elapsed()
    );
    let client = db.client().await;
    let store = db.store().await;
    let counts = assert_counts_exact(&store, &client, "b").await;
    assert_eq!(counts.complete, n, "{counts:?}");
    let second = query_i64(
        &client,
        "select count(*) from tally.record where state = 'complete' and attempt = 2",
        &[],
    )
    .await;
    assert_eq!(
        second, n,
        "every record failed once, then completed at attempt 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_retries_are_claimed_when_their_backoff_ends_not_at_the_next_poll() {
    let db = TestDb::new("retry_wake_sql").await;
    let client = db.client().await;
    // A serialization failure (retryable) on the first attempt of every record.
    client
        .batch_execute(
            "create table sink (record_id text primary key);
             create function deliver(rid text, bname text) returns boolean language plpgsql as $$
             declare a int;
             begin
               select r.attempt into a from tally.record r join tally.batch b on b.id = r.batch_id
                where b.name = bname and r.record_id = rid;
               if a = 1 then
                 raise exception 'busy' using errcode = '40001';
               end if;
               return true;
             end $$;",
        )
        .await
        .expect("create deliver()");
    let n = 300;
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(n as u32), &BACKOFF);
    let started = Instant::now();
    let _worker = WorkerCmd::sql(
        &db.url,
        "q",
        "insert into sink select $1 where deliver($1, $3)",
    )
    .args(&["--sql-chunk", "25", "--breaker-threshold", "100000"])
    .poll(POLL)
    .start();
    assert_completed_by_retry(&db, n, started).await;
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        n,
        "each record's effect was applied once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_retries_are_claimed_when_their_backoff_ends_not_at_the_next_poll() {
    let db = TestDb::new("retry_wake_exec").await;
    let n = 40;
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(n as u32), &BACKOFF);
    let started = Instant::now();
    // EX_TEMPFAIL (retryable) on the first attempt of every record.
    let _worker = WorkerCmd::new(&db.url, "q", "exec")
        .args(&[
            "--shell",
            "--command",
            "[ \"$TALLY_ATTEMPT\" -gt 1 ] || exit 75",
        ])
        .args(&["--concurrency", "8", "--breaker-threshold", "100000"])
        .poll(POLL)
        .start();
    assert_completed_by_retry(&db, n, started).await;
}
