//! Pipelines: the example file end to end with sql workers (a stage failing past its
//! tolerance, its fallback, a repair that redoes only the failed records), one run for two
//! concurrent starts, hostile parameter values, and every bad file with its error.

use std::time::Duration;
use tally_tests::pipelines::*;
use tally_tests::*;

const RUN: &str = "nightly-orders/date=2024-06-01";

/// Waits up to 60 s for the database's only run to end; returns its state.
async fn run_ended(client: &tokio_postgres::Client, what: &str) -> String {
    poll_until(what, Duration::from_secs(60), || async {
        let state: String = client
            .query_one("select state from tally.pipeline_run", &[])
            .await
            .unwrap()
            .get(0);
        (state != "running").then_some(state)
    })
    .await
}

async fn stage_states(db: &TestDb) -> Vec<(String, String)> {
    let (code, out, err) = coordinator_async(&db.url, &["pipeline", "status", RUN, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v = parse_json(&out);
    v["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap_or("").to_string(),
                s["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_runs_fails_over_and_is_repaired_record_by_record() {
    let db = TestDb::new("pipeline_example").await;
    let client = db.client().await;
    client.batch_execute(EXAMPLE_SQL).await.unwrap();
    // 20 orders that day (o7 has a negative amount, which `orders` refuses), 5 another day.
    client
        .batch_execute(
            "insert into src_orders
             select 'o' || g, date '2024-06-01', g, case when g = 7 then -1 else g end
               from generate_series(1, 20) g;
             insert into src_orders
             select 'x' || g, date '2024-06-02', g, g from generate_series(1, 5) g;",
        )
        .await
        .unwrap();
    let _workers = example_workers(&db.url);
    let wait = [
        "pipeline",
        "run",
        EXAMPLE,
        "--param",
        "date=2024-06-01",
        "--wait",
        "--timeout",
        "90s",
        "--interval",
        "200ms",
    ];
    let (code, out, err) = coordinator_async(&db.url, &wait).await;
    assert_eq!(code, 3, "load fails past its tolerance: {out} {err}");
    assert!(out.starts_with(RUN), "{out}");
    let states = stage_states(&db).await;
    let expect = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        states,
        expect(&[
            ("extract", "succeeded"),
            ("load", "failed"),
            ("report", "upstream_failed"),
            ("compensate", "succeeded"),
        ])
    );
    // compensate ran with exactly the failed keys of load as its input.
    let input: Vec<String> = client
        .query(
            "select r.record_id from tally.record r join tally.batch b on b.id = r.batch_id \
              where b.name = 'nightly-orders:2024-06-01:compensate' order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(input, vec!["o7".to_string()]);
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from rejected_orders where order_id = 'o7'",
            &[]
        )
        .await,
        1
    );

    // Fix the cause, then repair: only o7 runs again, and report follows.
    client
        .batch_execute("alter table orders drop constraint orders_amount_check")
        .await
        .unwrap();
    let (code, out, err) = coordinator_async(&db.url, &["pipeline", "repair", RUN]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("re-opened 1 failed records in 1 stage(s) (load)"),
        "{out}"
    );
    assert!(out.contains("(report)"), "{out}");
    let (code, out, _) = coordinator_async(&db.url, &["pipeline", "repair", RUN]).await;
    assert_eq!((code, out.contains("no failed stage")), (0, true), "{out}");
    let (code, out, err) = coordinator_async(&db.url, &wait).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(stage_states(&db)
        .await
        .iter()
        .all(|(_, s)| s == "succeeded"));
    let attempts: Vec<(String, i32)> = client
        .query(
            "select r.record_id, r.attempt from tally.record r \
               join tally.batch b on b.id = r.batch_id \
              where b.name = 'nightly-orders:2024-06-01:load' and r.state = 'complete' \
              order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(attempts.len(), 20);
    for (id, attempt) in &attempts {
        assert_eq!(*attempt, if id == "o7" { 2 } else { 1 }, "{id}");
    }
    // Every sink holds each record once.
    for (table, n) in [
        ("staged_orders", 20),
        ("orders", 20),
        ("rejected_orders", 1),
    ] {
        let row = client
            .query_one(
                &format!("select count(*), count(distinct order_id) from {table}"),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (n, n),
            "{table}"
        );
    }
    let row = client
        .query_one(
            "select count(*), sum(orders)::bigint from daily_report",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1, 20));
    // The run has ended: starting it again says so, and creates nothing.
    let (code, _, err) = coordinator_async(&db.url, &wait[..5]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already succeeded"), "{err}");
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_of_a_run_make_one_run() {
    let db = TestDb::new("pipeline_concurrent").await;
    let client = db.client().await;
    client.batch_execute(EXAMPLE_SQL).await.unwrap();
    client
        .batch_execute("insert into src_orders values ('o1', '2024-06-01', 1, 1)")
        .await
        .unwrap();
    for round in 0..5 {
        let date = format!("date=2024-07-0{}", round + 1);
        let args = ["pipeline", "run", EXAMPLE, "--param", date.as_str()];
        let (a, b) = tokio::join!(
            coordinator_async(&db.url, &args),
            coordinator_async(&db.url, &args)
        );
        assert_eq!((a.0, b.0), (0, 0), "{a:?} {b:?}");
        assert_eq!(a.1, b.1, "both name the same run");
    }
    assert_eq!(
        query_i64(&client, "select count(*) from tally.pipeline_run", &[]).await,
        5
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.pipeline_stage", &[]).await,
        20
    );
    // The first stage of each run was prepared once (its query finds nothing those days).
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.pipeline_stage where stage = 'extract' and state = 'succeeded'",
            &[]
        )
        .await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_are_only_data_and_a_changed_file_needs_a_new_version() {
    let db = TestDb::new("pipeline_hostile").await;
    let client = db.client().await;
    client
        .batch_execute("create table keep_me (x int)")
        .await
        .unwrap();
    let dir = TempDir::new("pipeline-hostile");
    let file = dir.0.join("p.yaml");
    let yaml = "name: hostile\nparams: [v]\nstages:\n  one:\n    queue: q\n    from_query: \"select :v::text as id, :v as copy\"\n";
    std::fs::write(&file, yaml).unwrap();
    let file = file.display().to_string();
    let value = "'; drop table keep_me; --";
    let param = format!("v={value}");
    let (code, out, err) =
        coordinator_async(&db.url, &["pipeline", "run", &file, "--param", &param]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "hostile/v=%27%3B%20drop%20table%20keep_me%3B%20--"
    );
    let row = client
        .query_one("select record_id, payload->>'copy' from tally.record", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), value);
    assert_eq!(row.get::<_, String>(1), value);
    assert_eq!(
        query_i64(&client, "select count(*) from keep_me", &[]).await,
        0
    );

    // The same name with another definition: refused, then accepted as version 2.
    std::fs::write(&file, yaml.replace("queue: q", "queue: q2")).unwrap();
    let other = ["pipeline", "run", file.as_str(), "--param", "v=2"];
    let (code, _, err) = coordinator_async(&db.url, &other).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--new-version"), "{err}");
    let mut with_new = other.to_vec();
    with_new.push("--new-version");
    let (code, _, err) = coordinator_async(&db.url, &with_new).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        query_i64(&client, "select version::bigint from tally.pipeline", &[]).await,
        2
    );
}

#[test]
fn every_bad_pipeline_file_gets_its_error() {
    let dir = TempDir::new("pipeline-bad");
    let head = "name: p\nparams: [date]\nstages:\n";
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown field",
            format!("{head}  a:\n    queue: q\n    from_query: select 1 as id\n    retries: 3\n"),
            &[":7: unknown field `retries` in stage \"a\""],
        ),
        (
            "cycle",
            format!(
                "{head}  a:\n    queue: q\n    depends_on: [b]\n    from_query: select 1 as id\n  \
                 b:\n    queue: q\n    depends_on: [a]\n    from_query: select 1 as id\n"
            ),
            &["the stages form a cycle: a -> b -> a"],
        ),
        (
            "missing dependency",
            format!("{head}  a:\n    queue: q\n    depends_on: [nope]\n    from_query: select 1 as id\n"),
            &[":4: stage \"a\" depends on \"nope\", which is not a stage"],
        ),
        (
            "undeclared parameter",
            format!("{head}  a:\n    queue: q\n    from_query: select :day::text as id\n"),
            &[":6: stage \"a\": from_query uses :day, which is not in params"],
        ),
        (
            "bad stage name",
            format!("{head}  \"a b\":\n    queue: q\n    from_query: select 1 as id\n"),
            &[":4: stage name \"a b\" is not valid"],
        ),
        (
            "two inputs and no queue",
            format!("{head}  a:\n    from_query: select 1 as id\n    from_failed: a\n"),
            &["has no `queue`", "has from_query and from_failed: give exactly one input"],
        ),
        (
            "not YAML",
            "name: [p\n".to_string(),
            &["not valid YAML"],
        ),
    ];
    for (what, text, expect) in cases {
        let path = dir.0.join(format!("{}.yaml", what.replace(' ', "_")));
        std::fs::write(&path, text).unwrap();
        let shown = path.display().to_string();
        let (code, out, err) = coordinator(
            "postgres://nobody@127.0.0.1:1/none",
            &["pipeline", "run", &shown, "--param", "date=2024-06-01"],
        );
        assert_eq!(code, 64, "{what}: {out} {err}");
        for e in *expect {
            assert!(err.contains(e), "{what}: {e:?} in {err}");
        }
        assert!(err.contains(&shown), "{what}: names the file: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_params_are_refused_before_anything_is_written() {
    let db = TestDb::new("pipeline_params").await;
    let client = db.client().await;
    for (args, expect) in [
        (vec![], "missing --param date=VALUE"),
        (vec!["--param", "day=1"], "has no parameter \"day\""),
        (vec!["--param", "date"], "is not NAME=VALUE"),
    ] {
        let mut all = vec!["pipeline", "run", EXAMPLE];
        all.extend(args);
        let (code, _, err) = coordinator_async(&db.url, &all).await;
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(expect), "{expect:?} in {err}");
    }
    assert_eq!(
        query_i64(&client, "select count(*) from tally.pipeline", &[]).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_moves_a_run_forward_without_anyone_waiting() {
    let db = TestDb::new("pipeline_serve").await;
    let client = db.client().await;
    client.batch_execute(EXAMPLE_SQL).await.unwrap();
    client
        .batch_execute(
            "insert into src_orders select 'o' || g, date '2024-06-01', g, g \
               from generate_series(1, 10) g",
        )
        .await
        .unwrap();
    let _workers = example_workers(&db.url);
    let (code, _, err) = coordinator_async(
        &db.url,
        &["pipeline", "run", EXAMPLE, "--param", "date=2024-06-01"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let _serve = tally_tests::serve::start_serve(&db.url, &["--check-interval", "200ms"]);
    run_ended(&client, "serve to finish the run").await;
    let states = stage_states(&db).await;
    assert_eq!(
        states.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        vec!["succeeded", "succeeded", "succeeded", "skipped"],
        "{states:?}"
    );
    assert_eq!(
        query_i64(&client, "select count(*) from orders", &[]).await,
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_killed_while_preparing_a_stage_is_relieved_by_another() {
    let db = TestDb::new("pipeline_serve_kill").await;
    let client = db.client().await;
    let dir = TempDir::new("pipeline-serve-kill");
    let file = dir.0.join("slow.yaml");
    // Stage `slow` takes 3 s to prepare, long enough to kill its preparer in the middle.
    std::fs::write(
        &file,
        "name: slow\nstages:\n  first:\n    queue: qa\n    from_query: select 'a' as id\n  \
         slow:\n    queue: qb\n    depends_on: [first]\n    from_query: \"select g::text as id \
         from generate_series(1, 1000) g, (select pg_sleep(3)) s\"\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let (code, _, err) = coordinator_async(&db.url, &["pipeline", "run", &file]).await;
    assert_eq!(code, 0, "{err}");
    let mut serve_a = tally_tests::serve::start_serve(&db.url, &["--check-interval", "100ms"]);
    let _workers = [
        WorkerCmd::noop(&db.url, "qa").poll("100ms").start(),
        WorkerCmd::noop(&db.url, "qb").poll("100ms").start(),
    ];
    poll_until(
        "serve A preparing stage slow",
        Duration::from_secs(30),
        || async {
            (query_i64(
                &client,
                "select count(*) from pg_stat_activity where datname = current_database() \
               and query like '%pg_sleep(3)%' and pid <> pg_backend_pid()",
                &[],
            )
            .await
                > 0)
            .then_some(())
        },
    )
    .await;
    serve_a.child.signal(libc::SIGKILL);
    serve_a
        .child
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    let _serve_b = tally_tests::serve::start_serve(&db.url, &["--check-interval", "100ms"]);
    let state = run_ended(&client, "serve B to finish the run").await;
    assert_eq!(state, "succeeded");
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        2
    );
    let row = client
        .query_one(
            "select count(*), count(distinct record_id) from tally.record r \
               join tally.batch b on b.id = r.batch_id where b.name = 'slow:slow'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1000, 1000));
}
