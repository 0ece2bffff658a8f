//! A worker's start against a database that is not there yet, or never will be.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tally_tests::{admin_url, binary, with_database, ChildGuard, TestDb};

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
    let out = Command::new(binary("worker"))
        .args(["--queue", "q", "--handler", "noop"])
        .env("DATABASE_URL", &missing)
        .stdin(Stdio::null())
        .output()
        .expect("run worker");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/tally_no_such_database") && stderr.contains("does not exist"),
        "{stderr}"
    );

    let db = TestDb::new("worker_starts_once_reachable").await;
    let mut worker = ChildGuard::new(
        "worker",
        Command::new(binary("worker"))
            .args([
                "--queue",
                "q",
                "--handler",
                "noop",
                "--poll-interval",
                "200ms",
            ])
            .env("DATABASE_URL", &db.url)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn worker"),
    );
    let (code, _, stderr) = tally_tests::coordinator_with_stdin(
        &db.url,
        &["prepare", "b", "--queue", "q", "--from-file", "-"],
        Some(b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n"),
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) =
        tally_tests::coordinator(&db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "{stdout} {stderr}");
    worker.signal(libc::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}
