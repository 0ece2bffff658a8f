//! The `http` and `exec` handlers of the real `worker` binary: an HTTP server inside the test
//! process counts deliveries and keys; exec runs real processes and leaves files behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tally_tests::*;
use tokio_util::sync::CancellationToken;

const EXIT_OK: i32 = 0;
const EXIT_FINISHED_WITH_FAILURES: i32 = 3;
const EXIT_USAGE: i32 = 64;

// ---------------------------------------------------------------------------------------------
// A recording HTTP server
// ---------------------------------------------------------------------------------------------

/// One request the server received.
#[derive(Debug, Clone)]
struct Delivery {
    method: Method,
    path: String,
    key: String,
    batch: String,
    record: String,
    attempt: i32,
    content_type: String,
    body: Bytes,
    at: Instant,
}

/// What the server answers, after `delay`.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    fn body(mut self, body: impl Into<String>) -> Reply {
        self.body = body.into();
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// Decides the reply to a delivery; `nth` counts deliveries to the same path, from 1.
type Script = dyn Fn(&Delivery, usize) -> Reply + Send + Sync;

struct ServerState {
    log: Mutex<(Vec<Delivery>, HashMap<String, usize>)>,
    /// Requests being answered, by the first segment of their path.
    active: Mutex<HashMap<String, i64>>,
    script: Box<Script>,
}

/// An HTTP server on 127.0.0.1 in this process, stopped when dropped.
struct RecordingServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    _stop: tokio_util::sync::DropGuard,
}

impl RecordingServer {
    async fn start(script: impl Fn(&Delivery, usize) -> Reply + Send + Sync + 'static) -> Self {
        let state = Arc::new(ServerState {
            log: Mutex::new((Vec::new(), HashMap::new())),
            active: Mutex::new(HashMap::new()),
            script: Box::new(script),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test server");
        let addr = listener.local_addr().expect("test server address");
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        RecordingServer {
            addr,
            state,
            _stop: stop.drop_guard(),
        }
    }

    fn url(&self, path_template: &str) -> String {
        format!("http://{}{path_template}", self.addr)
    }

    /// Requests under `/<first>/` received and not yet answered.
    fn active(&self, first: &str) -> i64 {
        let active = self.state.active.lock().expect("server state");
        active.get(first).copied().unwrap_or(0)
    }

    fn count(&self) -> usize {
        self.state.log.lock().expect("server log").0.len()
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.state.log.lock().expect("server log").0.clone()
    }

    /// Deliveries grouped by record id (from the URL path's last segment).
    fn by_record(&self) -> BTreeMap<String, Vec<Delivery>> {
        let mut map: BTreeMap<String, Vec<Delivery>> = BTreeMap::new();
        for d in self.deliveries() {
            let id = d.path.rsplit('/').next().unwrap_or_default().to_string();
            map.entry(id).or_default().push(d);
        }
        map
    }
}

async fn receive(
    State(state): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let delivery = Delivery {
        method,
        path: uri.path().to_string(),
        key: header("idempotency-key"),
        batch: header("tally-batch"),
        record: header("tally-record-id"),
        attempt: header("tally-attempt").parse().unwrap_or(0),
        content_type: header("content-type"),
        body,
        at: Instant::now(),
    };
    let nth = {
        let mut log = state.log.lock().expect("server log");
        let n = log.1.entry(delivery.path.clone()).or_default();
        *n += 1;
        let nth = *n;
        log.0.push(delivery.clone());
        nth
    };
    let reply = (state.script)(&delivery, nth);
    let first = delivery
        .path
        .split('/')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let change_active = |by: i64| {
        let mut active = state.active.lock().expect("server state");
        *active.entry(first.clone()).or_default() += by;
    };
    change_active(1);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    change_active(-1);
    let status = StatusCode::from_u16(reply.status).expect("reply status");
    let mut response = (status, reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).expect("reply header"),
        );
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Prepares `batch` on queue `q` from `records` (JSONL written to `dir`), with short backoffs.
async fn prepare(db: &TestDb, dir: &TempDir, batch: &str, records: &[Value], extra: &[&str]) {
    let path = dir.0.join(format!("{batch}.jsonl"));
    std::fs::write(&path, jsonl_bytes(records)).expect("write input");
    let path = path.display().to_string();
    let mut args = vec![
        "prepare",
        batch,
        "--queue",
        "q",
        "--from-file",
        &path,
        "--backoff-base",
        "10ms",
        "--backoff-max",
        "50ms",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = coordinator_async(&db.url, &args).await;
    assert_eq!(code, EXIT_OK, "prepare {batch}: {out}{err}");
}

/// (state, attempt, last_error) of every record of the database, by record id.
async fn records(db: &TestDb) -> BTreeMap<String, (String, i32, Option<String>)> {
    db.client()
        .await
        .query(
            "select record_id, state, attempt, last_error from tally.record",
            &[],
        )
        .await
        .expect("read records")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

fn http_worker(db: &TestDb, url: &str, extra: &[&str]) -> ChildGuard {
    WorkerCmd::new(&db.url, "q", "http")
        .args(&["--url", url])
        .poll("200ms")
        .args(extra)
        .start()
}

// ---------------------------------------------------------------------------------------------
// http
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_clean_run_delivers_each_record_exactly_once() {
    const N: usize = 10_000;
    let db = TestDb::new("http_clean_run").await;
    let dir = TempDir::new("http-clean");
    let server = RecordingServer::start(|_, _| Reply::status(200)).await;
    // Ids that need encoding in a path and in a header.
    let input: Vec<Value> = (1..=N)
        .map(|i| match i {
            1 => json!({"id": "a/b c?d#é", "n": i, "name": "Zoë"}),
            _ => json!({"id": format!("r{i}"), "n": i}),
        })
        .collect();
    prepare(&db, &dir, "june:run", &input, &[]).await;
    let _worker = http_worker(
        &db,
        &server.url("/orders/{id}"),
        &["--concurrency", "32", "--header", "X-Api-Token: secret"],
    );
    let (code, out, err) = wait_batch(&db.url, "june:run", "120s").await;
    assert_eq!(code, EXIT_OK, "{out}{err}");

    let deliveries = server.deliveries();
    assert_eq!(deliveries.len(), N, "one delivery per record");
    let keys: BTreeSet<&str> = deliveries.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys.len(), N, "distinct idempotency keys");
    let by_path: HashMap<&str, &Delivery> =
        deliveries.iter().map(|d| (d.path.as_str(), d)).collect();
    for record in &input {
        let id = record["id"].as_str().unwrap();
        let encoded = percent_encode(id);
        let d = by_path
            .get(format!("/orders/{encoded}").as_str())
            .unwrap_or_else(|| panic!("no delivery for {id:?}"));
        assert_eq!(d.method, Method::POST);
        assert_eq!(d.key, format!("june%3Arun/{encoded}"));
        assert_eq!(
            (d.batch.as_str(), d.record.as_str()),
            ("june%3Arun", encoded.as_str())
        );
        assert_eq!(d.attempt, 1);
        assert_eq!(d.content_type, "application/json");
        let body: Value = serde_json::from_slice(&d.body).expect("JSON body");
        assert_eq!(&body, record, "the payload is the body");
    }
    let c = assert_counts_exact(&db.store().await, &db.client().await, "june:run").await;
    assert_eq!(c.complete, N as i64);
}

/// RFC 3986 unreserved characters stay, everything else is %XX (UTF-8 bytes).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_statuses_decide_retry_or_failure() {
    let db = TestDb::new("http_statuses").await;
    let dir = TempDir::new("http-statuses");
    let server = RecordingServer::start(|d, nth| {
        match (d.path.rsplit('/').next().unwrap_or_default(), nth) {
            // Two server errors, then success.
            ("flaky", 1 | 2) => Reply::status(500).body("database is down"),
            // Slower than the worker's --timeout once.
            ("slow", 1) => Reply::status(200).after(Duration::from_secs(5)),
            ("missing", _) => Reply::status(404).body("no such order: missing"),
            ("huge", _) => Reply::status(422).body("é".repeat(50_000)),
            _ => Reply::status(200),
        }
    })
    .await;
    let input: Vec<Value> = ["ok", "flaky", "slow", "missing", "huge"]
        .iter()
        .map(|id| json!({"id": id}))
        .collect();
    prepare(&db, &dir, "b", &input, &[]).await;
    let _worker = http_worker(&db, &server.url("/x/{id}"), &["--timeout", "500ms"]);
    let (code, out, err) = wait_batch(&db.url, "b", "60s").await;
    assert_eq!(code, EXIT_FINISHED_WITH_FAILURES, "{out}{err}");

    let seen = server.by_record();
    let rows = records(&db).await;
    let attempts = |id: &str| -> Vec<i32> { seen[id].iter().map(|d| d.attempt).collect() };
    assert_eq!(attempts("ok"), [1]);
    assert_eq!(attempts("flaky"), [1, 2, 3], "500, 500, then 200");
    assert_eq!(rows["flaky"].0, "complete");
    assert_eq!(attempts("slow"), [1, 2], "timed out once, then 200");
    assert_eq!(rows["slow"].0, "complete");
    assert_eq!(attempts("missing"), [1], "404 is not retried");
    let (state, attempt, error) = &rows["missing"];
    assert_eq!((state.as_str(), *attempt), ("failed", 1));
    let error = error.as_deref().unwrap_or_default();
    assert!(
        error.contains("404") && error.contains("no such order: missing"),
        "{error}"
    );
    let (state, _, error) = &rows["huge"];
    assert_eq!(state, "failed");
    let error = error.as_deref().unwrap_or_default();
    assert!(error.starts_with("HTTP 422"), "{error}");
    assert!(
        error.len() < 2_000 && error.ends_with("é…"),
        "bounded, cut at a character: {} bytes",
        error.len()
    );
    // Every delivery of a record carried the same key.
    for (id, ds) in &seen {
        assert!(ds.iter().all(|d| d.key == format!("b/{id}")), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_retry_after_is_respected_in_seconds_and_as_a_date() {
    let db = TestDb::new("http_retry_after").await;
    let dir = TempDir::new("http-retry-after");
    let server = RecordingServer::start(|d, nth| {
        match (d.path.rsplit('/').next().unwrap_or_default(), nth) {
            ("seconds", 1) => Reply::status(429).header("retry-after", "2"),
            ("date", 1) => {
                Reply::status(503).header("retry-after", httpdate_in(Duration::from_secs(3)))
            }
            _ => Reply::status(200),
        }
    })
    .await;
    let input = [json!({"id": "seconds"}), json!({"id": "date"})];
    prepare(&db, &dir, "b", &input, &[]).await;
    let _worker = http_worker(&db, &server.url("/x/{id}"), &[]);
    let (code, out, err) = wait_batch(&db.url, "b", "60s").await;
    assert_eq!(code, EXIT_OK, "{out}{err}");
    let seen = server.by_record();
    let gap = |id: &str| {
        let ds = &seen[id];
        assert_eq!(ds.len(), 2, "{id}: {ds:?}");
        ds[1].at - ds[0].at
    };
    // The batch's own backoff is at most 50 ms: only the header explains these delays.
    assert!(
        gap("seconds") >= Duration::from_secs(2),
        "{:?}",
        gap("seconds")
    );
    // An HTTP date has whole seconds: 3 s from now is at least 2 s away.
    assert!(gap("date") >= Duration::from_secs(2), "{:?}", gap("date"));
}

/// An HTTP date `d` from now.
fn httpdate_in(d: Duration) -> String {
    httpdate::fmt_http_date(SystemTime::now() + d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_http_worker_killed_mid_run_redelivers_with_the_same_key() {
    const N: usize = 20_000;
    let db = TestDb::new("heavy_http_kill").await;
    let dir = TempDir::new("http-kill");
    // Each worker has a URL of its own. The one to be killed is answered slowly, so that it
    // always has requests in flight: records the server saw and the worker never finished.
    let server = RecordingServer::start(|d, _| {
        let delay = if d.path.starts_with("/w1/") { 100 } else { 2 };
        Reply::status(200).after(Duration::from_millis(delay))
    })
    .await;
    let input: Vec<Value> = (1..=N).map(|i| json!({"id": format!("r{i}")})).collect();
    prepare(&db, &dir, "b", &input, &[]).await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut workers: Vec<ChildGuard> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let (id, listen) = (format!("w{}", i + 1), format!("127.0.0.1:{port}"));
            http_worker(
                &db,
                &server.url(&format!("/{id}/{{id}}")),
                &[
                    "--worker-id",
                    &id,
                    "--listen",
                    &listen,
                    "--concurrency",
                    "16",
                    "--claim-size",
                    "200",
                    "--lease",
                    "3s",
                    "--rescue-interval",
                    "1s",
                ],
            )
        })
        .collect();
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for w in workers.iter_mut() {
            w.assert_running();
        }
        if server.count() >= 2_000 && server.active("w1") > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "w1 had no request in flight mid-run in 60s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers[0].signal(libc::SIGKILL);
    workers[0]
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed worker is gone");

    let (code, out, err) = wait_batch(&db.url, "b", "120s").await;
    assert_eq!(code, EXIT_OK, "{out}{err}");
    let c = assert_counts_exact(&db.store().await, &client, "b").await;
    assert_eq!(
        (c.complete, c.pending, c.running),
        (N as i64, 0, 0),
        "{c:?}"
    );

    let seen = server.by_record();
    assert_eq!(seen.len(), N, "every record was delivered at least once");
    let mut redeliveries = 0;
    for (id, ds) in &seen {
        assert!(
            ds.iter().all(|d| d.key == format!("b/{id}")),
            "{id}: every delivery carries the same key"
        );
        redeliveries += ds.iter().filter(|d| d.attempt > 1).count() as u64;
    }
    assert!(
        redeliveries > 0,
        "the killed worker's rows were redelivered"
    );
    let redelivered_records = seen
        .values()
        .filter(|ds| ds.iter().any(|d| d.attempt > 1))
        .count() as i64;
    let retried = query_i64(
        &client,
        "select count(*) from tally.record where attempt > 1",
        &[],
    )
    .await;
    assert_eq!(
        redelivered_records, retried,
        "records the server saw again = rows claimed more than once"
    );
    let mut counted = 0;
    for port in &ports[1..] {
        let page = scrape(*port).expect("a surviving worker serves /metrics");
        counted += metric(&page, "tally_worker_records_redelivered_total", &[])
            .map(|v| v as u64)
            .expect("tally_worker_records_redelivered_total on /metrics");
    }
    eprintln!(
        "http kill -9: {redeliveries} redeliveries seen by the server, {counted} counted by the \
         surviving workers, {retried} rows with attempt > 1"
    );
    assert_eq!(
        counted, redeliveries,
        "redeliveries counted by the surviving workers = deliveries with Tally-Attempt > 1"
    );
    for w in &mut workers[1..] {
        w.assert_running();
    }
}

// ---------------------------------------------------------------------------------------------
// exec
// ---------------------------------------------------------------------------------------------

/// Writes stdin and the environment to files named after the record and attempt, then acts
/// by record id.
const EXEC_SCRIPT: &str = r#"
out="$OUT_DIR/$TALLY_RECORD_ID.$TALLY_ATTEMPT"
cat > "$out.json"
printf '%s\n%s\n%s\n%s\n%s\n' "$TALLY_BATCH" "$TALLY_RECORD_ID" "$TALLY_ATTEMPT" "$TALLY_IDEMPOTENCY_KEY" "${DATABASE_URL:-no database url}" > "$out.env"
case "$TALLY_RECORD_ID" in
  temp)
    if [ "$TALLY_ATTEMPT" -lt 3 ]; then echo "busy, try later" >&2; exit 75; fi ;;
  bad)
    echo "reading record" >&2
    echo "record is malformed" >&2
    exit 1 ;;
  hang)
    sleep 60 &
    echo "$$ $!" > "$out.pids"
    wait ;;
esac
exit 0
"#;

fn exec_worker(db: &TestDb, out_dir: &Path, script: &Path, extra: &[&str]) -> ChildGuard {
    let command = format!("sh {}", script.display());
    let out_dir = out_dir.to_str().expect("a UTF-8 output directory");
    WorkerCmd::new(&db.url, "q", "exec")
        .args(&["--command", &command])
        .poll("200ms")
        .args(&["--concurrency", "4"])
        .args(extra)
        .env("OUT_DIR", out_dir)
        .start()
}

/// Gone, or a zombie nobody reaped yet (it runs no more either way).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_exit_statuses_timeouts_and_stdin() {
    let db = TestDb::new("exec_handler").await;
    let dir = TempDir::new("exec");
    let out_dir = dir.0.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let script = dir.0.join("handle.sh");
    std::fs::write(&script, EXEC_SCRIPT).unwrap();
    let input = [
        json!({"id": "ok1", "text": "quotes \" and \\ and\nnewlines", "unicode": "Zoë 🦀 日本", "n": 1.5}),
        json!({"id": "ok2", "nested": {"list": [1, null, true, {"k": "v"}]}, "big": "x".repeat(200_000)}),
        json!({"id": "temp"}),
        json!({"id": "bad"}),
        json!({"id": "hang"}),
    ];
    prepare(&db, &dir, "exec:batch", &input, &["--max-attempts", "3"]).await;
    let started = Instant::now();
    let _worker = exec_worker(&db, &out_dir, &script, &["--timeout", "1s"]);
    let (code, out, err) = wait_batch(&db.url, "exec:batch", "60s").await;
    assert_eq!(code, EXIT_FINISHED_WITH_FAILURES, "{out}{err}");
    let rows = records(&db).await;

    // Exit 0 completes; stdin carried the payload exactly as the worker read it from
    // PostgreSQL, and the environment names the record.
    let client = db.client().await;
    for id in ["ok1", "ok2"] {
        assert_eq!(rows[id].0, "complete", "{id}: {:?}", rows[id]);
        let payload: Value = client
            .query_one(
                "select payload from tally.record where record_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        let stdin = std::fs::read(out_dir.join(format!("{id}.1.json"))).unwrap();
        assert_eq!(
            stdin,
            serde_json::to_vec(&payload).unwrap(),
            "{id}: stdin bytes"
        );
        let original = input.iter().find(|r| r["id"] == id).unwrap();
        assert_eq!(&serde_json::from_slice::<Value>(&stdin).unwrap(), original);
        let env = std::fs::read_to_string(out_dir.join(format!("{id}.1.env"))).unwrap();
        // The worker's DATABASE_URL is not passed on to the command.
        assert_eq!(
            env,
            format!("exec:batch\n{id}\n1\nexec:batch/{id}\nno database url\n")
        );
    }
    // Exit 75 is retried: attempts 1 and 2 asked for it, 3 succeeded.
    assert_eq!((rows["temp"].0.as_str(), rows["temp"].1), ("complete", 3));
    assert!(out_dir.join("temp.2.json").exists());
    // Exit 1 fails at once, with stderr's end in last_error.
    let (state, attempt, error) = &rows["bad"];
    assert_eq!((state.as_str(), *attempt), ("failed", 1));
    let error = error.as_deref().unwrap_or_default();
    assert!(
        error.contains("status 1") && error.contains("record is malformed"),
        "{error}"
    );
    // A hanging command is killed at the timeout, with its children (the whole group), and
    // retried until its attempts are used up.
    let (state, attempt, error) = &rows["hang"];
    assert_eq!((state.as_str(), *attempt), ("failed", 3));
    let error = error.as_deref().unwrap_or_default();
    assert!(error.contains("timed out after 1s"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "sleep 60 was cut short"
    );
    for attempt in 1..=3 {
        let pids = std::fs::read_to_string(out_dir.join(format!("hang.{attempt}.pids")))
            .unwrap_or_else(|e| panic!("hang attempt {attempt} ran: {e}"));
        for pid in pids.split_whitespace() {
            let pid: i32 = pid.parse().unwrap();
            poll_until(
                &format!("process {pid} of hang attempt {attempt} to be gone"),
                Duration::from_secs(5),
                || async { process_gone(pid).then_some(()) },
            )
            .await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bad configuration
// ---------------------------------------------------------------------------------------------

/// Runs a worker that must refuse to start: exit 64 and every `expected` text on stderr.
async fn refused(args: &[&str], expected: &[&str]) {
    let child = std::process::Command::new(binary("worker"))
        .args(args)
        // Nothing listens there: a worker that got past validation would wait, not exit.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nowhere")
        .env("TALLY_LISTEN", "off")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn worker");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{args:?}: {stderr}");
    for text in expected {
        assert!(stderr.contains(text), "{args:?}: no {text:?} in {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handler_configuration_exits_64_with_every_problem() {
    let q = ["--queue", "q"];
    let with = |more: &[&'static str]| -> Vec<&'static str> {
        q.iter().copied().chain(more.iter().copied()).collect()
    };
    let cases: [(&[&'static str], &[&str]); 11] = [
        (
            &["--handler", "http", "--url", "http://api.test/x/{id"],
            &["unbalanced '{'"],
        ),
        (
            &["--handler", "http", "--url", "not a url"],
            &["--url \"not a url\" is not a URL"],
        ),
        (&["--handler", "http"], &["--handler http needs --url"]),
        (
            &["--handler", "exec", "--command", "  "],
            &["--command is empty"],
        ),
        (
            &[
                "--handler",
                "exec",
                "--command",
                "no-such-program-xyz --flag",
            ],
            &["\"no-such-program-xyz\" is not an executable file in PATH"],
        ),
        (
            &["--handler", "frobnicate"],
            &["invalid value 'frobnicate'", "--handler"],
        ),
        // Several problems are reported together.
        (
            &[
                "--handler",
                "http",
                "--url",
                "ftp://h/{id}",
                "--header",
                "no colon",
                "--command",
                "cat",
                "--max-body",
                "1MiB",
            ],
            &[
                "use http or https",
                "'Name: value'",
                "--command is only used by --handler exec",
            ],
        ),
        (
            &["--handler", "noop", "--url", "http://h/", "--timeout", "5s"],
            &[
                "--url is only used by --handler http",
                "--timeout is only used by --handler http or exec",
            ],
        ),
        (
            &[
                "--handler",
                "http",
                "--url",
                "http://h/",
                "--max-body",
                "lots",
            ],
            &["--max-body", "not a size"],
        ),
        (
            &["--handler", "noop", "--sql", "select 1", "--sql-chunk", "5"],
            &[
                "--sql is only used by --handler sql",
                "--sql-chunk is only used by --handler sql",
            ],
        ),
        (
            &["--handler", "exec", "--command", "cat", "--sql-chunk", "10"],
            &["--sql-chunk is only used by --handler sql"],
        ),
    ];
    for (args, expected) in cases {
        refused(&with(args), expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_commands_are_killed_when_the_grace_period_ends() {
    let db = TestDb::new("exec_grace").await;
    let dir = TempDir::new("exec-grace");
    let out_dir = dir.0.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let script = dir.0.join("handle.sh");
    std::fs::write(&script, EXEC_SCRIPT).unwrap();
    prepare(&db, &dir, "b", &[json!({"id": "hang"})], &[]).await;
    let mut worker = exec_worker(
        &db,
        &out_dir,
        &script,
        &["--timeout", "60s", "--grace-period", "500ms"],
    );
    let pids_file = out_dir.join("hang.1.pids");
    let pids = poll_until("the command to start", Duration::from_secs(30), || async {
        std::fs::read_to_string(&pids_file)
            .ok()
            .filter(|p| p.ends_with('\n'))
    })
    .await;
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the worker stops once the grace period is over");
    assert_eq!(status.code(), Some(0), "{status}");
    for pid in pids.split_whitespace() {
        let pid: i32 = pid.parse().unwrap();
        poll_until(
            &format!("process {pid} to be gone"),
            Duration::from_secs(5),
            || async { process_gone(pid).then_some(()) },
        )
        .await;
    }
}

/// Starts an exec worker on one `hang` record and returns it with the pids of the command
/// (`sh`, the worker's direct child) and of the `sleep` it started.
async fn worker_with_a_hanging_command(
    db: &TestDb,
    dir: &TempDir,
    extra: &[&str],
) -> (ChildGuard, Vec<i32>) {
    let out_dir = dir.0.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let script = dir.0.join("handle.sh");
    std::fs::write(&script, EXEC_SCRIPT).unwrap();
    prepare(db, dir, "b", &[json!({"id": "hang"})], &[]).await;
    let worker = exec_worker(db, &out_dir, &script, extra);
    let pids_file = out_dir.join("hang.1.pids");
    let pids = poll_until("the command to start", Duration::from_secs(30), || async {
        std::fs::read_to_string(&pids_file)
            .ok()
            .filter(|p| p.ends_with('\n'))
    })
    .await;
    let pids = pids
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    (worker, pids)
}

async fn wait_gone(pid: i32) {
    poll_until(
        &format!("process {pid} to be gone"),
        Duration::from_secs(5),
        || async { process_gone(pid).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_commands_are_killed_on_a_second_signal() {
    let db = TestDb::new("exec_second_signal").await;
    let dir = TempDir::new("exec-second-signal");
    let (mut worker, pids) =
        worker_with_a_hanging_command(&db, &dir, &["--timeout", "60s", "--grace-period", "60s"])
            .await;
    worker.signal(libc::SIGTERM);
    // Two signals close together may be delivered as one: let the first one drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.assert_running();
    worker.signal(libc::SIGTERM);
    let status = worker
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the worker exits at the second signal");
    assert_eq!(status.code(), Some(130), "{status}");
    // The whole group: the command and the child it started.
    for pid in pids {
        wait_gone(pid).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_command_dies_with_a_killed_worker() {
    let db = TestDb::new("exec_worker_killed").await;
    let dir = TempDir::new("exec-worker-killed");
    let (mut worker, pids) = worker_with_a_hanging_command(&db, &dir, &["--timeout", "60s"]).await;
    worker.kill();
    // The command itself goes with the worker; a child it started is beyond the kernel's
    // reach (it is cleaned up here).
    wait_gone(pids[0]).await;
    for pid in &pids[1..] {
        // SAFETY: kill(2) on a pid this test's command started.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_command_that_exits_completes_though_its_input_is_unread() {
    let db = TestDb::new("exec_unread_stdin").await;
    let dir = TempDir::new("exec-unread-stdin");
    let out_dir = dir.0.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    // Far more than a pipe holds, to a background child that never reads it.
    prepare(
        &db,
        &dir,
        "b",
        &[json!({"id": "big", "text": "x".repeat(200_000)})],
        &[],
    )
    .await;
    let out = out_dir.to_str().unwrap();
    let _worker = WorkerCmd::new(&db.url, "q", "exec")
        .args(&[
            "--shell",
            "--command",
            // fd 3: sh points a background job's stdin at /dev/null, an explicit copy survives.
            r#"exec 3<&0; sleep 60 <&3 & echo $! > "$OUT_DIR/bg.pid"; exit 0"#,
            "--timeout",
            "30s",
        ])
        .poll("200ms")
        .env("OUT_DIR", out)
        .start();
    // Well before the timeout: the exit is not held up by the unread input.
    let row = poll_until(
        "the record to complete",
        Duration::from_secs(15),
        || async {
            let rows = records(&db).await;
            // Done, or retried (attempt 2 is pending or running).
            rows.get("big")
                .filter(|r| r.0 == "complete" || r.0 == "failed" || r.1 > 1)
                .cloned()
        },
    )
    .await;
    assert_eq!((row.0.as_str(), row.1), ("complete", 1), "{row:?}");
    let pid: i32 = std::fs::read_to_string(out_dir.join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The background child went with the command's group.
    wait_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tls_and_connection_errors_are_retried() {
    let db = TestDb::new("http_transport_errors").await;
    let dir = TempDir::new("http-transport");
    let server = RecordingServer::start(|_, _| Reply::status(200)).await;
    // TLS spoken to a plain HTTP server, then a port nobody listens on.
    let tls_url = format!("https://{}/x/{{id}}", server.addr);
    let refused_url = format!("http://127.0.0.1:{}/x/{{id}}", free_port());
    for (batch, url, expected) in [
        ("tls", tls_url.as_str(), "HTTP request failed"),
        ("refused", refused_url.as_str(), "Connection refused"),
    ] {
        prepare(
            &db,
            &dir,
            batch,
            &[json!({"id": "a"})],
            &["--max-attempts", "2"],
        )
        .await;
        let mut worker = http_worker(&db, url, &[]);
        let (code, out, err) = wait_batch(&db.url, batch, "60s").await;
        assert_eq!(code, EXIT_FINISHED_WITH_FAILURES, "{batch}: {out}{err}");
        worker.kill();
        let (state, attempt, error): (String, i32, Option<String>) = db
            .client()
            .await
            .query_one(
                "select r.state, r.attempt, r.last_error from tally.record r \
                   join tally.batch b on b.id = r.batch_id where b.name = $1",
                &[&batch],
            )
            .await
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .unwrap();
        let error = error.unwrap_or_default();
        assert_eq!((state.as_str(), attempt), ("failed", 2), "{batch}: {error}");
        assert!(
            error.contains(expected) && error.contains("attempts exhausted"),
            "{batch}: retried until its attempts ran out: {error}"
        );
        eprintln!("{batch}: {error}");
    }
    assert!(server.deliveries().is_empty(), "nothing got through");
}
