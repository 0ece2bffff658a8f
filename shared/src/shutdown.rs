//! Shutdown on SIGTERM/SIGINT, for the binaries' `main` to install: the library itself never
//! watches signals, it is handed a [`CancellationToken`].

use tokio_util::sync::CancellationToken;

/// Exit code after a second signal (128 + SIGINT, as a shell reports an interrupted program).
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Waits for signals: the first SIGTERM or SIGINT cancels `shutdown` (the program drains:
/// `draining` says what it still does, for the log), a second one exits the process at once
/// with [`EXIT_SECOND_SIGNAL`] (work still leased is then rescued as after a crash). Spawn it
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
    std::process::exit(EXIT_SECOND_SIGNAL);
}
