//! Structured logs of a real `worker` process: with `--log-format json` every stderr line is
//! a JSON object, record-level lines carry the batch and record id, and the password of the
//! database URL appears nowhere, even at `RUST_LOG=debug`. The errors that end a run of either
//! binary (usage, configuration, connection, command failures) are JSON lines too.

use std::io::Cursor;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use tally::input::Format;
use tally_tests::*;

static ROLES: AtomicU32 = AtomicU32::new(0);

/// A login role with a password on the shared server, dropped (with its privileges in `db`)
/// when the value is dropped, also when the test fails.
struct Role {
    name: String,
    db_url: String,
}

impl Role {
    async fn create(db: &TestDb, password: &str) -> Role {
        let name = format!(
            "tally_logs_{}_{}",
            std::process::id(),
            ROLES.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("create role {name} login password '{password}'"))
            .await
            .expect("create role");
        let role = Role {
            name,
            db_url: db.url.clone(),
        };
        // What a worker needs, and no more: the tally schema's rows, sequences and functions,
        // and the sink the statement writes.
        db.client()
            .await
            .batch_execute(&format!(
                "grant usage on schema tally to {r};
                 grant select, insert, update, delete on all tables in schema tally to {r};
                 grant usage, select on all sequences in schema tally to {r};
                 grant execute on all functions in schema tally to {r};
                 grant insert on sink to {r};",
                r = role.name
            ))
            .await
            .expect("grant the role a worker's privileges");
        role
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        execute_detached(vec![
            (self.db_url.clone(), format!("drop owned by {}", self.name)),
            (admin_url(), format!("drop role if exists {}", self.name)),
        ]);
    }
}

/// `url` with its user and password replaced.
fn with_login(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
    let host_start = match rest.find('@') {
        Some(at) if rest[..at].find('/').is_none() => at + 1,
        _ => 0,
    };
    format!("{scheme}://{user}:{password}@{}", &rest[host_start..])
}

/// The fields of the innermost span called `name` that encloses the line, if any.
fn span_fields<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line["spans"]
        .as_array()?
        .iter()
        .rev()
        .find(|s| s["name"] == name)
}

#[tokio::test]
async fn json_logs_carry_record_fields_and_never_the_password() {
    let db = TestDb::new("logs_json").await;
    let store = db.store().await;
    let client = db.client().await;
    client
        .batch_execute("create table sink (record_id text not null, n int not null)")
        .await
        .expect("create sink");
    let password = format!("Pw-{}-quux-7r0mb0ne", std::process::id());
    let role = Role::create(&db, &password).await;
    let url = with_login(&db.url, &role.name, &password);

    let records = [
        json!({"id": "r1", "n": 1}),
        json!({"id": "r2", "n": 2}),
        json!({"id": "bad", "n": "not a number"}),
    ];
    store
        .prepare_from_reader(
            &spec("logs-1", "logs"),
            Cursor::new(jsonl_bytes(&records)),
            Format::Jsonl,
            1 << 20,
            None,
        )
        .await
        .expect("prepare");

    let dir = TempDir::new("logs");
    let stderr_path = dir.0.join("worker.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
    let child = Command::new(binary("worker"))
        .args([
            "--queue",
            "logs",
            "--handler",
            "sql",
            "--sql",
            "insert into sink (record_id, n) values ($1, ($2->>'n')::int)",
            "--log-format",
            "json",
            "--listen",
            "off",
            "--poll-interval",
            "100ms",
        ])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn worker");
    let mut worker = ChildGuard::new("worker", child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        worker.assert_running();
        let c = counts_by_state(&client, "logs-1").await;
        if c.complete == 2 && c.failed == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "batch not finished in 30s: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("worker exits after SIGTERM");
    assert!(status.success(), "worker exited with {status}");

    let log = std::fs::read_to_string(&stderr_path).expect("read stderr");
    assert!(
        !log.contains(&password),
        "the password appears in the worker's log"
    );
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "RUST_LOG=debug gives debug lines"
    );
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "worker stopped"));

    // One line per record outcome, inside the record's span, inside the worker's span.
    let mut outcomes = Vec::new();
    for line in &lines {
        let Some(record) = span_fields(line, "record") else {
            continue;
        };
        assert_eq!(record["batch"], "logs-1", "{line}");
        let id = record["record_id"]
            .as_str()
            .unwrap_or_else(|| panic!("record_id in {line}"));
        assert_eq!(
            span_fields(line, "worker").map(|w| &w["queue"]),
            Some(&json!("logs")),
            "{line}"
        );
        if let Some(state) = line["fields"]["state"].as_str() {
            outcomes.push((id.to_string(), state.to_string(), line["fields"].clone()));
        }
    }
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    let states: Vec<(&str, &str)> = outcomes
        .iter()
        .map(|(id, state, _)| (id.as_str(), state.as_str()))
        .collect();
    assert_eq!(
        states,
        vec![("bad", "failed"), ("r1", "complete"), ("r2", "complete")]
    );
    let reason = outcomes[0].2["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("invalid input syntax"), "{}", outcomes[0].2);
    drop(role);
}

/// Runs `program` to its end with `args`, `DATABASE_URL=url`, the log format only from the
/// arguments and `env`; returns (exit code, stdout, stderr).
fn run_binary(
    program: &str,
    url: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut cmd = Command::new(binary(program));
    cmd.args(args)
        .env("DATABASE_URL", url)
        .env_remove(tally::logging::ENV_LOG_FORMAT)
        .env_remove("RUST_LOG")
        .env("TALLY_LISTEN", "off");
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = output_with_stdin(&mut cmd, None);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every line of `stderr` parsed as JSON (panics on one that is not); the ERROR lines of
/// `target` must include one whose message holds `expect`.
fn assert_json_error(what: &str, stderr: &str, target: &str, expect: &str) -> Vec<Value> {
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {l}"))
        })
        .collect();
    let found = lines.iter().any(|l| {
        l["level"] == "ERROR"
            && l["target"] == target
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(expect))
    });
    assert!(
        found,
        "{what}: no ERROR line of {target} saying {expect:?} in:\n{stderr}"
    );
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_format_also_covers_the_errors_that_end_a_run() {
    let db = TestDb::new("logs_errors").await;
    let json = ["--log-format", "json"];

    // The worker: a configuration problem, found after parsing.
    let (code, _, stderr) = run_binary(
        "worker",
        &db.url,
        &["--queue", "q", "--handler", "sql", "--log-format", "json"],
        &[],
    );
    assert_eq!(code, 64, "{stderr}");
    assert_json_error(
        "worker without --sql",
        &stderr,
        "worker",
        "--handler sql needs --sql",
    );

    // A usage error clap reports before the format is parsed: the argument is found anyway,
    // and so is the environment variable.
    let (code, _, stderr) = run_binary(
        "worker",
        &db.url,
        &["--handler", "sql", "--log-format=json"],
        &[],
    );
    assert_eq!(code, 64, "{stderr}");
    assert_json_error("worker without --queue", &stderr, "worker", "--queue");
    let (code, _, stderr) = run_binary(
        "worker",
        &db.url,
        &["--queue", "q", "--handler", "nope"],
        &[(tally::logging::ENV_LOG_FORMAT, "json")],
    );
    assert_eq!(code, 64, "{stderr}");
    assert_json_error("worker --handler nope", &stderr, "worker", "'nope'");

    // Credentials the server refuses: the error names the login, never its password.
    let password = format!("Pw-{}-n0-such-r0le", std::process::id());
    let user = format!("tally_logs_missing_{}", std::process::id());
    let bad_login = with_login(&db.url, &user, &password);
    let (code, _, stderr) = run_binary(
        "worker",
        &bad_login,
        &[&["--queue", "q", "--handler", "noop"][..], &json].concat(),
        &[("RUST_LOG", "debug")],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_json_error(
        "worker with a bad login",
        &stderr,
        "worker",
        "cannot connect",
    );
    assert!(stderr.contains(&user), "the error names the user: {stderr}");
    assert!(
        !stderr.contains(&password),
        "the password appears: {stderr}"
    );

    // The coordinator: a command that fails at run time, and bad input.
    let (code, stdout, stderr) = run_binary(
        "coordinator",
        &db.url,
        &["status", "nope", "--log-format", "json"],
        &[],
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert_json_error(
        "status of a missing batch",
        &stderr,
        "coordinator",
        "batch \"nope\" does not exist",
    );
    let dir = TempDir::new("logs-errors");
    let file = dir.0.join("bad.jsonl");
    std::fs::write(&file, "{\"id\":\"a\"}\n{\"id\":\n").expect("write input");
    let file = file.display().to_string();
    let (code, _, stderr) = run_binary(
        "coordinator",
        &db.url,
        &[
            "--log-format",
            "json",
            "prepare",
            "b",
            "--queue",
            "q",
            "--from-file",
            &file,
        ],
        &[],
    );
    assert_eq!(code, 65, "{stderr}");
    assert_json_error(
        "prepare of a malformed file",
        &stderr,
        "coordinator",
        "line 2",
    );

    // `wait` running out of time explains its exit code on stderr; stdout is unchanged.
    tally_tests::prepare_stdin(&db.url, "w", "q", b"{\"id\":\"a\"}\n", &[]);
    let (code, _, stderr) = run_binary(
        "coordinator",
        &db.url,
        &[
            "wait",
            "w",
            "--timeout",
            "50ms",
            "--interval",
            "10ms",
            "--log-format",
            "json",
        ],
        &[],
    );
    assert_eq!(code, 4, "{stderr}");
    assert_json_error(
        "wait past its timeout",
        &stderr,
        "coordinator",
        "timed out waiting for batch w",
    );
    let (code, stdout, stderr) = run_binary(
        "coordinator",
        &db.url,
        &["status", "w", "--json", "--log-format", "json"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let status: Value = serde_json::from_str(&stdout).expect("status --json is one JSON document");
    assert_eq!(status["batch"], "w", "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");

    // Text stays as it was.
    let (code, _, stderr) = run_binary("coordinator", &db.url, &["status", "nope"], &[]);
    assert_eq!(code, 1);
    assert_eq!(stderr, "coordinator: batch \"nope\" does not exist\n");
}
