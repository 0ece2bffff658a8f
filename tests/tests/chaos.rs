//! Chaos tests against real processes: workers killed in a loop, their database sessions cut,
//! PostgreSQL restarted under them. Each must end with every record complete and its effect
//! applied exactly once. Names start with `heavy_chaos_`, so they run serially.

use std::time::{Duration, Instant};

use tally_tests::*;

const BATCH: &str = "chaos";
const QUEUE: &str = "q";
/// The sink statement, `insert into sink(record_id, batch) values ($1, $3)`, slowed down by
/// `pg_sleep(secs)` per record: unthrottled, 3 workers finish 50,000 records in 2-3 s, before
/// most of the chaos lands. Slowed, each 100-record chunk holds a transaction open for a while,
/// so kills, cut sessions and restarts hit open transactions and leased rows.
fn sink_sql(secs: f64) -> String {
    format!("insert into sink(record_id, batch) select $1, $3 from pg_sleep({secs})")
}

/// Sink without a unique constraint (a second effect shows as a duplicate) and a prepared
/// batch of `n` records.
async fn setup(db: &TestDb, dir: &TempDir, n: u64) {
    let client = db.client().await;
    client
        .batch_execute("create table sink (record_id text not null, batch text not null)")
        .await
        .expect("create sink");
    let path = jsonl_file(&dir.0, "in.jsonl", n);
    let path = path.display().to_string();
    let (code, stdout, stderr) = coordinator_async(
        &db.url,
        // A row may be caught by several kills in a row: allow more attempts than that.
        &[
            "prepare",
            BATCH,
            "--queue",
            QUEUE,
            "--from-file",
            &path,
            "--max-attempts",
            "50",
        ],
    )
    .await;
    assert_eq!(code, 0, "prepare: {stdout} {stderr}");
}

fn worker(url: &str, sleep: f64) -> ChildGuard {
    start_worker(
        url,
        &[
            "--queue",
            QUEUE,
            "--handler",
            "sql",
            "--sql",
            &sink_sql(sleep),
            "--concurrency",
            "4",
            "--lease",
            "3s",
            "--rescue-interval",
            "1s",
        ],
    )
}

/// Completed records, on a fresh connection (the server may have been restarted or our
/// sessions cut); `None` if the server does not answer.
async fn complete_now(url: &str) -> Option<i64> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let n = client
        .query_one(
            "select count(*) from tally.record where state = 'complete'",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0));
    drop(client);
    let _ = task.await;
    n
}

/// Waits until some records are complete, failing at once if a worker died.
async fn await_progress(url: &str, at_least: i64, workers: &mut [ChildGuard]) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for w in workers.iter_mut() {
            w.assert_running();
        }
        if let Some(n) = complete_now(url).await {
            if n >= at_least {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {at_least} records complete after 30s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `coordinator wait` exits 0 within `timeout`; returns how long it took.
async fn wait_complete(db: &TestDb, timeout: &str) -> Duration {
    let start = Instant::now();
    let (code, stdout, stderr) = coordinator_async(
        &db.url,
        &["wait", BATCH, "--timeout", timeout, "--interval", "100ms"],
    )
    .await;
    let took = start.elapsed();
    if code != 0 {
        let client = db.client().await;
        let counts = counts_by_state(&client, BATCH).await;
        panic!("coordinator wait exited {code} after {took:?}: {stdout} {stderr}; {counts:?}");
    }
    took
}

/// Every record complete, each effect applied exactly once, status counts exact.
async fn assert_exactly_once(db: &TestDb, n: i64) {
    let client = db.client().await;
    let row = client
        .query_one(
            "select count(*), count(distinct record_id), count(*) filter (where batch <> $1) \
               from sink",
            &[&BATCH],
        )
        .await
        .expect("count sink");
    let (total, distinct, wrong_batch): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let missing = query_i64(
        &client,
        "select count(*) from tally.record r where not exists \
           (select 1 from sink s where s.record_id = r.record_id)",
        &[],
    )
    .await;
    let store = db.store().await;
    let c = assert_counts_exact(&store, &client, BATCH).await;
    assert_eq!(c.complete, n, "all records complete: {c:?}");
    assert_eq!(
        distinct, n,
        "every record's effect applied ({missing} missing)"
    );
    assert_eq!(total, n, "no effect applied twice ({} extra)", total - n);
    assert_eq!(wrong_batch, 0, "$3 is the batch name");
    assert_eq!(missing, 0, "records without an effect");
}

async fn rescued(db: &TestDb) -> i64 {
    let client = db.client().await;
    query_i64(
        &client,
        "select count(*) from tally.record where attempt > 1",
        &[],
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 in a loop
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_chaos_kill_loop() {
    const N: i64 = 100_000;
    const KILL_SLEEP: f64 = 0.005;
    let db = TestDb::new("heavy_chaos_kill_loop").await;
    let dir = TempDir::new("chaos-kill-loop");
    setup(&db, &dir, N as u64).await;
    let mut workers: Vec<ChildGuard> = (0..3).map(|_| worker(&db.url, KILL_SLEEP)).collect();
    await_progress(&db.url, 1, &mut workers).await;

    // Every ~1 s for 30 s: SIGKILL one worker (round robin) and start a replacement.
    let chaos_start = Instant::now();
    let mut kills = 0usize;
    let mut last_kill = Instant::now();
    let mut complete_at_last_kill = 0;
    while chaos_start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let slot = kills % workers.len();
        for (i, w) in workers.iter_mut().enumerate() {
            if i != slot {
                w.assert_running();
            }
        }
        workers[slot].signal(libc::SIGKILL);
        workers[slot]
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("killed worker is gone");
        last_kill = Instant::now();
        kills += 1;
        workers[slot] = worker(&db.url, KILL_SLEEP);
        complete_at_last_kill = complete_now(&db.url).await.unwrap_or(-1);
    }

    wait_complete(&db, "120s").await;
    let after_last_kill = last_kill.elapsed();
    for w in workers.iter_mut() {
        w.assert_running();
    }
    let rescued = rescued(&db).await;
    let client = db.client().await;
    let max_attempt = query_i64(
        &client,
        "select max(attempt)::bigint from tally.record",
        &[],
    )
    .await;
    eprintln!(
        "chaos kill loop: {kills} kills, {rescued} rescued rows (attempt > 1), \
         max attempt {max_attempt}, {complete_at_last_kill}/{N} complete at the last kill, \
         batch complete {:.1}s after the last kill",
        after_last_kill.as_secs_f64()
    );
    assert_exactly_once(&db, N).await;
    assert!(kills >= 20, "only {kills} kills");
}

// ---------------------------------------------------------------------------------------------
// 2. the workers' database sessions terminated in a loop
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_chaos_connections_cut() {
    const N: i64 = 50_000;
    let db = TestDb::new("heavy_chaos_connections_cut").await;
    let dir = TempDir::new("chaos-connections-cut");
    setup(&db, &dir, N as u64).await;
    // Workers connect without an application_name in the URL, so the store names them "tally".
    let mut workers: Vec<ChildGuard> = (0..3).map(|_| worker(&db.url, 0.002)).collect();
    await_progress(&db.url, 1, &mut workers).await;

    // Our own client has no application_name, so only the workers' sessions are cut.
    let client = db.client().await;
    let chaos_start = Instant::now();
    let (mut rounds, mut terminated) = (0, 0);
    while chaos_start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        terminated += terminate_backends(&client, "tally").await;
        rounds += 1;
        for w in workers.iter_mut() {
            w.assert_running();
        }
    }
    let complete_at_end = complete_now(&db.url).await.unwrap_or(-1);
    eprintln!(
        "chaos connections cut: {rounds} rounds, {terminated} sessions terminated, \
         {complete_at_end}/{N} complete when the cuts stopped"
    );
    assert!(terminated > 0, "no worker session was ever terminated");

    let took = wait_complete(&db, "60s").await;
    for w in workers.iter_mut() {
        w.assert_running();
    }
    let rescued = rescued(&db).await;
    eprintln!(
        "chaos connections cut: batch complete {:.1}s after the cuts stopped, \
         {rescued} rows with attempt > 1",
        took.as_secs_f64()
    );
    assert_exactly_once(&db, N).await;
}

// ---------------------------------------------------------------------------------------------
// 3. PostgreSQL restarted (fast, then immediate) under the workers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_chaos_postgres_restart() {
    const N: i64 = 30_000;
    // Declared first, dropped last: the database is dropped while the cluster still runs.
    let pg = ThrowawayPg::start("chaos-restart");
    let db = TestDb::new_at(&pg.url, "heavy_chaos_postgres_restart").await;
    let dir = TempDir::new("chaos-postgres-restart");
    setup(&db, &dir, N as u64).await;
    let mut workers: Vec<ChildGuard> = (0..3).map(|_| worker(&db.url, 0.002)).collect();

    let start = Instant::now();
    let before_fast = await_progress(&db.url, 3_000, &mut workers).await;
    tokio::task::block_in_place(|| pg.restart("fast"));
    let fast_at = start.elapsed();
    for w in workers.iter_mut() {
        w.assert_running();
    }
    // Work resumes after the restart.
    let before_immediate = await_progress(&db.url, before_fast + 3_000, &mut workers).await;
    tokio::task::block_in_place(|| pg.restart("immediate"));
    let immediate_at = start.elapsed();
    for w in workers.iter_mut() {
        w.assert_running();
    }
    eprintln!(
        "chaos postgres restart: fast restart at {:.1}s ({before_fast}/{N} complete), \
         immediate restart at {:.1}s ({before_immediate}/{N} complete)",
        fast_at.as_secs_f64(),
        immediate_at.as_secs_f64()
    );
    assert!(
        before_immediate < N,
        "the batch finished before the immediate restart"
    );

    let took = wait_complete(&db, "60s").await;
    for w in workers.iter_mut() {
        w.assert_running();
    }
    let rescued = rescued(&db).await;
    eprintln!(
        "chaos postgres restart: batch complete {:.1}s after the immediate restart, \
         {rescued} rows with attempt > 1",
        took.as_secs_f64()
    );
    assert_exactly_once(&db, N).await;
}
