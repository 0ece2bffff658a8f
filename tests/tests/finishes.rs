//! Every record finishes: a SQL chunk that fails as a whole is split down to the record that
//! fails alone; a worker whose own task dies exits instead of renewing its leases for ever;
//! attempts count only handler starts, however often the worker is killed; a claim stops
//! once a pause committed; a lease's fencing token never comes back.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tally::{Outcome, RecordState};
use tally_tests::*;
use tally_worker::{Fault, Handler, HandlerError, Health, RecordContext, Worker, WorkerError};
use tokio_util::sync::CancellationToken;

/// record id -> (state, attempt, last_error) of every record of `batch`.
async fn records_of(
    client: &tokio_postgres::Client,
    batch: &str,
) -> HashMap<String, (String, i32, Option<String>)> {
    client
        .query(
            "select r.record_id, r.state, r.attempt, r.last_error from tally.record r \
               join tally.batch b on b.id = r.batch_id where b.name = $1",
            &[&batch],
        )
        .await
        .expect("records")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. A SQL chunk that fails as a whole
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_failing_at_commit_is_split_down_to_the_record_that_fails() {
    let db = TestDb::new("finish_commit").await;
    let client = db.client().await;
    client
        .batch_execute(
            "create table parent (id int primary key); insert into parent values (1);
             create table sink (id text, p int references parent deferrable initially deferred);",
        )
        .await
        .expect("tables");
    let input = b"{\"id\":\"a\",\"p\":1}\n{\"id\":\"b\",\"p\":2}\n{\"id\":\"c\",\"p\":1}\n";
    prepare_stdin(&db.url, "fk", "qd", input, &["--max-attempts", "3"]);
    let _worker = WorkerCmd::sql(
        &db.url,
        "qd",
        "insert into sink values ($1, ($2->>'p')::int)",
    )
    .poll("100ms")
    .start();
    wait_finished(&client, "fk", Duration::from_secs(30)).await;
    let records = records_of(&client, "fk").await;
    for id in ["a", "c"] {
        assert_eq!(records[id].0, "complete", "{id}: {:?}", records[id]);
    }
    let (state, attempt, error) = &records["b"];
    assert_eq!(
        (state.as_str(), *attempt),
        ("failed", 1),
        "{:?}",
        records["b"]
    );
    let error = error.as_deref().unwrap_or_default();
    assert!(
        error.contains("foreign key"),
        "the server's message: {error}"
    );
    let sink: Vec<String> = client
        .query("select id from sink order by id", &[])
        .await
        .expect("sink")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sink, ["a", "c"], "the good records' effects, once each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_kills_its_backend_spends_its_attempts() {
    let db = TestDb::new("finish_killer").await;
    let client = db.client().await;
    create_sink(&client, "sink").await;
    let input =
        b"{\"id\":\"r1\"}\n{\"id\":\"r2\"}\n{\"id\":\"k\"}\n{\"id\":\"r3\"}\n{\"id\":\"r4\"}\n";
    prepare_stdin(
        &db.url,
        "kill",
        "qk",
        input,
        &[
            "--max-attempts",
            "2",
            "--backoff-base",
            "10ms",
            "--backoff-max",
            "50ms",
        ],
    );
    let _worker = WorkerCmd::sql(
        &db.url,
        "qk",
        "insert into sink select $1 \
          where case when $1 = 'k' then pg_terminate_backend(pg_backend_pid()) else true end",
    )
    .poll("100ms")
    .start();
    wait_finished(&client, "kill", Duration::from_secs(60)).await;
    let records = records_of(&client, "kill").await;
    for id in ["r1", "r2", "r3", "r4"] {
        assert_eq!(records[id].0, "complete", "{id}: {:?}", records[id]);
    }
    let (state, attempt, error) = &records["k"];
    assert_eq!(
        (state.as_str(), *attempt),
        ("failed", 2),
        "{:?}",
        records["k"]
    );
    let error = error.as_deref().unwrap_or_default();
    assert!(
        error.contains("terminating connection") && error.contains("attempts exhausted: 2 of 2"),
        "{error}"
    );
    assert_sink_exactly_once(&client, "sink", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_cannot_be_prepared_fails_its_records() {
    let db = TestDb::new("finish_prepare").await;
    let client = db.client().await;
    create_sink(&client, "gone").await;
    let worker = WorkerCmd::sql(&db.url, "qp", "insert into gone values ($1)")
        .poll("100ms")
        .start();
    // A first batch proves the worker checked its statement and is claiming.
    prepare_stdin(&db.url, "before", "qp", &jsonl_ids(1), &[]);
    wait_finished(&client, "before", Duration::from_secs(30)).await;
    client.batch_execute("drop table gone").await.expect("drop");
    prepare_stdin(&db.url, "after", "qp", &jsonl_ids(3), &[]);
    wait_finished(&client, "after", Duration::from_secs(30)).await;
    for (id, (state, attempt, error)) in records_of(&client, "after").await {
        assert_eq!((state.as_str(), attempt), ("failed", 1), "{id}");
        let error = error.unwrap_or_default();
        assert!(error.contains("does not exist"), "{id}: {error}");
    }
    drop(worker);
}

// ---------------------------------------------------------------------------------------------
// 2. A task of the worker's own dies
// ---------------------------------------------------------------------------------------------

struct Slow;

#[async_trait::async_trait]
impl Handler for Slow {
    async fn handle(&self, _: &RecordContext, _: &serde_json::Value) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

/// With `fault` injected, the worker reports unhealthy, exits with the task's name, and
/// leaves its rows to expire; another worker then finishes every record.
async fn a_dying_task_stops_the_worker(test: &str, fault: Fault, task: &str) {
    let db = TestDb::new(test).await;
    let store = db.store().await;
    let client = db.client().await;
    let ids: Vec<serde_json::Value> = (0..20).map(|i| json!({"id": format!("r{i}")})).collect();
    prepare_records(&store, &spec("b", "q"), &ids).await;

    let health = Health::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let metrics = std::sync::Arc::new(tally::metrics::WorkerMetrics::new("q").expect("metrics"));
    tokio::spawn(tally_worker::health::serve(
        listener,
        health.clone(),
        metrics,
        CancellationToken::new(),
    ));
    let worker = Worker::builder(store.clone(), "q")
        .handler(Slow)
        .concurrency(4)
        .claim_size(20)
        .lease(Duration::from_secs(2))
        .rescue_interval(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(100))
        .worker_id("doomed")
        .build()
        .expect("valid configuration")
        .with_health(health.clone())
        .inject_fault(fault);
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        worker.run(CancellationToken::new()),
    )
    .await
    .expect("the worker exits by itself");
    match result {
        Err(WorkerError::Fatal(reason)) => {
            assert!(reason.contains(task), "{task}: {reason}")
        }
        other => panic!("expected a fatal error from the {task} task, got {other:?}"),
    }
    assert!(!health.is_live());
    // Unhealthy before it returned: the probe already answers 503.
    let probe = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .expect("probe");
    assert_eq!(probe.status().as_u16(), 503);

    let rescuer = Worker::builder(store.clone(), "q")
        .handler(Slow)
        .concurrency(8)
        .rescue_interval(Duration::from_millis(200))
        .poll_interval(Duration::from_millis(100))
        .worker_id("rescuer")
        .build()
        .expect("valid configuration");
    let stop = CancellationToken::new();
    let running = tokio::spawn(rescuer.run(stop.clone()));
    wait_finished(&client, "b", Duration::from_secs(30)).await;
    stop.cancel();
    running.await.expect("rescuer task").expect("rescuer run");
    let c = assert_counts_exact(&store, &client, "b").await;
    assert_eq!((c.complete, c.failed), (20, 0), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_completer_stops_the_worker() {
    a_dying_task_stops_the_worker("fault_completer", Fault::CompleterPanics, "completer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_record_task_stops_the_worker() {
    a_dying_task_stops_the_worker("fault_record", Fault::RecordTaskPanics, "record").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_loop_that_ends_stops_the_worker() {
    a_dying_task_stops_the_worker("fault_renew", Fault::RenewStops, "lease renewal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_rescue_loop_stops_the_worker() {
    a_dying_task_stops_the_worker("fault_rescue", Fault::RescuePanics, "rescue").await;
}

// ---------------------------------------------------------------------------------------------
// 3. kill -9 spends no attempt of a record whose handler never started
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator, seeded from the clock (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
        lo + (self.0 >> 33) % (hi - lo)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_kill_9_spends_attempts_only_on_started_records() {
    const N: usize = 40;
    let db = TestDb::new("heavy_kill_attempts").await;
    let client = db.client().await;
    let dir = TempDir::new("kill-attempts");
    let log = dir.0.join("starts.log");
    prepare_stdin(
        &db.url,
        "k9",
        "k9",
        &jsonl_ids(N as u32),
        &["--max-attempts", "2"],
    );
    let command = format!("echo \"$TALLY_RECORD_ID\" >> '{}'; sleep 2", log.display());
    let worker = WorkerCmd::new(&db.url, "k9", "exec").args(&[
        "--shell",
        "--command",
        &command,
        "--claim-size",
        "200",
        "--concurrency",
        "4",
        "--lease",
        "3s",
        "--rescue-interval",
        "500ms",
        "--poll-interval",
        "100ms",
    ]);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("kill schedule seed: {seed}");
    let mut rng = Lcg(seed);
    for kill in 1..=4 {
        let mut w = worker.start();
        tokio::time::sleep(Duration::from_millis(rng.next_ms(300, 4000))).await;
        w.signal(libc::SIGKILL);
        w.wait_exit(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("kill {kill}: the worker is gone"));
    }
    let _last = worker.start();
    wait_finished(&client, "k9", Duration::from_secs(180)).await;

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut starts: HashMap<String, i32> = HashMap::new();
    for id in text.lines() {
        *starts.entry(id.to_string()).or_default() += 1;
    }
    let records = records_of(&client, "k9").await;
    assert_eq!(records.len(), N);
    for (id, (state, attempt, error)) in &records {
        let started = starts.get(id).copied().unwrap_or(0);
        assert!(
            state == "complete" || state == "failed",
            "{id} did not finish: {state}"
        );
        assert!(
            *attempt <= started,
            "{id} is {state} at attempt {attempt} but its handler started {started} times \
             ({error:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. The claim re-checks its batch; the fencing token never comes back
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_after_a_pause_committed_takes_nothing() {
    let db = TestDb::new("claim_after_pause").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_records(
        &store,
        &spec("p", "q"),
        &[json!({"id": "a"}), json!({"id": "b"})],
    )
    .await;
    // A worker lists the claimable batches, then the operator pauses before it claims.
    let batches = store.claimable_batches("q").await.expect("claimable");
    assert_eq!(batches.len(), 1);
    assert!(store.pause("p").await.expect("pause"));
    let claimed = store
        .claim(batches[0].id, 10, "w", Duration::from_secs(60))
        .await
        .expect("claim");
    assert!(
        claimed.is_empty(),
        "claimed {} rows of a paused batch",
        claimed.len()
    );
    store.resume("p").await.expect("resume");
    let claimed = store
        .claim(batches[0].id, 10, "w", Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 2);
    assert_counts_exact(&store, &client, "p").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_worker_id_cannot_revive_a_released_claim() {
    let db = TestDb::new("fence_reused_id").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_records(&store, &spec("f", "q"), &[json!({"id": "a"})]).await;
    let batch = batch_id(&client, "f").await;
    let lease = Duration::from_secs(60);
    // Worker "w" claims the row (attempt 1) and gives it back unstarted (attempt 0 again).
    let first = store.claim(batch, 1, "w", lease).await.expect("claim");
    let held: Vec<(i64, i64)> = first.iter().map(|r| (r.id, r.lease_id)).collect();
    assert_eq!(store.release(&held, "w").await.expect("release"), 1);
    // Another process with the same worker id claims it: attempt 1 once more.
    let second = store.claim(batch, 1, "w", lease).await.expect("claim");
    assert_eq!(
        (second[0].id, second[0].attempt),
        (first[0].id, first[0].attempt)
    );
    // A late outcome of the first claim must not land on the second.
    let stale = Outcome {
        state: RecordState::Failed,
        error: Some("stale".into()),
        ..Outcome::complete(&first[0])
    };
    assert!(store
        .finish(&[stale], "w")
        .await
        .expect("finish")
        .is_empty());
    let current = Outcome::complete(&second[0]);
    assert_eq!(
        store.finish(&[current], "w").await.expect("finish"),
        vec![second[0].id]
    );
    let c = assert_counts_exact(&store, &client, "f").await;
    assert_eq!((c.complete, c.failed), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescue_gives_unstarted_rows_their_attempt_back() {
    let db = TestDb::new("rescue_unstarted").await;
    let store = db.store().await;
    let client = db.client().await;
    let mut s = spec("u", "q");
    s.max_attempts = 1;
    prepare_records(
        &store,
        &s,
        &[json!({"id": "a"}), json!({"id": "b"}), json!({"id": "c"})],
    )
    .await;
    let batch = batch_id(&client, "u").await;
    let lease = Duration::from_secs(60);
    let claimed = store.claim(batch, 3, "w", lease).await.expect("claim");
    assert_eq!(claimed.len(), 3);
    // Only the first row's handler started before the worker died.
    assert_eq!(
        store
            .start_leases(&[(claimed[0].lease_id, 1)], "w", lease)
            .await
            .expect("announce"),
        vec![claimed[0].lease_id]
    );
    assert!(backdate_lease(&client, claimed[0].id).await >= 1);
    let rescued = store.rescue_expired(100).await.expect("rescue");
    assert_eq!(
        rescued,
        tally::RescueSummary {
            to_pending: 0,
            to_failed: 1,
            unstarted: 2,
            batches_with_failures: vec![batch],
        }
    );
    let records = records_of(&client, "u").await;
    let (state, attempt, error) = &records[&claimed[0].record_id];
    assert_eq!((state.as_str(), *attempt), ("failed", 1));
    assert!(error
        .as_deref()
        .unwrap_or_default()
        .contains("lease expired"));
    for r in &claimed[1..] {
        assert_eq!(
            records[&r.record_id],
            ("pending".to_string(), 0, None),
            "{} never started: its attempt is given back",
            r.record_id
        );
    }
    assert_counts_exact(&store, &client, "u").await;
}
