//! Alert webhooks: Slack-compatible messages about batches and breakers. Any replica of
//! `serve` may deliver an alert; the one that claims it in PostgreSQL does, and retries with
//! backoff while the webhook fails.

use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tally::store::alerts::AlertDelivery;
use tally::store::progress::{Event, EventKind};
use tally::{Store, StoreError};

/// A webhook that has not answered by then (or by the end of the delivery's lease, if
/// shorter) counts as failed (and is retried).
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay of a failed delivery; doubles per attempt.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(300);
/// Longest Retry-After honoured: a webhook asking for more is retried after this (an
/// unbounded value would overflow the next attempt's time in PostgreSQL).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Attempts before a delivery is given up (about eight hours at the longest delay).
pub const DEFAULT_MAX_ATTEMPTS: i32 = 100;
/// Deliveries claimed at once.
const CLAIM_SIZE: i64 = 16;
/// Claims per pass, so that a long backlog does not hold up the next observation.
pub const CLAIMS_PER_PASS: usize = 8;

/// A webhook URL, with the key that names it in PostgreSQL.
#[derive(Debug, Clone)]
pub struct Webhook {
    url: reqwest::Url,
    /// sha256 of the URL, hex: URLs carry secrets and never reach the database or the logs.
    pub key: String,
}

impl Webhook {
    /// Scheme, host and port only: a webhook's path or query may be its password.
    pub fn shown(&self) -> String {
        let host = self.url.host_str().unwrap_or("?");
        match self.url.port() {
            Some(port) => format!("{}://{host}:{port}/…", self.url.scheme()),
            None => format!("{}://{host}/…", self.url.scheme()),
        }
    }
}

/// Parses `--alert-webhook` values: absolute http or https URLs.
pub fn parse_webhooks(urls: &[String]) -> Result<Vec<Webhook>, Vec<String>> {
    let mut hooks = Vec::new();
    let mut problems = Vec::new();
    for (i, raw) in urls.iter().enumerate() {
        let n = i + 1;
        match reqwest::Url::parse(raw.trim()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
                let key = Sha256::digest(url.as_str().as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                if !hooks.iter().any(|h: &Webhook| h.key == key) {
                    hooks.push(Webhook { url, key });
                }
            }
            Ok(url) => problems.push(format!(
                "--alert-webhook #{n}: expected an http:// or https:// URL with a host, got scheme \"{}\"",
                url.scheme()
            )),
            Err(e) => problems.push(format!("--alert-webhook #{n} is not a URL: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(hooks)
    } else {
        Err(problems)
    }
}

/// The webhook body: `text` for Slack and people, plus structured fields for programs.
pub fn body(event: &Event) -> String {
    let text = message(event);
    let mut body = serde_json::json!({
        "text": text,
        "event": event.kind.as_str(),
        "key": event.key,
        "queue": event.queue,
    });
    if let Some(b) = &event.batch {
        body["batch"] = b.batch.clone().into();
        body["state"] = b.state().into();
        body["total"] = b.total.into();
        body["counts"] = serde_json::json!({
            "pending": b.counts.pending,
            "running": b.counts.running,
            "complete": b.counts.complete,
            "failed": b.counts.failed,
            "cancelled": b.counts.cancelled,
        });
        if let Some(reason) = &b.paused_reason {
            body["paused_reason"] = reason.clone().into();
        }
    }
    if let Some(detail) = &event.detail {
        body["detail"] = detail.clone().into();
    }
    body.to_string()
}

fn message(event: &Event) -> String {
    let q = &event.queue;
    let Some(b) = &event.batch else {
        let detail = event.detail.as_deref().unwrap_or("open");
        return format!(
            "Circuit breaker of queue {q} opened ({detail}): workers claim nothing from it \
             until a probe succeeds"
        );
    };
    let (name, c) = (&b.batch, &b.counts);
    match event.kind {
        EventKind::Finished => format!(
            "Batch {name} (queue {q}) finished: all {} records complete",
            b.total
        ),
        EventKind::FinishedWithFailures => format!(
            "Batch {name} (queue {q}) finished with failures: {} complete, {} failed of {}; \
             see `coordinator failed {name}`",
            c.complete, c.failed, b.total
        ),
        EventKind::FailureLimit => format!(
            "Batch {name} (queue {q}) paused: {}; fix the cause, then `coordinator resume {name}`",
            b.paused_reason.as_deref().unwrap_or("too many failures")
        ),
        EventKind::Stalled => format!(
            "Batch {name} (queue {q}) stalled: {}; {} pending, {} running, {} of {} done",
            event.detail.as_deref().unwrap_or("no progress"),
            c.pending,
            c.running,
            c.done(),
            b.total
        ),
        EventKind::BreakerOpen => format!("Circuit breaker of queue {q} opened"),
    }
}

/// Why one delivery attempt failed.
struct SendFailure {
    message: String,
    /// Retrying cannot help (the webhook refused the request itself).
    permanent: bool,
    /// The webhook asked for this delay (429 or 503 with Retry-After).
    retry_after: Option<Duration>,
}

/// Delivers the alerts due to this replica's webhooks.
pub struct Deliverer {
    store: Store,
    client: reqwest::Client,
    hooks: HashMap<String, Webhook>,
    keys: Vec<String>,
    /// How long a claimed delivery belongs to this replica.
    lease: Duration,
    /// Outcomes of delivery attempts, by `result`.
    outcomes: IntCounterVec,
}

impl Deliverer {
    /// A deliverer that claims deliveries for `lease`. A request never outlasts the lease,
    /// so that no other replica sends the alert while this one may still get it through.
    pub fn new(
        store: Store,
        hooks: Vec<Webhook>,
        lease: Duration,
        outcomes: IntCounterVec,
    ) -> Result<Deliverer, String> {
        let client = reqwest::Client::builder()
            .timeout(DEFAULT_WEBHOOK_TIMEOUT.min(lease))
            .user_agent(concat!("tally-coordinator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up the webhook client: {e}"))?;
        let keys = hooks.iter().map(|h| h.key.clone()).collect();
        let hooks = hooks.into_iter().map(|h| (h.key.clone(), h)).collect();
        Ok(Deliverer {
            store,
            client,
            hooks,
            keys,
            lease,
            outcomes,
        })
    }

    /// Sends what is due now; returns how many deliveries succeeded.
    pub async fn deliver_due(&self) -> Result<usize, StoreError> {
        if self.keys.is_empty() {
            return Ok(0);
        }
        let mut sent = 0;
        for _ in 0..CLAIMS_PER_PASS {
            let claimed = self
                .store
                .claim_alert_deliveries(&self.keys, CLAIM_SIZE, self.lease)
                .await?;
            if claimed.is_empty() {
                break;
            }
            let lease_end = Instant::now() + self.lease;
            let results =
                futures::future::join_all(claimed.iter().map(|d| self.deliver(d, lease_end))).await;
            // Every delivery's outcome counts, whatever happened to the others.
            let mut first_error = None;
            for (d, result) in claimed.iter().zip(results) {
                match result {
                    Ok(took) => sent += usize::from(took),
                    Err(e) => {
                        tracing::warn!("alert {}: {e}", d.key);
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            if claimed.len() < CLAIM_SIZE as usize {
                break;
            }
        }
        Ok(sent)
    }

    /// One attempt; records its outcome. True if the webhook took the alert.
    async fn deliver(&self, d: &AlertDelivery, lease_end: Instant) -> Result<bool, StoreError> {
        let Some(hook) = self.hooks.get(&d.webhook) else {
            return Ok(false);
        };
        match self.send(hook, d).await {
            Ok(()) => {
                // Sent: losing that now would send it again once the lease passes.
                let marked = until_lease_end(lease_end, || self.store.alert_sent(d)).await?;
                if !marked {
                    tracing::warn!(
                        "alert {} reached {} after its lease passed to another replica",
                        d.key,
                        hook.shown()
                    );
                }
                self.outcomes.with_label_values(&["sent"]).inc();
                Ok(true)
            }
            Err(f) => {
                let give_up = f.permanent || d.attempt >= DEFAULT_MAX_ATTEMPTS;
                let retry_in = next_retry(d.attempt, f.retry_after);
                if give_up {
                    tracing::error!(
                        "alert {} not delivered to {} after {} attempts, giving up: {}",
                        d.key,
                        hook.shown(),
                        d.attempt,
                        f.message
                    );
                } else {
                    tracing::warn!(
                        "alert {} to {}: {}; retrying in {retry_in:?}",
                        d.key,
                        hook.shown(),
                        f.message
                    );
                }
                until_lease_end(lease_end, || {
                    self.store.alert_failed(d, &f.message, retry_in, give_up)
                })
                .await?;
                let result = if give_up { "failed" } else { "retried" };
                self.outcomes.with_label_values(&[result]).inc();
                Ok(false)
            }
        }
    }

    async fn send(&self, hook: &Webhook, d: &AlertDelivery) -> Result<(), SendFailure> {
        let response = self
            .client
            .post(hook.url.clone())
            .header("content-type", "application/json")
            // The same key on every attempt, for receivers that deduplicate.
            .header("idempotency-key", d.key.as_str())
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| SendFailure {
                message: describe_reqwest_error(e),
                permanent: false,
                retry_after: None,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // 4xx other than timeouts and rate limits: the request itself is refused (bad URL,
        // revoked token), and sending it again changes nothing.
        let permanent = status.is_client_error() && !matches!(status.as_u16(), 408 | 425 | 429);
        Err(SendFailure {
            message: format!("webhook answered {status}"),
            permanent,
            retry_after,
        })
    }
}

/// Runs `op` again after a lost connection while this replica's lease of the delivery lasts;
/// after that its outcome is the next holder's to record.
async fn until_lease_end<T, F, Fut>(lease_end: Instant, mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = tally::store::RETRY_BACKOFF_MIN;
    loop {
        match op().await {
            Err(e) if e.is_transient() && Instant::now() + delay < lease_end => {
                tracing::debug!("recording an alert delivery: {e}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(tally::store::RETRY_BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

/// Delay before the next attempt after attempt `attempt` (1-based) failed.
fn retry_delay(attempt: i32) -> Duration {
    let exp = attempt.saturating_sub(1).clamp(0, 20) as u32;
    DEFAULT_RETRY_BASE
        .saturating_mul(1u32 << exp)
        .min(DEFAULT_RETRY_MAX)
}

/// Delay before the next attempt: the backoff, or the webhook's Retry-After if longer, never
/// more than [`MAX_RETRY_AFTER`].
fn next_retry(attempt: i32, retry_after: Option<Duration>) -> Duration {
    retry_delay(attempt)
        .max(retry_after.unwrap_or_default())
        .min(MAX_RETRY_AFTER.max(DEFAULT_RETRY_MAX))
}

/// The error and its causes, without the URL (which may hold a secret).
fn describe_reqwest_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_must_be_http_urls_and_are_named_without_their_secret() {
        let hooks = parse_webhooks(&[
            "https://hooks.example.com/services/T000/B000/SECRET".to_string(),
            "https://hooks.example.com/services/T000/B000/SECRET".to_string(),
        ])
        .unwrap();
        assert_eq!(hooks.len(), 1, "a repeated URL is one webhook");
        assert_eq!(hooks[0].shown(), "https://hooks.example.com/…");
        assert_eq!(hooks[0].key.len(), 64);
        let problems = parse_webhooks(&["ftp://x/y".into(), "not a url".into()]).unwrap_err();
        assert_eq!(problems.len(), 2);
        assert!(problems[0].contains("#1") && problems[1].contains("#2"));
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        assert_eq!(retry_delay(1), DEFAULT_RETRY_BASE);
        assert_eq!(retry_delay(2), DEFAULT_RETRY_BASE * 2);
        assert_eq!(retry_delay(90), DEFAULT_RETRY_MAX);
    }

    #[test]
    fn retry_after_is_honoured_up_to_a_cap() {
        let huge = Some(Duration::from_secs(u64::MAX));
        assert_eq!(next_retry(1, huge), MAX_RETRY_AFTER);
        assert_eq!(next_retry(90, huge), MAX_RETRY_AFTER);
        let ask = Some(Duration::from_secs(120));
        assert_eq!(next_retry(1, ask), Duration::from_secs(120));
        assert_eq!(
            next_retry(90, ask),
            DEFAULT_RETRY_MAX,
            "the backoff when longer"
        );
        assert_eq!(next_retry(1, None), DEFAULT_RETRY_BASE);
    }
}
