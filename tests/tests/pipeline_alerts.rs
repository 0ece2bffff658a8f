//! Pipeline runs under `coordinator serve`: `stage_failed`, `pipeline_failed` and, after a
//! repair, `pipeline_finished` reach the webhook once each across two replicas, and
//! `/metrics` shows the run's state, its stages and the watermark.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_tests::pipelines::*;
use tally_tests::serve::*;
use tally_tests::*;

const RUN: &str = "nightly-orders/date=2024-06-01";

type Received = Arc<Mutex<Vec<serde_json::Value>>>;

/// A webhook receiver on 127.0.0.1:0 that accepts everything.
async fn start_receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let log = log.clone();
            async move {
                let body = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                log.lock().unwrap().push(body);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), received)
}

fn events(received: &Received, event: &str) -> Vec<serde_json::Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b["event"] == event)
        .cloned()
        .collect()
}

fn run_series(name: &str, state: &str) -> String {
    format!("{name}{{pipeline=\"nightly-orders\",run=\"{RUN}\",state=\"{state}\"}}")
}

fn stage_series(name: &str, stage: &str, state: &str) -> String {
    format!(
        "{name}{{pipeline=\"nightly-orders\",run=\"{RUN}\",stage=\"{stage}\",state=\"{state}\"}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_alerts_are_sent_once_and_runs_show_on_metrics() {
    let db = TestDb::new("pipeline_alerts").await;
    let client = db.client().await;
    client.batch_execute(EXAMPLE_SQL).await.unwrap();
    client
        .batch_execute(
            "insert into src_orders
             select 'o' || g, date '2024-06-01', g, case when g = 7 then -1 else g end
               from generate_series(1, 20) g",
        )
        .await
        .unwrap();
    let (hook, received) = start_receiver().await;
    let args = [
        "--check-interval",
        "200ms",
        "--alert-webhook",
        hook.as_str(),
    ];
    let serve = start_serve(&db.url, &args);
    let _replica = start_serve(&db.url, &args);
    let _workers = example_workers(&db.url);
    // Once serve is watching (its alerts start after the newest alert when it started).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, _, err) = coordinator_async(
        &db.url,
        &["pipeline", "run", EXAMPLE, "--param", "date=2024-06-01"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    poll_until(
        "pipeline_failed at the webhook",
        Duration::from_secs(60),
        || async { (!events(&received, "pipeline_failed").is_empty()).then_some(()) },
    )
    .await;
    // More passes of both replicas: nothing is sent again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = events(&received, "stage_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["stage"], "load");
    assert_eq!(failed[0]["run"], RUN);
    assert_eq!(failed[0]["batch"], "nightly-orders:2024-06-01:load");
    assert_eq!(failed[0]["counts"]["failed"], 1);
    let text = failed[0]["text"].as_str().unwrap_or_default();
    assert!(text.contains("pipeline repair"), "{text}");
    let run_failed = events(&received, "pipeline_failed");
    assert_eq!(run_failed.len(), 1, "{run_failed:?}");
    assert!(events(&received, "pipeline_finished").is_empty());

    let m = serve.scrape().await;
    assert_eq!(
        value(&m, &run_series("tally_pipeline_run_state", "failed")),
        1.0
    );
    assert_eq!(
        value(&m, &run_series("tally_pipeline_run_state", "running")),
        0.0
    );
    let load_failed = stage_series("tally_pipeline_stage_state", "load", "failed");
    assert_eq!(value(&m, &load_failed), 1.0);
    let report = stage_series("tally_pipeline_stage_state", "report", "upstream_failed");
    assert_eq!(value(&m, &report), 1.0);
    let records =
        |stage: &str, state: &str| stage_series("tally_pipeline_stage_records", stage, state);
    assert_eq!(value(&m, &records("load", "failed")), 1.0);
    assert_eq!(value(&m, &records("load", "complete")), 19.0);
    assert!(
        !m.keys()
            .any(|k| k.starts_with("tally_pipeline_watermark_seconds")),
        "no window succeeded yet"
    );

    // Repaired, the run finishes: one pipeline_finished, and nothing else again.
    client
        .batch_execute("alter table orders drop constraint orders_amount_check")
        .await
        .unwrap();
    let (code, out, err) = coordinator_async(&db.url, &["pipeline", "repair", RUN]).await;
    assert_eq!(code, 0, "{out} {err}");
    poll_until(
        "pipeline_finished at the webhook",
        Duration::from_secs(60),
        || async { (!events(&received, "pipeline_finished").is_empty()).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (event, n) in [
        ("pipeline_finished", 1),
        ("pipeline_failed", 1),
        ("stage_failed", 1),
    ] {
        assert_eq!(events(&received, event).len(), n, "{event}");
        assert_eq!(
            query_i64(
                &client,
                "select count(*) from tally.alert where kind = $1",
                &[&event]
            )
            .await,
            n as i64,
            "{event}"
        );
    }
    let finished = &events(&received, "pipeline_finished")[0];
    assert_eq!(finished["state"], "succeeded");
    assert_eq!(finished["stages"].as_array().map(Vec::len), Some(4));
    let m = serve.scrape().await;
    assert_eq!(
        value(&m, &run_series("tally_pipeline_run_state", "succeeded")),
        1.0
    );
    assert_eq!(value(&m, &records("load", "complete")), 20.0);
    assert_eq!(
        value(
            &m,
            "tally_pipeline_watermark_seconds{pipeline=\"nightly-orders\"}"
        ),
        1_717_286_400.0,
        "2024-06-02T00:00:00Z"
    );
}
