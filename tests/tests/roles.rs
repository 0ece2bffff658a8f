//! `sql/roles.sql`: a worker log-in role in `tally_worker` processes a real batch but cannot
//! create batches or change tables; a coordinator role in `tally_coordinator` prepares and
//! administers; a scaler role in `tally_scaler` runs the autoscaler's backlog query and reads
//! no record. Roles are cluster-wide, so this runs on a private cluster.

use std::process::{Command, Stdio};
use std::time::Duration;
use tally_tests::{binary, with_database, TestDb, ThrowawayPg, WorkerCmd};

const ROLES_SQL: &str = include_str!("../../sql/roles.sql");

fn as_role(url: &str, role: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = rest.split_once('@').map(|(_, h)| h).unwrap_or(rest);
    format!("postgres://{role}@{host}")
}

fn coordinator(url: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(binary("coordinator"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("DATABASE_URL_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run coordinator");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), said)
}

async fn sqlstate(client: &tokio_postgres::Client, statement: &str) -> Option<String> {
    match client.batch_execute(statement).await {
        Ok(()) => None,
        Err(e) => e.code().map(|c| c.code().to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_role_processes_a_batch_and_may_do_nothing_else() {
    let pg = ThrowawayPg::start("roles");
    // Migrated by the owner (here the superuser the cluster was created with).
    let db = TestDb::new_at(&pg.url, "roles").await;
    let owner = db.client().await;
    // Twice: the script is idempotent.
    owner.batch_execute(ROLES_SQL).await.expect("roles.sql");
    owner
        .batch_execute(ROLES_SQL)
        .await
        .expect("roles.sql again");
    owner
        .batch_execute(
            "create role w1 login in role tally_worker; \
             create role c1 login in role tally_coordinator; \
             create table sink (id text primary key); \
             grant insert on sink to w1",
        )
        .await
        .unwrap();
    let worker_url = with_database(&as_role(&pg.url, "w1"), &db.name);
    let coordinator_url = with_database(&as_role(&pg.url, "c1"), &db.name);

    // The coordinator role prepares and administers.
    let input = pg.dir.join("in.jsonl");
    std::fs::write(&input, tally_tests::jsonl_ids(200)).unwrap();
    let (code, said) = coordinator(
        &coordinator_url,
        &[
            "prepare",
            "b1",
            "--queue",
            "q",
            "--from-file",
            input.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{said}");
    for command in [["pause", "b1"], ["resume", "b1"], ["status", "b1"]] {
        let (code, said) = coordinator(&coordinator_url, &command);
        assert_eq!(code, 0, "{command:?}: {said}");
    }

    // The worker role processes the whole batch (counts kept by the triggers under its role).
    let mut worker = WorkerCmd::sql(&worker_url, "q", "insert into sink (id) values ($1)")
        .poll("200ms")
        .env_remove("DATABASE_URL_FILE")
        .start();
    let (code, said) = coordinator(&coordinator_url, &["wait", "b1", "--timeout", "60s"]);
    assert_eq!(code, 0, "{said}");
    worker.signal(libc::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert_eq!(
        tally_tests::query_i64(&owner, "select count(*) from sink", &[]).await,
        200
    );
    tally_tests::assert_counts_exact(&db.store().await, &owner, "b1").await;

    // ... and nothing else: no batches, no new or deleted records, no DDL.
    let w1 = tally_tests::connect(&worker_url).await;
    for statement in [
        "insert into tally.batch (name, queue) values ('evil', 'q')",
        "delete from tally.record",
        "insert into tally.record (batch_id, record_id, payload) values (1, 'x', '{}')",
        "update tally.batch set max_attempts = 100",
        "alter table tally.record add column evil int",
        "drop table tally.lease",
        "truncate tally.batch_count",
    ] {
        assert_eq!(
            sqlstate(&w1, statement).await.as_deref(),
            Some("42501"),
            "worker role was allowed: {statement}"
        );
    }
    // Migrations stay with the owner.
    let c1 = tally_tests::connect(&coordinator_url).await;
    assert_eq!(
        sqlstate(&c1, "alter table tally.record add column evil int")
            .await
            .as_deref(),
        Some("42501")
    );
}

/// The autoscaler's log-in role (deploy/k8s/keda.yaml) runs the backlog query and reads no
/// record, payload or lease, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaler_role_reads_the_backlog_and_no_records() {
    const QUEUE_BACKLOG_SQL: &str = include_str!("../../sql/queries/queue_backlog.sql");
    let pg = ThrowawayPg::start("roles-scaler");
    let db = TestDb::new_at(&pg.url, "roles_scaler").await;
    let owner = db.client().await;
    owner.batch_execute(ROLES_SQL).await.expect("roles.sql");
    owner
        .batch_execute(ROLES_SQL)
        .await
        .expect("roles.sql again");
    owner
        .batch_execute("create role s1 login in role tally_scaler")
        .await
        .unwrap();
    let store = db.store().await;
    store
        .prepare_from_reader(
            &tally_tests::spec("b1", "q"),
            std::io::Cursor::new(tally_tests::jsonl_ids(40)),
            tally::input::Format::Jsonl,
            1 << 20,
            None,
        )
        .await
        .expect("prepare");
    let b1 = tally_tests::batch_id(&owner, "b1").await;
    let claimed = store
        .claim(b1, 5, "w1", Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 5);

    let scaler_url = with_database(&as_role(&pg.url, "s1"), &db.name);
    let s1 = tally_tests::connect(&scaler_url).await;
    assert_eq!(
        tally_tests::query_i64(&s1, QUEUE_BACKLOG_SQL, &[&"q"]).await,
        40,
        "35 pending + 5 running"
    );
    for statement in [
        "select payload from tally.record limit 1",
        "select count(*) from tally.record",
        "select * from tally.lease",
        "update tally.batch set state = 'paused'",
        "insert into tally.batch_count (batch_id, state, slot, n) values (1, 'pending', 0, 1)",
        "delete from tally.batch",
        "create table tally.evil (id int)",
    ] {
        assert_eq!(
            sqlstate(&s1, statement).await.as_deref(),
            Some("42501"),
            "scaler role was allowed: {statement}"
        );
    }
}
