//! pause, resume and cancel through the `coordinator` binary, with a real worker.

use std::time::Duration;
use tally_tests::{
    assert_counts_exact, coordinator, coordinator_with_stdin, jsonl_ids, prepare_stdin, TestDb,
    WorkerCmd,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_batch_is_not_claimed_until_resumed() {
    let db = TestDb::new("pause_resume").await;
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(2000), &[]);
    let (code, out, err) = coordinator(&db.url, &["pause", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("paused"), "{out}");
    let (code, _, err) = coordinator(&db.url, &["pause", "b"]);
    assert_eq!(code, 1, "pausing twice is refused: {err}");

    let _worker = WorkerCmd::noop(&db.url, "q").poll("100ms").start();
    // The worker polls ten times a second: long enough to have claimed, had it been allowed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let store = db.store().await;
    let status = &store.batch_status(Some("b")).await.unwrap()[0];
    assert_eq!(status.state, "paused");
    assert_eq!((status.pending, status.complete), (2000, 0), "{status:?}");

    let (code, out, err) = coordinator(&db.url, &["resume", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = coordinator(&db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "{out}{err}");
    let client = db.client().await;
    let counts = assert_counts_exact(&store, &client, "b").await;
    assert_eq!(counts.complete, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_marks_unfinished_records_and_ends_the_batch() {
    let db = TestDb::new("cancel").await;
    prepare_stdin(&db.url, "b", "q", &jsonl_ids(500), &[]);
    // Another batch of the same queue is left alone.
    prepare_stdin(&db.url, "other", "q", &jsonl_ids(10), &[]);
    let (code, out, err) = coordinator(&db.url, &["cancel", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("500 unfinished records"), "{out}");

    let store = db.store().await;
    let client = db.client().await;
    let counts = assert_counts_exact(&store, &client, "b").await;
    assert_eq!(counts.cancelled, 500, "{counts:?}");
    assert_eq!(counts.pending, 0);
    let status = &store.batch_status(Some("b")).await.unwrap()[0];
    assert_eq!(status.state, "cancelled");
    let other = &store.batch_status(Some("other")).await.unwrap()[0];
    assert_eq!(other.pending, 10);

    let (code, _, _) = coordinator(&db.url, &["wait", "b", "--timeout", "5s"]);
    assert_eq!(code, 3, "a cancelled batch is finished, not complete");
    let (code, _, err) = coordinator(&db.url, &["resume", "b"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = coordinator(&db.url, &["cancel", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_its_failure_limit_is_paused_until_resumed() {
    let db = TestDb::new("max_failed").await;
    let client = db.client().await;
    client
        .batch_execute("create table sink (n int not null check (n % 5 <> 0))")
        .await
        .unwrap();
    let input: String = (1..=2000)
        .map(|i| format!("{{\"id\":\"r{i}\",\"n\":{i}}}\n"))
        .collect();
    prepare_stdin(&db.url, "b", "q", input.as_bytes(), &["--max-failed", "5"]);
    // Small claims and chunks, one at a time: the pause takes effect long before the end.
    let _worker = WorkerCmd::sql(&db.url, "q", "insert into sink values (($2->>'n')::int)")
        .args(&[
            "--concurrency",
            "1",
            "--claim-size",
            "20",
            "--sql-chunk",
            "10",
        ])
        .poll("100ms")
        .start();
    let store = db.store().await;
    let paused = tally_tests::poll_until("the batch pauses", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            let s = store.batch_status(Some("b")).await.unwrap().remove(0);
            (s.state == "paused").then_some(s)
        }
    })
    .await;
    let reason = paused.paused_reason.clone().unwrap_or_default();
    assert!(reason.contains("too many failures"), "{reason}");
    assert!(reason.contains("5 tolerated"), "{reason}");
    // Let in-flight work settle, then check the batch stopped burning work.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = assert_counts_exact(&store, &client, "b").await;
    assert!(counts.failed > 5, "{counts:?}");
    assert!(counts.pending > 1000, "work stopped early: {counts:?}");
    let (_, out, _) = coordinator(&db.url, &["status", "b"]);
    assert!(out.contains("too many failures"), "{out}");

    let (code, out, err) = coordinator(&db.url, &["resume", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = coordinator(&db.url, &["wait", "b", "--timeout", "60s"]);
    assert_eq!(code, 3, "finished with failures: {out}{err}");
    let counts = assert_counts_exact(&store, &client, "b").await;
    assert_eq!((counts.complete, counts.failed), (1600, 400), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_limits_are_validated() {
    let db = TestDb::new("max_failed_validation").await;
    for args in [
        &["--max-failed-ratio", "1.5"][..],
        &["--max-failed-ratio=-0.1"][..],
        &["--max-failed=-1"][..],
    ] {
        let mut all = vec!["prepare", "b", "--queue", "q", "--from-file", "-"];
        all.extend_from_slice(args);
        let (code, _, err) = coordinator_with_stdin(&db.url, &all, Some(b"{\"id\":\"a\"}\n"));
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains("--max-failed"), "{err}");
    }
}
