//! A dedicated session that LISTENs for work and wakes the claim loop; reconnects with backoff.
//! Behind PgBouncer in transaction pooling mode there is no session to LISTEN on: the claim
//! loop then polls alone.

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Runs until `stop` fires. Every notification for `queue`, and every (re)connection (work may
/// have appeared while it was away), calls `wake.notify_one()`.
pub async fn listen(
    store: tally::Store,
    queue: String,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    if store.pgbouncer() {
        // A pooled server connection changes hands after every transaction, so it would
        // receive other clients' notifications, or none.
        tracing::info!("behind PgBouncer: no LISTEN, polling for work");
        return;
    }
    let mut delay = RECONNECT_MIN;
    while !stop.is_cancelled() {
        match session(&store, &queue, &wake, &stop).await {
            Ok(()) => delay = RECONNECT_MIN,
            Err(e) => {
                tracing::warn!("notification session lost ({e}); polling until it is back");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

async fn session(
    store: &tally::Store,
    queue: &str,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = store.connect_dedicated().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(Some(n.payload().to_string())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("notification connection: {e}");
                    break;
                }
            }
        }
        let _ = tx.send(None);
    });
    client.batch_execute(tally::store::LISTEN_WORK).await?;
    wake.notify_one();
    let result = loop {
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            message = rx.recv() => match message {
                Some(Some(payload)) if payload == queue => wake.notify_one(),
                Some(Some(_)) => {}
                // The connection ended: report it so the caller reconnects.
                _ => break client.simple_query("select 1").await.map(|_| ()),
            }
        }
    };
    driver.abort();
    result
}
