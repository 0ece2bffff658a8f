//! Shutdown on SIGTERM/SIGINT, for the binaries' `main` to install: the library itself never
//! watches signals, it is handed a [`CancellationToken`].

use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Callbacks run just before a second signal exits the process.
static HARD_EXIT_HOOKS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

/// Exit code after a second signal (128 + SIGINT, as a shell reports an interrupted program).
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Waits for signals: the first SIGTERM or SIGINT cancels `shutdown` (the program drains:
/// `draining` says what it still does, for the log), a second one exits the process at once
/// with [`EXIT_SECOND_SIGNAL`] after the [`on_hard_exit`] hooks (work still leased is then
/// rescued as after a crash). Spawn it
/// from `main`: `tokio::spawn(tally::shutdown::on_signals(token.clone(), "…"))`.
pub async fn on_signals(shutdown: CancellationToken, draining: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("stopping: {draining} (signal again to stop now)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    run_hard_exit_hooks();
    std::process::exit(EXIT_SECOND_SIGNAL);
}

/// Registers `hook` to run just before a second signal exits the process: `exit` runs no
/// destructors, so whatever must not outlive the process (e.g. child processes) is cleaned up
/// here. Hooks run in registration order, on the signal task; they must be quick and must not
/// block on locks held across `.await`.
pub fn on_hard_exit(hook: fn()) {
    // A poisoned list is still a list: a panic elsewhere must not lose the cleanup.
    HARD_EXIT_HOOKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(hook);
}

fn run_hard_exit_hooks() {
    let hooks = HARD_EXIT_HOOKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    for hook in hooks {
        hook();
    }
}
