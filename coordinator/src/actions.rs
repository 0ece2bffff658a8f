//! The operator actions both the CLI and the dashboard take: retry-failed (a batch, or one
//! error group), pause, resume, cancel, and pipeline repair. Each is one store call, and each
//! is written to the audit table with who took it and how many rows it touched.

use tally::{Store, StoreError};

/// One action, with what it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    RetryFailed {
        batch: String,
        group: Option<String>,
        reset_attempts: bool,
    },
    Pause {
        batch: String,
    },
    Resume {
        batch: String,
    },
    Cancel {
        batch: String,
    },
    Repair {
        run: String,
        stage: Option<String>,
    },
}

/// What an action did: a sentence for the operator, and the rows it touched.
#[derive(Debug, Clone)]
pub struct Done {
    pub message: String,
    pub rows: u64,
}

/// The actor of CLI actions: `cli:` and the login name.
pub fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

impl Action {
    /// The action's name in the audit table and in URLs.
    pub fn name(&self) -> &'static str {
        match self {
            Action::RetryFailed { group: None, .. } => "retry-failed",
            Action::RetryFailed { group: Some(_), .. } => "retry-failed-group",
            Action::Pause { .. } => "pause",
            Action::Resume { .. } => "resume",
            Action::Cancel { .. } => "cancel",
            Action::Repair { .. } => "pipeline-repair",
        }
    }

    fn batch(&self) -> Option<&str> {
        match self {
            Action::RetryFailed { batch, .. }
            | Action::Pause { batch }
            | Action::Resume { batch }
            | Action::Cancel { batch } => Some(batch),
            Action::Repair { .. } => None,
        }
    }

    fn run_name(&self) -> Option<&str> {
        match self {
            Action::Repair { run, .. } => Some(run),
            _ => None,
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Action::RetryFailed {
                group,
                reset_attempts,
                ..
            } => {
                let mut parts = Vec::new();
                if let Some(g) = group {
                    parts.push(format!("group {g}"));
                }
                if *reset_attempts {
                    parts.push("attempts reset".to_string());
                }
                (!parts.is_empty()).then(|| parts.join(", "))
            }
            Action::Repair { stage: Some(s), .. } => Some(format!("stage {s}")),
            _ => None,
        }
    }

    /// What the action would touch now, for its confirmation: a sentence and a row count.
    pub async fn preview(&self, store: &Store) -> Result<(String, i64), StoreError> {
        let status = match self.batch() {
            Some(b) => store.batch_status(Some(b)).await?.into_iter().next(),
            None => None,
        };
        let s = status.as_ref();
        let count = |f: fn(&tally::BatchStatus) -> i64| s.map(f).unwrap_or(0);
        Ok(match self {
            Action::RetryFailed {
                batch,
                group: Some(g),
                ..
            } => {
                let n = store.failed_in_group(batch, g).await?;
                (
                    format!("{n} failed records of error group {g} go back to pending"),
                    n,
                )
            }
            Action::RetryFailed { .. } => {
                let n = count(|s| s.failed);
                (format!("{n} failed records go back to pending"), n)
            }
            Action::Pause { .. } => {
                let n = count(|s| s.pending);
                (
                    format!("{n} pending records wait until the batch is resumed"),
                    n,
                )
            }
            Action::Resume { .. } => {
                let n = count(|s| s.pending);
                (format!("{n} pending records may be claimed again"), n)
            }
            Action::Cancel { .. } => {
                let n = count(|s| s.pending + s.running);
                (
                    format!("{n} pending and running records become cancelled"),
                    n,
                )
            }
            Action::Repair { run, stage } => {
                let status = store.pipeline_status(run).await?;
                let n: i64 = status
                    .stages
                    .iter()
                    .filter(|x| x.state == "failed")
                    .filter(|x| stage.as_ref().is_none_or(|s| &x.stage == s))
                    .map(|x| x.failed)
                    .sum();
                (
                    format!("{n} failed records of the run's failed stages go back to pending"),
                    n,
                )
            }
        })
    }

    /// Takes the action and writes it to the audit table as `actor`. An audit write that fails
    /// after the action succeeded is logged, not returned: the action has happened.
    pub async fn run(&self, store: &Store, actor: &str) -> Result<Done, StoreError> {
        let done = self.take(store).await?;
        if let Err(e) = store
            .audit(
                actor,
                self.name(),
                self.batch(),
                self.run_name(),
                self.detail().as_deref(),
                i64::try_from(done.rows).unwrap_or(i64::MAX),
            )
            .await
        {
            tracing::warn!(
                "{} was done, but writing it to the audit table failed: {e}",
                self.name()
            );
        }
        Ok(done)
    }

    async fn take(&self, store: &Store) -> Result<Done, StoreError> {
        match self {
            Action::RetryFailed {
                batch,
                group,
                reset_attempts,
            } => {
                let n = store
                    .retry_failed_group(batch, *reset_attempts, group.as_deref())
                    .await?;
                let message = match group {
                    Some(g) => format!(
                        "{n} failed records of batch {batch} in error group {g} sent back to pending"
                    ),
                    None => format!("{n} failed records of batch {batch} sent back to pending"),
                };
                Ok(Done { message, rows: n })
            }
            Action::Pause { batch } => {
                if !store.pause(batch).await? {
                    return Err(StoreError::Conflict(format!(
                        "batch {batch} is not ready, so it cannot be paused (see `coordinator status {batch}`)"
                    )));
                }
                let rows = pending(store, batch).await?;
                Ok(Done {
                    message: format!(
                        "batch {batch} paused: workers claim none of its records until resumed"
                    ),
                    rows,
                })
            }
            Action::Resume { batch } => {
                let (resumed, closed) = store.resume(batch).await?;
                if !resumed && !closed {
                    return Err(StoreError::Conflict(format!(
                        "batch {batch} is not paused and its queue's circuit breaker is closed"
                    )));
                }
                let mut lines = Vec::new();
                if resumed {
                    lines.push(format!("batch {batch} resumed"));
                }
                if closed {
                    lines.push(format!("circuit breaker of batch {batch}'s queue closed"));
                }
                let rows = pending(store, batch).await?;
                Ok(Done {
                    message: lines.join("\n"),
                    rows,
                })
            }
            Action::Cancel { batch } => match store.cancel(batch).await? {
                Some(n) => Ok(Done {
                    message: format!(
                        "batch {batch} cancelled: {n} unfinished records marked cancelled"
                    ),
                    rows: n,
                }),
                None => Err(StoreError::Conflict(format!(
                    "batch {batch} is not ready or paused, so it cannot be cancelled"
                ))),
            },
            Action::Repair { run, stage } => {
                let repair = store.pipeline_repair(run, stage.as_deref()).await?;
                if repair.stages.is_empty() {
                    return Ok(Done {
                        message: format!("run {run}: no failed stage to repair"),
                        rows: 0,
                    });
                }
                let message = format!(
                    "run {run}: re-opened {} failed records in {} stage(s) ({}); {} stage(s) after them will run again{}",
                    repair.records,
                    repair.stages.len(),
                    repair.stages.join(", "),
                    repair.waiting.len(),
                    if repair.waiting.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", repair.waiting.join(", "))
                    }
                );
                store.advance_run(repair.run_id).await?;
                Ok(Done {
                    message,
                    rows: repair.records,
                })
            }
        }
    }
}

/// A batch's pending records now: the rows a pause holds back or a resume frees.
async fn pending(store: &Store, batch: &str) -> Result<u64, StoreError> {
    Ok(store
        .batch_status(Some(batch))
        .await?
        .first()
        .map(|s| s.pending.max(0) as u64)
        .unwrap_or(0))
}
