//! A real headless Chromium driven over WebDriver, for tests of what a browser does with a page
//! (scripts that run, dialogs that open, what it renders), which an HTTP client cannot tell.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/tools.sh` installs them). Each
//! [`Browser`] runs a `chromedriver` of its own on a free port, with a fresh profile, so tests
//! can run in parallel.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::{ChildGuard, TempDir};

/// Debian's Chromium; when it is missing, chromedriver looks for a browser itself.
const CHROMIUM: &str = "/usr/bin/chromium";
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
/// How long chromedriver may take to listen.
const DRIVER_START: Duration = Duration::from_secs(20);

/// A WebDriver session in a headless Chromium. Dropping it (a test that panicked) kills
/// chromedriver and the browser it started; [`Browser::close`] ends the session cleanly first.
pub struct Browser {
    client: Client,
    driver: ChildGuard,
    /// Removed after the browser is dead (fields drop after [`Drop::drop`]).
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of 1280×800. Headless Chromium keeps
    /// room for browser UI: the viewport (what pages and screenshots get) is 1280×657.
    pub async fn start() -> Browser {
        // rustls has both ring (the workspace's) and aws-lc-rs (hyper-rustls's default) here,
        // so it cannot pick a provider by itself. An error means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();

        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // A group of its own, so that Drop can kill the browser with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    panic!("chromedriver not found: run scripts/tools.sh")
                }
                _ => panic!("spawn chromedriver: {e}"),
            });
        let mut driver = ChildGuard::new("chromedriver", child);
        wait_listening(&mut driver, port).await;

        let profile = TempDir::new("chromium");
        let mut chrome = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                format!("--window-size={WIDTH},{HEIGHT}"),
                format!("--user-data-dir={}", profile.0.display()),
            ],
        });
        if Path::new(CHROMIUM).exists() {
            chrome["binary"] = json!(CHROMIUM);
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), chrome);
        // Leave a dialog open (the default dismisses it at the next command), so that
        // `assert_no_dialog` sees it whenever it is called and other commands fail meanwhile.
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));

        let client = ClientBuilder::rustls()
            .unwrap_or_else(|e| panic!("rustls for the WebDriver client: {e}"))
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("new WebDriver session on chromedriver: {e}"));
        // `--window-size` already sizes the window (this changes nothing today); explicit.
        client
            .set_window_size(WIDTH, HEIGHT)
            .await
            .unwrap_or_else(|e| panic!("set window size: {e}"));
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// The WebDriver client, for anything this harness does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Navigates to `url` and waits for its load event.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// The rendered text of the page (the body's `innerText`): what a user reads.
    pub async fn text(&self) -> String {
        self.client
            .find(Locator::Css("body"))
            .await
            .unwrap_or_else(|e| panic!("find the page's body: {e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("text of the page's body: {e}"))
    }

    /// Writes a PNG of the viewport to `path`, creating its directory.
    pub async fn screenshot(&self, path: &Path) {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Panics if a JavaScript dialog (`alert`, `confirm`, `prompt`) is open: on a page that
    /// shows untrusted text, one means the text ran as script. A dialog opened by an event
    /// (an image's `onerror`) may come after `goto` returns; check after the page settled.
    pub async fn assert_no_dialog(&self) {
        match self.client.get_alert_text().await {
            Ok(text) => panic!("a dialog opened: {text}"),
            Err(e) if e.is_no_such_alert() => {}
            Err(e) => panic!("ask chromedriver for an open dialog: {e}"),
        }
    }

    /// Ends the session (the browser exits), then stops chromedriver.
    pub async fn close(self) {
        // `Client::close` takes the client by value and `Browser` has a `Drop`: close a handle.
        self.client
            .clone()
            .close()
            .await
            .unwrap_or_else(|e| panic!("close the WebDriver session: {e}"));
    }
}

impl Drop for Browser {
    /// Kills chromedriver's process group (Chromium and its helpers are in it), which a
    /// SIGKILL to chromedriver alone would leave running; the guard then reaps chromedriver.
    fn drop(&mut self) {
        let pid = self.driver.id();
        if pid != 0 {
            // SAFETY: kill(2) on the process group of a child we spawned; no memory is touched.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    }
}

/// `$CARGO_TARGET_DIR/test-output/<test>` (default `target/` of the workspace), created: where
/// a test leaves screenshots and the like for a person to look at.
pub fn output_dir(test: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lies inside the workspace");
    // Cargo reads a relative CARGO_TARGET_DIR against where it ran: the root, as a rule.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"));
    let dir = target.join("test-output").join(test);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A port nothing listens on now (the OS picks it; another process may take it meanwhile, which
/// chromedriver then reports).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("bind a free port: {e}"))
        .port()
}

/// Waits until chromedriver accepts connections on `port`; panics if it exits or is too slow.
async fn wait_listening(driver: &mut ChildGuard, port: u16) {
    let deadline = Instant::now() + DRIVER_START;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Some(status) = driver.try_wait() {
            panic!("chromedriver exited before listening on port {port}: {status}");
        }
        if Instant::now() >= deadline {
            panic!("chromedriver not listening on port {port} after {DRIVER_START:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
