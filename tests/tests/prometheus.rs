//! The metrics against Prometheus's own tools: `promtool check metrics` on what a worker and
//! `coordinator serve` expose, `promtool check config` and `promtool test rules` on
//! deploy/prometheus, and a real Prometheus scraping both during a batch. The dashboard's and
//! alerts' queries are run against that Prometheus, and every metric they name must exist.
//! `promtool` and `prometheus` come from the Debian package `prometheus` (scripts/tools.sh).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tally_tests::{
    coordinator, free_port, output_with_stdin, poll_until, start_coordinator, start_worker,
    ChildGuard, TempDir, TestDb,
};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// A Prometheus tool from PATH, or a panic that says how to get it.
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} not found: run scripts/test.sh (it installs it), or apt-get install prometheus"
        )
    })
}

/// Runs `promtool ARGS` (with `stdin` piped in if given); panics with its output unless it
/// exits 0.
fn promtool(args: &[&str], stdin: Option<&str>) -> String {
    let out = output_with_stdin(
        Command::new(tool("promtool"))
            .args(args)
            .current_dir(repo_root()),
        stdin.map(str::as_bytes),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// `GET url` once it answers 200; its body.
async fn get_ok(url: &str) -> String {
    let client = http();
    poll_until(
        &format!("{url} to answer 200"),
        Duration::from_secs(20),
        || {
            let request = client.get(url).send();
            async move {
                let response = request.await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response.text().await.ok()
            }
        },
    )
    .await
}

/// A worker and `coordinator serve` with their endpoints on free ports, on one database.
struct Scraped {
    db: TestDb,
    worker_port: u16,
    serve_port: u16,
    _worker: ChildGuard,
    _serve: ChildGuard,
}

impl Scraped {
    /// Runs `setup` (SQL) on a fresh database, then starts both.
    async fn start(test: &str, setup: &str, worker_args: &[&str]) -> Scraped {
        let db = TestDb::new(test).await;
        db.client()
            .await
            .batch_execute(setup)
            .await
            .unwrap_or_else(|e| panic!("{setup}: {e}"));
        let (worker_port, serve_port) = (free_port(), free_port());
        let worker_listen = format!("127.0.0.1:{worker_port}");
        let mut args = vec!["--queue", "q", "--listen", &worker_listen];
        args.extend_from_slice(worker_args);
        let worker = start_worker(&db.url, &args);
        let serve_listen = format!("127.0.0.1:{serve_port}");
        let serve = start_coordinator(
            &db.url,
            &["serve", "--listen", &serve_listen, "--check-interval", "1s"],
        );
        let scraped = Scraped {
            db,
            worker_port,
            serve_port,
            _worker: worker,
            _serve: serve,
        };
        get_ok(&scraped.url(worker_port, "/readyz")).await;
        get_ok(&scraped.url(serve_port, "/readyz")).await;
        scraped
    }

    fn url(&self, port: u16, path: &str) -> String {
        format!("http://127.0.0.1:{port}{path}")
    }

    async fn worker_metrics(&self) -> String {
        get_ok(&self.url(self.worker_port, "/metrics")).await
    }

    async fn serve_metrics(&self) -> String {
        get_ok(&self.url(self.serve_port, "/metrics")).await
    }

    /// Prepares batch `name` of `records` records on queue `q`.
    fn prepare(&self, name: &str, records: u32, extra: &[&str]) {
        let input = tally_tests::jsonl_ids(records);
        tally_tests::prepare_stdin(&self.db.url, name, "q", &input, extra);
    }
}

/// The metric names (`tally_…`, without the `_bucket`/`_sum`/`_count` of histograms) that a
/// text names.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tally_") {
        let after_boundary = at == 0
            || !rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        if !after_boundary {
            continue;
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.insert(base.to_string());
    }
    names
}

/// Metric names declared (`# TYPE name …`) in a scrape.
fn declared(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every `expr` in the dashboard's panels, with its variables filled in.
fn dashboard_queries() -> Vec<String> {
    let path = repo_root().join("deploy/grafana/tally-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let dashboard: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains(&"datasource"),
        "the data source is a variable"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title} uses the data source variable"
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            queries.push(
                expr.replace("$__rate_interval", "1m")
                    .replace("$queue", ".*")
                    .replace("$batch", ".*"),
            );
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_of_a_worker_and_of_serve() {
    let scraped = Scraped::start("promtool_metrics", "", &["--handler", "noop"]).await;
    scraped.prepare("b", 50, &[]);
    let (code, out, err) = coordinator(&scraped.db.url, &["wait", "b", "--timeout", "30s"]);
    assert_eq!(code, 0, "{out}{err}");

    let worker = poll_until(
        "the worker counts the batch",
        Duration::from_secs(10),
        || async {
            let text = scraped.worker_metrics().await;
            text.contains("tally_worker_records_completed_total{queue=\"q\"} 50")
                .then_some(text)
        },
    )
    .await;
    let serve = poll_until("serve shows the batch", Duration::from_secs(20), || async {
        let text = scraped.serve_metrics().await;
        text.contains("tally_batch_records{batch=\"b\",queue=\"q\",state=\"complete\"} 50")
            .then_some(text)
    })
    .await;
    promtool(&["check", "metrics"], Some(&worker));
    promtool(&["check", "metrics"], Some(&serve));

    // Every metric the alerts and the dashboard name is one that is exposed.
    let exposed: BTreeSet<String> = declared(&worker)
        .union(&declared(&serve))
        .cloned()
        .collect();
    let alerts = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))
        .expect("read alerts.yml");
    let mut named = metric_names(&alerts);
    named.extend(dashboard_queries().iter().flat_map(|q| metric_names(q)));
    let unknown: Vec<&String> = named.difference(&exposed).collect();
    assert!(
        unknown.is_empty(),
        "alerts or dashboard name metrics nobody exposes: {unknown:?}; exposed: {exposed:?}"
    );
}

#[test]
fn promtool_accepts_the_config_and_the_alert_rules_pass_their_tests() {
    let out = promtool(
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        None,
    );
    assert!(out.contains("1 rule files found"), "{out}");
    promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], None);
    let tests: Vec<String> = std::fs::read_dir(repo_root().join("deploy/prometheus/tests"))
        .expect("deploy/prometheus/tests")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        !tests.is_empty(),
        "no rule tests in deploy/prometheus/tests"
    );
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = promtool(&args, None);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// A Prometheus server of the test's own: storage in a temp dir, a free port, 1 s scrapes.
struct Prometheus {
    port: u16,
    _process: ChildGuard,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[(&str, u16)]) -> Prometheus {
        let port = free_port();
        let alerts = repo_root().join("deploy/prometheus/alerts.yml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {:?}\nscrape_configs:\n",
            alerts.display().to_string()
        );
        for (job, target_port) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"127.0.0.1:{target_port}\"]\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let process = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create prometheus.log"))
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            port,
            _process: ChildGuard::new("prometheus", process),
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `/api/v1/query?query=…`: the `data.result` array; panics on an error response (e.g. a
    /// query that does not parse).
    async fn query(&self, promql: &str) -> Vec<Value> {
        let response = http()
            .get(self.url("/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .await
            .unwrap_or_else(|e| panic!("query {promql}: {e}"));
        let body: Value = serde_json::from_str(&response.text().await.expect("body"))
            .expect("query response is JSON");
        assert_eq!(body["status"], "success", "query {promql}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The value of a query that returns one series, if it does.
    async fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits until `promql` returns one series with value `want`.
    async fn wait_for(&self, promql: &str, want: f64) {
        let log = self.log.clone();
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if self.value(promql).await == Some(want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        if found.is_err() {
            let last = self.query(promql).await;
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{promql} did not reach {want}; last result {last:?}\nprometheus log:\n{log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_batch_to_completion() {
    const RECORDS: u32 = 3000;
    let scraped = Scraped::start(
        "prometheus_e2e",
        "create table sink (id text primary key)",
        &[
            "--handler",
            "sql",
            "--sql",
            "insert into sink (id) values ($1)",
            "--concurrency",
            "2",
            "--sql-chunk",
            "50",
            "--claim-size",
            "200",
        ],
    )
    .await;
    let client = scraped.db.client().await;
    let scratch = TempDir::new("prometheus");
    let prometheus = Prometheus::start(
        &scratch.0,
        &[
            ("tally-worker", scraped.worker_port),
            ("tally-serve", scraped.serve_port),
        ],
    );
    get_ok(&prometheus.url("/-/ready")).await;
    // Both targets are scraped before the batch starts.
    prometheus.wait_for("sum(up)", 2.0).await;

    scraped.prepare("orders", RECORDS, &[]);
    let (code, out, err) = coordinator(&scraped.db.url, &["wait", "orders", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");

    let total = f64::from(RECORDS);
    prometheus
        .wait_for(
            r#"tally_batch_records{job="tally-serve",batch="orders",state="complete"}"#,
            total,
        )
        .await;
    prometheus
        .wait_for(
            r#"tally_worker_records_completed_total{job="tally-worker",queue="q"}"#,
            total,
        )
        .await;
    let expected = prometheus
        .value(r#"tally_batch_records_expected{batch="orders"}"#)
        .await;
    assert_eq!(expected, Some(total));
    assert_eq!(
        prometheus
            .value(r#"tally_batch_completion_ratio{batch="orders"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        prometheus
            .value(r#"sum(tally_worker_records_failed_total{queue="q"})"#)
            .await,
        Some(0.0)
    );
    assert_eq!(
        prometheus.value(r#"tally_worker_ready{queue="q"}"#).await,
        Some(1.0)
    );
    let sink = tally_tests::query_i64(&client, "select count(*) from sink", &[]).await;
    assert_eq!(sink, i64::from(RECORDS));

    // The alert rules loaded and evaluate cleanly, and none is pending or firing once the
    // batch is done (an evaluation may still have seen the batch's first seconds: poll).
    let rules_url = prometheus.url("/api/v1/rules");
    let mut last = Value::Null;
    let settled = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            last = serde_json::from_str(&get_ok(&rules_url).await).expect("rules JSON");
            let rules: Vec<&Value> = last["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .collect();
            assert_eq!(rules.len(), 5, "alerts.yml has five rules: {last}");
            for rule in &rules {
                assert_eq!(rule["health"], "ok", "{rule}");
            }
            if rules.iter().all(|r| r["state"] == "inactive") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "an alert is active after the batch: {last}"
    );
    // Every dashboard query is valid PromQL, and the batch panels see the batch.
    for q in dashboard_queries() {
        prometheus.query(&q).await;
    }
    let progress = prometheus
        .query(r#"max by (batch) (tally_batch_completion_ratio{batch=~".*",queue=~".*"})"#)
        .await;
    assert_eq!(progress.len(), 1, "{progress:?}");
    // Nothing unbounded became a label: no record id in any series Prometheus holds.
    let series = get_ok(&prometheus.url("/api/v1/label/__name__/values")).await;
    let ids =
        get_ok(&prometheus.url("/api/v1/series?match[]=%7B__name__%3D~%22tally_.%2B%22%7D")).await;
    assert!(
        series.contains("tally_worker_records_completed_total"),
        "{series}"
    );
    assert!(!ids.contains("\"r1\"") && !ids.contains("r2999"), "{ids}");
}
