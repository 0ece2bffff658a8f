//! The `Store` API against a real PostgreSQL: migrations, prepare, the record state machine,
//! fencing, and the claim query's plan.

use std::io::Cursor;
use std::time::Duration;

use serde_json::json;
use tally::input::Format;
use tally::{ClaimedRecord, Outcome, PrepareOutcome, RecordState, Store, StoreError};
use tally_tests::*;

const MIB: usize = 1 << 20;

/// The outcome of a claimed row: its lease id is the fencing token.
fn outcome(r: &ClaimedRecord, state: RecordState, error: Option<&str>) -> Outcome {
    Outcome {
        id: r.id,
        // Only the worker reads it (to check failure limits); the store's finish does not.
        batch_id: 0,
        attempt: r.attempt,
        lease_id: r.lease_id,
        state,
        error: error.map(str::to_string),
        retry_in: Duration::ZERO,
    }
}

async fn prepare_jsonl(
    store: &Store,
    spec: &tally::BatchSpec,
    bytes: Vec<u8>,
) -> Result<PrepareOutcome, StoreError> {
    store
        .prepare_from_reader(spec, Cursor::new(bytes), Format::Jsonl, MIB, None)
        .await
}

fn records(n: u64) -> Vec<u8> {
    let values: Vec<_> = (1..=n)
        .map(|i| json!({"id": format!("r{i}"), "n": i}))
        .collect();
    jsonl_bytes(&values)
}

async fn record_ids(client: &tokio_postgres::Client, batch: &str) -> Vec<String> {
    client
        .query(
            "select r.record_id from tally.record r join tally.batch b on b.id = r.batch_id \
              where b.name = $1 order by r.id",
            &[&batch],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn assert_not_found(result: Result<Vec<tally::BatchStatus>, StoreError>, batch: &str) {
    match result {
        Err(StoreError::BatchNotFound(name)) => assert_eq!(name, batch),
        other => panic!("expected BatchNotFound({batch}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Migrations
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_noop() {
    let db = TestDb::new("migrate_twice_is_a_noop").await;
    let store = db.store().await;
    let again = store.migrate().await.expect("second migrate");
    assert!(again.is_empty(), "second migrate applied {again:?}");
    let third = store.migrate().await.expect("third migrate");
    assert!(third.is_empty(), "third migrate applied {third:?}");
    store.check_schema().await.expect("schema is current");
    let client = db.client().await;
    let versions = query_i64(&client, "select count(*) from tally.migration", &[]).await;
    assert_eq!(
        versions,
        migration_files().len() as i64,
        "one row per migration"
    );
}

/// The migrations in sql/migrations, by name, in order.
fn migration_files() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/migrations");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".sql").map(str::to_string))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_each_migration_once() {
    let db = TestDb::empty("concurrent_migrations").await;
    // Four separate pools, as four coordinator replicas would have.
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(db.store().await);
    }
    let runs = stores.iter().map(|s| s.migrate());
    let results = futures::future::join_all(runs).await;
    let mut applied: Vec<&str> = Vec::new();
    for result in results {
        applied.extend(result.expect("every concurrent migrate succeeds"));
    }
    applied.sort();
    assert_eq!(
        applied,
        migration_files(),
        "exactly one of the concurrent runs applies each migration"
    );
    let client = db.client().await;
    let rows = client
        .query(
            "select version, count(*) from tally.migration group by version order by version",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "migrations recorded");
    for row in &rows {
        let version: i32 = row.get(0);
        let n: i64 = row.get(1);
        assert_eq!(n, 1, "migration {version} recorded {n} times");
    }
    stores[0].check_schema().await.expect("schema is current");
}

// ---------------------------------------------------------------------------------------------
// 2. The record state machine, with exact counts after every step
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_transitions_keep_counts_exact() {
    let db = TestDb::new("state_transitions").await;
    let store = db.store().await;
    let client = db.client().await;
    let spec = spec("b1", "q1");

    let prepared = prepare_jsonl(&store, &spec, records(5)).await.unwrap();
    assert_eq!(prepared, PrepareOutcome::Prepared { records: 5 });
    let c = assert_counts_exact(&store, &client, "b1").await;
    assert_eq!(c.pending, 5);
    let status = &store.batch_status(Some("b1")).await.unwrap()[0];
    assert_eq!(status.state, "ready");

    let batches = store.claimable_batches("q1").await.unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].name, "b1");
    assert_eq!(batches[0].max_attempts, 5);
    let id = batches[0].id;
    assert!(store.claimable_batches("other").await.unwrap().is_empty());

    // Claim three: the attempt (fencing token) becomes 1.
    let claimed = store
        .claim(id, 3, "w1", Duration::from_secs(60))
        .await
        .unwrap();
    store.mark_started(id).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2", "r3"], "claims in id order");
    assert!(claimed.iter().all(|r| r.attempt == 1));
    assert_eq!(claimed[1].payload, json!({"id": "r2", "n": 2}));
    let c = assert_counts_exact(&store, &client, "b1").await;
    assert_eq!((c.pending, c.running), (2, 3));
    assert_eq!(
        store.batch_status(Some("b1")).await.unwrap()[0].state,
        "running"
    );
    let owners = query_i64(
        &client,
        "select count(*) from tally.record where lease_owner = 'w1' and state = 'running'",
        &[],
    )
    .await;
    assert_eq!(owners, 3, "claimed rows carry their owner");

    // complete / pending (retry) / failed.
    let written = store
        .finish(
            &[
                outcome(&claimed[0], RecordState::Complete, None),
                outcome(&claimed[1], RecordState::Pending, Some("try again")),
                outcome(&claimed[2], RecordState::Failed, Some("boom")),
            ],
            "w1",
        )
        .await
        .unwrap();
    assert_eq!(written.len(), 3, "all three outcomes written");
    let c = assert_counts_exact(&store, &client, "b1").await;
    assert_eq!(
        c,
        Counts {
            pending: 3,
            running: 0,
            complete: 1,
            failed: 1,
            cancelled: 0
        }
    );
    let row = client
        .query_one(
            "select state, attempt, last_error, lease_owner from tally.record where id = $1",
            &[&claimed[1].id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i32>(1), 1, "a retry keeps the attempt count");
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("try again")
    );
    assert_eq!(row.get::<_, Option<String>>(3), None, "lease cleared");
    let failed = store.failed_records("b1", 10).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].record_id, "r3");
    assert_eq!(failed[0].attempts, 1);
    assert_eq!(failed[0].last_error, "boom");

    // The retried row comes back with attempt 2, together with the untouched ones.
    let claimed2 = store
        .claim(id, 10, "w2", Duration::from_secs(60))
        .await
        .unwrap();
    let mut got: Vec<(&str, i32)> = claimed2
        .iter()
        .map(|r| (r.record_id.as_str(), r.attempt))
        .collect();
    // (The retried row may come before or after the untouched ones.)
    got.sort();
    assert_eq!(got, [("r2", 2), ("r4", 1), ("r5", 1)]);
    let c = assert_counts_exact(&store, &client, "b1").await;
    assert_eq!((c.pending, c.running, c.complete, c.failed), (0, 3, 1, 1));
    assert!(
        store.claimable_batches("q1").await.unwrap().is_empty(),
        "no pending rows left: nothing claimable"
    );

    let all: Vec<Outcome> = claimed2
        .iter()
        .map(|r| outcome(r, RecordState::Complete, None))
        .collect();
    assert_eq!(store.finish(&all, "w2").await.unwrap().len(), 3);
    let c = assert_counts_exact(&store, &client, "b1").await;
    assert_eq!(
        c,
        Counts {
            pending: 0,
            running: 0,
            complete: 4,
            failed: 1,
            cancelled: 0
        }
    );
    let status = &store.batch_status(Some("b1")).await.unwrap()[0];
    assert_eq!(status.state, "complete_with_failures");
    assert!(status.is_finished());

    // A second finish of the same outcomes is refused: the rows are no longer running.
    assert!(store.finish(&all, "w2").await.unwrap().is_empty());
    assert_counts_exact(&store, &client, "b1").await;

    // retry-failed sends r3 back (one more attempt), and is harmless twice.
    assert_eq!(store.retry_failed("b1", false).await.unwrap(), 1);
    assert_eq!(store.retry_failed("b1", false).await.unwrap(), 0);
    let c = assert_counts_exact(&store, &client, "b1").await;
    assert_eq!((c.pending, c.failed, c.complete), (1, 0, 4));
    let again = store
        .claim(id, 10, "w3", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].record_id.as_str(), again[0].attempt), ("r3", 2));
    store
        .finish(&[outcome(&again[0], RecordState::Complete, None)], "w3")
        .await
        .unwrap();
    let c = assert_counts_exact(&store, &client, "b1").await;
    assert_eq!(c.complete, 5);
    assert_eq!(
        store.batch_status(Some("b1")).await.unwrap()[0].state,
        "complete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_retry_is_not_claimable_before_its_time() {
    let db = TestDb::new("delayed_retry").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_jsonl(&store, &spec("b", "q"), records(1))
        .await
        .unwrap();
    let id = batch_id(&client, "b").await;
    let r = store
        .claim(id, 1, "w", Duration::from_secs(60))
        .await
        .unwrap();
    let mut retry = outcome(&r[0], RecordState::Pending, Some("later"));
    retry.retry_in = Duration::from_secs(3600);
    assert_eq!(store.finish(&[retry], "w").await.unwrap().len(), 1);
    assert!(
        store
            .claim(id, 1, "w", Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "a row backing off for an hour must not be claimed now"
    );
    let c = assert_counts_exact(&store, &client, "b").await;
    assert_eq!(c.pending, 1);
}

// ---------------------------------------------------------------------------------------------
// 3. Prepare: idempotent, conflicting input, from a query, bad queries
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_twice_is_already_prepared() {
    let db = TestDb::new("prepare_twice").await;
    let store = db.store().await;
    let client = db.client().await;
    let spec = spec("twice", "q");
    let first = prepare_jsonl(&store, &spec, records(3)).await.unwrap();
    assert_eq!(first, PrepareOutcome::Prepared { records: 3 });
    let second = prepare_jsonl(&store, &spec, records(3)).await.unwrap();
    assert_eq!(second, PrepareOutcome::AlreadyPrepared { records: 3 });
    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        3
    );
    assert_eq!(record_ids(&client, "twice").await, ["r1", "r2", "r3"]);
    let c = assert_counts_exact(&store, &client, "twice").await;
    assert_eq!(c.pending, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_same_name_other_input_conflicts() {
    let db = TestDb::new("prepare_conflict").await;
    let store = db.store().await;
    let client = db.client().await;
    let spec = spec("same", "q");
    prepare_jsonl(&store, &spec, records(3)).await.unwrap();
    let before = client
        .query_one(
            "select total, input_digest, state from tally.batch where name = 'same'",
            &[],
        )
        .await
        .unwrap();

    // Different content, same name.
    let other = jsonl_bytes(&[json!({"id": "x1"}), json!({"id": "x2"})]);
    match prepare_jsonl(&store, &spec, other).await {
        Err(StoreError::Conflict(msg)) => assert!(msg.contains("same"), "{msg}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    // Same content, another queue.
    let mut moved = spec.clone();
    moved.queue = "elsewhere".into();
    assert!(matches!(
        prepare_jsonl(&store, &moved, records(3)).await,
        Err(StoreError::Conflict(_))
    ));
    // Same name from a query.
    assert!(matches!(
        store
            .prepare_from_query(&spec, "select g as id from generate_series(1, 3) g")
            .await,
        Err(StoreError::Conflict(_))
    ));

    let after = client
        .query_one(
            "select total, input_digest, state from tally.batch where name = 'same'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(before.get::<_, i64>(0), after.get::<_, i64>(0));
    assert_eq!(
        before.get::<_, Option<String>>(1),
        after.get::<_, Option<String>>(1)
    );
    assert_eq!(after.get::<_, String>(2), "ready");
    assert_eq!(
        record_ids(&client, "same").await,
        ["r1", "r2", "r3"],
        "batch unchanged"
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        1
    );
    assert_counts_exact(&store, &client, "same").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prepares_of_one_batch_load_it_once() {
    let db = TestDb::new("concurrent_prepares").await;
    let store = db.store().await;
    let client = db.client().await;
    let spec = spec("race", "q");
    let input = records(20_000);
    let runs = (0..4).map(|_| prepare_jsonl(&store, &spec, input.clone()));
    let results = futures::future::join_all(runs).await;
    let mut prepared = 0;
    for r in &results {
        match r {
            Ok(PrepareOutcome::Prepared { records }) => {
                assert_eq!(*records, 20_000);
                prepared += 1;
            }
            Ok(PrepareOutcome::AlreadyPrepared { records }) => assert_eq!(*records, 20_000),
            // A prepare that ran into another one's load is told so, and changed nothing.
            Err(StoreError::Conflict(msg)) => assert!(msg.contains("prepared"), "{msg}"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(
        prepared, 1,
        "exactly one prepare loads the batch: {results:?}"
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        20_000
    );
    let c = assert_counts_exact(&store, &client, "race").await;
    assert_eq!(c.pending, 20_000);
    // After the race, a re-run is recognised as the same input.
    assert_eq!(
        prepare_jsonl(&store, &spec, input).await.unwrap(),
        PrepareOutcome::AlreadyPrepared { records: 20_000 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_from_query_makes_one_record_per_row() {
    let db = TestDb::new("prepare_from_query").await;
    let store = db.store().await;
    let client = db.client().await;
    let spec = spec("fromq", "q");
    let query = "select g as id, g*2 as v from generate_series(1,1000) g";
    assert_eq!(
        store.prepare_from_query(&spec, query).await.unwrap(),
        PrepareOutcome::Prepared { records: 1000 }
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        1000
    );
    let mismatched = query_i64(
        &client,
        "select count(*) from tally.record \
          where payload <> jsonb_build_object('id', record_id::int, 'v', record_id::int * 2)",
        &[],
    )
    .await;
    assert_eq!(
        mismatched, 0,
        "payload is the row as JSON, id its id column"
    );
    let payload: serde_json::Value = client
        .query_one(
            "select payload from tally.record where record_id = '7'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(payload, json!({"id": 7, "v": 14}));
    let c = assert_counts_exact(&store, &client, "fromq").await;
    assert_eq!(c.pending, 1000);

    // Re-run (even with a trailing semicolon and whitespace) adds nothing.
    assert_eq!(
        store
            .prepare_from_query(&spec, &format!("  {query} ;\n"))
            .await
            .unwrap(),
        PrepareOutcome::AlreadyPrepared { records: 1000 }
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_from_bad_query_leaves_no_batch() {
    let db = TestDb::new("prepare_bad_query").await;
    let store = db.store().await;
    let client = db.client().await;
    let cases = [
        (
            "nullid",
            "select null::int as id, 1 as v from generate_series(1, 3)",
            "no value",
        ),
        (
            "dupid",
            "select g % 2 as id from generate_series(1, 10) g",
            "more than once",
        ),
        (
            "norows",
            "select g as id from generate_series(1, 0) g",
            "no rows",
        ),
        (
            "noidcol",
            "select g as key from generate_series(1, 3) g",
            "no value",
        ),
        ("syntax", "select from where", "query failed"),
    ];
    for (name, query, expected) in cases {
        let err = store
            .prepare_from_query(&spec(name, "q"), query)
            .await
            .expect_err(name);
        let msg = err.to_string();
        // An empty result is its own kind: a pipeline stage with nothing to do succeeds.
        if name == "norows" {
            assert!(
                matches!(err, StoreError::NoRecords(_)),
                "{name}: expected NoRecords, got {err:?}"
            );
        } else {
            assert!(
                matches!(err, StoreError::Invalid(_)),
                "{name}: expected Invalid, got {err:?}"
            );
        }
        assert!(msg.contains(expected), "{name}: {msg}");
        assert_not_found(store.batch_status(Some(name)).await, name);
    }
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        0
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        0
    );
    assert!(store.claimable_batches("q").await.unwrap().is_empty());
    // The name is free again afterwards.
    assert_eq!(
        store
            .prepare_from_query(&spec("nullid", "q"), "select 1 as id")
            .await
            .unwrap(),
        PrepareOutcome::Prepared { records: 1 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_rejects_bad_names_and_settings() {
    let db = TestDb::new("prepare_bad_names").await;
    let store = db.store().await;
    let client = db.client().await;
    let mut bad = vec![spec("a b", "q"), spec("ok", "x';drop"), spec("", "q")];
    let mut zero = spec("ok2", "q");
    zero.max_attempts = 0;
    bad.push(zero);
    for s in bad {
        let r = prepare_jsonl(&store, &s, records(1)).await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{s:?}: {r:?}");
    }
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        0
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Fencing
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_fenced_off() {
    let db = TestDb::new("fencing").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_jsonl(&store, &spec("f", "q"), records(1))
        .await
        .unwrap();
    let batch = batch_id(&client, "f").await;
    let lease = Duration::from_secs(60);

    let a = store.claim(batch, 10, "a", lease).await.unwrap();
    assert_eq!(a.len(), 1);
    let row = a[0].id;
    assert_eq!(a[0].attempt, 1);

    // Its handler starts.
    assert_eq!(
        store
            .start_leases(&[(a[0].lease_id, 1)], "a", lease)
            .await
            .unwrap(),
        vec![a[0].lease_id]
    );
    // Nothing has expired yet: rescue leaves the row alone.
    assert_eq!(store.rescue_expired(100).await.unwrap().to_pending, 0);
    assert!(backdate_lease(&client, row).await >= 1);
    let rescued = store.rescue_expired(100).await.unwrap();
    assert_eq!(
        rescued,
        tally::RescueSummary {
            to_pending: 1,
            to_failed: 0,
            unstarted: 0,
            batches_with_failures: vec![],
        }
    );
    let r = client
        .query_one(
            "select state, attempt, last_error, lease_owner from tally.record where id = $1",
            &[&row],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "pending");
    assert_eq!(r.get::<_, i32>(1), 1, "the lost attempt counts");
    let last_error: Option<String> = r.get(2);
    assert!(
        last_error.as_deref().is_some_and(|e| e.contains("lease")),
        "last_error mentions the lease: {last_error:?}"
    );
    assert_eq!(r.get::<_, Option<String>>(3), None);
    assert_counts_exact(&store, &client, "f").await;

    let b = store.claim(batch, 10, "b", lease).await.unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].id, b[0].attempt), (row, 2));

    // A, whose lease is gone, can neither renew, announce, release nor finish in any way.
    assert!(store
        .renew_leases(&[a[0].lease_id], "a", lease)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .start_leases(&[(a[0].lease_id, 1)], "a", lease)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.release(&[(row, a[0].lease_id)], "a").await.unwrap(),
        0
    );
    for state in [
        RecordState::Complete,
        RecordState::Failed,
        RecordState::Pending,
    ] {
        let refused = store
            .finish(&[outcome(&a[0], state, Some("late"))], "a")
            .await
            .unwrap();
        assert!(refused.is_empty(), "A's {state:?} must be refused");
    }
    // Neither the right lease under the wrong owner nor the reverse gets through.
    assert!(store
        .finish(&[outcome(&b[0], RecordState::Complete, None)], "a")
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .finish(&[outcome(&a[0], RecordState::Complete, None)], "b")
        .await
        .unwrap()
        .is_empty());
    let r = client
        .query_one(
            "select state, attempt, lease_owner from tally.record where id = $1",
            &[&row],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "running");
    assert_eq!(r.get::<_, i32>(1), 2);
    assert_eq!(r.get::<_, Option<String>>(2).as_deref(), Some("b"));
    assert_counts_exact(&store, &client, "f").await;

    // B still holds it: renew works for B, then B finishes.
    assert_eq!(
        store
            .renew_leases(&[b[0].lease_id], "b", lease)
            .await
            .unwrap(),
        vec![b[0].lease_id]
    );
    // A cannot renew B's lease either.
    assert!(store
        .renew_leases(&[b[0].lease_id], "a", lease)
        .await
        .unwrap()
        .is_empty());
    let done = store
        .finish(&[outcome(&b[0], RecordState::Complete, None)], "b")
        .await
        .unwrap();
    assert_eq!(done, vec![row]);
    let c = assert_counts_exact(&store, &client, "f").await;
    assert_eq!(c.complete, 1);
    // And the late A still cannot undo it.
    assert!(store
        .finish(&[outcome(&a[0], RecordState::Failed, Some("late"))], "a")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where state = 'complete' and last_error is null",
            &[]
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescuing_an_old_claim_spares_a_row_reclaimed_since() {
    // One worker ("a") claims r1 and r2 together; r1 fails retryably and "a" claims it again
    // (attempt 2, a new claim). Then only the first claim's lease runs out (r2 is stuck).
    // Rescue must return r2, and leave r1 alone: its current lease has not expired.
    let db = TestDb::new("rescue_old_claim").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_jsonl(&store, &spec("old", "q"), records(2))
        .await
        .unwrap();
    let batch = batch_id(&client, "old").await;
    let lease = Duration::from_secs(60);
    let first = store.claim(batch, 2, "a", lease).await.unwrap();
    assert_eq!(first.len(), 2);
    let (r1, r2) = (first[0].id, first[1].id);
    assert_eq!(
        store
            .start_leases(&[(first[0].lease_id, 2)], "a", lease)
            .await
            .unwrap()
            .len(),
        1
    );
    let retry = outcome(&first[0], RecordState::Pending, Some("transient"));
    assert_eq!(store.finish(&[retry], "a").await.unwrap(), vec![r1]);
    let second = store.claim(batch, 10, "a", lease).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].id, second[0].attempt), (r1, 2));

    let lease_table = query_i64(
        &client,
        "select count(*) from pg_tables where schemaname = 'tally' and tablename = 'lease'",
        &[],
    )
    .await
        > 0;
    if lease_table {
        assert_ne!(first[0].lease_id, second[0].lease_id, "one lease per claim");
        client
            .execute(
                "update tally.lease set expires_at = now() - interval '1 second' where id = $1",
                &[&first[0].lease_id],
            )
            .await
            .unwrap();
    } else {
        assert!(backdate_lease(&client, r2).await == 1);
    }
    let rescued = store.rescue_expired(100).await.unwrap();
    let r = client
        .query_one(
            "select state, attempt, lease_owner from tally.record where id = $1",
            &[&r1],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, Option<String>>(2)
        ),
        ("running".to_string(), 2, Some("a".to_string())),
        "r1 is held under its second, unexpired claim and must not be rescued"
    );
    assert_eq!(
        rescued,
        tally::RescueSummary {
            to_pending: 1,
            to_failed: 0,
            unstarted: 0,
            batches_with_failures: vec![],
        },
        "only r2 comes back"
    );
    assert_eq!(
        store
            .finish(&[outcome(&second[0], RecordState::Complete, None)], "a")
            .await
            .unwrap(),
        vec![r1]
    );
    assert_counts_exact(&store, &client, "old").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expiring_on_the_last_attempt_fails_the_record() {
    let db = TestDb::new("lease_last_attempt").await;
    let store = db.store().await;
    let client = db.client().await;
    let mut s = spec("last", "q");
    s.max_attempts = 1;
    prepare_jsonl(&store, &s, records(2)).await.unwrap();
    let batch = batch_id(&client, "last").await;
    let claimed = store
        .claim(batch, 1, "a", Duration::from_secs(60))
        .await
        .unwrap();
    let row = claimed[0].id;
    store
        .start_leases(&[(claimed[0].lease_id, 1)], "a", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(backdate_lease(&client, row).await >= 1);
    let rescued = store.rescue_expired(100).await.unwrap();
    assert_eq!(
        rescued,
        tally::RescueSummary {
            to_pending: 0,
            to_failed: 1,
            unstarted: 0,
            batches_with_failures: vec![claimed[0].batch_id],
        }
    );
    let r = client
        .query_one(
            "select state, attempt, last_error from tally.record where id = $1",
            &[&row],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "failed");
    assert_eq!(r.get::<_, i32>(1), 1);
    let last_error: String = r.get(2);
    assert!(last_error.contains("lease expired"), "{last_error}");
    let failed = store.failed_records("last", 10).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert!(failed[0].last_error.contains("lease expired"));
    let c = assert_counts_exact(&store, &client, "last").await;
    assert_eq!((c.pending, c.failed), (1, 1));
    // The late owner cannot resurrect it.
    assert!(store
        .finish(&[outcome(&claimed[0], RecordState::Complete, None)], "a")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_gives_rows_back_without_an_attempt() {
    let db = TestDb::new("release").await;
    let store = db.store().await;
    let client = db.client().await;
    prepare_jsonl(&store, &spec("rel", "q"), records(3))
        .await
        .unwrap();
    let batch = batch_id(&client, "rel").await;
    let claimed = store
        .claim(batch, 3, "w", Duration::from_secs(60))
        .await
        .unwrap();
    let held: Vec<(i64, i64)> = claimed.iter().map(|r| (r.id, r.lease_id)).collect();
    assert_eq!(
        store.release(&held, "other").await.unwrap(),
        0,
        "not its rows"
    );
    assert_eq!(store.release(&held, "w").await.unwrap(), 3);
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where state = 'pending' and attempt = 0 \
               and lease_owner is null",
            &[]
        )
        .await,
        3
    );
    let c = assert_counts_exact(&store, &client, "rel").await;
    assert_eq!(c.pending, 3);
    // A stale release after re-claim does nothing.
    let again = store
        .claim(batch, 3, "w2", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(again.iter().all(|r| r.attempt == 1));
    assert_eq!(store.release(&held, "w").await.unwrap(), 0);
    assert_counts_exact(&store, &client, "rel").await;
}

// ---------------------------------------------------------------------------------------------
// 8. SQLSTATE classification
// ---------------------------------------------------------------------------------------------

#[test]
fn sqlstates_are_classified() {
    use tally::store::is_retryable_sqlstate;
    for code in ["40001", "40P01", "55P03", "57014", "08006", "53300"] {
        assert!(is_retryable_sqlstate(code), "{code} should be retryable");
    }
    for code in ["23505", "22P02", "23514", "42601", "42P01", "22012"] {
        assert!(
            !is_retryable_sqlstate(code),
            "{code} should not be retryable"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 12. The claim uses the partial index on a freshly loaded batch
// ---------------------------------------------------------------------------------------------

/// Every (node type, index name, has a filter) in the part of the plan that picks rows: the
/// `picked` CTE.
fn scans(plan: &serde_json::Value, in_cte: bool, out: &mut Vec<(String, String, bool)>) {
    let here = in_cte
        || plan
            .get("Subplan Name")
            .and_then(|s| s.as_str())
            .is_some_and(|s| s.contains("picked"));
    // Scans of tally.record only: the claim also checks its batch's state by primary key.
    if here && plan.get("Relation Name").and_then(|s| s.as_str()) == Some("record") {
        if let Some(index) = plan.get("Index Name").and_then(|s| s.as_str()) {
            out.push((
                plan["Node Type"].as_str().unwrap_or("?").to_string(),
                index.to_string(),
                plan.get("Filter").is_some(),
            ));
        } else if plan["Node Type"] == "Seq Scan" {
            out.push(("Seq Scan".into(), String::new(), true));
        }
    }
    if let Some(children) = plan.get("Plans").and_then(|p| p.as_array()) {
        for child in children {
            scans(child, here, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_claim_plan_uses_the_pending_index() {
    let db = TestDb::new("heavy_claim_plan").await;
    let store = db.store().await;
    let client = db.client().await;
    // A small finished batch first: finished rows in the table are what lures the planner
    // onto the primary key.
    store
        .prepare_from_query(
            &spec("small", "q"),
            "select g as id from generate_series(1, 1000) g",
        )
        .await
        .unwrap();
    let small = batch_id(&client, "small").await;
    let done: Vec<Outcome> = store
        .claim(small, 1000, "w", Duration::from_secs(60))
        .await
        .unwrap()
        .iter()
        .map(|r| outcome(r, RecordState::Complete, None))
        .collect();
    assert_eq!(store.finish(&done, "w").await.unwrap().len(), 1000);
    store
        .prepare_from_query(
            &spec("big", "q"),
            "select g as id, g as n from generate_series(1, 200000) g",
        )
        .await
        .unwrap();
    client.batch_execute("analyze tally.record").await.unwrap();
    let big = batch_id(&client, "big").await;

    let claim = include_str!("../../sql/queries/record_claim.sql");
    client
        .batch_execute(&format!(
            "prepare claim_plan(bigint, bigint, text, float8) as {claim}"
        ))
        .await
        .unwrap();
    // Five custom plans, then the plan cache may switch to the generic plan.
    for round in 1..=6 {
        let row = client
            .query_one(
                &format!("explain (format json) execute claim_plan({big}, 1000, 'w', 60)"),
                &[],
            )
            .await
            .unwrap();
        let plan: serde_json::Value = row.get(0);
        let mut found = Vec::new();
        scans(&plan[0]["Plan"], false, &mut found);
        assert!(
            !found.is_empty(),
            "round {round}: no scan found under the picked CTE in {plan:#}"
        );
        for (node, index, filtered) in &found {
            // The partial index of claimable rows (record_pending, or its successor), never
            // the primary key (or a sequential scan) plus a filter on the state.
            let partial = !index.is_empty()
                && query_i64(
                    &client,
                    "select count(*) from pg_index i join pg_class c on c.oid = i.indexrelid \
                       join pg_namespace n on n.oid = c.relnamespace \
                      where n.nspname = 'tally' and c.relname = $1 and i.indpred is not null \
                        and i.indrelid = 'tally.record'::regclass",
                    &[index],
                )
                .await
                    == 1;
            assert!(
                partial && index != "record_pkey",
                "round {round}: the claim must walk the partial index of pending rows, found \
                 {node} on {index:?} (filter: {filtered}); plan: {plan:#}"
            );
        }
    }
    // And the claim itself takes rows from the front of the batch.
    let claimed = store
        .claim(big, 1000, "w", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1000);
    assert_eq!(claimed[0].record_id, "1");
    assert_counts_exact(&store, &client, "big").await;
}
