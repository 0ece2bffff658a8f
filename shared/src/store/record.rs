//! Records: claim under a lease, record outcomes behind the fence, renew, release, rescue.

use super::{query_cached, sql, Store};
use crate::error::StoreError;
use crate::model::{
    BreakerGate, BreakerPolicy, ClaimableBatch, ClaimedRecord, Outcome, RescueSummary,
};
use std::time::Duration;

impl Store {
    /// Ready batches of `queue` that still have pending rows, oldest first.
    pub async fn claimable_batches(&self, queue: &str) -> Result<Vec<ClaimableBatch>, StoreError> {
        let client = self.conn().await?;
        let rows = query_cached(
            &*client,
            self.pgbouncer,
            sql!("batch_ready_in_queue"),
            &[&queue],
        )
        .await
        .map_err(|e| StoreError::db("finding work", e))?;
        client.done().await?;
        Ok(rows
            .iter()
            .map(|r| ClaimableBatch {
                id: r.get(0),
                name: r.get(1),
                max_attempts: r.get(2),
                backoff_base: Duration::from_millis(r.get::<_, i64>(3).max(0) as u64),
                backoff_max: Duration::from_millis(r.get::<_, i64>(4).max(0) as u64),
            })
            .collect())
    }

    /// Asks the queue's circuit breaker whether `owner` may claim now. A prober silent for
    /// longer than `probe_timeout` is replaced.
    pub async fn breaker_gate(
        &self,
        queue: &str,
        owner: &str,
        probe_timeout: Duration,
    ) -> Result<BreakerGate, StoreError> {
        let client = self.conn().await?;
        let timeout_ms = probe_timeout.as_millis() as i64;
        let state: String = client
            .query_one(sql!("breaker_gate"), &[&queue, &owner, &timeout_ms])
            .await
            .map_err(|e| StoreError::db("asking the circuit breaker", e))?
            .get(0);
        client.done().await?;
        Ok(match state.as_str() {
            "closed" => BreakerGate::Closed,
            "probe" => BreakerGate::Probe,
            _ => BreakerGate::Open,
        })
    }

    /// Tells the queue's breaker what `owner` saw; returns its state afterwards.
    pub async fn breaker_report(
        &self,
        queue: &str,
        owner: &str,
        successes: i64,
        retryable_failures: i64,
        policy: &BreakerPolicy,
    ) -> Result<String, StoreError> {
        let client = self.conn().await?;
        let cooldown_ms = policy.cooldown.as_millis() as i64;
        let max_ms = policy.max_cooldown.as_millis() as i64;
        let state: String = client
            .query_one(
                sql!("breaker_report"),
                &[
                    &queue,
                    &owner,
                    &successes,
                    &retryable_failures,
                    &policy.threshold,
                    &cooldown_ms,
                    &max_ms,
                ],
            )
            .await
            .map_err(|e| StoreError::db("reporting to the circuit breaker", e))?
            .get(0);
        client.done().await?;
        Ok(state)
    }

    /// Notes the first claim of a batch (the start of its rate and ETA).
    pub async fn mark_started(&self, batch_id: i64) -> Result<(), StoreError> {
        let client = self.conn().await?;
        client
            .execute(sql!("batch_mark_started"), &[&batch_id])
            .await
            .map_err(|e| StoreError::db("marking the batch started", e))?;
        client.done().await
    }

    /// Claims up to `limit` pending rows of a batch for `owner`, leased for `lease`.
    pub async fn claim(
        &self,
        batch_id: i64,
        limit: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<Vec<ClaimedRecord>, StoreError> {
        let client = self.conn().await?;
        let ctx = "claiming records";
        let lease_s = lease.as_secs_f64();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&batch_id, &limit, &owner, &lease_s];
        let rows = query_cached(&*client, self.pgbouncer, sql!("record_claim"), &params)
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        client.done().await?;
        Ok(rows
            .iter()
            .map(|r| ClaimedRecord {
                id: r.get(0),
                batch_id,
                record_id: r.get(1),
                attempt: r.get(2),
                payload: r.get(3),
                lease_id: r.get(4),
            })
            .collect())
    }

    /// Writes outcomes in one statement, each only while `owner` still holds that row under
    /// the outcome's lease. Returns the ids written; the others' leases were lost and must not
    /// be retried.
    pub async fn finish(&self, outcomes: &[Outcome], owner: &str) -> Result<Vec<i64>, StoreError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.conn().await?;
        let written = finish_on(&*client, self.pgbouncer, outcomes, owner).await?;
        client.done().await?;
        Ok(written)
    }

    /// Extends `owner`'s leases; returns the ids still in force (the others were rescued).
    pub async fn renew_leases(
        &self,
        lease_ids: &[i64],
        owner: &str,
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        let client = self.conn().await?;
        let lease_s = lease.as_secs_f64();
        let rows = query_cached(
            &*client,
            self.pgbouncer,
            sql!("lease_renew"),
            &[&lease_ids, &owner, &lease_s],
        )
        .await
        .map_err(|e| StoreError::db("renewing leases", e))?;
        client.done().await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Announces, before the handlers start, how many rows of each lease (by `record_ids`
    /// order) were handed to a handler: `(lease id, started)`. Renews them too. Returns the
    /// leases still held; the rows of the others were rescued and must not start.
    pub async fn start_leases(
        &self,
        started: &[(i64, i32)],
        owner: &str,
        lease: Duration,
    ) -> Result<Vec<i64>, StoreError> {
        if started.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, counts): (Vec<i64>, Vec<i32>) = started.iter().copied().unzip();
        let client = self.conn().await?;
        let lease_s = lease.as_secs_f64();
        let rows = query_cached(
            &*client,
            self.pgbouncer,
            sql!("lease_start"),
            &[&ids, &counts, &owner, &lease_s],
        )
        .await
        .map_err(|e| StoreError::db("announcing handler starts", e))?;
        client.done().await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Removes leases whose rows are all written back.
    pub async fn drop_leases(&self, lease_ids: &[i64], owner: &str) -> Result<(), StoreError> {
        if lease_ids.is_empty() {
            return Ok(());
        }
        let client = self.conn().await?;
        client
            .execute(sql!("lease_drop"), &[&lease_ids, &owner])
            .await
            .map_err(|e| StoreError::db("dropping finished leases", e))?;
        client.done().await
    }

    /// Gives back rows (by id and lease id) that were claimed but never started, without
    /// counting an attempt.
    pub async fn release(&self, held: &[(i64, i64)], owner: &str) -> Result<u64, StoreError> {
        if held.is_empty() {
            return Ok(0);
        }
        let (ids, leases): (Vec<i64>, Vec<i64>) = held.iter().copied().unzip();
        let client = self.conn().await?;
        let rows = query_cached(
            &*client,
            self.pgbouncer,
            sql!("record_release"),
            &[&ids, &leases, &owner],
        )
        .await
        .map_err(|e| StoreError::db("releasing records", e))?;
        client.done().await?;
        Ok(rows.len() as u64)
    }

    /// One bounded pass over up to `limit` expired leases (claims); safe to run from every
    /// worker at once. Wakes the queues that got rows back.
    pub async fn rescue_expired(&self, limit: i64) -> Result<RescueSummary, StoreError> {
        let client = self.conn().await?;
        let ctx = "rescuing expired leases";
        let rows = query_cached(&*client, self.pgbouncer, sql!("record_rescue"), &[&limit])
            .await
            .map_err(|e| StoreError::db(ctx, e))?;
        let mut summary = RescueSummary::default();
        let mut queues: Vec<String> = Vec::new();
        for row in &rows {
            let state: &str = row.get(1);
            let batch_id: i64 = row.get(2);
            let ran: bool = row.get(3);
            if state == "failed" && !summary.batches_with_failures.contains(&batch_id) {
                summary.batches_with_failures.push(batch_id);
            }
            if state == "pending" {
                if ran {
                    summary.to_pending += 1;
                } else {
                    summary.unstarted += 1;
                }
                let queue: String = row.get(0);
                if !queues.contains(&queue) {
                    queues.push(queue);
                }
            } else {
                summary.to_failed += 1;
            }
        }
        for queue in queues {
            client
                .query_one(sql!("notify_work"), &[&queue])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
        }
        client.done().await?;
        Ok(summary)
    }
}

/// The fenced outcome write, on a given connection or transaction.
pub(super) async fn finish_on<C: super::TypedQuery>(
    client: &C,
    pgbouncer: bool,
    outcomes: &[Outcome],
    owner: &str,
) -> Result<Vec<i64>, StoreError> {
    let ctx = "recording outcomes";
    let mut ids = Vec::with_capacity(outcomes.len());
    let mut leases = Vec::with_capacity(outcomes.len());
    let mut states = Vec::with_capacity(outcomes.len());
    let mut errors = Vec::with_capacity(outcomes.len());
    let mut delays = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        ids.push(o.id);
        leases.push(o.lease_id);
        states.push(o.state.as_str());
        errors.push(o.error.as_deref());
        delays.push(o.retry_in.as_secs_f64());
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&ids, &leases, &states, &errors, &delays, &owner];
    let rows = query_cached(client, pgbouncer, sql!("record_finish"), &params)
        .await
        .map_err(|e| StoreError::db(ctx, e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
