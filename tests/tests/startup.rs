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

/// A free TCP port on 127.0.0.1 (released before use; fine for a test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `GET path` on 127.0.0.1:port: status code and body, or `None` when nothing answers yet.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(status, _)| status)
}

async fn status_when_up(port: u16, path: &str) -> u16 {
    tally_tests::poll_until(
        "the health endpoint answers",
        Duration::from_secs(10),
        || async { http_status(port, path) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_report_live_but_not_ready_without_a_database() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _worker = tally_tests::start_worker(
        "postgres://postgres@127.0.0.1:1/nowhere",
        &["--queue", "q", "--handler", "noop", "--listen", &listen],
    );
    assert_eq!(status_when_up(port, "/healthz").await, 200);
    assert_eq!(status_when_up(port, "/readyz").await, 503);
    assert_eq!(status_when_up(port, "/nope").await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_when_connected_and_metrics_count_the_batch() {
    let db = TestDb::new("health_ready").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _worker = tally_tests::start_worker(
        &db.url,
        &["--queue", "q", "--handler", "noop", "--listen", &listen],
    );
    assert_eq!(status_when_up(port, "/healthz").await, 200);
    // Panics unless /readyz answers 200 within the deadline.
    tally_tests::poll_until("the worker is ready", Duration::from_secs(10), || async {
        (http_status(port, "/readyz") == Some(200)).then_some(())
    })
    .await;

    let input: String = (1..=100)
        .map(|i| format!("{{\"id\":\"secret-{i}\"}}\n"))
        .collect();
    let (code, _, err) = tally_tests::coordinator_with_stdin(
        &db.url,
        &["prepare", "b", "--queue", "q", "--from-file", "-"],
        Some(input.as_bytes()),
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = tally_tests::coordinator(&db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "{out}{err}");
    let metrics = tally_tests::poll_until(
        "completions are counted",
        Duration::from_secs(10),
        || async {
            http_get(port, "/metrics")
                .map(|(_, body)| body)
                .filter(|body| {
                    body.contains("tally_worker_records_completed_total{queue=\"q\"} 100")
                })
        },
    )
    .await;
    for line in [
        "tally_worker_records_claimed_total{queue=\"q\"} 100",
        "tally_worker_records_failed_total{queue=\"q\"} 0",
        "tally_worker_records_in_flight{queue=\"q\"} 0",
        "tally_worker_handler_duration_seconds_count{queue=\"q\"} 100",
        "# TYPE tally_worker_claim_duration_seconds histogram",
        "tally_worker_build_info{version=",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
    assert!(
        !metrics.contains("secret-"),
        "record ids never become labels"
    );
}
