//! Failures grouped by cause: `failed --group-by error` folds what varies between records
//! (quoted values, ids, numbers), and `retry-failed --group` sends back exactly one group.

use std::time::Duration;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_group_by_cause_and_one_group_is_retried_alone() {
    let db = TestDb::new("failure_groups").await;
    let client = db.client().await;
    let (code, _, err) = coordinator(
        &db.url,
        &[
            "prepare",
            "b",
            "--queue",
            "q",
            "--from-query",
            "select 'r' || g as id from generate_series(1, 60) g",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // Every third record fails on a cast naming its own id; every fifth other one divides by
    // zero; the rest complete.
    let n = "substr($1, 2)::int";
    let statement = format!(
        "select case when {n} % 3 = 0 then ('bad-' || $1)::int \
                     when {n} % 5 = 0 then 1 / ({n} - {n}) else 1 end"
    );
    let mut worker = WorkerCmd::sql(&db.url, "q", &statement)
        .poll("100ms")
        .start();
    poll_until("the batch finished", Duration::from_secs(60), || async {
        let c = counts_by_state(&client, "b").await;
        (c.pending + c.running == 0).then_some(())
    })
    .await;
    worker.kill();

    let (code, out, err) = coordinator(&db.url, &["failed", "b", "--group-by", "error", "--json"]);
    assert_eq!(code, 0, "{err}");
    let groups = parse_json(&out);
    let groups = groups.as_array().unwrap_or_else(|| panic!("{out}"));
    assert_eq!(groups.len(), 2, "{out}");
    assert_eq!(groups[0]["count"], 20);
    assert_eq!(
        groups[0]["pattern"], "invalid input syntax for type integer: \"…\"",
        "{out}"
    );
    assert_eq!(
        groups[0]["sample_ids"],
        serde_json::json!(["r3", "r6", "r9", "r12", "r15"])
    );
    assert!(groups[0]["example"]
        .as_str()
        .unwrap_or("")
        .contains("bad-r"));
    assert_eq!(groups[1]["count"], 8);
    assert_eq!(groups[1]["pattern"], "division by zero");
    let (code, table, err) = coordinator(&db.url, &["failed", "b", "--group-by", "error"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("division by zero") && table.contains("e.g. r5, r10"),
        "{table}"
    );

    let key = groups[1]["key"].as_str().unwrap_or_default().to_string();
    let (code, out, err) = coordinator(&db.url, &["retry-failed", "b", "--group", &key]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("8 failed records"), "{out}");
    let pending: Vec<String> = client
        .query(
            "select record_id from tally.record r join tally.batch b on b.id = r.batch_id \
              where b.name = 'b' and r.state = 'pending' order by r.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        pending,
        ["r5", "r10", "r20", "r25", "r35", "r40", "r50", "r55"],
        "exactly the division-by-zero group"
    );
    let c = counts_by_state(&client, "b").await;
    assert_eq!((c.pending, c.failed, c.complete), (8, 20, 32));
    let (code, out, _) = coordinator(&db.url, &["retry-failed", "b", "--group", "nosuchgroup"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("0 failed records"), "{out}");
}
