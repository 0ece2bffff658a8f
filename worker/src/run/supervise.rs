//! Every task the worker spawns is watched. When one it cannot do without dies (a panic, or a
//! loop that ends before it was told to), the worker reports unhealthy, stops renewing its
//! leases, stops its handlers and exits non-zero: its rows then expire and other workers
//! rescue them, instead of staying leased to a zombie for ever.

use super::state::Shared;
use futures::FutureExt;
use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What a watched task owes the worker.
pub(super) enum Duty {
    /// Runs until `stop` fires: ending sooner, or panicking, is fatal.
    UntilStopped(CancellationToken),
    /// Ends when its work is done; panicking is fatal.
    Finite,
    /// Helpful but not needed for correctness (the poll covers notifications, progress lines
    /// are only lines): a panic is logged and the worker carries on.
    Optional,
}

/// Faults a test injects (honoured in debug builds only) to check that the worker notices
/// its own tasks dying.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The completer panics when it first writes outcomes.
    CompleterPanics,
    /// A record's task panics after its handler returned, before its outcome is queued.
    RecordTaskPanics,
    /// The lease renewal loop returns after its first pass.
    RenewStops,
    /// The rescue loop panics on its first pass.
    RescuePanics,
}

impl Shared {
    /// Whether the test fault `fault` was injected.
    pub(super) fn faulty(&self, fault: Fault) -> bool {
        cfg!(debug_assertions) && self.fault == Some(fault)
    }

    /// A task the worker cannot do without died: report unhealthy at once, then stop
    /// claiming, renewing and handling. The first reason is the one returned by `run`.
    pub(super) fn fail(&self, task: &str, why: &str) {
        let reason = format!("its {task} task {why}");
        let first = match self.fatal_reason.lock() {
            Ok(mut r) if r.is_none() => {
                *r = Some(reason.clone());
                true
            }
            _ => false,
        };
        self.health.set_failed();
        if first {
            tracing::error!(
                task,
                "the worker failed: {reason}; stopping without renewing its leases, so that \
                 other workers rescue its rows once they expire"
            );
        }
        self.fatal.cancel();
        self.soft.cancel();
        self.hard.cancel();
    }

    /// Why the worker failed, if it did.
    pub(super) fn fatal_reason(&self) -> Option<String> {
        if !self.fatal.is_cancelled() {
            return None;
        }
        let reason = self.fatal_reason.lock().ok().and_then(|r| r.clone());
        Some(reason.unwrap_or_else(|| "one of its tasks failed".to_string()))
    }
}

/// Spawns `task` (in the current span) and watches it according to `duty`.
pub(super) fn spawn_watched<F>(
    shared: &Arc<Shared>,
    task: &'static str,
    duty: Duty,
    future: F,
) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let shared = shared.clone();
    let watched = async move {
        let why = match AssertUnwindSafe(future).catch_unwind().await {
            Err(panic) => format!("panicked: {}", panic_message(&*panic)),
            Ok(()) => match &duty {
                Duty::UntilStopped(stop) if !stop.is_cancelled() => {
                    "ended while the worker was running".to_string()
                }
                _ => return,
            },
        };
        match duty {
            Duty::Optional => {
                tracing::error!(
                    task,
                    "the worker's {task} task {why}; carrying on without it"
                )
            }
            _ => shared.fail(task, &why),
        }
    };
    tokio::spawn(watched.in_current_span())
}

/// The text of a panic's payload.
pub(super) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string payload")
}
