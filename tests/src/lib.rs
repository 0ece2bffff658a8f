//! Test harness: every test gets its own freshly migrated database on a real PostgreSQL,
//! and can start the real `coordinator` and `worker` binaries.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use tally::Store;

pub mod browser;
pub mod pipelines;
pub mod serve;

/// Admin URL of the server tests run against (set by `scripts/test.sh`).
pub fn admin_url() -> String {
    std::env::var("TALLY_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Replaces the database name of a URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own, migrated, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    /// Creates and migrates a fresh database named after the test.
    pub async fn new(test: &str) -> TestDb {
        let db = Self::empty(test).await;
        let store = db.store().await;
        store.migrate().await.expect("migrate");
        db
    }

    /// A fresh database without the schema.
    pub async fn empty(test: &str) -> TestDb {
        Self::empty_at(&admin_url(), test).await
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.url, 8).await.expect("connect store")
    }

    /// A plain client for assertions and setup.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("TALLY_KEEP_TEST_DB").is_some() {
            return;
        }
        execute_detached(vec![(
            self.admin.clone(),
            format!("drop database if exists \"{}\" with (force)", self.name),
        )]);
    }
}

/// Runs each `(url, statement)` on a connection of its own, from a thread and runtime of its
/// own: `Drop` may run inside a runtime, which cannot block on another. Failures are reported
/// on stderr, never raised (this is cleanup).
pub fn execute_detached(steps: Vec<(String, String)>) {
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            for (url, sql) in steps {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    if let Err(e) = client.batch_execute(&sql).await {
                        eprintln!("{sql}: {e}");
                    }
                }
            }
        });
    })
    .join();
}

/// Connects a plain client (the connection is driven by a spawned task).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Path of a release binary of this workspace (`scripts/test.sh` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["release", "debug"] {
        let path = target.join(profile).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("binary {name} not built: run `cargo build --release --bins` first");
}

/// Runs `coordinator` with `args` against `url`; returns (exit code, stdout, stderr).
pub fn coordinator(url: &str, args: &[&str]) -> (i32, String, String) {
    coordinator_with_stdin(url, args, None)
}

pub fn coordinator_with_stdin(
    url: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (i32, String, String) {
    let out = output_with_stdin(
        Command::new(binary("coordinator"))
            .args(args)
            .env("DATABASE_URL", url),
        stdin,
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` to its end with `stdin` written to it (or stdin closed), capturing stdout and
/// stderr. A write the process does not read (it exited early) is not an error here: its exit
/// status tells.
pub fn output_with_stdin(cmd: &mut Command, stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(data);
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {program}: {e}"))
}

/// Starts a `worker` process; the caller kills or waits for it. Its endpoints are off
/// (tests run many workers at once) unless `args` has a `--listen`, which wins over the env.
pub fn spawn_worker(url: &str, args: &[&str]) -> Child {
    WorkerCmd::bare(url)
        .args(args)
        .command()
        .spawn()
        .expect("spawn worker")
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned; no memory is touched.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Writes `n` JSONL records `{"id": "r<i>", "n": i}` to a temp file and returns its path.
pub fn jsonl_file(dir: &std::path::Path, name: &str, n: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create input"));
    for i in 1..=n {
        writeln!(f, "{{\"id\":\"r{i}\",\"n\":{i}}}").expect("write input");
    }
    f.flush().expect("flush input");
    path
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tally-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for the integration suite (tests/tests/*.rs).
// ---------------------------------------------------------------------------------------------

/// A child process that is SIGKILLed and reaped when dropped, so that a failing (panicking)
/// test never leaves a worker or coordinator behind.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn new(what: &str, child: Child) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            what: what.to_string(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) unless the process was already reaped.
    pub fn signal(&mut self, sig: i32) {
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                signal(child, sig);
            }
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (polling, without blocking the async runtime) up to `timeout` for the process to
    /// end; `None` if it is still running.
    pub async fn wait_exit(
        &mut self,
        timeout: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Panics (after killing the process) unless it is still running: a worker that died on
    /// its own is a failure the test should report plainly.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("{} exited unexpectedly: {status}", self.what);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a `worker` process guarded by a [`ChildGuard`].
pub fn start_worker(url: &str, args: &[&str]) -> ChildGuard {
    ChildGuard::new("worker", spawn_worker(url, args))
}

/// Starts `coordinator` with `args` in the background (output discarded, errors to the test's
/// stderr), guarded by a [`ChildGuard`].
pub fn start_coordinator(url: &str, args: &[&str]) -> ChildGuard {
    let child = Command::new(binary("coordinator"))
        .args(args)
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn coordinator");
    ChildGuard::new("coordinator", child)
}

/// [`coordinator`] on a blocking thread, so that the test's runtime keeps serving its
/// database connections meanwhile.
pub async fn coordinator_async(url: &str, args: &[&str]) -> (i32, String, String) {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        coordinator(&url, &refs)
    })
    .await
    .expect("coordinator task")
}

/// A batch spec with short backoffs, so that retries in tests happen quickly.
pub fn spec(name: &str, queue: &str) -> tally::BatchSpec {
    tally::BatchSpec {
        name: name.to_string(),
        queue: queue.to_string(),
        id_field: "id".to_string(),
        max_attempts: 5,
        backoff_base: std::time::Duration::from_millis(10),
        backoff_max: std::time::Duration::from_millis(100),
        max_failed: None,
        max_failed_ratio: None,
    }
}

/// JSONL text of the given values, one per line.
pub fn jsonl_bytes(records: &[serde_json::Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(r.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Runs a query returning one bigint (e.g. a `count(*)`).
pub async fn query_i64(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    client
        .query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The internal id of a batch.
pub async fn batch_id(client: &tokio_postgres::Client, batch: &str) -> i64 {
    query_i64(
        client,
        "select id from tally.batch where name = $1",
        &[&batch],
    )
    .await
}

/// Row counts of a batch by state, straight from `tally.record`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub pending: i64,
    pub running: i64,
    pub complete: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl Counts {
    pub fn total(&self) -> i64 {
        self.pending + self.running + self.complete + self.failed + self.cancelled
    }
}

/// `select state, count(*) from tally.record group by state` for one batch.
pub async fn counts_by_state(client: &tokio_postgres::Client, batch: &str) -> Counts {
    let rows = client
        .query(
            "select r.state, count(*) from tally.record r \
               join tally.batch b on b.id = r.batch_id \
              where b.name = $1 group by r.state",
            &[&batch],
        )
        .await
        .expect("count records by state");
    let mut counts = Counts::default();
    for row in rows {
        let state: String = row.get(0);
        let n: i64 = row.get(1);
        match state.as_str() {
            "pending" => counts.pending = n,
            "running" => counts.running = n,
            "complete" => counts.complete = n,
            "failed" => counts.failed = n,
            "cancelled" => counts.cancelled = n,
            other => panic!("unknown record state {other:?}"),
        }
    }
    counts
}

/// Guarantee 7: the counts `batch_status` reports equal a `COUNT(*)` by state. Returns them.
pub async fn assert_counts_exact(
    store: &Store,
    client: &tokio_postgres::Client,
    batch: &str,
) -> Counts {
    let status = store
        .batch_status(Some(batch))
        .await
        .unwrap_or_else(|e| panic!("status of {batch}: {e}"));
    assert_eq!(status.len(), 1, "one status for batch {batch}");
    let s = &status[0];
    let reported = Counts {
        pending: s.pending,
        running: s.running,
        complete: s.complete,
        failed: s.failed,
        cancelled: s.cancelled,
    };
    let actual = counts_by_state(client, batch).await;
    assert_eq!(
        reported, actual,
        "batch {batch}: counts reported by batch_status (left) differ from COUNT(*) by state (right)"
    );
    assert_eq!(s.total, actual.total(), "batch {batch}: total");
    actual
}

/// Polls `check` every 50 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Makes the lease holding record row `row_id` expired (one second ago), whichever way the
/// schema keeps leases: a `tally.lease` row per claim, or `lease_expires_at` on the record.
/// Returns how many lease rows were changed.
pub async fn backdate_lease(client: &tokio_postgres::Client, row_id: i64) -> u64 {
    let lease_table = query_i64(
        client,
        "select count(*) from pg_tables where schemaname = 'tally' and tablename = 'lease'",
        &[],
    )
    .await
        > 0;
    let sql = if lease_table {
        "update tally.lease set expires_at = now() - interval '1 second' where $1 = any(record_ids)"
    } else {
        "update tally.record set lease_expires_at = now() - interval '1 second' where id = $1"
    };
    client
        .execute(sql, &[&row_id])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Rows in `tally.lease` (one per claim still held), or `None` when the schema keeps leases on
/// the records instead.
pub async fn lease_rows(client: &tokio_postgres::Client) -> Option<i64> {
    let lease_table = query_i64(
        client,
        "select count(*) from pg_tables where schemaname = 'tally' and tablename = 'lease'",
        &[],
    )
    .await
        > 0;
    if !lease_table {
        return None;
    }
    Some(query_i64(client, "select count(*) from tally.lease", &[]).await)
}

// ---------------------------------------------------------------------------------------------
// Helpers for the chaos suite (tests/tests/chaos.rs).
// ---------------------------------------------------------------------------------------------

impl TestDb {
    /// Like [`TestDb::empty`], on the server of the admin URL `admin` (e.g. a throwaway cluster).
    pub async fn empty_at(admin: &str, test: &str) -> TestDb {
        let clean: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!(
            "tally_t_{clean}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let client = connect(admin).await;
        // Two statements, two round trips: a multi-statement simple query is one implicit
        // transaction, in which PostgreSQL refuses DROP/CREATE DATABASE.
        client
            .batch_execute(&format!("drop database if exists \"{name}\" with (force)"))
            .await
            .expect("drop leftover test database");
        client
            .batch_execute(&format!("create database \"{name}\""))
            .await
            .expect("create test database");
        TestDb {
            url: with_database(admin, &name),
            name,
            admin: admin.to_string(),
        }
    }

    /// Like [`TestDb::new`] (created and migrated), on the server of the admin URL `admin`.
    pub async fn new_at(admin: &str, test: &str) -> TestDb {
        let db = Self::empty_at(admin, test).await;
        let store = db.store().await;
        store.migrate().await.expect("migrate");
        db
    }
}

/// Terminates the server sessions of this database whose `application_name` is `app`
/// (other than the caller's own). Returns how many were signalled.
pub async fn terminate_backends(client: &tokio_postgres::Client, app: &str) -> i64 {
    query_i64(
        client,
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
          where datname = current_database() and application_name = $1 \
            and backend_type = 'client backend' and pid <> pg_backend_pid()) t",
        &[&app],
    )
    .await
}

/// A private PostgreSQL cluster started with `scripts/pg-up.sh --throwaway DIR PORT`, stopped
/// (`--stop DIR`) and its directory removed when dropped.
pub struct ThrowawayPg {
    pub dir: PathBuf,
    pub port: u16,
    /// Admin URL printed by pg-up.sh.
    pub url: String,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl ThrowawayPg {
    /// Starts a cluster in a fresh directory under the temp dir, on a free port from
    /// `56000 + pid % 1000` up.
    pub fn start(tag: &str) -> ThrowawayPg {
        let dir = std::env::temp_dir().join(format!(
            "tally-pg-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create throwaway cluster dir");
        let base = 56000 + (std::process::id() % 1000) as u16;
        let port = (base..base + 200)
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .expect("a free port for the throwaway cluster");
        let out = Command::new(repo_root().join("scripts/pg-up.sh"))
            .arg("--throwaway")
            .arg(&dir)
            .arg(port.to_string())
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/pg-up.sh --throwaway");
        let mut pg = ThrowawayPg {
            dir,
            port,
            url: String::new(),
        };
        assert!(
            out.status.success(),
            "pg-up.sh --throwaway failed: {}",
            out.status
        );
        pg.url = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        assert!(pg.url.starts_with("postgres"), "no URL from pg-up.sh");
        pg
    }

    /// `pg_ctl` of the newest installed major version (or on PATH).
    fn pg_ctl() -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin/pg_ctl"))
            .filter(|p| p.exists())
            .collect();
        found.sort_by_key(|p| {
            p.parent()
                .and_then(|b| b.parent())
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        found.pop().unwrap_or_else(|| PathBuf::from("pg_ctl"))
    }

    /// `pg_ctl -D DIR/data -m MODE -w restart` (as the `postgres` OS user when run as root).
    /// The server keeps its options (postmaster.opts) and logs to DIR/postgres.log.
    pub fn restart(&self, mode: &str) {
        let pg_ctl = Self::pg_ctl();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        let status = cmd
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-m", mode, "-w", "-t", "60", "restart"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("run pg_ctl restart");
        assert!(
            status.success(),
            "pg_ctl -m {mode} restart failed: {status}"
        );
    }
}

impl Drop for ThrowawayPg {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/pg-up.sh"))
            .arg("--stop")
            .arg(&self.dir)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status();
        if std::env::var_os("TALLY_KEEP_TEST_DB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// JSONL input of `n` records `{"id":"r<i>"}`, i = 1..=n.
pub fn jsonl_ids(n: u32) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{{\"id\":\"r{i}\"}}\n"))
        .collect::<String>()
        .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Shared setup of the integration suite: workers, batches, sinks, HTTP and metrics.
// ---------------------------------------------------------------------------------------------

/// A `worker` command line under construction: `WorkerCmd::sql(&db.url, "q", statement)
/// .poll("100ms").listen(port).start()`. Its environment is that of [`spawn_worker`]
/// (endpoints off, `RUST_LOG=warn`, stdout discarded, stderr inherited) unless changed.
#[derive(Debug, Clone)]
pub struct WorkerCmd {
    url: String,
    args: Vec<String>,
    /// Applied in order after the defaults: `Some` sets, `None` removes.
    env: Vec<(String, Option<String>)>,
    log: Option<PathBuf>,
}

impl WorkerCmd {
    /// `worker` against `url`, without arguments yet.
    pub fn bare(url: &str) -> WorkerCmd {
        WorkerCmd {
            url: url.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            log: None,
        }
    }

    /// `worker --queue QUEUE --handler HANDLER` against `url`.
    pub fn new(url: &str, queue: &str, handler: &str) -> WorkerCmd {
        Self::bare(url).args(&["--queue", queue, "--handler", handler])
    }

    /// A worker with the `noop` handler.
    pub fn noop(url: &str, queue: &str) -> WorkerCmd {
        Self::new(url, queue, "noop")
    }

    /// A worker with the `sql` handler running `statement`.
    pub fn sql(url: &str, queue: &str, statement: &str) -> WorkerCmd {
        Self::new(url, queue, "sql").args(&["--sql", statement])
    }

    /// More command-line arguments, as given.
    pub fn args(mut self, args: &[&str]) -> WorkerCmd {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// `--poll-interval INTERVAL`.
    pub fn poll(self, interval: &str) -> WorkerCmd {
        self.args(&["--poll-interval", interval])
    }

    /// `--listen 127.0.0.1:PORT` (endpoints on).
    pub fn listen(self, port: u16) -> WorkerCmd {
        self.args(&["--listen", &format!("127.0.0.1:{port}")])
    }

    /// Sets an environment variable of the process.
    pub fn env(mut self, key: &str, value: &str) -> WorkerCmd {
        self.env.push((key.to_string(), Some(value.to_string())));
        self
    }

    /// Removes an environment variable (also one of the defaults) from the process.
    pub fn env_remove(mut self, key: &str) -> WorkerCmd {
        self.env.push((key.to_string(), None));
        self
    }

    /// Writes the worker's stderr to `path` (created afresh) instead of the test's stderr.
    pub fn log_to(mut self, path: &std::path::Path) -> WorkerCmd {
        self.log = Some(path.to_path_buf());
        self
    }

    /// The command, for callers that run it to completion (e.g. with `.output()`).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(binary("worker"));
        cmd.args(&self.args)
            .env("DATABASE_URL", &self.url)
            .env("TALLY_LISTEN", "off")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (key, value) in &self.env {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        if let Some(path) = &self.log {
            let file = std::fs::File::create(path)
                .unwrap_or_else(|e| panic!("create worker log {}: {e}", path.display()));
            cmd.stderr(file);
        }
        cmd
    }

    /// Starts the worker, guarded by a [`ChildGuard`]; `&self`, so that one command line can
    /// start several identical workers.
    pub fn start(&self) -> ChildGuard {
        ChildGuard::new("worker", self.command().spawn().expect("spawn worker"))
    }
}

/// `coordinator prepare BATCH --queue QUEUE --from-file - EXTRA…` with `input` on stdin;
/// panics with the coordinator's output unless it exits 0.
pub fn prepare_stdin(url: &str, batch: &str, queue: &str, input: &[u8], extra: &[&str]) {
    let mut args = vec!["prepare", batch, "--queue", queue, "--from-file", "-"];
    args.extend_from_slice(extra);
    let (code, out, err) = coordinator_with_stdin(url, &args, Some(input));
    assert_eq!(code, 0, "prepare {batch}: {out}{err}");
}

/// `coordinator prepare BATCH --queue QUEUE --from-file PATH EXTRA…` (on a blocking thread);
/// panics with the coordinator's output unless it exits 0. Returns its stdout.
pub async fn prepare_file(
    url: &str,
    batch: &str,
    queue: &str,
    path: impl AsRef<std::path::Path>,
    extra: &[&str],
) -> String {
    let path = path.as_ref().display().to_string();
    let mut args = vec!["prepare", batch, "--queue", queue, "--from-file", &path];
    args.extend_from_slice(extra);
    let (code, out, err) = coordinator_async(url, &args).await;
    assert_eq!(code, 0, "prepare {batch}: {out} {err}");
    out
}

/// `coordinator wait BATCH --timeout TIMEOUT --interval 100ms` on a blocking thread; returns
/// (exit code, stdout, stderr).
pub async fn wait_batch(url: &str, batch: &str, timeout: &str) -> (i32, String, String) {
    coordinator_async(
        url,
        &["wait", batch, "--timeout", timeout, "--interval", "100ms"],
    )
    .await
}

/// Creates the table `table (record_id text not null)` that sql-handler statements write one
/// row per applied record to.
pub async fn create_sink(client: &tokio_postgres::Client, table: &str) {
    let sql = format!("create table {table} (record_id text not null)");
    client
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Panics unless `table` holds exactly `n` rows with `n` distinct `record_id`s: each record's
/// effect applied, none twice.
pub async fn assert_sink_exactly_once(client: &tokio_postgres::Client, table: &str, n: i64) {
    let total = query_i64(client, &format!("select count(*) from {table}"), &[]).await;
    let distinct = query_i64(
        client,
        &format!("select count(distinct record_id) from {table}"),
        &[],
    )
    .await;
    assert_eq!(
        (total, distinct),
        (n, n),
        "{table}: rows and distinct record ids (each record processed once)"
    );
}

/// A free TCP port on 127.0.0.1 (released before use; fine for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on 127.0.0.1:port: status code and body, or `None` when nothing answers yet.
/// Blocking, with a 5 s read timeout.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
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

/// The body of `GET /metrics` on 127.0.0.1:port, or `None` when nothing answers yet.
pub fn scrape(port: u16) -> Option<String> {
    http_get(port, "/metrics").map(|(_, body)| body)
}

/// The value of the first sample of metric `name` in Prometheus text whose labels include
/// every one of `labels` (each as rendered, e.g. `queue="q"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The value of one series (name with its labels, exactly as rendered) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Prepares batch `spec` from `records` (JSONL) through the store; panics if that fails.
pub async fn prepare_records(
    store: &Store,
    spec: &tally::BatchSpec,
    records: &[serde_json::Value],
) {
    store
        .prepare_from_reader(
            spec,
            std::io::Cursor::new(jsonl_bytes(records)),
            tally::input::Format::Jsonl,
            1 << 20,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("prepare {}: {e}", spec.name));
}

/// Waits until `batch` has records and none is pending or running.
pub async fn wait_finished(
    client: &tokio_postgres::Client,
    batch: &str,
    timeout: std::time::Duration,
) {
    poll_until(&format!("batch {batch} to finish"), timeout, || async {
        let c = counts_by_state(client, batch).await;
        (c.total() > 0 && c.pending + c.running == 0).then_some(())
    })
    .await
}

/// Parses a command's JSON output, or fails the test showing it.
pub fn parse_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `coordinator status --json [batch]`, which must succeed.
pub async fn status_json(db: &TestDb, batch: Option<&str>) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    args.extend(batch);
    let (code, stdout, stderr) = coordinator_async(&db.url, &args).await;
    assert_eq!(code, 0, "status --json: {stderr}");
    parse_json(&stdout)
}
