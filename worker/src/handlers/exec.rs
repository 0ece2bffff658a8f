//! `--handler exec`: one process per record, the payload as JSON on its standard input.
//!
//! Exit 0 completes the record, exit 75 (`EX_TEMPFAIL`) retries it, any other exit status or
//! a signal fails it, with the status and the end of stderr in its `last_error`. The process
//! runs in a process group of its own, which is killed as a whole on timeout, when the worker
//! stops hard (also on a second stop signal, through [`tally::shutdown::on_hard_exit`]), and
//! once the command has exited (so no stray child keeps running). The command itself is also
//! killed by the kernel when the worker dies (`PR_SET_PDEATHSIG`).

use super::{tail_excerpt, ConfigError, DEFAULT_ERROR_EXCERPT_BYTES};
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, Once};
use std::time::Duration;
use tally::{Handler, HandlerError, RecordContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one command may run before its process group is killed (the attempt is retryable).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The exit status that asks for a retry (sysexits `EX_TEMPFAIL`).
pub const EXIT_TEMPFAIL: i32 = 75;
/// How long to wait for stderr to close once the command's group is gone: a process that left
/// the group (`setsid`) may keep it open.
const STDERR_DRAIN: Duration = Duration::from_secs(1);
/// Variables that carry the worker's database credentials; removed from each command's
/// environment.
const CREDENTIAL_VARS: [&str; 4] = [
    "DATABASE_URL",
    "DATABASE_URL_FILE",
    "PGPASSWORD",
    "PGPASSFILE",
];

/// Process groups of the commands running now, for [`kill_live_groups`]: a second stop signal
/// exits the process without running destructors, so [`GroupKill`] alone cannot reach them.
static LIVE_GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
static HARD_EXIT_HOOK: Once = Once::new();

/// Settings of [`ExecHandler`].
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// The program: a path, or a name looked up in `PATH`.
    pub program: String,
    pub args: Vec<String>,
    /// Limit on one run ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// Bytes at the end of stderr kept in `last_error`.
    pub stderr_tail_bytes: usize,
}

impl ExecConfig {
    /// A command line split with shell-words rules (quotes, backslashes; no expansion), or run
    /// by `sh -c` when `shell` is set.
    pub fn from_command_line(command: &str, shell: bool) -> Result<ExecConfig, ConfigError> {
        if command.trim().is_empty() {
            return Err(ConfigError(vec!["--command is empty".into()]));
        }
        let (program, args) = if shell {
            (
                "sh".to_string(),
                vec!["-c".to_string(), command.to_string()],
            )
        } else {
            let mut words = shell_words::split(command)
                .map_err(|e| ConfigError(vec![format!("--command {command:?}: {e}")]))?
                .into_iter();
            let Some(program) = words.next() else {
                return Err(ConfigError(vec!["--command is empty".into()]));
            };
            (program, words.collect())
        };
        Ok(ExecConfig {
            program,
            args,
            timeout: DEFAULT_TIMEOUT,
            stderr_tail_bytes: DEFAULT_ERROR_EXCERPT_BYTES,
        })
    }
}

/// Runs [`ExecConfig::program`] once per record. Environment: `TALLY_BATCH`,
/// `TALLY_RECORD_ID`, `TALLY_ATTEMPT`, `TALLY_IDEMPOTENCY_KEY`, beside the worker's own.
/// Standard output is discarded.
pub struct ExecHandler {
    config: ExecConfig,
}

impl ExecHandler {
    /// Checks the config (every problem at once): a program that can be found and run, and a
    /// timeout above zero.
    pub fn new(config: ExecConfig) -> Result<ExecHandler, ConfigError> {
        let mut problems = Vec::new();
        if config.program.is_empty() {
            problems.push("--command is empty".to_string());
        } else if !is_runnable(&config.program) {
            problems.push(format!(
                "--command: program {:?} is not an executable file{}",
                config.program,
                if config.program.contains('/') {
                    ""
                } else {
                    " in PATH"
                }
            ));
        }
        if config.timeout.is_zero() {
            problems.push("--timeout must be above zero".to_string());
        }
        if problems.is_empty() {
            HARD_EXIT_HOOK.call_once(|| tally::shutdown::on_hard_exit(kill_live_groups));
            Ok(ExecHandler { config })
        } else {
            Err(ConfigError(problems))
        }
    }

    async fn run(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        let input = serde_json::to_vec(payload)
            .map_err(|e| HandlerError::permanent(format!("cannot encode the payload: {e}")))?;
        let mut command = tokio::process::Command::new(&self.config.program);
        // The worker's own database credentials are not the command's business.
        for name in CREDENTIAL_VARS {
            command.env_remove(name);
        }
        let worker_pid = std::process::id() as libc::pid_t;
        // SAFETY: runs in the forked child before exec; prctl and getppid are
        // async-signal-safe and touch no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                // The kernel kills the command when the worker dies, even by SIGKILL. (It
                // watches the spawning thread: tokio's runtime threads live as long as the
                // worker.)
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The worker died before prctl took effect: do not run orphaned.
                if libc::getppid() != worker_pid {
                    return Err(std::io::Error::other("the worker exited"));
                }
                Ok(())
            });
        }
        let mut child = command
            .args(&self.config.args)
            .env("TALLY_BATCH", &ctx.batch)
            .env("TALLY_RECORD_ID", &ctx.record_id)
            .env("TALLY_ATTEMPT", ctx.attempt.to_string())
            .env("TALLY_IDEMPOTENCY_KEY", &ctx.idempotency_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own group, so that a timeout kills the command's children too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| spawn_error(&self.config.program, e))?;
        let Some(pid) = child.id() else {
            return Err(HandlerError::retryable(
                "the command exited before it was seen",
            ));
        };
        // Dropped when this future is (worker stopping hard) as well as on return.
        let group = GroupKill::new(pid as i32);
        let stderr = child.stderr.take();
        let stderr_tail = tokio::spawn(read_tail(stderr, self.config.stderr_tail_bytes));
        let stdin = child.stdin.take();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A command that ignores its input closes the pipe early: not an error.
                let _ = stdin.write_all(&input).await;
            }
        };
        let waited = async {
            let wait = child.wait();
            tokio::pin!(wait);
            tokio::select! {
                // Exited: the input is not waited for (a background child may hold the pipe
                // without reading it); the writer is dropped with this block.
                status = &mut wait => return status,
                () = feed => {}
            }
            wait.await
        };
        let ended = tokio::select! {
            status = waited => Ended::Exited(status),
            _ = tokio::time::sleep(self.config.timeout) => Ended::TimedOut,
            _ = ctx.cancel.cancelled() => Ended::Cancelled,
        };
        drop(group);
        if !matches!(ended, Ended::Exited(_)) {
            let _ = child.wait().await;
        }
        let mut stderr_tail = stderr_tail;
        let tail = match tokio::time::timeout(STDERR_DRAIN, &mut stderr_tail).await {
            Ok(Ok(tail)) => tail,
            Ok(Err(_)) => String::new(),
            Err(_) => {
                // Someone outside the group still holds stderr: stop reading it.
                stderr_tail.abort();
                String::new()
            }
        };
        match ended {
            Ended::Exited(Ok(status)) => classify(status, &tail),
            Ended::Exited(Err(e)) => Err(HandlerError::retryable(format!(
                "cannot wait for the command: {e}"
            ))),
            Ended::TimedOut => Err(HandlerError::retryable(with_stderr(
                format!(
                    "command timed out after {}; its process group was killed",
                    humantime::format_duration(self.config.timeout)
                ),
                &tail,
            ))),
            Ended::Cancelled => Err(HandlerError::retryable(
                "worker stopped while the command ran; its process group was killed",
            )),
        }
    }
}

enum Ended {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

/// SIGKILLs a process group when dropped; listed in [`LIVE_GROUPS`] meanwhile.
struct GroupKill(i32);

impl GroupKill {
    fn new(group: i32) -> GroupKill {
        live_groups().insert(group);
        GroupKill(group)
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        kill_group(self.0);
        live_groups().remove(&self.0);
    }
}

fn live_groups() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    // A poisoned set is still right: inserts and removes cannot be left half done.
    LIVE_GROUPS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kill_group(group: i32) {
    // SAFETY: kill(2) has no memory effects. A negative pid names a group this handler
    // created; its id stays taken while the leader is unreaped or any member lives, and is
    // otherwise reused only after the pid counter wraps. ESRCH (all gone) is fine.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

/// SIGKILLs the process group of every command still running; run just before a second stop
/// signal exits the worker.
pub fn kill_live_groups() {
    for group in live_groups().iter() {
        kill_group(*group);
    }
}

/// The outcome of an exit status: 0 completes, [`EXIT_TEMPFAIL`] retries, anything else
/// (another code, a signal) fails; `stderr_tail` goes into the message.
pub fn classify(status: ExitStatus, stderr_tail: &str) -> Result<(), HandlerError> {
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(EXIT_TEMPFAIL), _) => Err(HandlerError::retryable(with_stderr(
            format!("command exited with status {EXIT_TEMPFAIL} (temporary failure)"),
            stderr_tail,
        ))),
        (Some(code), _) => Err(HandlerError::permanent(with_stderr(
            format!("command exited with status {code}"),
            stderr_tail,
        ))),
        (None, Some(signal)) => Err(HandlerError::permanent(with_stderr(
            format!("command was killed by signal {signal}"),
            stderr_tail,
        ))),
        (None, None) => Err(HandlerError::permanent(with_stderr(
            format!("command ended with {status}"),
            stderr_tail,
        ))),
    }
}

fn with_stderr(message: String, tail: &str) -> String {
    if tail.is_empty() {
        message
    } else {
        format!("{message}; stderr: {tail}")
    }
}

/// Reads stderr to its end, keeping only the last `max` bytes (as text).
async fn read_tail(stderr: Option<tokio::process::ChildStderr>, max: usize) -> String {
    let Some(mut stderr) = stderr else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                // Keep a little more than needed, so the excerpt can start at a character.
                let limit = max + 4;
                if kept.len() > 2 * limit {
                    kept.drain(..kept.len() - limit);
                }
            }
        }
    }
    tail_excerpt(&kept, max)
}

/// Missing or not executable are permanent (retrying cannot help); anything else (too many
/// processes, out of memory) may pass.
fn spawn_error(program: &str, e: std::io::Error) -> HandlerError {
    use std::io::ErrorKind;
    let message = format!("cannot start {program:?}: {e}");
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::PermissionDenied => HandlerError::permanent(message),
        _ => HandlerError::retryable(message),
    }
}

/// An executable file at `program` (when it holds a `/`) or in a `PATH` directory.
fn is_runnable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        path.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| executable(&dir.join(program))))
        .unwrap_or(false)
}

#[async_trait::async_trait]
impl Handler for ExecHandler {
    fn name(&self) -> &'static str {
        "exec"
    }

    async fn handle(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        self.run(ctx, payload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_with_shell_words_rules() {
        let c = ExecConfig::from_command_line(r#"python3 -c 'print("a b")' "x y" z\ w"#, false)
            .unwrap();
        assert_eq!(c.program, "python3");
        assert_eq!(c.args, ["-c", r#"print("a b")"#, "x y", "z w"]);
        let c = ExecConfig::from_command_line("cat > out.json && echo ok", true).unwrap();
        assert_eq!(c.program, "sh");
        assert_eq!(c.args, ["-c", "cat > out.json && echo ok"]);
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for (command, expected) in [
            ("", "empty"),
            ("   ", "empty"),
            ("echo 'unclosed", "--command"),
        ] {
            let err = ExecConfig::from_command_line(command, false).unwrap_err();
            assert!(err.to_string().contains(expected), "{command:?}: {err}");
        }
        let mut config = ExecConfig::from_command_line("no-such-program-here x", false).unwrap();
        config.timeout = Duration::ZERO;
        let Err(ConfigError(problems)) = ExecHandler::new(config) else {
            panic!("accepted a missing program");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("not an executable file in PATH"));
        assert!(ExecHandler::new(ExecConfig::from_command_line("cat", false).unwrap()).is_ok());
        assert!(ExecHandler::new(ExecConfig::from_command_line("/bin/sh", false).unwrap()).is_ok());
        assert!(
            ExecHandler::new(ExecConfig::from_command_line("/etc/passwd", false).unwrap()).is_err()
        );
    }

    #[test]
    fn exit_statuses_are_classified() {
        let exited = |code: i32| ExitStatus::from_raw(code << 8);
        assert!(classify(exited(0), "").is_ok());
        assert!(matches!(
            classify(exited(75), "busy"),
            Err(HandlerError::Retryable { message, .. }) if message.ends_with("stderr: busy")
        ));
        assert!(matches!(
            classify(exited(1), "bad record"),
            Err(HandlerError::Permanent { message }) if message == "command exited with status 1; stderr: bad record"
        ));
        assert!(matches!(
            classify(ExitStatus::from_raw(libc::SIGSEGV), ""),
            Err(HandlerError::Permanent { message }) if message == format!("command was killed by signal {}", libc::SIGSEGV)
        ));
    }
}
