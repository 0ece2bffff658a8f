//! Helpers for tests of `coordinator serve`: starting it, reading its metrics.

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};

use crate::{binary, ChildGuard};

/// A running `coordinator serve` and the address it listens on.
pub struct Serve {
    pub child: ChildGuard,
    pub base: String,
}

/// Starts `coordinator serve --listen 127.0.0.1:0 ARGS` and reads the address it printed.
pub fn start_serve(url: &str, args: &[&str]) -> Serve {
    start_serve_env(url, args, &[])
}

/// [`start_serve`] with extra environment variables.
pub fn start_serve_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> Serve {
    let mut child = Command::new(binary("coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn coordinator serve");
    let stdout = child.stdout.take().expect("serve's stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines
        .next()
        .and_then(|l| l.ok())
        .unwrap_or_else(|| panic!("coordinator serve printed nothing"));
    // Keep draining, so that the process never writes into a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    let addr = first
        .rsplit(' ')
        .next()
        .filter(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    Serve {
        child: ChildGuard::new("coordinator serve", child),
        base: format!("http://{addr}"),
    }
}

impl Serve {
    /// Waits until `/readyz` answers 200: serve has connected to PostgreSQL.
    pub async fn ready(self) -> Serve {
        crate::poll_until(
            "serve is ready",
            std::time::Duration::from_secs(30),
            || async { (self.get("/readyz").await.0 == 200).then_some(()) },
        )
        .await;
        self
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// One scrape, as series (name with labels) to value.
    pub async fn scrape(&self) -> HashMap<String, f64> {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        parse_metrics(&text)
    }
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

pub fn series(name: &str, batch: &str, queue: &str, state: Option<&str>) -> String {
    match state {
        Some(s) => format!("{name}{{batch=\"{batch}\",queue=\"{queue}\",state=\"{s}\"}}"),
        None => format!("{name}{{batch=\"{batch}\",queue=\"{queue}\"}}"),
    }
}

pub fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no series {key} in {m:?}"))
}
