//! The pipeline file: YAML to [`Pipeline`], with every problem reported at its line.

use super::params::{bind_placeholders, path_placeholders, valid_param_name};
use super::plan::find_cycle;
use super::{Pipeline, PipelineError, RunIf, Stage, StageInput, DEFAULT_MAX_ATTEMPTS};
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::Node;
use std::path::Path;

const TOP_FIELDS: &[&str] = &["name", "params", "stages", "description"];
const STAGE_FIELDS: &[&str] = &[
    "queue",
    "depends_on",
    "run_if",
    "from_query",
    "from_file",
    "from_failed",
    "id_field",
    "max_attempts",
    "max_failed",
    "max_failed_ratio",
    "description",
];

/// Longest pipeline or stage name; a stage's batch name joins both with the run's values.
pub const MAX_NAME_LEN: usize = 48;

/// Reads and checks a pipeline file. A relative `from_file` becomes relative to the file's
/// folder, so that any process driving the run finds the same input.
pub fn load_file(path: &Path) -> Result<Pipeline, PipelineError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError {
        file: shown.clone(),
        problems: vec![(0, format!("cannot read the pipeline file: {e}"))],
    })?;
    let mut pipeline = parse_str(&shown, &text)?;
    let base = path
        .parent()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
        .unwrap_or_default();
    for stage in &mut pipeline.stages {
        if let StageInput::File(f) = &mut stage.input {
            if Path::new(f.as_str()).is_relative() {
                *f = base.join(f.as_str()).display().to_string();
            }
        }
    }
    Ok(pipeline)
}

/// Parses and checks a pipeline; `file` names it in errors.
pub fn parse_str(file: &str, text: &str) -> Result<Pipeline, PipelineError> {
    let mut p = Problems {
        file: file.to_string(),
        list: Vec::new(),
    };
    let root = match marked_yaml::parse_yaml(0, text) {
        Ok(root) => root,
        Err(e) => {
            p.at(0, format!("not valid YAML: {e}"));
            return Err(p.into_error());
        }
    };
    let Some(top) = root.as_mapping() else {
        p.at(
            line(&root),
            "the file must be a mapping with name, params and stages".into(),
        );
        return Err(p.into_error());
    };
    p.unknown_fields(top, TOP_FIELDS, "the pipeline");

    let name = match top.get_node("name") {
        Some(node) => match scalar(&mut p, node, "name") {
            Some(s) => {
                check_name(&mut p, line(node), "pipeline", s.as_str());
                s.as_str().to_string()
            }
            None => String::new(),
        },
        None => {
            p.at(
                line_of_map(top),
                "the pipeline has no `name`: add `name: <pipeline name>`".into(),
            );
            String::new()
        }
    };

    let mut params: Vec<String> = Vec::new();
    if let Some(node) = top.get_node("params") {
        match node.as_sequence() {
            Some(seq) => {
                for item in seq.iter() {
                    let Some(s) = scalar(&mut p, item, "params") else {
                        continue;
                    };
                    let v = s.as_str();
                    if !valid_param_name(v) {
                        p.at(
                            line(item),
                            format!(
                            "parameter name {v:?} is not valid: use lower-case letters, digits \
                             and '_', starting with a letter or '_'"
                        ),
                        );
                    } else if params.iter().any(|x| x == v) {
                        p.at(line(item), format!("parameter {v:?} is listed twice"));
                    } else {
                        params.push(v.to_string());
                    }
                }
            }
            None => p.at(
                line(node),
                "`params` must be a list, e.g. `params: [date]`".into(),
            ),
        }
    }

    let mut stages: Vec<(Stage, usize)> = Vec::new();
    let mut failed_refs: Vec<(usize, String, String)> = Vec::new();
    match top.get_node("stages") {
        None => p.at(
            line_of_map(top),
            "the pipeline has no `stages`: add at least one stage under `stages:`".into(),
        ),
        Some(node) => match node.as_mapping() {
            None => p.at(
                line(node),
                "`stages` must be a mapping of stage name to stage".into(),
            ),
            Some(map) if map.is_empty() => p.at(
                line(node),
                "`stages` is empty: add at least one stage".into(),
            ),
            Some(map) => {
                for (key, body) in map.iter() {
                    let at = key_line(key);
                    let stage_name = key.as_str().to_string();
                    check_name(&mut p, at, "stage", &stage_name);
                    if let Some(stage) = parse_stage(&mut p, &stage_name, at, body, &params) {
                        if let StageInput::Failed(from) = &stage.input {
                            failed_refs.push((at, stage_name.clone(), from.clone()));
                        }
                        stages.push((stage, at));
                    }
                }
            }
        },
    }

    // References between stages.
    let known: Vec<String> = stages.iter().map(|(s, _)| s.name.clone()).collect();
    for (stage, at) in &stages {
        for dep in &stage.depends_on {
            if dep == &stage.name {
                p.at(*at, format!("stage {:?} depends on itself", stage.name));
            } else if !known.contains(dep) {
                p.at(
                    *at,
                    format!(
                        "stage {:?} depends on {dep:?}, which is not a stage of this pipeline \
                     (stages: {})",
                        stage.name,
                        known.join(", ")
                    ),
                );
            }
        }
    }
    for (at, stage, from) in failed_refs {
        let deps = stages
            .iter()
            .find(|(s, _)| s.name == stage)
            .map(|(s, _)| s.depends_on.clone())
            .unwrap_or_default();
        if !known.contains(&from) {
            p.at(
                at,
                format!("stage {stage:?}: from_failed names {from:?}, which is not a stage"),
            );
        } else if !deps.contains(&from) {
            p.at(
                at,
                format!(
                "stage {stage:?}: from_failed: {from} needs {from:?} in depends_on too, so that \
                 its failures are final when {stage:?} starts"
            ),
            );
        }
    }
    let graph: Vec<(String, Vec<String>)> = stages
        .iter()
        .map(|(s, _)| (s.name.clone(), s.depends_on.clone()))
        .collect();
    if let Some(cycle) = find_cycle(&graph) {
        let at = stages
            .iter()
            .find(|(s, _)| s.name == cycle[0])
            .map_or(0, |(_, at)| *at);
        p.at(
            at,
            format!(
                "the stages form a cycle: {}; remove one of these depends_on",
                cycle.join(" -> ")
            ),
        );
    }
    if !p.list.is_empty() {
        return Err(p.into_error());
    }
    Ok(Pipeline {
        name,
        params,
        stages: stages.into_iter().map(|(s, _)| s).collect(),
    })
}

fn parse_stage(
    p: &mut Problems,
    name: &str,
    at: usize,
    body: &Node,
    params: &[String],
) -> Option<Stage> {
    let Some(map) = body.as_mapping() else {
        p.at(
            at,
            format!("stage {name:?} must be a mapping with at least `queue` and an input"),
        );
        return None;
    };
    let what = format!("stage {name:?}");
    p.unknown_fields(map, STAGE_FIELDS, &what);
    let text = |p: &mut Problems, field: &str| -> Option<(String, usize)> {
        let node = map.get_node(field)?;
        scalar(p, node, field).map(|s| (s.as_str().to_string(), line(node)))
    };
    let queue = match text(p, "queue") {
        Some((q, l)) => {
            if let Err(e) = crate::names::validate_name("queue", &q) {
                p.at(l, format!("{what}: {e}"));
            }
            q
        }
        None => {
            p.at(
                at,
                format!("{what} has no `queue`: add `queue: <queue its workers take>`"),
            );
            String::new()
        }
    };
    let mut depends_on = Vec::new();
    if let Some(node) = map.get_node("depends_on") {
        match node.as_sequence() {
            Some(seq) => {
                for item in seq.iter() {
                    if let Some(s) = scalar(p, item, "depends_on") {
                        if !depends_on.iter().any(|d| d == s.as_str()) {
                            depends_on.push(s.as_str().to_string());
                        }
                    }
                }
            }
            None => p.at(
                line(node),
                format!("{what}: `depends_on` must be a list, e.g. [extract]"),
            ),
        }
    }
    let run_if = match text(p, "run_if") {
        None => RunIf::AllSuccess,
        Some((v, l)) => match v.as_str() {
            "all_success" => RunIf::AllSuccess,
            "all_done" => RunIf::AllDone,
            "any_failed" => RunIf::AnyFailed,
            other => {
                p.at(
                    l,
                    format!(
                    "{what}: run_if {other:?} is not known; use all_success, all_done or any_failed"
                ),
                );
                RunIf::AllSuccess
            }
        },
    };
    let inputs: Vec<&str> = ["from_query", "from_file", "from_failed"]
        .into_iter()
        .filter(|f| map.get_node(f).is_some())
        .collect();
    let input = match inputs.as_slice() {
        [] => {
            p.at(
                at,
                format!("{what} has no input: add one of from_query, from_file or from_failed"),
            );
            None
        }
        [one] => match (*one, text(p, one)) {
            ("from_query", Some((q, l))) => {
                let (_, used) = bind_placeholders(&q);
                for u in used.iter().filter(|u| !params.contains(u)) {
                    p.at(
                        l,
                        format!(
                        "{what}: from_query uses :{u}, which is not in params; add it to params \
                         or remove it from the query"
                    ),
                    );
                }
                if q.trim().is_empty() {
                    p.at(l, format!("{what}: from_query is empty"));
                }
                Some(StageInput::Query(q))
            }
            ("from_file", Some((f, l))) => {
                for u in path_placeholders(&f).iter().filter(|u| !params.contains(u)) {
                    p.at(
                        l,
                        format!(
                        "{what}: from_file uses {{{u}}}, which is not in params; add it to params"
                    ),
                    );
                }
                Some(StageInput::File(f))
            }
            ("from_failed", Some((s, _))) => Some(StageInput::Failed(s)),
            _ => None,
        },
        many => {
            p.at(
                at,
                format!("{what} has {}: give exactly one input", many.join(" and ")),
            );
            None
        }
    };
    let id_field = match text(p, "id_field") {
        Some((f, l)) if f.is_empty() => {
            p.at(l, format!("{what}: id_field is empty"));
            f
        }
        Some((f, _)) => f,
        None => "id".to_string(),
    };
    let max_attempts = number::<i32>(
        p,
        map,
        "max_attempts",
        &what,
        |v| (1..=1000).contains(v),
        "between 1 and 1000",
    )
    .unwrap_or(DEFAULT_MAX_ATTEMPTS);
    let max_failed = number::<i64>(p, map, "max_failed", &what, |v| *v >= 0, "0 or more");
    let max_failed_ratio = number::<f64>(
        p,
        map,
        "max_failed_ratio",
        &what,
        |v| (0.0..=1.0).contains(v),
        "between 0 and 1",
    );
    Some(Stage {
        name: name.to_string(),
        queue,
        depends_on,
        run_if,
        input: input?,
        id_field,
        max_attempts,
        max_failed,
        max_failed_ratio,
    })
}

fn number<T: std::str::FromStr>(
    p: &mut Problems,
    map: &MarkedMappingNode,
    field: &str,
    what: &str,
    ok: impl Fn(&T) -> bool,
    range: &str,
) -> Option<T> {
    let node = map.get_node(field)?;
    let s = scalar(p, node, field)?;
    match s.as_str().trim().parse::<T>() {
        Ok(v) if ok(&v) => Some(v),
        _ => {
            p.at(
                line(node),
                format!(
                    "{what}: {field} is {:?}; it must be a number {range}",
                    s.as_str()
                ),
            );
            None
        }
    }
}

struct Problems {
    file: String,
    list: Vec<(usize, String)>,
}

impl Problems {
    fn at(&mut self, line: usize, message: String) {
        self.list.push((line, message));
    }

    fn unknown_fields(&mut self, map: &MarkedMappingNode, known: &[&str], what: &str) {
        for (key, _) in map.iter() {
            if !known.contains(&key.as_str()) {
                self.at(
                    key_line(key),
                    format!(
                        "unknown field `{}` in {what}; expected one of: {}",
                        key.as_str(),
                        known.join(", ")
                    ),
                );
            }
        }
    }

    fn into_error(mut self) -> PipelineError {
        self.list.sort_by_key(|(line, _)| *line);
        PipelineError {
            file: self.file,
            problems: self.list,
        }
    }
}

fn scalar<'n>(p: &mut Problems, node: &'n Node, field: &str) -> Option<&'n MarkedScalarNode> {
    match node.as_scalar() {
        Some(s) => Some(s),
        None => {
            p.at(
                line(node),
                format!("`{field}` must be a single value, not a list or mapping"),
            );
            None
        }
    }
}

fn check_name(p: &mut Problems, at: usize, kind: &str, name: &str) {
    let ok = name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        p.at(
            at,
            format!(
                "{kind} name {name:?} is not valid: use 1 to {MAX_NAME_LEN} letters, digits, '_' \
             and '-', starting with a letter or digit"
            ),
        );
    }
}

fn line(node: &Node) -> usize {
    node.span().start().map_or(0, |m| m.line())
}

fn key_line(key: &MarkedScalarNode) -> usize {
    key.span().start().map_or(0, |m| m.line())
}

fn line_of_map(map: &MarkedMappingNode) -> usize {
    map.span().start().map_or(0, |m| m.line())
}
