//! The trait a custom Rust worker implements, the context it gets with each record, and the
//! error that tells the worker whether to retry.
//!
//! A handler that calls an external service and classifies its failures:
//!
//! ```
//! use std::time::Duration;
//! use tally::{Handler, HandlerError, RecordContext};
//!
//! struct Charge;
//!
//! #[async_trait::async_trait]
//! impl Handler for Charge {
//!     async fn handle(
//!         &self,
//!         ctx: &RecordContext,
//!         payload: &serde_json::Value,
//!     ) -> Result<(), HandlerError> {
//!         let Some(amount) = payload.get("amount").and_then(|a| a.as_i64()) else {
//!             // No retry can add a missing field.
//!             return Err(HandlerError::permanent("record has no integer \"amount\""));
//!         };
//!         // Send ctx.idempotency_key along, so that the service can drop a redelivery.
//!         match charge(&ctx.idempotency_key, amount).await {
//!             Ok(()) => Ok(()),
//!             Err(503) => Err(HandlerError::retry_after("service unavailable", Duration::from_secs(30))),
//!             Err(status) if status >= 500 => Err(HandlerError::retryable(format!("HTTP {status}"))),
//!             Err(status) => Err(HandlerError::permanent(format!("rejected: HTTP {status}"))),
//!         }
//!     }
//! }
//! # async fn charge(_key: &str, _amount: i64) -> Result<(), u16> { Ok(()) }
//! ```

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a handler knows about the record it processes.
#[derive(Debug, Clone)]
pub struct RecordContext {
    /// The batch's name.
    pub batch: String,
    /// The record's id within its batch (from the input's id field).
    pub record_id: String,
    /// 1 on the first delivery; higher after retries or a rescued lease. This is the record's
    /// fencing token: only the outcome of the current attempt is recorded.
    pub attempt: i32,
    /// `<batch>/<record id>`, the same on every delivery of this record: pass it to external
    /// systems so that a redelivery after a crash is recognised there.
    pub idempotency_key: String,
    /// Fires when this record's outcome can no longer be recorded, so that further work on it
    /// is wasted: the grace period after a stop signal ran out, or the worker
    /// learned that its lease on the record was lost (a renewal found the lease rescued by
    /// another worker, or the fence refused an outcome of the same claim). A handler doing
    /// long work should watch it (`tokio::select!` on [`CancellationToken::cancelled`]) and
    /// return; whatever it returns then is discarded. A second stop signal does not fire it:
    /// the process exits at once, no handler code runs any more (the exec handler's commands
    /// are killed on the way out), and the leased records are rescued as after a crash.
    pub cancel: CancellationToken,
}

impl RecordContext {
    /// The idempotency key of a record: batch and record id, stable across deliveries.
    pub fn idempotency_key_for(batch: &str, record_id: &str) -> String {
        format!("{batch}/{record_id}")
    }
}

/// How a handler failed: the worker retries the first kind with backoff and fails the record
/// at once on the second. The message is stored as the record's `last_error` (shown by
/// `coordinator failed`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// A transient failure (timeout, connection refused, HTTP 429/503): the record goes back
    /// to `pending` while attempts remain, and fails once they are spent.
    #[error("{message}")]
    Retryable {
        /// What went wrong, for `last_error`.
        message: String,
        /// Ask for this delay instead of the batch's backoff (e.g. an HTTP Retry-After).
        /// Delays longer than [`MAX_RETRY_AFTER`] (24 h) are cut to it.
        retry_after: Option<Duration>,
    },
    /// A failure no retry can fix (invalid data, HTTP 4xx): the record fails at once.
    #[error("{message}")]
    Permanent {
        /// What went wrong, for `last_error`.
        message: String,
    },
}

/// The longest retry delay a handler can ask for: a longer [`HandlerError::Retryable`]
/// `retry_after` is cut to this, so that the row's `available_at` stays a valid timestamp.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest error message stored as a record's `last_error`, in bytes; longer ones are cut.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 8 * 1024;

/// A handler's (or panic's) message made storable as `last_error`: PostgreSQL text cannot hold
/// NUL, so each becomes U+FFFD, and the message is cut to [`MAX_ERROR_MESSAGE_BYTES`] on a
/// character boundary (with a marker saying so).
pub fn storable_message(message: &str) -> String {
    const CUT: &str = " [...]";
    let mut clean = if message.contains('\0') {
        message.replace('\0', "\u{FFFD}")
    } else {
        message.to_string()
    };
    if clean.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut end = MAX_ERROR_MESSAGE_BYTES - CUT.len();
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
        clean.push_str(CUT);
    }
    clean
}

impl HandlerError {
    /// A transient failure, retried with the batch's backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A transient failure, retried after `delay` rather than the batch's backoff (e.g. the
    /// server's `Retry-After`).
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        HandlerError::Retryable {
            message: message.into(),
            retry_after: Some(delay),
        }
    }

    /// A failure that no retry can fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError::Permanent {
            message: message.into(),
        }
    }

    /// Whether the worker will try the record again (attempts permitting).
    pub fn is_retryable(&self) -> bool {
        matches!(self, HandlerError::Retryable { .. })
    }
}

/// Processes one record. Called concurrently from many tasks (up to the worker's
/// concurrency); a record may be delivered again after a crash or an expired lease, always
/// with the same [`RecordContext::idempotency_key`].
///
/// Return `Ok(())` when the record's work is done, [`HandlerError::retryable`] (or
/// [`HandlerError::retry_after`]) when it may succeed later, and [`HandlerError::permanent`]
/// when it never will. A handler should not panic on bad data: a panic is recorded as a
/// retryable failure of the attempt (its message in `last_error`), so the record is tried again
/// until its attempts run out.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Does the work for one record; `payload` is the record as prepared (a JSON object).
    async fn handle(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError>;

    /// What kind of handler this is, as the dashboard's workers page shows it.
    fn name(&self) -> &'static str {
        "custom"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_messages_hold_no_nul_and_stay_within_the_cap() {
        assert_eq!(storable_message("a\0b"), "a\u{FFFD}b");
        assert_eq!(storable_message("short"), "short");
        // Multi-byte characters across the cut: it falls on a character boundary.
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let cut = storable_message(&long);
        assert!(cut.len() <= MAX_ERROR_MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.ends_with(" [...]"));
        assert!(cut.starts_with("éé"));
    }
}
