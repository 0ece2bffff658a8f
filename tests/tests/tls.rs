//! TLS to PostgreSQL and where the password comes from, through the real binaries, against a
//! private cluster with ssl=on and a certificate signed by a CA of the test's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tally_tests::{binary, poll_until, with_database, ChildGuard, TestDb, ThrowawayPg, WorkerCmd};

const PASSWORD: &str = "Tls-s3cret-pw-7q";
const ROLE: &str = "tally_tls";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate for localhost and 127.0.0.1 signed by it. Returns the CA file.
fn make_certificates(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=tally test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.crt",
            "-extfile",
            "server.ext",
        ],
    );
    dir.join("ca.crt")
}

/// A self-signed X.509 v1 certificate (no extensions), like the one `create extension citus`
/// generates for itself, as `server.crt` and `server.key`.
fn make_v1_certificate(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=citus-auto-ssl",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-signkey",
            "server.key",
            "-days",
            "2",
            "-out",
            "server.crt",
        ],
    );
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in", "server.crt"])
        .current_dir(dir)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("Version: 1 (0x0)"),
        "not a v1 certificate: {shown}"
    );
}

/// Turns TLS on in the cluster, and lets `ROLE` in only over TLS with a SCRAM password.
async fn enable_tls(pg: &ThrowawayPg, certs: &Path) {
    let data = pg.dir.join("data");
    for name in ["server.crt", "server.key"] {
        std::fs::copy(certs.join(name), data.join(name)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The server runs as the postgres OS user and insists on owning its key.
        for name in ["server.crt", "server.key"] {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(data.join(name))
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
    let hba = data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl all {ROLE} 127.0.0.1/32 scram-sha-256\nhost all {ROLE} 127.0.0.1/32 reject\n{old}"
        ),
    )
    .unwrap();
    let admin = tally_tests::connect(&pg.url).await;
    // One statement per round trip: ALTER SYSTEM refuses the implicit transaction of several.
    for statement in [
        "alter system set ssl = on".to_string(),
        "alter system set ssl_cert_file = 'server.crt'".to_string(),
        "alter system set ssl_key_file = 'server.key'".to_string(),
        format!("create role {ROLE} login superuser password '{PASSWORD}'"),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .expect("configure TLS");
    }
    let reloaded: bool = admin
        .query_one("select pg_reload_conf()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reloaded);
}

/// Runs a binary with exactly `env` as its database settings (nothing inherited).
fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary(bin));
    cmd.args(args);
    for var in [
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "PGPASSWORD",
        "TALLY_DB_CA_FILE",
        "TALLY_DB_SSLMODE",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .env("TALLY_LISTEN", "off")
        .stdin(Stdio::null())
        .output()
        .expect("run binary")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `postgres://tally_tls[:PASSWORD]@HOST:PORT/DB?QUERY`
fn url(pg: &ThrowawayPg, db: &str, host: &str, password: bool, query: &str) -> String {
    let auth = if password {
        format!("{ROLE}:{PASSWORD}")
    } else {
        ROLE.to_string()
    };
    let base = with_database(&format!("postgres://{auth}@{host}:{}/x", pg.port), db);
    if query.is_empty() {
        base
    } else {
        format!("{base}?{query}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_and_password_sources_through_the_binaries() {
    let pg = ThrowawayPg::start("tls");
    let certs = pg.dir.join("certs");
    let ca = make_certificates(&certs);
    let ca = ca.to_str().unwrap();
    enable_tls(&pg, &certs).await;
    let db = TestDb::new_at(&pg.url, "tls").await;
    let input = pg.dir.join("in.jsonl");
    std::fs::write(&input, tally_tests::jsonl_ids(50)).unwrap();
    let input = input.to_str().unwrap();

    // verify-full with the CA: connects (by name and by address, both in the certificate).
    let full = url(&pg, &db.name, "localhost", true, "sslmode=verify-full");
    let out = run(
        "coordinator",
        &[
            "--db-ca-file",
            ca,
            "prepare",
            "b1",
            "--queue",
            "q",
            "--from-file",
            input,
        ],
        &[("DATABASE_URL", &full)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let by_ip = url(
        &pg,
        &db.name,
        "127.0.0.1",
        true,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let out = run(
        "coordinator",
        &["status", "b1"],
        &[("DATABASE_URL", &by_ip)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // `coordinator serve` takes the same TLS flags: ready over verify-full, b1 on /metrics.
    let port = tally_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let serve = Command::new(binary("coordinator"))
        .args(["--db-ca-file", ca, "serve", "--listen", &listen])
        .env("DATABASE_URL", &full)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn coordinator serve");
    let _serve = ChildGuard::new("coordinator serve", serve);
    let metrics = poll_until(
        "serve ready over verify-full",
        Duration::from_secs(20),
        || async {
            match tally_tests::http_get(port, "/readyz") {
                Some((200, _)) => tally_tests::scrape(port),
                _ => None,
            }
        },
    )
    .await;
    assert!(
        metrics.contains(r#"tally_batch_records_expected{batch="b1",queue="q"} 50"#),
        "{metrics}"
    );

    // verify-full without it: refused, saying why and what to do, without the password.
    let out = run("coordinator", &["status"], &[("DATABASE_URL", &full)]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(69), "{said}");
    assert!(
        said.contains("certificate verification failed for host localhost: unknown issuer")
            && said.contains("--db-ca-file"),
        "{said}"
    );
    assert!(!said.contains(PASSWORD), "{said}");
    let out = run(
        "worker",
        &["--queue", "q", "--handler", "noop"],
        &[("DATABASE_URL", &full)],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("unknown issuer") && !said.contains(PASSWORD),
        "{said}"
    );

    // require: encrypted without checking the certificate; the role is let in only over TLS.
    let require = url(&pg, &db.name, "127.0.0.1", true, "sslmode=require");
    let out = run("coordinator", &["status"], &[("DATABASE_URL", &require)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let plain = url(&pg, &db.name, "127.0.0.1", true, "sslmode=disable");
    let out = run("coordinator", &["status"], &[("DATABASE_URL", &plain)]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD));

    // The URL from a file (a mounted Secret).
    let secret = pg.dir.join("database-url");
    std::fs::write(&secret, format!("{full}\n")).unwrap();
    let secret = secret.to_str().unwrap();
    let out = run(
        "coordinator",
        &["status", "--database-url-file", secret, "--db-ca-file", ca],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains(PASSWORD));
    // Both sources at once is bad usage.
    let out = run(
        "coordinator",
        &["status", "--database-url-file", secret],
        &[("DATABASE_URL", &full)],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let out = run(
        "worker",
        &[
            "--queue",
            "q",
            "--handler",
            "noop",
            "--database-url-file",
            secret,
        ],
        &[("DATABASE_URL", &full)],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));

    // PGPASSWORD with a URL that has none, a worker processing the batch over verify-full.
    let no_pw = url(&pg, &db.name, "localhost", false, "sslmode=verify-full");
    let wrong = run(
        "coordinator",
        &["status"],
        &[
            ("DATABASE_URL", &no_pw),
            ("PGPASSWORD", "not-the-password"),
            ("TALLY_DB_CA_FILE", ca),
        ],
    );
    assert_eq!(wrong.status.code(), Some(69), "{}", text(&wrong));
    assert!(!text(&wrong).contains("not-the-password"));
    db.client()
        .await
        .batch_execute("create table seen (id text primary key)")
        .await
        .unwrap();
    let log = pg.dir.join("worker.log");
    let mut worker = WorkerCmd::sql(&no_pw, "q", "insert into seen (id) values ($1)")
        .poll("200ms")
        .env_remove("DATABASE_URL_FILE")
        .env("PGPASSWORD", PASSWORD)
        .env("TALLY_DB_CA_FILE", ca)
        .env("RUST_LOG", "debug")
        .log_to(&log)
        .start();
    let out = run(
        "coordinator",
        &["wait", "b1", "--timeout", "60s"],
        &[
            ("DATABASE_URL", &no_pw),
            ("PGPASSWORD", PASSWORD),
            ("TALLY_DB_CA_FILE", ca),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    worker.signal(libc::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let seen = tally_tests::query_i64(&db.client().await, "select count(*) from seen", &[]).await;
    assert_eq!(seen, 50);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains(PASSWORD), "the worker logged the password");
}

/// libpq's prefer and require encrypt without checking the certificate, so they accept one
/// that cannot even be verified (X.509 v1, as Citus makes); verify-ca refuses it, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_and_require_accept_a_v1_self_signed_certificate() {
    let pg = ThrowawayPg::start("tls-v1");
    let certs = pg.dir.join("certs");
    make_v1_certificate(&certs);
    enable_tls(&pg, &certs).await;
    let db = TestDb::new_at(&pg.url, "tls_v1").await;

    // The role is let in only over TLS: a success below was encrypted.
    for query in ["", "sslmode=prefer", "sslmode=require"] {
        let url = url(&pg, &db.name, "127.0.0.1", true, query);
        let out = run("coordinator", &["status"], &[("DATABASE_URL", &url)]);
        assert_eq!(out.status.code(), Some(0), "{query:?}: {}", text(&out));
        let out = run(
            "coordinator",
            &[
                "prepare",
                &format!("b{}", query.len()),
                "--queue",
                "q",
                "--from-query",
                "select g::text as id from generate_series(1, 3) g",
            ],
            &[("DATABASE_URL", &url)],
        );
        assert_eq!(out.status.code(), Some(0), "{query:?}: {}", text(&out));
    }

    // verify-ca, even with the certificate itself as the CA: refused at once, saying why.
    let ca = certs.join("server.crt");
    let url = url(&pg, &db.name, "127.0.0.1", true, "sslmode=verify-ca");
    let out = run(
        "coordinator",
        &["--db-ca-file", ca.to_str().unwrap(), "status"],
        &[("DATABASE_URL", &url)],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(69), "{said}");
    assert!(
        said.contains("the server's certificate is X.509 v1") && said.contains("sslmode=require"),
        "{said}"
    );
    assert!(!said.contains(PASSWORD), "{said}");
}
