//! Pipelines: stages that are batches, run in dependency order. This module holds the file's
//! model and the rules that need no database: parsing with line numbers (`parse`), query
//! parameters and run names (`params`), and the stage graph (`plan`).

pub mod params;
pub mod parse;
pub mod plan;
pub mod window;

use serde::{Deserialize, Serialize};

pub use parse::{load_file, parse_str};

/// A pipeline file, checked: names valid, stages acyclic, every reference resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub name: String,
    /// Parameters every run binds; a run is (pipeline, params).
    pub params: Vec<String>,
    /// In the file's order.
    pub stages: Vec<Stage>,
}

/// One stage: an ordinary batch, prepared when the stages it depends on have finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub queue: String,
    pub depends_on: Vec<String>,
    pub run_if: RunIf,
    pub input: StageInput,
    pub id_field: String,
    pub max_attempts: i32,
    /// Tolerated failed records (default 0): past it the stage fails, and its batch is paused.
    pub max_failed: Option<i64>,
    pub max_failed_ratio: Option<f64>,
}

/// Where a stage's records come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageInput {
    /// A query with `:param` placeholders, sent as bind parameters.
    Query(String),
    /// A JSONL file path with `{param}` placeholders, absolute once loaded.
    File(String),
    /// Exactly the failed records of that stage (a dependency of this one).
    Failed(String),
}

/// When a stage runs, given the outcomes of the stages it depends on (as Airflow's
/// trigger rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunIf {
    /// Every dependency succeeded (the default).
    AllSuccess,
    /// Every dependency finished, whatever its outcome.
    AllDone,
    /// At least one dependency failed.
    AnyFailed,
}

impl RunIf {
    pub fn as_str(self) -> &'static str {
        match self {
            RunIf::AllSuccess => "all_success",
            RunIf::AllDone => "all_done",
            RunIf::AnyFailed => "any_failed",
        }
    }
}

/// Default `max_attempts` of a stage, as `prepare`'s.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// sha256 of the definition: a changed file under the same name has another digest.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&json)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Everything wrong with a pipeline file, one problem per line of output.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineError {
    pub file: String,
    /// (line, message); line 0 when the problem has no place in the file.
    pub problems: Vec<(usize, String)>,
}

impl std::fmt::Display for PipelineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (line, message)) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if *line > 0 {
                write!(f, "{}:{line}: {message}", self.file)?;
            } else {
                write!(f, "{}: {message}", self.file)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for PipelineError {}
