//! The fleet-wide circuit breaker, with real worker processes and a downstream that fails
//! every call transiently until it recovers.

use std::time::Duration;
use tally_tests::{
    assert_counts_exact, assert_sink_exactly_once, coordinator, jsonl_ids, poll_until,
    prepare_stdin, query_i64, TestDb, WorkerCmd,
};

const SETUP: &str = "
create table downstream (up boolean not null);
insert into downstream values (false);
create table sink (record_id text not null);
-- Fails with a serialization failure (retryable) while the downstream is down.
create function call_downstream(id text) returns boolean language plpgsql as $$
begin
    if not (select up from downstream) then
        raise exception 'downstream unavailable for %', id using errcode = '40001';
    end if;
    return true;
end $$;
";

async fn breaker_state(client: &tokio_postgres::Client) -> String {
    client
        .query_opt("select state from tally.breaker where queue = 'q'", &[])
        .await
        .unwrap()
        .map(|r| r.get(0))
        .unwrap_or_else(|| "closed".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_breaker_opens_fleet_wide_probes_and_closes_on_recovery() {
    let db = TestDb::new("breaker").await;
    let client = db.client().await;
    client.batch_execute(SETUP).await.unwrap();
    let retry = [
        "--max-attempts",
        "20",
        "--backoff-base",
        "10ms",
        "--backoff-max",
        "50ms",
    ];
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(300), &retry);
    let statement = "insert into sink select $1 where call_downstream($1)";
    let worker = WorkerCmd::sql(&db.url, "q", statement)
        .args(&[
            "--concurrency",
            "1",
            "--claim-size",
            "10",
            "--sql-chunk",
            "5",
        ])
        .args(&["--breaker-threshold", "5", "--breaker-cooldown", "1s"])
        .args(&["--breaker-max-cooldown", "2s"])
        .poll("100ms");
    let _w1 = worker.start();
    let _w2 = worker.start();

    poll_until("the breaker opens", Duration::from_secs(20), || async {
        (breaker_state(&client).await != "closed").then_some(())
    })
    .await;
    let (_, out, _) = coordinator(&db.url, &["status", "b"]);
    assert!(out.contains("circuit breaker"), "{out}");

    // While the downstream stays down, the fleet makes only probes: one record per cool-down.
    let attempts = "select coalesce(sum(attempt), 0) from tally.record";
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = query_i64(&client, attempts, &[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = query_i64(&client, attempts, &[]).await - before;
    assert!(
        during <= 6,
        "{during} attempts in 3 s with the breaker open (1-2 s cool-downs): not just probes"
    );
    let store = db.store().await;
    let counts = assert_counts_exact(&store, &client, "b").await;
    assert_eq!(
        counts.failed, 0,
        "no record fails because of the outage: {counts:?}"
    );

    client
        .batch_execute("update downstream set up = true")
        .await
        .unwrap();
    poll_until(
        "a probe closes the breaker",
        Duration::from_secs(20),
        || async { (breaker_state(&client).await == "closed").then_some(()) },
    )
    .await;
    let (code, out, err) = coordinator(&db.url, &["wait", "b", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_sink_exactly_once(&client, "sink", 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_closes_an_open_breaker_by_hand() {
    let db = TestDb::new("breaker_resume").await;
    prepare_stdin(&db.url, "b", "q", b"{\"id\":\"a\"}\n", &[]);
    let store = db.store().await;
    let policy = tally::BreakerPolicy {
        threshold: 2,
        cooldown: Duration::from_secs(3600),
        max_cooldown: Duration::from_secs(3600),
    };
    assert_eq!(
        store.breaker_report("q", "w", 0, 1, &policy).await.unwrap(),
        "closed"
    );
    assert_eq!(
        store.breaker_report("q", "w", 0, 1, &policy).await.unwrap(),
        "open"
    );
    assert_eq!(
        store
            .breaker_gate("q", "other", Duration::from_secs(60))
            .await
            .unwrap(),
        tally::BreakerGate::Open
    );
    let (code, out, err) = coordinator(&db.url, &["resume", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("circuit breaker"), "{out}");
    assert_eq!(
        store
            .breaker_gate("q", "other", Duration::from_secs(60))
            .await
            .unwrap(),
        tally::BreakerGate::Closed
    );
    let (code, _, err) = coordinator(&db.url, &["resume", "b"]);
    assert_eq!(code, 1, "nothing left to resume: {err}");
}
