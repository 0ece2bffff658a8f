//! The deployment files in deploy/: the autoscaler's backlog query against a real PostgreSQL,
//! and the image, compose file and Kubernetes manifests checked by the tools that understand
//! them (hadolint, docker compose, kubectl kustomize, kubernetes-validate, the KEDA and
//! Prometheus Operator schemas). The tools are installed by `scripts/tools.sh`.

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tally::input::Format;
use tally::{Outcome, Store};
use tally_tests::*;

/// The query KEDA's postgresql trigger polls (deploy/k8s/keda.yaml); `$1` is the queue.
const QUEUE_BACKLOG_SQL: &str = include_str!("../../sql/queries/queue_backlog.sql");

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

// ---------------------------------------------------------------------------------------------
// The backlog query
// ---------------------------------------------------------------------------------------------

async fn prepare(
    store: &Store,
    client: &tokio_postgres::Client,
    name: &str,
    queue: &str,
    n: u32,
) -> i64 {
    store
        .prepare_from_reader(
            &spec(name, queue),
            Cursor::new(jsonl_ids(n)),
            Format::Jsonl,
            1 << 20,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
    batch_id(client, name).await
}

async fn backlog(client: &tokio_postgres::Client, queue: &str) -> i64 {
    query_i64(client, QUEUE_BACKLOG_SQL, &[&queue]).await
}

/// The same number the slow way, from the records themselves.
async fn backlog_by_count(client: &tokio_postgres::Client, queue: &str) -> i64 {
    query_i64(
        client,
        "select count(*) from tally.record r join tally.batch b on b.id = r.batch_id \
          where b.queue = $1 \
            and (r.state = 'running' or (r.state = 'pending' and b.state = 'ready'))",
        &[&queue],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_backlog_counts_pending_of_ready_batches_and_all_running() {
    let db = TestDb::new("queue_backlog_counts").await;
    let store = db.store().await;
    let client = db.client().await;
    let lease = Duration::from_secs(60);

    // A running batch: 3 claimed, 2 of them completed -> 7 pending + 1 running.
    let a = prepare(&store, &client, "a", "orders", 10).await;
    let claimed = store.claim(a, 3, "w1", lease).await.expect("claim a");
    assert_eq!(claimed.len(), 3);
    let done: Vec<Outcome> = claimed[..2].iter().map(Outcome::complete).collect();
    store.finish(&done, "w1").await.expect("finish a");

    // A paused batch: its 3 pending rows wait for `resume`, its 2 running rows need a worker.
    let b = prepare(&store, &client, "b", "orders", 5).await;
    assert_eq!(
        store.claim(b, 2, "w2", lease).await.expect("claim b").len(),
        2
    );
    assert!(store.pause("b").await.expect("pause b"));

    // A cancelled batch and a batch of another queue count for nothing here.
    let c = prepare(&store, &client, "c", "orders", 4).await;
    assert_eq!(
        store.claim(c, 1, "w3", lease).await.expect("claim c").len(),
        1
    );
    store.cancel("c").await.expect("cancel c");
    prepare(&store, &client, "d", "emails", 6).await;

    assert_counts_exact(&store, &client, "a").await;
    assert_eq!(backlog(&client, "orders").await, 7 + 1 + 2);
    assert_eq!(
        backlog(&client, "orders").await,
        backlog_by_count(&client, "orders").await
    );
    assert_eq!(backlog(&client, "emails").await, 6);
    assert_eq!(backlog(&client, "no-such-queue").await, 0);

    // Everything done: nothing left to scale for.
    store.resume("b").await.expect("resume b");
    for batch in [a, b] {
        let rest = store.claim(batch, 100, "w9", lease).await.expect("claim");
        store
            .finish(
                &rest.iter().map(Outcome::complete).collect::<Vec<_>>(),
                "w9",
            )
            .await
            .expect("finish rest");
    }
    let running: Vec<(i64, i32, i64)> = client
        .query(
            "select id, attempt, lease_id from tally.record \
              where state = 'running' and batch_id = any($1)",
            &[&vec![a, b]],
        )
        .await
        .expect("running rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for (id, attempt, lease_id) in running {
        let owner: String = client
            .query_one("select lease_owner from tally.record where id = $1", &[&id])
            .await
            .expect("owner")
            .get(0);
        let outcome = Outcome {
            id,
            batch_id: 0,
            attempt,
            lease_id,
            state: tally::RecordState::Complete,
            error: None,
            retry_in: Duration::ZERO,
        };
        store.finish(&[outcome], &owner).await.expect("finish held");
    }
    assert_eq!(backlog(&client, "orders").await, 0);
    assert_eq!(backlog_by_count(&client, "orders").await, 0);
}

/// Every relation a JSON plan reads.
fn relations(plan: &Value, out: &mut Vec<String>) {
    match plan {
        Value::Object(map) => {
            if let Some(Value::String(name)) = map.get("Relation Name") {
                out.push(name.clone());
            }
            map.values().for_each(|v| relations(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| relations(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_backlog_plan_reads_no_record_rows() {
    let db = TestDb::new("queue_backlog_plan").await;
    let store = db.store().await;
    let client = db.client().await;
    let a = prepare(&store, &client, "big", "orders", 20_000).await;
    store
        .claim(a, 500, "w1", Duration::from_secs(60))
        .await
        .expect("claim");
    client
        .batch_execute("analyze tally.record; analyze tally.batch; analyze tally.batch_count")
        .await
        .expect("analyze");

    let explain = format!("explain (format json) {QUEUE_BACKLOG_SQL}");
    let row = client
        .query_one(explain.as_str(), &[&"orders"])
        .await
        .expect("explain the backlog query");
    let plan: Value = row.get(0);
    let mut read = Vec::new();
    relations(&plan, &mut read);
    assert!(
        !read.iter().any(|r| r == "record"),
        "the backlog query reads tally.record: {plan:#}"
    );
    assert!(
        read.iter().any(|r| r == "batch_count"),
        "the backlog query should read the maintained counts: {plan:#}"
    );
    assert_eq!(backlog(&client, "orders").await, 20_000);
}

// ---------------------------------------------------------------------------------------------
// The tools
// ---------------------------------------------------------------------------------------------

/// A tool from PATH, or from the private prefix where `scripts/tools.sh` installs it.
fn tool(name: &str) -> PathBuf {
    let tools_dir = std::env::var_os("TALLY_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tally-tools")));
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let extra = tools_dir
        .into_iter()
        .flat_map(|d| [d.join("venv/bin"), d.join("npm/node_modules/.bin")]);
    path_dirs
        .into_iter()
        .chain(extra)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: run `. scripts/tools.sh && ensure_tools` (scripts/test.sh does)"
            )
        })
}

/// Runs a command from the repository root, feeding `stdin`.
fn run(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut pipe = child.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    // A thread of its own, so that a large input cannot deadlock against a full stdout pipe.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for the tool");
    let _ = writer.join();
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command and panics with its output unless it exits 0; returns stdout.
fn run_ok(cmd: &mut Command, stdin: &[u8]) -> Vec<u8> {
    let out = run(cmd, stdin);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    out.stdout
}

/// `kubectl kustomize deploy/k8s`: the manifests as YAML.
fn kustomize() -> Vec<u8> {
    run_ok(
        Command::new(tool("kubectl")).args(["kustomize", "deploy/k8s"]),
        b"",
    )
}

/// YAML documents as one JSON array, with the PyYAML that kubernetes-validate brings along.
fn yaml_to_json(yaml: &[u8]) -> Value {
    let validate = tool("kubernetes-validate");
    let python = validate.with_file_name("python");
    let python = if python.is_file() {
        python
    } else {
        PathBuf::from("python3")
    };
    let out = run_ok(
        Command::new(python).args([
            "-c",
            "import sys, json, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ]),
        yaml,
    );
    serde_json::from_slice(&out).expect("YAML converted to JSON")
}

/// Durations the manifests use: "40s", "2m".
fn seconds(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("not a duration: {s:?}"));
    match unit {
        "s" | "" => n,
        "m" => n * 60,
        other => panic!("unexpected duration unit {other:?} in {s:?}"),
    }
}

#[test]
fn hadolint_passes_on_the_dockerfile() {
    run_ok(Command::new(tool("hadolint")).arg("deploy/Dockerfile"), b"");
    // The linter does catch things: a shell-form entrypoint (SIGTERM would go to a shell) and
    // a root runtime user are reported.
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile"))
        .expect("read deploy/Dockerfile");
    let broken = dockerfile.replace("USER 10001:10001", "USER root").replace(
        "ENTRYPOINT [\"/usr/local/bin/worker\"]",
        "ENTRYPOINT /usr/local/bin/worker",
    );
    let out = run(Command::new(tool("hadolint")).arg("-"), broken.as_bytes());
    let report = text(&out);
    assert!(!out.status.success(), "hadolint accepted:\n{broken}");
    assert!(
        report.contains("DL3002"),
        "last USER root not reported: {report}"
    );
    assert!(
        report.contains("DL3025"),
        "shell-form ENTRYPOINT not reported: {report}"
    );
}

#[test]
fn compose_file_is_valid_and_workers_scale() {
    let compose = tool("docker-compose");
    run_ok(
        Command::new(&compose).args(["-f", "deploy/compose.yaml", "config", "--quiet"]),
        b"",
    );
    let json = run_ok(
        Command::new(&compose).args(["-f", "deploy/compose.yaml", "config", "--format", "json"]),
        b"",
    );
    let config: Value = serde_json::from_slice(&json).expect("compose config as JSON");
    let services = &config["services"];
    for name in ["postgres", "migrate", "serve", "worker", "prometheus"] {
        assert!(services[name].is_object(), "no service {name}: {config:#}");
    }
    let worker = &services["worker"];
    // `--scale worker=N` needs replicas that do not compete for a name or a host port.
    assert!(
        worker["container_name"].is_null(),
        "worker has a container_name"
    );
    assert!(worker["ports"].is_null(), "worker publishes host ports");
    let grace = seconds(
        worker["environment"]["TALLY_GRACE_PERIOD"]
            .as_str()
            .expect("grace"),
    );
    let stop = seconds(
        worker["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period"),
    );
    assert!(
        stop > grace,
        "stop_grace_period {stop}s must exceed the worker's grace period {grace}s"
    );
    for name in ["serve", "worker"] {
        assert_eq!(
            services[name]["depends_on"]["migrate"]["condition"], "service_completed_successfully",
            "{name} must wait for the migration"
        );
        assert!(
            services[name]["healthcheck"]["test"].is_array(),
            "{name} has no healthcheck"
        );
    }
    assert_eq!(
        services["migrate"]["command"],
        serde_json::json!(["migrate"])
    );
    // Prometheus gets the scrape configuration and, beside it, the alert rules it loads.
    let mounts = services["prometheus"]["volumes"]
        .as_array()
        .expect("prometheus volumes");
    assert!(
        mounts.iter().any(|m| m["target"] == "/etc/prometheus"
            && m["source"]
                .as_str()
                .is_some_and(|s| s.ends_with("deploy/prometheus"))),
        "deploy/prometheus is not mounted at /etc/prometheus: {mounts:?}"
    );
}

/// Pod specs of every workload (Deployment, Job, CronJob) in the rendered manifests.
fn pod_specs(docs: &Value) -> Vec<(String, &Value)> {
    let mut specs = Vec::new();
    for doc in docs.as_array().expect("manifests") {
        let name = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
        let spec = match doc["kind"].as_str() {
            Some("Deployment") | Some("Job") => &doc["spec"]["template"]["spec"],
            Some("CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => continue,
        };
        specs.push((name, spec));
    }
    specs
}

fn find<'a>(docs: &'a Value, kind: &str, name: &str) -> &'a Value {
    docs.as_array()
        .expect("manifests")
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

#[test]
fn kustomize_renders_manifests_that_validate_strictly() {
    let yaml = kustomize();
    let dir = TempDir::new("deploy");
    let rendered = dir.0.join("tally.yaml");
    std::fs::write(&rendered, &yaml).expect("write rendered manifests");
    let validate = tool("kubernetes-validate");
    run_ok(Command::new(&validate).arg("--strict").arg(&rendered), b"");
    // Strict mode rejects a misspelt field, so the pass above means something.
    let misspelt = String::from_utf8_lossy(&yaml).replace(
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
    );
    let broken = dir.0.join("broken.yaml");
    std::fs::write(&broken, misspelt).expect("write broken manifests");
    let out = run(Command::new(&validate).arg("--strict").arg(&broken), b"");
    assert!(
        !out.status.success(),
        "kubernetes-validate --strict accepted an unknown field:\n{}",
        text(&out)
    );

    let docs = yaml_to_json(&yaml);
    let specs = pod_specs(&docs);
    assert_eq!(specs.len(), 4, "worker, serve, migrate, prepare: {specs:?}");
    for (what, spec) in specs {
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"], true,
            "{what}: runAsNonRoot"
        );
        for c in spec["containers"].as_array().expect("containers") {
            let sc = &c["securityContext"];
            assert_eq!(
                sc["readOnlyRootFilesystem"], true,
                "{what}: readOnlyRootFilesystem"
            );
            assert_eq!(
                sc["allowPrivilegeEscalation"], false,
                "{what}: allowPrivilegeEscalation"
            );
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{what}: caps"
            );
            assert!(
                c["image"].as_str().is_some_and(|i| i.contains("tally")),
                "{what}: image"
            );
        }
        assert_eq!(
            spec["automountServiceAccountToken"], false,
            "{what}: API token"
        );
    }
    // Every namespaced object lands in the namespace the manifests create.
    find(&docs, "Namespace", "tally");
    for doc in docs.as_array().expect("manifests") {
        if doc["kind"] != "Namespace" {
            assert_eq!(
                doc["metadata"]["namespace"], "tally",
                "{} {} is not in namespace tally",
                doc["kind"], doc["metadata"]["name"]
            );
        }
    }

    let worker = find(&docs, "Deployment", "tally-worker");
    let config = find(&docs, "ConfigMap", "tally-worker");
    let grace = seconds(
        config["data"]["TALLY_GRACE_PERIOD"]
            .as_str()
            .expect("grace period"),
    );
    let pod = &worker["spec"]["template"]["spec"];
    let termination = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("termination grace");
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds {termination} must exceed the grace period {grace}s"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        find(&docs, "CronJob", "tally-prepare-nightly")["spec"]["concurrencyPolicy"],
        "Forbid"
    );
    assert_eq!(
        find(&docs, "PodDisruptionBudget", "tally-worker")["spec"]["maxUnavailable"],
        1
    );
    // KEDA owns the worker count: a `replicas` here would reset it on every apply.
    assert!(
        worker["spec"]["replicas"].is_null(),
        "the worker Deployment sets replicas, which fights the ScaledObject"
    );
}

/// The Secrets a pod spec mounts, and the file its DATABASE_URL_FILE names.
fn database_secret(what: &str, spec: &Value) -> String {
    let volumes = spec["volumes"].as_array().expect("volumes");
    let secrets: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(secrets.len(), 1, "{what}: one Secret expected: {secrets:?}");
    let volume = volumes
        .iter()
        .find(|v| v["secret"]["secretName"] == secrets[0])
        .expect("secret volume");
    for c in spec["containers"].as_array().expect("containers") {
        let file = c["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == "DATABASE_URL_FILE"))
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{what}: no DATABASE_URL_FILE"));
        let mounted = c["volumeMounts"].as_array().is_some_and(|mounts| {
            mounts.iter().any(|m| {
                m["name"] == volume["name"]
                    && m["readOnly"] == true
                    && m["mountPath"]
                        .as_str()
                        .is_some_and(|p| file == format!("{p}/database-url"))
            })
        });
        assert!(mounted, "{what}: {file} is not in the mounted Secret");
    }
    secrets[0].to_string()
}

#[test]
fn each_workload_logs_in_with_the_secret_of_its_role() {
    let docs = yaml_to_json(&kustomize());
    // pod_specs names a workload by its kind and name as JSON strings.
    let expected = [
        ("Job", "tally-migrate", "tally-database-owner"),
        (
            "CronJob",
            "tally-prepare-nightly",
            "tally-database-coordinator",
        ),
        ("Deployment", "tally-serve", "tally-database-coordinator"),
        ("Deployment", "tally-worker", "tally-database-worker"),
    ];
    let specs = pod_specs(&docs);
    assert_eq!(specs.len(), expected.len(), "{specs:?}");
    for (what, spec) in specs {
        let (_, _, secret) = expected
            .iter()
            .find(|(kind, name, _)| what == format!("\"{kind}\" \"{name}\""))
            .unwrap_or_else(|| panic!("unexpected workload {what}"));
        assert_eq!(database_secret(&what, spec), *secret, "{what}");
    }
    // KEDA's scaler connection is the read-only scaler login, not the owner's.
    let auth = find(&docs, "TriggerAuthentication", "tally-scaler");
    let refs = auth["spec"]["secretTargetRef"]
        .as_array()
        .expect("secretTargetRef");
    assert_eq!(refs.len(), 1, "{refs:?}");
    assert_eq!(refs[0]["parameter"], "connection");
    assert_eq!(refs[0]["name"], "tally-database-scaler");
    assert_eq!(refs[0]["key"], "database-url");
    let scaled = find(&docs, "ScaledObject", "tally-worker");
    assert_eq!(
        scaled["spec"]["triggers"][0]["authenticationRef"]["name"],
        "tally-scaler"
    );
}

#[test]
fn custom_resources_match_their_schemas() {
    let docs = yaml_to_json(&kustomize());
    let json = serde_json::to_vec(&docs).expect("manifests as JSON");
    let script = repo_root().join("deploy/crd-check/check.mjs");
    run_ok(Command::new(tool("node")).arg(&script), &json);
    // An invalid ScaledObject is refused.
    let mut broken = docs.clone();
    for doc in broken.as_array_mut().expect("manifests") {
        if doc["kind"] == "ScaledObject" {
            doc["spec"]["minReplicaCount"] = Value::String("none".into());
        }
    }
    let out = run(
        Command::new(tool("node")).arg(&script),
        &serde_json::to_vec(&broken).expect("json"),
    );
    assert!(
        !out.status.success(),
        "the schema check accepted minReplicaCount \"none\":\n{}",
        text(&out)
    );
}

/// Whitespace-insensitive SQL without `--` comments.
fn normalize_sql(sql: &str) -> String {
    sql.lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn keda_query_is_the_queue_backlog_query() {
    let docs = yaml_to_json(&kustomize());
    let scaled = find(&docs, "ScaledObject", "tally-worker");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "postgresql");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "tally-worker");
    let query = trigger["metadata"]["query"]
        .as_str()
        .expect("trigger query");
    let queue = find(&docs, "ConfigMap", "tally-worker")["data"]["TALLY_QUEUE"]
        .as_str()
        .expect("TALLY_QUEUE")
        .to_string();
    let expected = QUEUE_BACKLOG_SQL.replace("$1", &format!("'{queue}'"));
    assert_eq!(
        normalize_sql(query),
        normalize_sql(&expected),
        "deploy/k8s/keda.yaml's query differs from sql/queries/queue_backlog.sql (queue {queue})"
    );
}
