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
    /// is wasted: the worker stops hard (second signal, or the grace period ran out), or it
    /// learned that its lease on the record was lost (a renewal found the lease rescued by
    /// another worker, or the fence refused an outcome of the same claim). A handler doing
    /// long work should watch it (`tokio::select!` on [`CancellationToken::cancelled`]) and
    /// return; whatever it returns then is discarded.
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
        retry_after: Option<Duration>,
    },
    /// A failure no retry can fix (invalid data, HTTP 4xx): the record fails at once.
    #[error("{message}")]
    Permanent {
        /// What went wrong, for `last_error`.
        message: String,
    },
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
/// when it never will. A handler should not panic on bad data: a panic abandons the record
/// until its lease expires.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Does the work for one record; `payload` is the record as prepared (a JSON object).
    async fn handle(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError>;
}
