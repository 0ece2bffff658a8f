//! The `coordinator` binary: exit codes and messages for bad input, names and servers,
//! `status --json` and `wait`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::*;

const EXIT_OK: i32 = 0;
const EXIT_ERROR: i32 = 1;
const EXIT_FINISHED_WITH_FAILURES: i32 = 3;
const EXIT_TIMEOUT: i32 = 4;
const EXIT_USAGE: i32 = 64;
const EXIT_DATA: i32 = 65;
const EXIT_UNAVAILABLE: i32 = 69;

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.display().to_string()
}

/// `coordinator status <batch>` reports that the batch does not exist.
async fn assert_no_batch(db: &TestDb, batch: &str) {
    let (code, stdout, stderr) = coordinator_async(&db.url, &["status", batch]).await;
    assert_eq!(code, EXIT_ERROR, "status of {batch}: {stdout} {stderr}");
    assert!(
        stderr.contains(&format!("batch \"{batch}\" does not exist")),
        "status of {batch}: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Bad input
// ---------------------------------------------------------------------------------------------

struct BadInput {
    batch: &'static str,
    file: &'static str,
    content: String,
    extra: &'static [&'static str],
    /// Every one of these must appear in stderr.
    expect: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_with_file_and_line() {
    let db = TestDb::new("bad_input").await;
    let dir = TempDir::new("bad-input");
    let big = format!("{{\"id\":\"big\",\"text\":\"{}\"}}\n", "x".repeat(200));
    let cases = vec![
        BadInput {
            batch: "malformed",
            file: "malformed.jsonl",
            content: "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c\",\n{\"id\":\"d\"}\n".into(),
            extra: &[],
            expect: vec!["line 3".into(), "malformed JSON".into()],
        },
        BadInput {
            batch: "missing-id",
            file: "missing.jsonl",
            content: "{\"id\":\"a\"}\n{\"name\":\"no id\"}\n{\"id\":\"c\"}\n".into(),
            extra: &[],
            expect: vec!["line 2".into(), "\"id\"".into(), "missing".into()],
        },
        BadInput {
            batch: "duplicate",
            file: "duplicate.jsonl",
            content: "{\"id\":\"dup-1\"}\n{\"id\":\"b\"}\n{\"id\":\"c\"}\n{\"id\":\"dup-1\"}\n"
                .into(),
            extra: &[],
            expect: vec!["line 4".into(), "dup-1".into(), "duplicate".into()],
        },
        BadInput {
            batch: "duplicate-blank",
            file: "duplicate-blank.jsonl",
            content: "{\"id\":\"d\"}\n\n{\"id\":\"e\"}\n\n{\"id\":\"d\"}\n".into(),
            extra: &[],
            expect: vec!["line 5".into(), "\"d\"".into()],
        },
        BadInput {
            batch: "empty",
            file: "empty.jsonl",
            content: String::new(),
            extra: &[],
            expect: vec!["empty".into()],
        },
        BadInput {
            batch: "blank",
            file: "blank.jsonl",
            content: "\n\n   \n\t\n\n".into(),
            extra: &[],
            expect: vec!["empty".into()],
        },
        BadInput {
            batch: "oversized",
            file: "oversized.jsonl",
            content: format!("{{\"id\":\"small\"}}\n{big}"),
            extra: &["--max-payload-bytes", "100"],
            expect: vec!["line 2".into(), "100".into()],
        },
        BadInput {
            batch: "csv-fields",
            file: "fields.csv",
            content: "id,name\n1,a\n2,b,extra\n".into(),
            extra: &["--format", "csv"],
            expect: vec!["line 3".into(), "fields".into()],
        },
        BadInput {
            batch: "csv-noid",
            file: "noid.csv",
            content: "key,name\n1,a\n".into(),
            extra: &["--format", "csv"],
            expect: vec!["line 1".into(), "\"id\"".into()],
        },
        BadInput {
            batch: "object-id",
            file: "objectid.jsonl",
            content: "{\"id\":\"a\"}\n{\"id\":{\"nested\":1}}\n".into(),
            extra: &[],
            expect: vec!["line 2".into(), "object".into()],
        },
        BadInput {
            batch: "not-object",
            file: "array.jsonl",
            content: "{\"id\":\"a\"}\n[1,2]\n".into(),
            extra: &[],
            expect: vec!["line 2".into(), "object".into()],
        },
    ];
    for case in cases {
        let path = write(&dir.0, case.file, &case.content);
        let mut args = vec!["prepare", case.batch, "--queue", "q", "--from-file", &path];
        args.extend_from_slice(case.extra);
        let (code, stdout, stderr) = coordinator_async(&db.url, &args).await;
        assert_eq!(
            code, EXIT_DATA,
            "{}: exit code; stdout: {stdout}; stderr: {stderr}",
            case.batch
        );
        assert!(
            stderr.contains(case.file),
            "{}: stderr names the file: {stderr}",
            case.batch
        );
        for e in &case.expect {
            assert!(
                stderr.contains(e.as_str()),
                "{}: stderr lacks {e:?}: {stderr}",
                case.batch
            );
        }
        assert_no_batch(&db, case.batch).await;
    }
    let client = db.client().await;
    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        0
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        0
    );
    // And nothing is claimable, as the store sees it.
    assert!(db
        .store()
        .await
        .claimable_batches("q")
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_from_stdin_names_stdin() {
    let db = TestDb::new("bad_stdin").await;
    let (code, _, stderr) = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || {
            coordinator_with_stdin(
                &url,
                &["prepare", "s", "--queue", "q", "--from-file", "-"],
                Some(b"{\"id\":\"a\"}\nnot json\n"),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, EXIT_DATA, "{stderr}");
    assert!(
        stderr.contains("<stdin>") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert_no_batch(&db, "s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_from_stdin_and_csv_work() {
    let db = TestDb::new("stdin_csv").await;
    let (code, stdout, stderr) = tokio::task::spawn_blocking({
        let url = db.url.clone();
        move || {
            coordinator_with_stdin(
                &url,
                &["prepare", "s", "--queue", "q", "--from-file", "-"],
                Some(b"{\"id\":\"a\",\"n\":1}\n\n{\"id\":2}\n"),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    assert!(stdout.contains("2 records"), "{stdout}");
    let dir = TempDir::new("csv");
    let path = write(&dir.0, "in.csv", "name,id\nalpha,x1\n\"b, c\",x2\n");
    let (code, stdout, stderr) = coordinator_async(
        &db.url,
        &[
            "prepare",
            "c",
            "--queue",
            "q",
            "--format",
            "csv",
            "--from-file",
            &path,
        ],
    )
    .await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    let client = db.client().await;
    let rows = client
        .query(
            "select r.record_id, r.payload from tally.record r join tally.batch b \
               on b.id = r.batch_id where b.name = $1 order by r.id",
            &[&"c"],
        )
        .await
        .unwrap();
    let got: Vec<(String, Value)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            (
                "x1".to_string(),
                serde_json::json!({"name": "alpha", "id": "x1"})
            ),
            (
                "x2".to_string(),
                serde_json::json!({"name": "b, c", "id": "x2"})
            ),
        ]
    );
    let ids: Vec<String> = client
        .query(
            "select r.record_id from tally.record r join tally.batch b on b.id = r.batch_id \
              where b.name = 's' order by r.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["a", "2"], "an integer id becomes its decimal text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_usage_errors() {
    let db = TestDb::new("bad_names").await;
    let dir = TempDir::new("bad-names");
    let path = jsonl_file(&dir.0, "ok.jsonl", 3);
    let path = path.display().to_string();
    for (batch, queue) in [
        ("a b", "q"),
        ("x';drop", "q"),
        ("ok", "a b"),
        ("ok", "x';drop"),
    ] {
        let (code, stdout, stderr) = coordinator_async(
            &db.url,
            &["prepare", batch, "--queue", queue, "--from-file", &path],
        )
        .await;
        assert_eq!(code, EXIT_USAGE, "{batch:?}/{queue:?}: {stdout} {stderr}");
        assert!(stderr.contains("name"), "{batch:?}/{queue:?}: {stderr}");
    }
    // Unknown flags and a missing source are usage errors too.
    let (code, _, _) = coordinator_async(&db.url, &["prepare", "ok", "--queue", "q"]).await;
    assert_eq!(code, EXIT_USAGE);
    let (code, _, _) = coordinator_async(&db.url, &["status", "--bogus"]).await;
    assert_eq!(code, EXIT_USAGE);
    let (code, _, stderr) = coordinator_async(
        &db.url,
        &[
            "prepare",
            "ok",
            "--queue",
            "q",
            "--from-file",
            &path,
            "--max-attempts",
            "0",
        ],
    )
    .await;
    assert_eq!(code, EXIT_USAGE, "{stderr}");
    let client = db.client().await;
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_input_file_is_reported() {
    let db = TestDb::new("missing_file").await;
    let (code, _, stderr) = coordinator_async(
        &db.url,
        &[
            "prepare",
            "m",
            "--queue",
            "q",
            "--from-file",
            "/nonexistent/tally/in.jsonl",
        ],
    )
    .await;
    assert_ne!(code, EXIT_OK);
    assert!(stderr.contains("/nonexistent/tally/in.jsonl"), "{stderr}");
    assert_no_batch(&db, "m").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_unavailable_without_leaking_the_password() {
    let url = "postgres://u:secretpw@127.0.0.1:1/db";
    let dir = TempDir::new("unreachable");
    let path = jsonl_file(&dir.0, "in.jsonl", 1).display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["migrate"],
        vec!["status"],
        vec!["prepare", "b", "--queue", "q", "--from-file", &path],
        vec!["wait", "b", "--timeout", "1s"],
    ];
    for command in commands {
        let mut args = vec!["--database-url", url];
        args.extend(&command);
        let started = Instant::now();
        // DATABASE_URL points elsewhere too: the flag must win.
        let (code, stdout, stderr) =
            coordinator_async("postgres://nobody@127.0.0.1:1/x", &args).await;
        assert_eq!(code, EXIT_UNAVAILABLE, "{command:?}: {stdout} {stderr}");
        assert!(stderr.contains("127.0.0.1:1/db"), "{command:?}: {stderr}");
        assert!(
            !stderr.contains("secretpw") && !stdout.contains("secretpw"),
            "{command:?} leaks the password: {stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{command:?} took too long"
        );
    }
    // The same through the environment.
    let (code, _, stderr) = coordinator_async(url, &["status"]).await;
    assert_eq!(code, EXIT_UNAVAILABLE, "{stderr}");
    assert!(!stderr.contains("secretpw"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_schema_says_to_migrate() {
    let db = TestDb::empty("missing_schema").await;
    let dir = TempDir::new("noschema");
    let path = jsonl_file(&dir.0, "in.jsonl", 1).display().to_string();
    for command in [
        vec!["status"],
        vec!["prepare", "b", "--queue", "q", "--from-file", path.as_str()],
        vec!["wait", "b"],
        vec!["failed", "b"],
        vec!["retry-failed", "b"],
    ] {
        let (code, stdout, stderr) = coordinator_async(&db.url, &command).await;
        assert_eq!(code, EXIT_UNAVAILABLE, "{command:?}: {stdout} {stderr}");
        assert!(
            stderr.contains("coordinator migrate"),
            "{command:?}: {stderr}"
        );
    }
    // Nothing was created by those commands; migrate then works, twice.
    let (code, stdout, stderr) = coordinator_async(&db.url, &["migrate"]).await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    assert!(stdout.contains("0001_outbox"), "{stdout}");
    let (code, stdout, _) = coordinator_async(&db.url, &["migrate"]).await;
    assert_eq!(code, EXIT_OK);
    assert!(stdout.contains("up to date"), "{stdout}");
    let (code, stdout, stderr) = coordinator_async(&db.url, &["status"]).await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
}

// ---------------------------------------------------------------------------------------------
// 11. status --json and wait
// ---------------------------------------------------------------------------------------------

fn assert_status(v: &Value, batch: &str, queue: &str, state: &str, counts: [i64; 5]) {
    assert_eq!(v["batch"], batch, "{v}");
    assert_eq!(v["queue"], queue, "{v}");
    assert_eq!(v["state"], state, "{v}");
    let [total, pending, running, complete, failed] = counts;
    assert_eq!(v["total"], total, "{v}");
    assert_eq!(v["pending"], pending, "{v}");
    assert_eq!(v["running"], running, "{v}");
    assert_eq!(v["complete"], complete, "{v}");
    assert_eq!(v["failed"], failed, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_wait_exit_codes() {
    let db = TestDb::new("status_json_wait").await;
    let dir = TempDir::new("status");
    let ok = jsonl_file(&dir.0, "ok.jsonl", 40).display().to_string();
    let bad = jsonl_file(&dir.0, "bad.jsonl", 30).display().to_string();

    let list = status_json(&db, None).await;
    assert_eq!(list, serde_json::json!([]), "no batches yet");

    for (batch, queue, path) in [("good", "qgood", &ok), ("poison", "qbad", &bad)] {
        let stdout = prepare_file(&db.url, batch, queue, path, &["--max-attempts", "2"]).await;
        assert!(stdout.contains("prepared"), "{stdout}");
    }
    assert_status(
        &status_json(&db, Some("good")).await,
        "good",
        "qgood",
        "ready",
        [40, 40, 0, 0, 0],
    );
    let all = status_json(&db, None).await;
    let all = all
        .as_array()
        .expect("status --json without a batch prints an array");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["batch"], "good");
    assert_eq!(all[1]["batch"], "poison");
    assert_status(&all[1], "poison", "qbad", "ready", [30, 30, 0, 0, 0]);

    // No worker: wait times out with 4, promptly.
    let started = Instant::now();
    let (code, _, stderr) = coordinator_async(
        &db.url,
        &["wait", "good", "--timeout", "1s", "--interval", "100ms"],
    )
    .await;
    assert_eq!(code, EXIT_TIMEOUT, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(stderr.contains("timed out"), "{stderr}");

    // Unknown batch.
    let (code, _, stderr) = coordinator_async(&db.url, &["wait", "nope", "--timeout", "1s"]).await;
    assert_eq!(code, EXIT_ERROR, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    let mut good = start_worker(
        &db.url,
        &[
            "--queue",
            "qgood",
            "--handler",
            "noop",
            "--concurrency",
            "4",
        ],
    );
    // Division by zero (permanent) for r7 and r13 only.
    let mut poison = start_worker(
        &db.url,
        &[
            "--queue",
            "qbad",
            "--handler",
            "sql",
            "--concurrency",
            "4",
            "--sql",
            "select 1 / (case when $1 in ('r7', 'r13') then 0 else 1 end)",
        ],
    );
    let (code, stdout, stderr) = coordinator_async(
        &db.url,
        &["wait", "good", "--timeout", "60s", "--interval", "100ms"],
    )
    .await;
    assert_eq!(code, EXIT_OK, "{stdout} {stderr}");
    assert!(stdout.contains("complete"), "{stdout}");
    let (code, stdout, stderr) = coordinator_async(
        &db.url,
        &["wait", "poison", "--timeout", "60s", "--interval", "100ms"],
    )
    .await;
    assert_eq!(code, EXIT_FINISHED_WITH_FAILURES, "{stdout} {stderr}");
    good.assert_running();
    poison.assert_running();

    assert_status(
        &status_json(&db, Some("good")).await,
        "good",
        "qgood",
        "complete",
        [40, 0, 0, 40, 0],
    );
    assert_status(
        &status_json(&db, Some("poison")).await,
        "poison",
        "qbad",
        "complete_with_failures",
        [30, 0, 0, 28, 2],
    );
    let store = db.store().await;
    let client = db.client().await;
    assert_counts_exact(&store, &client, "good").await;
    assert_counts_exact(&store, &client, "poison").await;

    // The human table has both batches.
    let (code, stdout, _) = coordinator_async(&db.url, &["status"]).await;
    assert_eq!(code, EXIT_OK);
    assert!(
        stdout.contains("good") && stdout.contains("poison"),
        "{stdout}"
    );
}
