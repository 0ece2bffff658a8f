//! The trait a custom Rust worker implements.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a handler knows about the record it processes.
#[derive(Debug, Clone)]
pub struct RecordContext {
    /// The batch's name.
    pub batch: String,
    /// The record's id within its batch (from the input's id field).
    pub record_id: String,
    /// 1 on the first delivery; higher after retries or a rescued lease.
    pub attempt: i32,
    /// `<batch>/<record id>`, the same on every delivery of this record: pass it to external
    /// systems so that a redelivery after a crash is recognised there.
    pub idempotency_key: String,
    /// Fires when the worker stops hard; a handler doing long work should watch it.
    pub cancel: CancellationToken,
}

impl RecordContext {
    /// The idempotency key of a record: batch and record id, stable across deliveries.
    pub fn idempotency_key_for(batch: &str, record_id: &str) -> String {
        format!("{batch}/{record_id}")
    }
}

/// How a handler failed: the worker retries the first kind with backoff and fails the record
/// at once on the second.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    #[error("{message}")]
    Retryable {
        message: String,
        /// Ask for this delay instead of the batch's backoff (e.g. an HTTP Retry-After).
        retry_after: Option<Duration>,
    },
    #[error("{message}")]
    Permanent { message: String },
}

impl HandlerError {
    /// A transient failure, retried with the batch's backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure that no retry can fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError::Permanent {
            message: message.into(),
        }
    }
}

/// Processes one record. Called concurrently from many tasks; a record may be delivered again
/// after a crash or an expired lease, always with the same [`RecordContext::idempotency_key`].
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError>;
}
