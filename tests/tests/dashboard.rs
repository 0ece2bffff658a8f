//! The dashboard of `coordinator serve` in a real headless Chromium: every page against real
//! batches (a failed one, a pipeline run), hostile record ids that must stay text, an error
//! group retried from the browser, actions refused without credentials, and the plans of the
//! record queries on a large batch.

use std::time::Duration;

use fantoccini::Locator;
use serde_json::json;
use tally_tests::browser::{output_dir, Browser};
use tally_tests::pipelines::*;
use tally_tests::serve::start_serve;
use tally_tests::*;

const IMG: &str = "<img src=x onerror=alert(1)>";
const SCRIPT: &str = "</script><script>alert(2)</script>";
const PAUSED: &str = "select count(*) from tally.batch where state = 'paused'";
const USER: &str = "ops";
const PASSWORD: &str = "correct-horse-battery";

/// 40 records r1..r40 and two hostile ones. `kind` says how the sql worker below treats each:
/// "cast" fails on a cast naming the id, "zero" divides by zero, anything else completes.
fn night_records() -> Vec<serde_json::Value> {
    let mut records: Vec<_> = (1..=40)
        .map(|n| {
            let kind = match n {
                n if n % 3 == 0 => "cast",
                n if n % 5 == 0 => "zero",
                _ => "ok",
            };
            json!({"id": format!("r{n}"), "kind": kind})
        })
        .collect();
    records.push(json!({"id": IMG, "kind": "cast", "note": "<b>bold</b>"}));
    records.push(json!({"id": SCRIPT, "kind": "zero", "note": "<script>alert(3)</script>"}));
    records
}

const NIGHT_SQL: &str = "select case $2->>'kind' when 'cast' then ('bad-' || $1)::int \
                          when 'zero' then 1 / (length($1) - length($1)) else 1 end";

/// The records of batch `night` in state `state`, in load order.
async fn ids_in(client: &tokio_postgres::Client, state: &str) -> Vec<String> {
    client
        .query(
            "select record_id from tally.record r join tally.batch b on b.id = r.batch_id \
              where b.name = 'night' and r.state = $1 order by r.id",
            &[&state],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn shot(browser: &Browser, dir: &std::path::Path, name: &str) {
    browser.assert_no_dialog().await;
    browser.screenshot(&dir.join(format!("{name}.png"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_shows_real_batches_and_one_error_group_is_retried_from_the_browser() {
    let db = TestDb::new("dashboard_pages").await;
    let client = db.client().await;
    let out = output_dir("dashboard");

    // A batch that finishes with two groups of failures, and a clean one in another queue.
    let (code, _, err) = coordinator_with_stdin(
        &db.url,
        &["prepare", "night", "--queue", "q", "--from-file", "-"],
        Some(&jsonl_bytes(&night_records())),
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = coordinator(
        &db.url,
        &[
            "prepare",
            "clean",
            "--queue",
            "other",
            "--from-query",
            "select 'c' || g as id from generate_series(1, 25) g",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut night_worker = WorkerCmd::sql(&db.url, "q", NIGHT_SQL)
        .poll("100ms")
        .start();
    let mut clean_worker = WorkerCmd::noop(&db.url, "other").poll("100ms").start();
    for batch in ["night", "clean"] {
        poll_until("the batch finished", Duration::from_secs(60), || async {
            let c = counts_by_state(&client, batch).await;
            (c.pending + c.running == 0).then_some(())
        })
        .await;
    }
    clean_worker.kill();

    // A pipeline run whose load stage fails past its tolerance.
    client.batch_execute(EXAMPLE_SQL).await.unwrap();
    client
        .batch_execute(
            "insert into src_orders
             select 'o' || g, date '2024-06-01', g, case when g = 7 then -1 else g end
               from generate_series(1, 12) g",
        )
        .await
        .unwrap();
    let pipeline_workers = example_workers(&db.url);
    let run = [
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
    let (code, stdout, err) = coordinator_async(&db.url, &run).await;
    assert_eq!(code, 3, "{stdout} {err}");
    drop(pipeline_workers);

    let users = TempDir::new("dashboard-users");
    let users_file = users.0.join("users");
    std::fs::write(&users_file, format!("# operators\n{USER}:{PASSWORD}\n")).unwrap();
    let serve = start_serve(
        &db.url,
        &[
            "--dashboard-actions",
            "--dashboard-users",
            users_file.to_str().unwrap(),
            "--check-interval",
            "1s",
        ],
    )
    .ready()
    .await;
    let status = status_json(&db, Some("night")).await;
    let browser = Browser::start().await;
    // A window whose page (viewport) is 1280×800.
    browser.client().set_window_size(1280, 943).await.unwrap();
    let base = &serve.base;

    // Batches: both batches, with their states and counts.
    browser.goto(&format!("{base}/")).await;
    let text = browser.text().await;
    println!("--- batches\n{text}");
    for want in ["night", "clean", "complete_with_failures", "other"] {
        assert!(text.contains(want), "batches page lacks {want:?}: {text}");
    }
    shot(&browser, &out, "batches").await;
    // The name filter keeps only matching batches.
    browser.goto(&format!("{base}/?name=lea")).await;
    let text = browser.text().await;
    assert!(text.contains("clean") && !text.contains("night"), "{text}");

    // Batch: counts equal `status --json`, both error groups with their counts.
    browser.goto(&format!("{base}/batches/night")).await;
    let text = browser.text().await;
    println!("--- batch\n{text}");
    for (field, label) in [
        ("total", "Total"),
        ("pending", "Pending"),
        ("running", "Running"),
        ("complete", "Complete"),
        ("failed", "Failed"),
    ] {
        let n = status[field].as_i64().unwrap_or(-1);
        assert!(n >= 0, "{status}");
        assert!(
            text.contains(&format!("\n{label}\n{n}\n")),
            "batch page lacks {label} {n} (status --json): {text}"
        );
    }
    assert_eq!(status["failed"], 21, "{status}");
    assert!(text.contains("division by zero"), "{text}");
    assert!(
        text.contains("invalid input syntax for type integer: \"…\""),
        "{text}"
    );
    assert!(
        text.contains("14") && text.contains("r5 r10 r20 r25 r35"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    shot(&browser, &out, "batch").await;

    // Records: a prefix search, and the failed ones.
    browser
        .goto(&format!("{base}/batches/night/records?id=r1&match=prefix"))
        .await;
    let text = browser.text().await;
    println!("--- records r1*\n{text}");
    for id in ["r1", "r10", "r11", "r19"] {
        assert!(text.lines().any(|l| l.starts_with(id)), "{id}: {text}");
    }
    assert!(
        !text.lines().any(|l| l.starts_with("r2\t") || l == "r2"),
        "{text}"
    );
    browser
        .goto(&format!("{base}/batches/night/records?state=failed"))
        .await;
    let text = browser.text().await;
    println!("--- records failed\n{text}");
    assert!(text.contains(IMG) && text.contains(SCRIPT), "{text}");
    shot(&browser, &out, "records").await;

    // Record detail of each hostile id: the id and payload as text, no dialog.
    for id in [IMG, SCRIPT] {
        let link = browser
            .client()
            .find(Locator::LinkText(id))
            .await
            .unwrap_or_else(|e| panic!("a link named {id:?} on the records page: {e}"));
        link.click().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.assert_no_dialog().await;
        let text = browser.text().await;
        println!("--- record {id}\n{text}");
        assert!(text.contains(id), "{text}");
        assert!(text.contains("\"kind\": "), "pretty JSON payload: {text}");
        browser.client().back().await.unwrap();
    }
    browser
        .goto(&format!(
            "{base}/batches/night/record?id={}",
            urlencode(SCRIPT)
        ))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    shot(&browser, &out, "record").await;

    // Pipelines: the run's stages with their states; the run page.
    browser.goto(&format!("{base}/pipelines")).await;
    let text = browser.text().await;
    println!("--- pipelines\n{text}");
    assert!(text.contains("nightly-orders/date=2024-06-01"), "{text}");
    browser
        .goto(&format!(
            "{base}/runs/{}",
            urlencode("nightly-orders/date=2024-06-01")
        ))
        .await;
    let text = browser.text().await;
    println!("--- run\n{text}");
    for want in ["extract", "load", "report", "compensate", "upstream failed"] {
        assert!(text.contains(want), "run page lacks {want:?}: {text}");
    }
    shot(&browser, &out, "pipeline-run").await;

    // Workers: the sql worker of q, still running.
    browser.goto(&format!("{base}/workers")).await;
    let text = browser.text().await;
    println!("--- workers\n{text}");
    assert!(text.contains("sql") && text.contains(" q"), "{text}");
    shot(&browser, &out, "workers").await;
    night_worker.kill();

    // Sign in, then retry the division-by-zero group only.
    browser.goto(&format!("{base}/login")).await;
    let c = browser.client();
    c.find(Locator::Css("input[name=user]"))
        .await
        .unwrap()
        .send_keys(USER)
        .await
        .unwrap();
    c.find(Locator::Css("input[name=password]"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    c.find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.goto(&format!("{base}/batches/night")).await;
    let zero_group: Vec<String> = {
        let failed = ids_in(&client, "failed").await;
        let mut zero = Vec::new();
        for r in night_records() {
            let id = r["id"].as_str().unwrap().to_string();
            if r["kind"] == "zero" && failed.contains(&id) {
                zero.push(id);
            }
        }
        zero
    };
    let row = c
        .find(Locator::XPath(
            "//tr[td[contains(., 'division by zero')]]//a[contains(., 'Retry group')]",
        ))
        .await
        .unwrap_or_else(|e| panic!("a Retry group link on the division-by-zero row: {e}"));
    row.click().await.unwrap();
    let text = browser.text().await;
    println!("--- confirm\n{text}");
    let n = zero_group.len();
    assert!(text.contains(&format!("{n} records")), "{text}");
    shot(&browser, &out, "confirm").await;
    c.find(Locator::Id("confirm"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let done = c
        .find(Locator::Id("done"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(done.starts_with(&format!("{n} failed records")), "{done}");
    let pending = ids_in(&client, "pending").await;
    let mut want = zero_group.clone();
    want.sort();
    let mut got = pending.clone();
    got.sort();
    assert_eq!(got, want, "exactly the division-by-zero group is pending");
    assert!(
        ids_in(&client, "failed").await.contains(&IMG.to_string()),
        "the cast group stays failed"
    );

    // The audit shows who did it, on the batch page and in the table.
    let (actor, rows): (String, i64) = {
        let r = client
            .query_one("select actor, rows from tally.audit", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((actor.as_str(), rows), (USER, n as i64));
    browser.goto(&format!("{base}/batches/night")).await;
    let text = browser.text().await;
    assert!(
        text.contains("retry-failed-group") && text.contains(USER),
        "{text}"
    );
    browser.assert_no_dialog().await;
    browser.close().await;
}

/// Percent-encodes everything but unreserved characters, for a query value or path segment.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_without_credentials_or_csrf_token_are_refused() {
    let db = TestDb::new("dashboard_refused").await;
    let client = db.client().await;
    let (code, _, err) = coordinator(
        &db.url,
        &[
            "prepare",
            "b",
            "--queue",
            "q",
            "--from-query",
            "select 'r' || g as id from generate_series(1, 10) g",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let token = "0123456789abcdef-token";

    // Read-only by default: no action answers, even with the token.
    let serve = start_serve(&db.url, &[]).ready().await;
    let http = reqwest::Client::new();
    let post = |base: &str, path: &str| http.post(format!("{base}{path}"));
    let r = post(&serve.base, "/actions/pause")
        .bearer_auth(token)
        .form(&[("batch", "b")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    drop(serve);

    let serve = start_serve_with_token(&db.url, token).await;
    let base = &serve.base;
    // No credentials, a wrong token, and basic auth without the form's CSRF token.
    for request in [
        post(base, "/actions/pause").form(&[("batch", "b")]),
        post(base, "/actions/pause")
            .bearer_auth("0123456789abcdef-wrong")
            .form(&[("batch", "b")]),
        post(base, "/actions/pause")
            .basic_auth("token", Some(token))
            .form(&[("batch", "b"), ("csrf", "00ff")]),
    ] {
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403);
    }

    assert_eq!(
        query_i64(&client, PAUSED, &[]).await,
        0,
        "a refused action changed nothing"
    );
    assert_eq!(
        query_i64(&client, "select count(*) from tally.audit", &[]).await,
        0
    );

    // The token pauses, and the audit says so.
    let r = post(base, "/actions/pause")
        .bearer_auth(token)
        .form(&[("batch", "b")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    assert_eq!(query_i64(&client, PAUSED, &[]).await, 1);
    assert_eq!(
        query_i64(
            &client,
            "select count(*) from tally.audit where action = 'pause' and actor = 'token'",
            &[]
        )
        .await,
        1
    );

    // Every page sends the security headers, and none shows the database URL.
    for path in [
        "/",
        "/batches/b",
        "/batches/b/records",
        "/workers",
        "/pipelines",
        "/login",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let h = r.headers().clone();
        let csp = h["content-security-policy"].to_str().unwrap().to_string();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        let body = r.text().await.unwrap();
        assert!(!body.contains(&db.url) && !body.contains(token), "{path}");
    }
}

async fn start_serve_with_token(url: &str, token: &str) -> tally_tests::serve::Serve {
    tally_tests::serve::start_serve_env(
        url,
        &["--dashboard-actions"],
        &[("TALLY_DASHBOARD_TOKEN", token)],
    )
    .ready()
    .await
}

/// The plans of the record queries, on a batch large enough that the planner would scan it
/// if no index served: none reads `tally.record` sequentially.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_queries_read_through_indexes() {
    let db = TestDb::new("dashboard_plans").await;
    let client = db.client().await;
    for (name, n) in [("small", 100), ("big", 200_000)] {
        let query = format!("select 'r' || g as id, g as n from generate_series(1, {n}) g");
        let (code, _, err) = coordinator(
            &db.url,
            &["prepare", name, "--queue", "q", "--from-query", &query],
        );
        assert_eq!(code, 0, "{err}");
    }
    client
        .batch_execute(
            "update tally.record set state = 'failed', last_error = 'boom ' || id, attempt = 1,
                    available_at = null
              where id % 100 = 0;
             analyze tally.record",
        )
        .await
        .unwrap();
    let big = batch_id(&client, "big").await;
    let sql = |file: &str| {
        let path = format!("{}/../sql/queries/{file}.sql", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let none: Option<String> = None;
    let no_int: Option<i32> = None;
    let failed = Some("failed".to_string());
    let group = Some("0123456789ab".to_string());
    let min = Some(2i32);
    let plans: Vec<(&str, Vec<String>)> = vec![
        (
            "dash_record",
            explain(&client, &sql("dash_record"), &[&big, &"r150000"]).await,
        ),
        (
            "dash_records_open",
            explain(
                &client,
                &sql("dash_records_open"),
                &[&big, &"", &"", &none, &no_int, &50i64],
            )
            .await,
        ),
        (
            "dash_records_open (state, attempts)",
            explain(
                &client,
                &sql("dash_records_open"),
                &[&big, &"", &"r5", &failed, &min, &50i64],
            )
            .await,
        ),
        (
            "dash_records_range",
            explain(
                &client,
                &sql("dash_records_range"),
                &[&big, &"r15", &"r16", &"", &none, &no_int, &50i64],
            )
            .await,
        ),
        (
            "dash_records_errors",
            explain(
                &client,
                &sql("dash_records_errors"),
                &[&big, &0i64, &failed, &group, &no_int, &50i64],
            )
            .await,
        ),
        (
            "dash_attempts",
            explain(&client, &sql("dash_attempts"), &[&big]).await,
        ),
    ];
    for (name, plan) in &plans {
        println!("--- {name}\n{}", plan.join("\n"));
        assert!(
            !plan.iter().any(|l| l.contains("Seq Scan on record")),
            "{name} scans tally.record:\n{}",
            plan.join("\n")
        );
        assert!(
            plan.iter().any(|l| l.contains("Index")),
            "{name} uses no index:\n{}",
            plan.join("\n")
        );
    }
}

/// EXPLAIN of `sql` with its parameters bound, as the dashboard runs it: in a transaction
/// with sequential scans off (`Store::query_indexed`), so that a seq scan in the plan means
/// that no index can serve the query.
async fn explain(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<String> {
    client
        .batch_execute("begin; set local enable_seqscan = off")
        .await
        .unwrap();
    let plan = client
        .query(&format!("explain {sql}"), params)
        .await
        .unwrap_or_else(|e| panic!("explain {sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    client.batch_execute("commit").await.unwrap();
    plan
}
