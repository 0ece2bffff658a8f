//! Workers behind PgBouncer in transaction pooling mode (`--pgbouncer`): a private pgbouncer
//! with a pool of 2 server connections shared by two workers, the sql handler, every record
//! applied exactly once.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tally_tests::{admin_url, free_port, ChildGuard, TempDir, TestDb, WorkerCmd};

const RECORDS: u32 = 2000;

/// Host, port and user of a `postgres://user@host:port/...` URL.
fn server_of(url: &str) -> (String, u16, String) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (auth, rest) = rest.split_once('@').unwrap_or(("postgres", rest));
    let user = auth.split(':').next().unwrap_or("postgres").to_string();
    let hostport = rest.split(['/', '?']).next().unwrap_or("127.0.0.1:5432");
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
    (host.to_string(), port.parse().unwrap_or(5432), user)
}

/// Starts pgbouncer (transaction pooling, 2 server connections) in front of `db`; returns it
/// and its port.
async fn start_pgbouncer(dir: &Path, db: &TestDb) -> (ChildGuard, u16) {
    let (host, port, user) = server_of(&db.url);
    let listen = free_port();
    let config = dir.join("pgbouncer.ini");
    std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n")).unwrap();
    std::fs::write(
        &config,
        format!(
            "[databases]\n{name} = host={host} port={port} dbname={name} user={user}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\ndefault_pool_size = 2\nmin_pool_size = 0\n\
             max_client_conn = 200\nlogfile = {dir}/pgbouncer.log\n",
            name = db.name,
            dir = dir.display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new("pgbouncer");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // pgbouncer refuses to run as root.
        cmd.args(["-u", "postgres"]);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let child = cmd
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pgbouncer (apt-get install pgbouncer)");
    let mut guard = ChildGuard::new("pgbouncer", child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
        guard.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "pgbouncer did not listen within 20s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (guard, listen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_through_transaction_pooling_apply_each_record_once() {
    let db = TestDb::new("pgbouncer").await;
    let client = db.client().await;
    client
        .batch_execute("create table sink (id text primary key, batch text not null)")
        .await
        .unwrap();
    let dir = TempDir::new("pgbouncer");
    let (mut bouncer, port) = start_pgbouncer(&dir.0, &db).await;
    let (_, _, user) = server_of(&admin_url());
    let pooled = format!("postgres://{user}@127.0.0.1:{port}/{}", db.name);

    // Prepared directly against the server; the workers go through the pool.
    let input = dir.0.join("in.jsonl");
    std::fs::write(&input, tally_tests::jsonl_ids(RECORDS)).unwrap();
    tally_tests::prepare_file(&db.url, "b1", "q", &input, &[]).await;

    let worker = WorkerCmd::sql(&pooled, "q", "insert into sink (id, batch) values ($1, $3)")
        .args(&["--pgbouncer", "--concurrency", "4", "--claim-size", "50"])
        .args(&["--sql-chunk", "10", "--rescue-interval", "1s"])
        .poll("100ms")
        .env_remove("DATABASE_URL_FILE");
    let mut workers = Vec::new();
    for i in 0..2 {
        let log = dir.0.join(format!("worker{i}.log"));
        workers.push((worker.clone().log_to(&log).start(), log));
    }
    let (code, out, err) = tally_tests::coordinator(&db.url, &["wait", "b1", "--timeout", "120s"]);
    assert_eq!(code, 0, "{out}{err}");
    bouncer.assert_running();
    for (worker, log) in &mut workers {
        worker.signal(libc::SIGTERM);
        let status = worker.wait_exit(Duration::from_secs(30)).await;
        let logged = std::fs::read_to_string(log).unwrap_or_default();
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{logged}");
        // A statement split across server connections would show up here.
        assert!(
            !logged.contains("prepared statement") && !logged.contains("ERROR"),
            "{logged}"
        );
    }

    let q = |sql: &'static str| {
        let client = &client;
        async move { tally_tests::query_i64(client, sql, &[]).await }
    };
    assert_eq!(q("select count(*) from sink").await, RECORDS as i64);
    assert_eq!(
        q("select count(*) from tally.record where state = 'complete' and attempt = 1").await,
        RECORDS as i64
    );
    assert_eq!(
        q("select count(*) from tally.lease").await,
        0,
        "leases left behind"
    );
}
