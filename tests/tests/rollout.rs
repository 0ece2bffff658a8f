//! The deployment's shape run natively: `coordinator migrate`, `coordinator serve`, four
//! workers, and a rolling restart of every worker in the middle of a batch, as a Kubernetes
//! Deployment rollout does it (SIGTERM one pod, wait for it to exit, start its replacement,
//! wait until the new one is ready, go on with the next). The batch must complete exactly
//! once with no attempt burnt: a stopping worker gives back the rows it did not start.

use std::time::Duration;

use tally_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const N: i64 = 50_000;
const BATCH: &str = "roll";
const QUEUE: &str = "roll";
const WORKERS: usize = 4;
/// The sink statement, slowed by 5 ms per record: a 100-record chunk then takes at least
/// 0.5 s, so four workers at concurrency 4 need at least ~16 s for the batch, whatever the
/// machine, and the rollout (four drains and four starts) lands in the middle of it.
const SINK_SQL: &str = "insert into sink (record_id, batch) select $1, $3 from pg_sleep(0.005)";

/// `GET path` on 127.0.0.1:port: the status code and body, or `None` if nothing answers.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Waits until `GET /readyz` answers 200, as a readiness probe would.
async fn wait_ready(what: &str, port: u16, process: &mut ChildGuard) {
    poll_until(what, Duration::from_secs(30), || {
        process.assert_running();
        async move { matches!(http_get(port, "/readyz").await, Some((200, _))).then_some(()) }
    })
    .await;
}

struct Replica {
    id: String,
    port: u16,
    process: ChildGuard,
}

async fn start_replica(url: &str, id: String) -> Replica {
    let port = free_port();
    let mut process = WorkerCmd::sql(url, QUEUE, SINK_SQL)
        .args(&[
            "--concurrency",
            "4",
            "--claim-size",
            "500",
            "--grace-period",
            "30s",
        ])
        .listen(port)
        .args(&["--worker-id", &id])
        .start();
    wait_ready(&format!("worker {id} ready"), port, &mut process).await;
    Replica { id, port, process }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_rolling_restart_completes_exactly_once_without_burning_attempts() {
    let db = TestDb::empty("heavy_rolling_restart").await;
    let dir = TempDir::new("rollout");
    let client = db.client().await;

    // The migrate Job, then the serve Deployment.
    let (code, out, err) = coordinator_async(&db.url, &["migrate"]).await;
    assert_eq!(code, 0, "migrate: {out} {err}");
    let serve_port = free_port();
    let mut serve = start_coordinator(
        &db.url,
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{serve_port}"),
            "--check-interval",
            "1s",
        ],
    );
    wait_ready("coordinator serve ready", serve_port, &mut serve).await;

    client
        .batch_execute("create table sink (record_id text not null, batch text not null)")
        .await
        .expect("create sink");
    let input = jsonl_file(&dir.0, "in.jsonl", N as u64);
    prepare_file(&db.url, BATCH, QUEUE, &input, &[]).await;

    let mut replicas = Vec::new();
    for i in 0..WORKERS {
        replicas.push(start_replica(&db.url, format!("worker-{i}-a")).await);
    }
    let store = db.store().await;
    let complete = |store: tally::Store| async move {
        store
            .batch_status(Some(BATCH))
            .await
            .ok()
            .and_then(|s| s.first().map(|s| (s.complete, s.pending)))
    };
    poll_until("the batch under way", Duration::from_secs(60), || {
        let store = store.clone();
        async move { complete(store).await.filter(|(c, _)| *c >= N / 20) }
    })
    .await;

    // The rollout: one replica at a time, the next only once its replacement is ready.
    for (i, slot) in replicas.iter_mut().enumerate() {
        let (done, pending) = complete(store.clone()).await.expect("batch status");
        assert!(
            pending > 0,
            "the batch ran out of pending records before replica {i} was rolled \
             ({done}/{N} complete): the rollout would not be mid-batch"
        );
        let old_id = slot.id.clone();
        slot.process.signal(libc::SIGTERM);
        let status = slot
            .process
            .wait_exit(Duration::from_secs(40))
            .await
            .unwrap_or_else(|| panic!("{old_id} still running 40s after SIGTERM"));
        assert_eq!(status.code(), Some(0), "{old_id} exit status after SIGTERM");
        // It finished what it started and gave back the rest: it holds nothing any more.
        let leases = query_i64(
            &client,
            "select count(*) from tally.lease where owner = $1",
            &[&old_id],
        )
        .await;
        let held = query_i64(
            &client,
            "select count(*) from tally.record where lease_owner = $1 and state = 'running'",
            &[&old_id],
        )
        .await;
        assert_eq!(
            (leases, held),
            (0, 0),
            "{old_id} left leases or running rows"
        );
        assert!(
            http_get(slot.port, "/healthz").await.is_none(),
            "{old_id}'s endpoints outlived it"
        );
        *slot = start_replica(&db.url, format!("worker-{i}-b")).await;
        eprintln!("rolled {old_id} -> {} at {done}/{N} complete", slot.id);
    }

    let (code, out, err) = coordinator_async(&db.url, &["wait", BATCH, "--timeout", "180s"]).await;
    assert_eq!(code, 0, "wait: {out} {err}");
    for replica in replicas.iter_mut() {
        replica.process.assert_running();
        replica.process.signal(libc::SIGTERM);
        let status = replica.process.wait_exit(Duration::from_secs(40)).await;
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{} stop",
            replica.id
        );
    }

    // Exactly once: every record complete, one sink row each, none missing.
    let counts = assert_counts_exact(&store, &client, BATCH).await;
    assert_eq!(
        counts,
        Counts {
            complete: N,
            ..Counts::default()
        }
    );
    let sink = query_i64(&client, "select count(*) from sink", &[]).await;
    let distinct = query_i64(&client, "select count(distinct record_id) from sink", &[]).await;
    let missing = query_i64(
        &client,
        "select count(*) from tally.record r \
          where not exists (select 1 from sink s where s.record_id = r.record_id)",
        &[],
    )
    .await;
    assert_eq!(
        (sink, distinct, missing),
        (N, N, 0),
        "sink rows, distinct ids, missing"
    );
    // No attempt burnt: nothing was rescued, and given-back rows kept their attempt.
    let not_first = query_i64(
        &client,
        "select count(*) from tally.record where attempt <> 1",
        &[],
    )
    .await;
    assert_eq!(not_first, 0, "records with attempt other than 1");
    assert_eq!(lease_rows(&client).await, Some(0), "leases left behind");

    // The serve Deployment saw it all and reports the batch finished.
    let batch_label = format!("batch=\"{BATCH}\"");
    let (status, metrics) = http_get(serve_port, "/metrics")
        .await
        .expect("coordinator serve answers /metrics");
    assert_eq!(status, 200, "/metrics: {metrics}");
    assert_eq!(
        metric(
            &metrics,
            "tally_batch_records",
            &[&batch_label, "state=\"complete\""]
        ),
        Some(N as f64),
        "tally_batch_records complete in:\n{metrics}"
    );
    assert_eq!(
        metric(&metrics, "tally_batch_completion_ratio", &[&batch_label]),
        Some(1.0),
        "tally_batch_completion_ratio in:\n{metrics}"
    );
    serve.signal(libc::SIGTERM);
    let status = serve.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "serve stop");
}
