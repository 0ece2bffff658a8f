//! The stage graph: cycles, and what a stage does once the stages it depends on are done.

use super::RunIf;
use serde::{Deserialize, Serialize};

/// A stage of a run, as stored in `tally.pipeline_stage.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Some stage it depends on has not finished.
    Waiting,
    /// Its batch is being prepared.
    Preparing,
    /// Its batch is being worked on.
    Running,
    /// Its batch finished within its tolerance (or it had no records).
    Succeeded,
    /// Its batch finished past its tolerance, was paused by its failure limit, or cancelled.
    Failed,
    /// Its `run_if` was not met, and nothing upstream failed.
    Skipped,
    /// Its `run_if` was not met because something upstream failed.
    UpstreamFailed,
}

/// Every stage state, for metrics that list them all.
pub const STAGE_STATES: &[&str] = &[
    "waiting",
    "preparing",
    "running",
    "succeeded",
    "failed",
    "skipped",
    "upstream_failed",
];

/// Every run state.
pub const RUN_STATES: &[&str] = &["queued", "running", "succeeded", "failed"];

impl StageState {
    pub fn as_str(self) -> &'static str {
        match self {
            StageState::Waiting => "waiting",
            StageState::Preparing => "preparing",
            StageState::Running => "running",
            StageState::Succeeded => "succeeded",
            StageState::Failed => "failed",
            StageState::Skipped => "skipped",
            StageState::UpstreamFailed => "upstream_failed",
        }
    }

    pub fn parse(s: &str) -> Option<StageState> {
        Some(match s {
            "waiting" => StageState::Waiting,
            "preparing" => StageState::Preparing,
            "running" => StageState::Running,
            "succeeded" => StageState::Succeeded,
            "failed" => StageState::Failed,
            "skipped" => StageState::Skipped,
            "upstream_failed" => StageState::UpstreamFailed,
            _ => return None,
        })
    }

    /// Nothing more will happen to it (until a repair).
    pub fn is_done(self) -> bool {
        matches!(
            self,
            StageState::Succeeded
                | StageState::Failed
                | StageState::Skipped
                | StageState::UpstreamFailed
        )
    }

    fn failed_upstream(self) -> bool {
        matches!(self, StageState::Failed | StageState::UpstreamFailed)
    }
}

/// What a waiting stage does once every stage it depends on is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Run,
    Skip,
    UpstreamFailed,
}

/// `None` while a dependency is not done; otherwise what `run_if` says, as Airflow's trigger
/// rules: `all_success` marks the stage upstream_failed if anything upstream failed and
/// skipped if something was skipped; `any_failed` runs only if something upstream failed.
pub fn decide(run_if: RunIf, deps: &[StageState]) -> Option<Decision> {
    if !deps.iter().all(|d| d.is_done()) {
        return None;
    }
    let any_failed = deps.iter().any(|d| d.failed_upstream());
    Some(match run_if {
        RunIf::AllDone => Decision::Run,
        RunIf::AllSuccess if any_failed => Decision::UpstreamFailed,
        RunIf::AllSuccess if deps.contains(&StageState::Skipped) => Decision::Skip,
        RunIf::AllSuccess => Decision::Run,
        RunIf::AnyFailed if any_failed => Decision::Run,
        RunIf::AnyFailed => Decision::Skip,
    })
}

/// Whether `failed` of `total` records stay within a stage's tolerance (none by default).
pub fn within_tolerance(
    total: i64,
    failed: i64,
    max_failed: Option<i64>,
    max_failed_ratio: Option<f64>,
) -> bool {
    if failed == 0 {
        return true;
    }
    let by_count = max_failed.is_some_and(|m| failed <= m);
    let by_ratio = max_failed_ratio.is_some_and(|r| total > 0 && failed as f64 <= r * total as f64);
    match (max_failed, max_failed_ratio) {
        (None, None) => false,
        (Some(_), None) => by_count,
        (None, Some(_)) => by_ratio,
        (Some(_), Some(_)) => by_count && by_ratio,
    }
}

/// A cycle among stages (name, depends_on), as the path `a -> b -> a`, if there is one.
pub fn find_cycle(graph: &[(String, Vec<String>)]) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        i: usize,
        graph: &[(String, Vec<String>)],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        marks[i] = Mark::Open;
        path.push(i);
        for dep in &graph[i].1 {
            let Some(j) = graph.iter().position(|(n, _)| n == dep) else {
                continue;
            };
            if j == i {
                continue;
            }
            match marks[j] {
                Mark::Open => {
                    let from = path.iter().position(|&k| k == j).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[from..].iter().map(|&k| graph[k].0.clone()).collect();
                    cycle.push(graph[j].0.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(j, graph, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; graph.len()];
    for i in 0..graph.len() {
        if marks[i] == Mark::New {
            if let Some(c) = visit(i, graph, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use StageState::*;

    #[test]
    fn run_if_follows_the_trigger_rules() {
        assert_eq!(decide(RunIf::AllSuccess, &[Succeeded, Running]), None);
        assert_eq!(decide(RunIf::AllSuccess, &[Succeeded]), Some(Decision::Run));
        assert_eq!(decide(RunIf::AllSuccess, &[]), Some(Decision::Run));
        assert_eq!(
            decide(RunIf::AllSuccess, &[Failed]),
            Some(Decision::UpstreamFailed)
        );
        assert_eq!(
            decide(RunIf::AllSuccess, &[Skipped, Succeeded]),
            Some(Decision::Skip)
        );
        assert_eq!(
            decide(RunIf::AllSuccess, &[Skipped, UpstreamFailed]),
            Some(Decision::UpstreamFailed)
        );
        assert_eq!(decide(RunIf::AnyFailed, &[Failed]), Some(Decision::Run));
        assert_eq!(decide(RunIf::AnyFailed, &[Succeeded]), Some(Decision::Skip));
        assert_eq!(
            decide(RunIf::AllDone, &[Failed, Skipped]),
            Some(Decision::Run)
        );
    }

    #[test]
    fn tolerance() {
        assert!(within_tolerance(100, 0, None, None));
        assert!(!within_tolerance(100, 1, None, None));
        assert!(within_tolerance(100, 1, None, Some(0.01)));
        assert!(!within_tolerance(100, 2, None, Some(0.01)));
        assert!(within_tolerance(100, 2, Some(2), None));
    }

    #[test]
    fn cycles() {
        let g = |edges: &[(&str, &[&str])]| -> Vec<(String, Vec<String>)> {
            edges
                .iter()
                .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        assert_eq!(find_cycle(&g(&[("a", &[]), ("b", &["a"])])), None);
        assert_eq!(
            find_cycle(&g(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"])])),
            Some(vec!["a".into(), "c".into(), "b".into(), "a".into()])
        );
    }
}
