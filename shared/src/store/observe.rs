//! The observation pass of `coordinator serve`: changes of batch progress become alerts, once
//! across replicas, and every alert raised lately gets a delivery to this replica's webhooks.

use super::progress::{
    AlertTargets, BatchProgress, Event, EventKind, ObserveSettings, StateCounts,
};
use super::{sql, Store};
use crate::error::StoreError;

/// A batch's row in `tally.batch_progress`, as last saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tracked {
    done: i64,
    /// Failed as last seen: with `done`, tells a batch that finished anew (retry-failed, and
    /// every retried record done before the next pass) from one that stayed finished.
    failed: i64,
    finished: bool,
    finish_episode: i32,
    stalled: bool,
    stall_episode: i32,
    limit_paused: bool,
    limit_episode: i32,
}

/// The tracked row after this observation, whether the progress clock restarts, and the
/// events raised. `quiet_long`: the batch's own last change is older than the finished
/// retention, so a batch first seen already finished finished long ago and is taken as seen
/// without an alert (a first `serve` on a database used for months announces nothing old).
/// Pure, so that the rules can be read and tested on their own.
#[allow(clippy::too_many_arguments)]
fn step(
    seen: bool,
    quiet_long: bool,
    old: Tracked,
    stored: &str,
    paused_reason: Option<&str>,
    counts: &StateCounts,
    unchanged_s: f64,
    stall_after_s: f64,
) -> (Tracked, bool, Vec<EventKind>) {
    let mut new = old;
    let mut events = Vec::new();
    new.done = counts.done();
    new.failed = counts.failed;
    // The progress clock runs only while the batch is claimable and has work: a paused batch
    // is not stalled, and one resumed after a long pause gets a full stall time again.
    let mut restart_clock = !seen || new.done != old.done || stored != "ready";
    let finished = stored != "preparing" && counts.is_settled();
    // Finished with other counts than when last seen finished: it was given work again
    // (retry-failed) and finished anew between two passes.
    let finished_anew = old.finished && (new.done != old.done || new.failed != old.failed);
    if finished && !seen && quiet_long {
        new.finished = true;
    } else if finished && (!old.finished || finished_anew) {
        new.finished = true;
        new.finish_episode += 1;
        if stored != "cancelled" {
            events.push(if counts.failed > 0 {
                EventKind::FinishedWithFailures
            } else {
                EventKind::Finished
            });
        }
    } else if !finished && old.finished {
        new.finished = false;
        restart_clock = true;
    }
    let by_limit =
        stored == "paused" && paused_reason.is_some_and(|r| r.starts_with("too many failures"));
    if by_limit && !old.limit_paused {
        new.limit_episode += 1;
        events.push(EventKind::FailureLimit);
    }
    new.limit_paused = by_limit;
    if restart_clock || finished {
        new.stalled = false;
    } else if !old.stalled && unchanged_s >= stall_after_s {
        new.stalled = true;
        new.stall_episode += 1;
        events.push(EventKind::Stalled);
    }
    (new, restart_clock, events)
}

impl Store {
    /// One observation pass: compares every watched batch and breaker with what was last seen,
    /// saves the new state and raises an alert per event (with `body` as its webhook JSON),
    /// giving `targets`' webhooks a delivery of each, all in one transaction. Only one replica
    /// observes at a time: returns `None` when another one is doing it right now.
    pub async fn observe(
        &self,
        settings: ObserveSettings,
        targets: &AlertTargets,
        body: &(dyn Fn(&Event) -> String + Sync),
    ) -> Result<Option<Vec<Event>>, StoreError> {
        let mut client = self.client().await?;
        let ctx = "observing batch progress";
        let db = |e| StoreError::db(ctx, e);
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute(sql!("serve_observe_timeouts"))
            .await
            .map_err(db)?;
        let locked: bool = tx
            .query_one(sql!("serve_observe_lock"), &[])
            .await
            .map_err(db)?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let mut events = Vec::new();
        let retention = settings.finished_retention.as_secs_f64();
        let stall_after_s = settings.stall_after.as_secs_f64();
        for r in tx
            .query(sql!("serve_observe_batches"), &[&retention])
            .await
            .map_err(db)?
        {
            let id: i64 = r.get(0);
            let counts = StateCounts {
                pending: r.get(6),
                running: r.get(7),
                complete: r.get(8),
                failed: r.get(9),
                cancelled: r.get(10),
            };
            let seen: bool = r.get(11);
            let old = Tracked {
                done: r.get(12),
                finished: r.get(13),
                finish_episode: r.get(14),
                stalled: r.get(15),
                stall_episode: r.get(16),
                limit_paused: r.get(17),
                limit_episode: r.get(18),
                failed: r.get(20),
            };
            let stored: String = r.get(3);
            let paused_reason: Option<String> = r.get(4);
            let unchanged_s: f64 = r.get(19);
            let (new, restart_clock, kinds) = step(
                seen,
                r.get(21),
                old,
                &stored,
                paused_reason.as_deref(),
                &counts,
                unchanged_s,
                stall_after_s,
            );
            if seen && new == old && !restart_clock {
                continue;
            }
            tx.execute(
                sql!("serve_progress_save"),
                &[
                    &id,
                    &new.done,
                    &restart_clock,
                    &new.finished,
                    &new.finish_episode,
                    &new.stalled,
                    &new.stall_episode,
                    &new.limit_paused,
                    &new.limit_episode,
                    &new.failed,
                ],
            )
            .await
            .map_err(db)?;
            let batch = BatchProgress {
                batch: r.get(1),
                queue: r.get(2),
                stored_state: stored,
                paused_reason,
                total: r.get(5),
                counts,
                started: counts.done() + counts.running > 0,
                oldest_pending_age_s: None,
            };
            for kind in kinds {
                let episode = match kind {
                    EventKind::Stalled => new.stall_episode,
                    EventKind::FailureLimit => new.limit_episode,
                    _ => new.finish_episode,
                };
                let key = match kind {
                    EventKind::FinishedWithFailures => format!("finished:{id}:{episode}"),
                    _ => format!("{}:{id}:{episode}", kind.as_str()),
                };
                let detail = (kind == EventKind::Stalled).then(|| {
                    format!(
                        "no record finished for {}",
                        crate::model::human_duration(unchanged_s)
                    )
                });
                events.push(Event {
                    kind,
                    key,
                    queue: batch.queue.clone(),
                    batch: Some(batch.clone()),
                    detail,
                });
            }
        }
        for r in tx
            .query(sql!("serve_observe_breakers"), &[])
            .await
            .map_err(db)?
        {
            let queue: String = r.get(0);
            let state: String = r.get(1);
            let failures: i64 = r.get(2);
            let open_until: Option<String> = r.get(3);
            let was_open: bool = r.get(4);
            let mut episode: i32 = r.get(5);
            let open = state != "closed";
            if open == was_open {
                continue;
            }
            if open {
                episode += 1;
                let until = open_until
                    .map(|t| format!(" until {t}"))
                    .unwrap_or_default();
                events.push(Event {
                    kind: EventKind::BreakerOpen,
                    key: format!("breaker_open:{queue}:{episode}"),
                    queue: queue.clone(),
                    batch: None,
                    detail: Some(format!(
                        "{state}{until} after {failures} retryable failures in a row"
                    )),
                });
            }
            tx.execute(
                sql!("serve_queue_progress_save"),
                &[&queue, &open, &episode],
            )
            .await
            .map_err(db)?;
        }
        for event in &events {
            let batch = event.batch.as_ref().map(|b| b.batch.as_str());
            tx.query_opt(
                sql!("alert_insert"),
                &[
                    &event.key,
                    &event.kind.as_str(),
                    &batch,
                    &event.queue,
                    &body(event),
                ],
            )
            .await
            .map_err(db)?;
        }
        if !targets.webhooks.is_empty() {
            tx.execute(
                sql!("alert_attach"),
                &[&targets.webhooks, &targets.watermark],
            )
            .await
            .map_err(db)?;
        }
        // The dashboard's throughput chart and workers page.
        tx.batch_execute(sql!("serve_samples_save"))
            .await
            .map_err(db)?;
        tx.batch_execute(sql!("serve_workers_prune"))
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Some(events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pending: i64, complete: i64, failed: i64) -> StateCounts {
        StateCounts {
            pending,
            complete,
            failed,
            ..StateCounts::default()
        }
    }

    #[test]
    fn a_batch_finishes_once_and_again_after_a_retry() {
        let old = Tracked::default();
        let (t, _, ev) = step(
            true,
            false,
            old,
            "ready",
            None,
            &counts(0, 10, 0),
            0.0,
            60.0,
        );
        assert_eq!(ev, vec![EventKind::Finished]);
        let (t2, _, ev) = step(true, false, t, "ready", None, &counts(0, 10, 0), 0.0, 60.0);
        assert!(ev.is_empty(), "no second alert for the same finish");
        assert_eq!(t2, t);
        let (t3, restart, ev) = step(true, false, t2, "ready", None, &counts(2, 8, 0), 0.0, 60.0);
        assert!(ev.is_empty() && restart && !t3.finished);
        let (t4, _, ev) = step(true, false, t3, "ready", None, &counts(0, 8, 2), 0.0, 60.0);
        assert_eq!(ev, vec![EventKind::FinishedWithFailures]);
        assert_eq!(t4.finish_episode, 2);
    }

    #[test]
    fn a_retry_finished_within_one_pass_is_a_new_finish() {
        let (t, _, ev) = step(
            true,
            false,
            Tracked::default(),
            "ready",
            None,
            &counts(0, 8, 2),
            0.0,
            60.0,
        );
        assert_eq!(ev, vec![EventKind::FinishedWithFailures]);
        // retry-failed, and both retried records complete before the next pass: `done` is
        // the same, the batch never looked unfinished, yet it finished anew.
        let (t2, _, ev) = step(true, false, t, "ready", None, &counts(0, 10, 0), 0.0, 60.0);
        assert_eq!(ev, vec![EventKind::Finished]);
        assert_eq!(t2.finish_episode, t.finish_episode + 1);
        let (t3, _, ev) = step(true, false, t2, "ready", None, &counts(0, 10, 0), 0.0, 60.0);
        assert!(ev.is_empty() && t3 == t2, "still the same finish");
    }

    #[test]
    fn a_batch_first_seen_long_after_it_finished_is_not_announced() {
        let c = counts(0, 10, 0);
        let (t, _, ev) = step(
            false,
            true,
            Tracked::default(),
            "ready",
            None,
            &c,
            0.0,
            60.0,
        );
        assert!(ev.is_empty() && t.finished);
        let (_, _, ev) = step(true, true, t, "ready", None, &c, 0.0, 60.0);
        assert!(ev.is_empty(), "and not on the next pass either");
        let (_, _, ev) = step(
            false,
            false,
            Tracked::default(),
            "ready",
            None,
            &c,
            0.0,
            60.0,
        );
        assert_eq!(
            ev,
            vec![EventKind::Finished],
            "a recent finish is announced"
        );
        let (_, _, ev) = step(
            false,
            true,
            Tracked::default(),
            "ready",
            None,
            &counts(3, 7, 0),
            0.0,
            60.0,
        );
        assert!(ev.is_empty());
    }

    #[test]
    fn stalls_only_while_ready_with_work_and_once_per_episode() {
        let old = Tracked {
            done: 5,
            ..Tracked::default()
        };
        let c = counts(5, 5, 0);
        let (_, _, ev) = step(true, false, old, "ready", None, &c, 59.0, 60.0);
        assert!(ev.is_empty());
        let (t, _, ev) = step(true, false, old, "ready", None, &c, 61.0, 60.0);
        assert_eq!(ev, vec![EventKind::Stalled]);
        let (t, _, ev) = step(true, false, t, "ready", None, &c, 120.0, 60.0);
        assert!(ev.is_empty(), "one alert per stall");
        let (t, restart, ev) = step(true, false, t, "ready", None, &counts(4, 6, 0), 120.0, 60.0);
        assert!(ev.is_empty() && restart && !t.stalled);
        let (_, restart, ev) = step(
            true,
            false,
            t,
            "paused",
            None,
            &counts(4, 6, 0),
            500.0,
            60.0,
        );
        assert!(ev.is_empty() && restart, "a paused batch is not stalled");
    }

    #[test]
    fn the_failure_limit_is_reported_once_and_cancel_is_silent() {
        let reason = Some("too many failures: 3 failed records, 2 tolerated");
        let c = counts(5, 2, 3);
        let (t, _, ev) = step(
            true,
            false,
            Tracked::default(),
            "paused",
            reason,
            &c,
            0.0,
            60.0,
        );
        assert_eq!(ev, vec![EventKind::FailureLimit]);
        let (_, _, ev) = step(true, false, t, "paused", reason, &c, 0.0, 60.0);
        assert!(ev.is_empty());
        let (_, _, ev) = step(
            true,
            false,
            t,
            "cancelled",
            None,
            &counts(0, 2, 3),
            0.0,
            60.0,
        );
        assert!(
            ev.is_empty(),
            "cancelling is an operator's act, not an alert"
        );
    }
}
