//! A custom worker: a Rust handler that "calls an external system" and says which failures are
//! worth retrying. Run it against a prepared batch:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//!   cargo run -p tally-worker --example custom_handler -- my-queue
//! ```

use std::sync::Arc;
use std::time::Duration;
use tally::{Handler, HandlerError, RecordContext, Store};
use tally_worker::{Processor, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Pretends to send an e-mail for each record with an `email` field.
struct SendEmail;

#[async_trait::async_trait]
impl Handler for SendEmail {
    async fn handle(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        let Some(to) = payload.get("email").and_then(|v| v.as_str()) else {
            // No retry can add a missing field.
            return Err(HandlerError::permanent("record has no \"email\" field"));
        };
        if to.ends_with(".invalid") {
            // A real client would map e.g. HTTP 429/503 here, with the server's Retry-After.
            return Err(HandlerError::Retryable {
                message: format!("mail server unavailable for {to}"),
                retry_after: Some(Duration::from_secs(30)),
            });
        }
        // The key is the same on every delivery: the mail service can drop duplicates.
        println!("send to {to} (idempotency key {})", ctx.idempotency_key);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let queue = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "emails".to_string());
    let url = std::env::var("DATABASE_URL")?;
    let store = Store::connect(&url, 8).await?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    let summary = Worker::new(
        store,
        WorkerConfig::new(&queue),
        Processor::Handler(Arc::new(SendEmail)),
    )
    .run(shutdown)
    .await?;
    println!("{summary:?}");
    Ok(())
}
