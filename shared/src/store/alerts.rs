//! Alert deliveries: claimed by one `serve` replica under a lease, fenced by the attempt
//! count, retried with backoff, marked sent.

use super::{sql, Store};
use crate::error::StoreError;
use std::time::Duration;

/// One alert to send to one webhook, claimed under a lease.
#[derive(Debug, Clone)]
pub struct AlertDelivery {
    pub alert_id: i64,
    /// sha256 of the webhook URL.
    pub webhook: String,
    /// Attempts so far, this one included: the fencing token of the claim.
    pub attempt: i32,
    /// The alert's unique key (kind, batch or queue, episode).
    pub key: String,
    /// The JSON body to post.
    pub body: String,
}

impl Store {
    /// The newest alert's id: a replica starting now delivers only alerts after it.
    pub async fn alert_watermark(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_one(sql!("alert_watermark"), &[])
            .await
            .map_err(|e| StoreError::db("reading alerts", e))?
            .get(0))
    }

    /// Claims up to `limit` due deliveries to `webhooks` for `lease`; rows claimed by another
    /// replica right now are skipped.
    pub async fn claim_alert_deliveries(
        &self,
        webhooks: &[String],
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<AlertDelivery>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                sql!("alert_claim"),
                &[&webhooks, &limit, &lease.as_secs_f64()],
            )
            .await
            .map_err(|e| StoreError::db("claiming alert deliveries", e))?;
        Ok(rows
            .iter()
            .map(|r| AlertDelivery {
                alert_id: r.get(0),
                webhook: r.get(1),
                attempt: r.get(2),
                key: r.get::<_, Option<String>>(3).unwrap_or_default(),
                body: r.get::<_, Option<String>>(4).unwrap_or_default(),
            })
            .collect())
    }

    /// Marks a delivery sent. False if the claim was lost (its lease passed and another
    /// replica claimed it again).
    pub async fn alert_sent(&self, d: &AlertDelivery) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(sql!("alert_sent"), &[&d.alert_id, &d.webhook, &d.attempt])
            .await
            .map_err(|e| StoreError::db("marking an alert sent", e))?;
        Ok(n == 1)
    }

    /// Records a failed attempt: due again after `retry_in`, or given up when `give_up`.
    pub async fn alert_failed(
        &self,
        d: &AlertDelivery,
        error: &str,
        retry_in: Duration,
        give_up: bool,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                sql!("alert_retry"),
                &[
                    &d.alert_id,
                    &d.webhook,
                    &d.attempt,
                    &retry_in.as_secs_f64(),
                    &error,
                    &give_up,
                ],
            )
            .await
            .map_err(|e| StoreError::db("recording a failed alert delivery", e))?;
        Ok(n == 1)
    }
}
