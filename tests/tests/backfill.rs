//! Backfills and watermarks: a week of dates at most two at a time (measured from the
//! database), done dates skipped, only the failed date repaired; `--next` following the
//! watermark; hourly windows; a reprocessed window taking the watermark back until it is done.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally_tests::pipelines::*;
use tally_tests::*;

async fn watermark(client: &tokio_postgres::Client, pipeline: &str) -> Option<String> {
    client
        .query_one(
            "select to_char(watermark, 'YYYY-MM-DD HH24:MI:SS') from tally.pipeline \
              where name = $1",
            &[&pipeline],
        )
        .await
        .unwrap()
        .get(0)
}

/// Samples how many runs are running every 20 ms until `stop`; returns the most seen.
fn sample_running(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let client = connect(&url).await;
        let most = AtomicI64::new(0);
        while !stop.load(Ordering::SeqCst) {
            let n = query_i64(
                &client,
                "select count(*) from tally.pipeline_run where state = 'running'",
                &[],
            )
            .await;
            most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        most.load(Ordering::SeqCst)
    })
}

/// The most runs that were running at once, from their start and finish times: for each
/// run's start, the runs started by then and not finished yet.
const MOST_AT_ONCE: &str = "select coalesce(max((select count(*) from tally.pipeline_run o \
     where o.started_at <= r.started_at \
       and coalesce(o.finished_at, 'infinity') > r.started_at)), 0) \
     from tally.pipeline_run r";

fn lines_with(out: &str, text: &str) -> usize {
    out.lines().filter(|l| l.contains(text)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_runs_two_at_a_time_skips_done_dates_and_repairs_only_the_failed_one() {
    let db = TestDb::new("pipeline_backfill").await;
    let client = db.client().await;
    client.batch_execute(EXAMPLE_SQL).await.unwrap();
    // Four orders a day from 2024-06-01 to 2024-06-07; on 06-04 one has a negative amount,
    // which `orders` refuses: load fails past its tolerance that day.
    client
        .batch_execute(
            "insert into src_orders
             select 'd' || d || '-' || g, date '2024-05-31' + d, g,
                    case when d = 4 and g = 2 then -1 else g end
               from generate_series(1, 7) d, generate_series(1, 4) g",
        )
        .await
        .unwrap();
    let range = [
        "pipeline",
        "backfill",
        EXAMPLE,
        "--from",
        "2024-06-01",
        "--to",
        "2024-06-07",
        "--max-active",
        "2",
    ];
    let with = |more: &[&'static str]| -> Vec<&'static str> {
        range.iter().copied().chain(more.iter().copied()).collect()
    };
    // A dry run prints the plan and writes nothing.
    let (code, out, err) = coordinator_async(&db.url, &with(&["--dry-run"])).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines_with(&out, "  start"), 7, "{out}");
    assert!(out.contains("nothing was written"), "{out}");
    for table in ["pipeline", "pipeline_run", "pipeline_backfill", "batch"] {
        let n = query_i64(&client, &format!("select count(*) from tally.{table}"), &[]).await;
        assert_eq!(n, 0, "a dry run wrote into tally.{table}");
    }

    let workers = example_workers(&db.url);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_running(db.url.clone(), stop.clone());
    let wait: &[&'static str] = &["--wait", "--timeout", "120s", "--interval", "200ms"];
    let (code, out, err) = coordinator_async(&db.url, &with(wait)).await;
    stop.store(true, Ordering::SeqCst);
    let sampled = sampler.await.unwrap();
    assert_eq!(code, 3, "one date fails: {out} {err}");
    assert!(out.contains("7 run(s) queued, 0 skipped"), "{out}");
    let most = query_i64(&client, MOST_AT_ONCE, &[]).await;
    assert_eq!(
        most, 2,
        "two runs at once, never more (from the runs' times)"
    );
    assert!(
        (1..=2).contains(&sampled),
        "sampled {sampled} runs running at once"
    );
    let failed: Vec<String> = client
        .query(
            "select name from tally.pipeline_run where state = 'failed'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(failed, ["nightly-orders/date=2024-06-04"]);
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.pipeline_run where state = 'succeeded'",
            &[]
        )
        .await,
        6
    );
    assert_eq!(
        watermark(&client, "nightly-orders").await.as_deref(),
        Some("2024-06-04 00:00:00"),
        "every window before 06-04 is done, 06-04 is not"
    );

    // Again: every date has its run, so nothing is queued.
    let batches = "select count(*) from tally.batch";
    let before = query_i64(&client, batches, &[]).await;
    let (code, out, err) = coordinator_async(&db.url, &with(wait)).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(lines_with(&out, "skip: succeeded"), 6, "{out}");
    assert_eq!(lines_with(&out, "skip: failed"), 1, "{out}");
    assert!(out.contains("0 run(s) queued, 7 skipped"), "{out}");
    assert_eq!(query_i64(&client, batches, &[]).await, before);

    // The cause fixed, --reprocess failed repairs only 06-04, and only its failed record.
    client
        .batch_execute("alter table orders drop constraint orders_amount_check")
        .await
        .unwrap();
    let finished_others = "select string_agg(finished_at::text, ',' order by id) \
                           from tally.pipeline_run where name <> 'nightly-orders/date=2024-06-04'";
    let others_before: String = client.query_one(finished_others, &[]).await.unwrap().get(0);
    let (code, out, err) =
        coordinator_async(&db.url, &with(&["--reprocess", "failed", "--wait"])).await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(lines_with(&out, "repair its failed records"), 1, "{out}");
    assert_eq!(lines_with(&out, "skip: succeeded"), 6, "{out}");
    let others_after: String = client.query_one(finished_others, &[]).await.unwrap().get(0);
    assert_eq!(
        others_after, others_before,
        "the other dates were not touched"
    );
    assert_eq!(
        query_i64(&client, batches, &[]).await,
        before + 1,
        "one new batch: the report of 06-04, which had not run"
    );
    let attempts: Vec<(String, i32)> = client
        .query(
            "select r.record_id, r.attempt from tally.record r \
               join tally.batch b on b.id = r.batch_id \
              where b.name = 'nightly-orders:2024-06-04:load' order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        attempts,
        [
            ("d4-1".to_string(), 1),
            ("d4-2".to_string(), 2),
            ("d4-3".to_string(), 1),
            ("d4-4".to_string(), 1)
        ]
    );
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.record where attempt > 1",
            &[]
        )
        .await,
        1
    );
    for (table, n) in [("orders", 28), ("staged_orders", 28), ("daily_report", 7)] {
        assert_eq!(
            query_i64(&client, &format!("select count(*) from {table}"), &[]).await,
            n,
            "{table}"
        );
    }
    assert_eq!(
        watermark(&client, "nightly-orders").await.as_deref(),
        Some("2024-06-08 00:00:00")
    );

    // --next runs the day after the watermark; a done day is not run again.
    let (code, out, err) = coordinator_async(
        &db.url,
        &[
            "pipeline",
            "run",
            EXAMPLE,
            "--next",
            "--wait",
            "--timeout",
            "60s",
            "--interval",
            "200ms",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.starts_with("nightly-orders/date=2024-06-08"), "{out}");
    assert!(
        err.contains("watermark of nightly-orders is 2024-06-08"),
        "{err}"
    );
    assert_eq!(
        watermark(&client, "nightly-orders").await.as_deref(),
        Some("2024-06-09 00:00:00")
    );
    let runs = query_i64(&client, "select count(*) from tally.pipeline_run", &[]).await;
    let (code, _, err) = coordinator_async(
        &db.url,
        &["pipeline", "run", EXAMPLE, "--param", "date=2024-06-02"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already succeeded"), "{err}");
    assert_eq!(
        query_i64(&client, "select count(*) from tally.pipeline_run", &[]).await,
        runs
    );
    drop(workers);
}

const HOURLY: &str = "name: hourly-events
params: [window_start, window_end]
stages:
  count:
    queue: hourly
    from_query: \"select id, n from events where at >= :window_start::timestamp and at < :window_end::timestamp\"
";

fn hourly_worker(url: &str) -> ChildGuard {
    WorkerCmd::sql(
        url,
        "hourly",
        "insert into sink (id, n) values ($1, ($2->>'n')::int) \
         on conflict (id) do update set times = sink.times + 1",
    )
    .poll("100ms")
    .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hourly_windows_follow_the_watermark_and_a_reprocessed_window_takes_it_back() {
    let db = TestDb::new("pipeline_hourly").await;
    let client = db.client().await;
    client
        .batch_execute(
            "create table events (id text primary key, at timestamp not null, n int not null);
             create table sink (id text primary key, n int, times int not null default 1);
             insert into events
             select 'h' || h || '-' || i, timestamp '2024-06-01' + h * interval '1 hour'
                    + i * interval '1 minute', i
               from generate_series(0, 5) h, generate_series(1, 10) i",
        )
        .await
        .unwrap();
    let dir = TempDir::new("hourly");
    let file = dir.0.join("hourly.yaml");
    std::fs::write(&file, HOURLY).unwrap();
    let file = file.to_str().unwrap();
    let mut worker = hourly_worker(&db.url);
    let (code, out, err) = coordinator_async(
        &db.url,
        &[
            "pipeline",
            "backfill",
            file,
            "--from",
            "2024-06-01T00:00",
            "--to",
            "2024-06-01T04:00",
            "--step",
            "1h",
            "--max-active",
            "2",
            "--wait",
            "--timeout",
            "60s",
            "--interval",
            "200ms",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("4 run(s) queued"), "{out}");
    assert!(
        out.contains(
            "hourly-events/window_start=2024-06-01T03:00:00,window_end=2024-06-01T04:00:00"
        ),
        "{out}"
    );
    assert_eq!(query_i64(&client, MOST_AT_ONCE, &[]).await, 2);
    assert_eq!(
        watermark(&client, "hourly-events").await.as_deref(),
        Some("2024-06-01 04:00:00")
    );
    let next = [
        "pipeline",
        "run",
        file,
        "--next",
        "--wait",
        "--timeout",
        "60s",
        "--interval",
        "200ms",
    ];
    let (code, out, err) = coordinator_async(&db.url, &next).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.starts_with(
            "hourly-events/window_start=2024-06-01T04:00:00,window_end=2024-06-01T05:00:00"
        ),
        "the window of the last one's length after the watermark: {out}"
    );
    assert_eq!(
        watermark(&client, "hourly-events").await.as_deref(),
        Some("2024-06-01 05:00:00")
    );
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        50
    );

    // A done window is not run again, unless --reprocess: then from scratch, into a new batch,
    // and the watermark goes back to its start until it is done again.
    worker.kill();
    let one = [
        "pipeline",
        "run",
        file,
        "--param",
        "window_start=2024-06-01T01:00:00",
        "--param",
        "window_end=2024-06-01T02:00:00",
    ];
    let (code, _, err) = coordinator_async(&db.url, &one).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already succeeded"), "{err}");
    let again: Vec<&str> = one.iter().copied().chain(["--reprocess"]).collect();
    let (code, out, err) = coordinator_async(&db.url, &again).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(err.contains("started"), "{err}");
    assert_eq!(
        watermark(&client, "hourly-events").await.as_deref(),
        Some("2024-06-01 01:00:00"),
        "the window being reprocessed is not done"
    );
    let batch: String = client
        .query_one(
            "select s.batch from tally.pipeline_stage s join tally.pipeline_run r \
               on r.id = s.run_id where r.window_start = '2024-06-01 01:00'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(batch.ends_with(":count:r2"), "{batch}");
    let _worker = hourly_worker(&db.url);
    let attach: Vec<&str> = one
        .iter()
        .copied()
        .chain(["--wait", "--timeout", "60s", "--interval", "200ms"])
        .collect();
    let (code, out, err) = coordinator_async(&db.url, &attach).await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(err.contains("attached"), "{err}");
    assert_eq!(
        watermark(&client, "hourly-events").await.as_deref(),
        Some("2024-06-01 05:00:00"),
        "done again: the watermark is back past the later windows"
    );
    let times: Vec<(String, i64)> = client
        .query(
            "select left(id, 2), sum(times)::bigint from sink group by 1 order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        times,
        [
            ("h0".to_string(), 10),
            ("h1".to_string(), 20),
            ("h2".to_string(), 10),
            ("h3".to_string(), 10),
            ("h4".to_string(), 10)
        ],
        "only the reprocessed hour ran twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backfill_ranges_are_refused_with_what_to_do() {
    let db = TestDb::new("pipeline_backfill_bad").await;
    for (args, expect) in [
        (
            vec!["--from", "2024-06-07", "--to", "2024-06-01"],
            "--to 2024-06-01 is before --from 2024-06-07",
        ),
        (
            vec!["--from", "June", "--to", "2024-06-01"],
            "--from \"June\" is not a date",
        ),
        (
            vec!["--from", "2024-06-01", "--to", "2024-06-02", "--step", "1h"],
            "runs one day per run",
        ),
        (
            vec![
                "--from",
                "2024-06-01",
                "--to",
                "2024-06-02",
                "--param",
                "date=x",
            ],
            "the backfill sets it for each window",
        ),
    ] {
        let mut full = vec!["pipeline", "backfill", EXAMPLE];
        full.extend(args.iter());
        let (code, out, err) = coordinator_async(&db.url, &full).await;
        assert_eq!(code, 64, "{args:?}: {out} {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let client = db.client().await;
    assert_eq!(
        query_i64(&client, "select count(*) from tally.pipeline_run", &[]).await,
        0
    );
    // --next without a watermark says how to get one.
    let (code, _, err) = coordinator_async(&db.url, &["pipeline", "run", EXAMPLE, "--next"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no watermark yet"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_drives_a_backfill_and_a_second_serve_finishes_it_after_a_kill() {
    let db = TestDb::new("pipeline_backfill_serve").await;
    let client = db.client().await;
    client
        .batch_execute(
            "create table events (id text primary key, at timestamp not null, n int not null);
             create table sink (id text primary key, n int, times int not null default 1);
             insert into events
             select 'h' || h || '-' || i, timestamp '2024-06-01' + h * interval '1 hour'
                    + i * interval '1 minute', i
               from generate_series(0, 7) h, generate_series(1, 10) i",
        )
        .await
        .unwrap();
    let dir = TempDir::new("hourly-serve");
    let file = dir.0.join("hourly.yaml");
    std::fs::write(&file, HOURLY).unwrap();
    let (code, out, err) = coordinator_async(
        &db.url,
        &[
            "pipeline",
            "backfill",
            file.to_str().unwrap(),
            "--from",
            "2024-06-01T00:00",
            "--to",
            "2024-06-01T08:00",
            "--step",
            "1h",
            "--max-active",
            "2",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        err.contains("`coordinator serve` starts the queued runs"),
        "{err}"
    );
    let running = "select count(*) from tally.pipeline_run where state = 'running'";
    assert_eq!(
        query_i64(&client, running, &[]).await,
        2,
        "the first two started at once"
    );
    // Slow records, so that serve is killed while runs are going on.
    let _worker = WorkerCmd::sql(
        &db.url,
        "hourly",
        "insert into sink (id, n) select $1, ($2->>'n')::int from pg_sleep(0.02)",
    )
    .poll("100ms")
    .start();
    let mut first = tally_tests::serve::start_serve(&db.url, &["--check-interval", "200ms"]);
    let succeeded = "select count(*) from tally.pipeline_run where state = 'succeeded'";
    poll_until(
        "a run done under the first serve",
        Duration::from_secs(60),
        || async { (query_i64(&client, succeeded, &[]).await >= 2).then_some(()) },
    )
    .await;
    first.child.kill();
    let _second = tally_tests::serve::start_serve(&db.url, &["--check-interval", "200ms"]);
    poll_until(
        "the backfill done under the second serve",
        Duration::from_secs(90),
        || async {
            let state: String = client
                .query_one("select state from tally.pipeline_backfill", &[])
                .await
                .unwrap()
                .get(0);
            (state != "running").then_some(state)
        },
    )
    .await;
    assert_eq!(query_i64(&client, succeeded, &[]).await, 8);
    assert_eq!(query_i64(&client, MOST_AT_ONCE, &[]).await, 2);
    assert_eq!(
        query_i64(&client, "select count(*) from sink", &[]).await,
        80
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.batch", &[]).await,
        8,
        "no stage prepared twice"
    );
    assert_eq!(
        watermark(&client, "hourly-events").await.as_deref(),
        Some("2024-06-01 08:00:00")
    );
}
