//! `coordinator prepare` against dead and live sessions: a prepare killed mid-COPY and re-run
//! at once, the lock wait naming a live holder, interrupted batches shown and purged, and
//! lost connections retried.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tally_tests::*;

/// `url` with its sessions named `app`, so that a test can find (and terminate) them.
fn with_app(url: &str, app: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
}

// ---------------------------------------------------------------------------------------------
// A prepare killed mid-COPY, then re-run at once
// ---------------------------------------------------------------------------------------------

async fn copy_backends(client: &tokio_postgres::Client, db: &str) -> i64 {
    query_i64(
        client,
        "select count(*) from pg_stat_activity where datname = $1 and query ilike 'copy tally.record%'",
        &[&db],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_prepare_killed_then_rerun() {
    const N: i64 = 1_000_000;
    let db = TestDb::new("heavy_prepare_killed").await;
    let dir = TempDir::new("killed-prepare");
    let path = jsonl_file(&dir.0, "big.jsonl", N as u64)
        .display()
        .to_string();
    let client = db.client().await;
    let store = db.store().await;
    let args = [
        "prepare",
        "big",
        "--queue",
        "q",
        "--from-file",
        path.as_str(),
    ];

    let mut prepare = start_coordinator(&db.url, &args);
    // Kill it while COPY is streaming: once the COPY shows up, give it a second of rows.
    let deadline = Instant::now() + Duration::from_secs(30);
    while copy_backends(&client, &db.name).await == 0 {
        prepare.assert_running();
        assert!(
            Instant::now() < deadline,
            "the COPY did not start within 30s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    prepare.assert_running();
    prepare.signal(libc::SIGKILL);
    prepare
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("killed prepare exits");

    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        0,
        "no record of the killed prepare is visible"
    );
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.batch where state = 'ready'",
            &[]
        )
        .await,
        0,
        "no batch became ready half-written"
    );
    assert!(store.claimable_batches("q").await.unwrap().is_empty());
    // At once, as a CronJob or Airflow retry would: the killed session may still hold the
    // batch, and the re-run waits (within --lock-wait) for the server to end it.
    let (code, stdout, stderr) = coordinator_async(&db.url, &args).await;
    assert_eq!(code, 0, "re-run: {stdout} {stderr}");
    assert!(stdout.contains("prepared"), "{stdout}");
    let row = client
        .query_one(
            "select count(*), count(distinct record_id), min(payload->>'n'), \
                    count(*) filter (where payload->>'id' <> record_id) from tally.record",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), N, "exactly the input's rows");
    assert_eq!(row.get::<_, i64>(1), N, "no duplicates");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("1"));
    assert_eq!(row.get::<_, i64>(3), 0);
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.batch where name = 'big' and state = 'ready'",
            &[]
        )
        .await,
        1
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        1
    );
    let c = assert_counts_exact(&store, &client, "big").await;
    assert_eq!(c.pending, N);
    let v = status_json(&db, Some("big")).await;
    assert_eq!(
        (v["state"].as_str(), v["total"].as_i64()),
        (Some("ready"), Some(N)),
        "{v}"
    );

    let (code, stdout, stderr) = coordinator_async(&db.url, &args).await;
    assert_eq!(code, 0, "second re-run: {stdout} {stderr}");
    assert!(stdout.contains("already prepared"), "{stdout}");
    assert_eq!(
        query_i64(&client, "select count(*) from tally.record", &[]).await,
        N
    );
}

// ---------------------------------------------------------------------------------------------
// A live holder: waited for within --lock-wait, then named
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_waits_for_the_batch_lock_then_names_its_holder() {
    let db = TestDb::new("prepare_lock_wait").await;
    let dir = TempDir::new("lock-wait");
    let path = jsonl_file(&dir.0, "in.jsonl", 500).display().to_string();
    let args = |wait: &'static str| {
        vec![
            "prepare".to_string(),
            "held".into(),
            "--queue".into(),
            "q".into(),
            "--from-file".into(),
            path.clone(),
            "--lock-wait".into(),
            wait.into(),
        ]
    };
    let run = |args: Vec<String>| {
        let url = db.url.clone();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            coordinator_async(&url, &refs).await
        }
    };
    let mut holder = connect(&with_app(&db.url, "lock-holder")).await;
    let holder_pid: i32 = holder
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "select pg_advisory_xact_lock(7236552, hashtext('held'))",
        &[],
    )
    .await
    .unwrap();

    let started = Instant::now();
    let (code, stdout, stderr) = run(args("1s")).await;
    assert_eq!(code, 1, "{stdout} {stderr}");
    assert!(started.elapsed() >= Duration::from_secs(1), "it waited");
    for part in [
        format!("pid {holder_pid}"),
        "application_name \"lock-holder\"".to_string(),
        "--lock-wait".to_string(),
        format!("pg_terminate_backend({holder_pid})"),
    ] {
        assert!(stderr.contains(&part), "{part:?} in: {stderr}");
    }
    let client = db.client().await;
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        0,
        "a prepare that never got the lock writes nothing"
    );
    // purge refuses a batch whose prepare is running, naming the holder too.
    let (code, _, stderr) = coordinator_async(&db.url, &["purge", "held"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("pid {holder_pid}")), "{stderr}");

    // Within the wait, the prepare goes ahead as soon as the holder lets go.
    let waiting = tokio::spawn(run(args("30s")));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "the prepare waits for the holder");
    tx.commit().await.unwrap();
    let (code, stdout, stderr) = waiting.await.unwrap();
    assert_eq!(code, 0, "{stdout} {stderr}");
    let v = status_json(&db, Some("held")).await;
    assert_eq!(
        (v["state"].as_str(), v["pending"].as_i64()),
        (Some("ready"), Some(500)),
        "{v}"
    );
}

// ---------------------------------------------------------------------------------------------
// An interrupted prepare: shown as such, and purged
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_prepare_is_shown_and_can_be_purged() {
    let db = TestDb::new("prepare_interrupted").await;
    let client = db.client().await;
    prepare_stdin(&db.url, "other", "q", &jsonl_ids(300), &[]);

    // A prepare reading stdin, killed while its COPY waits for more input.
    let mut child = Command::new(binary("coordinator"))
        .args(["prepare", "stuck", "--queue", "q", "--from-file", "-"])
        .env("DATABASE_URL", &db.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn coordinator");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&jsonl_ids(100)).unwrap();
    stdin.flush().unwrap();
    let mut prepare = ChildGuard::new("coordinator prepare", child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while query_i64(
        &client,
        "select count(*) from pg_stat_activity where datname = current_database() \
           and query ilike 'copy tally.record%'",
        &[],
    )
    .await
        == 0
    {
        prepare.assert_running();
        assert!(
            Instant::now() < deadline,
            "the COPY did not start within 30s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    prepare.signal(libc::SIGKILL);
    prepare.wait_exit(Duration::from_secs(10)).await.unwrap();
    drop(stdin);

    let v = poll_until(
        "the batch shown interrupted",
        Duration::from_secs(30),
        || async {
            let v = status_json(&db, Some("stuck")).await;
            (v["state"] == "interrupted").then_some(v)
        },
    )
    .await;
    assert_eq!(v["total"], 0, "{v}");
    let (code, stdout, stderr) = coordinator_async(&db.url, &["status"]).await;
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.lines().find(|l| l.contains("stuck")).unwrap_or("");
    assert!(line.contains("interrupted: re-run prepare"), "{stdout}");
    let (code, _, stderr) = coordinator_async(&db.url, &["wait", "stuck"]).await;
    assert_eq!(
        code, 1,
        "wait does not wait for an interrupted batch: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");

    // A batch with records still to do is refused; the interrupted one goes.
    let (code, _, stderr) = coordinator_async(&db.url, &["purge", "other"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("300 records pending or running"),
        "{stderr}"
    );
    let (code, stdout, stderr) = coordinator_async(&db.url, &["purge", "--interrupted"]).await;
    assert_eq!(code, 0, "{stdout} {stderr}");
    assert!(stdout.contains("batch stuck purged"), "{stdout}");
    assert!(!stdout.contains("other"), "{stdout}");
    let (code, _, stderr) = coordinator_async(&db.url, &["status", "stuck"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("does not exist"), "{stderr}");
    let (code, stdout, _) = coordinator_async(&db.url, &["purge", "--interrupted"]).await;
    assert_eq!((code, stdout.trim()), (0, "no interrupted batches"));

    // A finished batch can be purged with its records, counts and leases.
    let (code, _, stderr) = coordinator_async(&db.url, &["cancel", "other"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = coordinator_async(&db.url, &["purge", "other"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("300 records removed"), "{stdout}");
    for table in ["batch", "record", "batch_count", "batch_progress", "lease"] {
        assert_eq!(
            query_i64(&client, &format!("select count(*) from tally.{table}"), &[]).await,
            0,
            "tally.{table} after purging every batch"
        );
    }
    // The name is free again.
    prepare_stdin(&db.url, "stuck", "q", &jsonl_ids(10), &[]);
    assert_eq!(status_json(&db, Some("stuck")).await["pending"], 10);
}

// ---------------------------------------------------------------------------------------------
// Lost connections, retried
// ---------------------------------------------------------------------------------------------

/// Terminates the sessions named `app` every 50 ms for `during`; returns how many it ended.
async fn terminate_for(client: &tokio_postgres::Client, app: &str, during: Duration) -> i64 {
    let until = Instant::now() + during;
    let mut ended = 0;
    while Instant::now() < until {
        ended += terminate_backends(client, app).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ended
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_retries_lost_connections_and_loads_exactly_once() {
    const N: i64 = 200_000;
    let db = TestDb::new("prepare_retries").await;
    let client = db.client().await;
    let dir = TempDir::new("prepare-retries");
    let path = jsonl_file(&dir.0, "in.jsonl", N as u64)
        .display()
        .to_string();
    let url = with_app(&db.url, "prep-victim");
    let query = "select 'q' || g as id, g as n from generate_series(1, 100000) g";
    let cases: [(&str, Vec<&str>, i64); 2] = [
        ("from-file", vec!["--from-file", path.as_str()], N),
        ("from-query", vec!["--from-query", query], 100_000),
    ];
    for (batch, input, n) in cases {
        let mut args = vec!["prepare", batch, "--queue", "q"];
        args.extend(input);
        let prepare = coordinator_async(&url, &args);
        let (ended, (code, stdout, stderr)) = tokio::join!(
            terminate_for(&client, "prep-victim", Duration::from_secs(2)),
            prepare
        );
        assert_eq!(code, 0, "{batch}: {stdout} {stderr}");
        assert!(ended > 0, "{batch}: some sessions were terminated");
        assert!(stderr.contains("trying again"), "{batch}: {stderr}");
        let row = client
            .query_one(
                "select count(*), count(distinct r.record_id) from tally.record r \
                   join tally.batch b on b.id = r.batch_id where b.name = $1",
                &[&batch],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (n, n),
            "{batch}"
        );
        let c = assert_counts_exact(&db.store().await, &client, batch).await;
        assert_eq!(c.pending, n, "{batch}");
    }
    let (code, stdout, _) = coordinator_async(&db.url, &["status"]).await;
    assert_eq!(code, 0);
    assert!(!stdout.contains("interrupted"), "{stdout}");
}
