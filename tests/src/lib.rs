//! Test harness: every test gets its own freshly migrated database on a real PostgreSQL,
//! and can start the real `coordinator` and `worker` binaries.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use tally::Store;

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
        let admin = admin_url();
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
        let client = connect(&admin).await;
        client
            .batch_execute(&format!(
                "drop database if exists \"{name}\" with (force); create database \"{name}\""
            ))
            .await
            .expect("create test database");
        TestDb {
            url: with_database(&admin, &name),
            name,
            admin,
        }
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
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // A thread of its own: Drop may run inside a runtime, which cannot block on another.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("drop database if exists \"{name}\" with (force)"))
                        .await;
                }
            });
        })
        .join();
    }
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
    use std::io::Write;
    let mut child = Command::new(binary("coordinator"))
        .args(args)
        .env("DATABASE_URL", url)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn coordinator");
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(data);
    }
    let out = child.wait_with_output().expect("wait coordinator");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a `worker` process; the caller kills or waits for it.
pub fn spawn_worker(url: &str, args: &[&str]) -> Child {
    Command::new(binary("worker"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
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
