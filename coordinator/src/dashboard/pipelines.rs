//! Pipeline runs: the runs and backfills, and one run's stages as a graph with their counts,
//! its repair history and its actions.

use super::html::{cut, esc, int, state, state_class};
use super::{given, store, Fail, Viewer, PAGE, REFRESH_S};
use crate::serve::Shared;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use tally::store::pipeline::StageStatus;

#[derive(Deserialize, Default)]
pub struct RunsQuery {
    pipeline: Option<String>,
    state: Option<String>,
    before: Option<i64>,
}

pub async fn index(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let store = store(&shared)?;
    let (pipeline, run_state) = (given(&q.pipeline), given(&q.state));
    let (pipeline, run_state) = (pipeline.as_deref(), run_state.as_deref());
    let mut runs = store
        .dashboard_runs(pipeline, run_state, q.before, PAGE + 1)
        .await?;
    let more = runs.len() as i64 > PAGE;
    runs.truncate(PAGE as usize);
    let backfills = store.dashboard_backfills(pipeline, 20).await?;
    let mut body = String::from("<h1>Pipeline runs</h1>");
    let mut states = String::from("<option value=\"\">any state</option>");
    for s in tally::pipeline::plan::RUN_STATES {
        let sel = if run_state == Some(s) {
            " selected"
        } else {
            ""
        };
        let _ = write!(states, "<option{sel}>{s}</option>");
    }
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/pipelines\">\
         <input name=\"pipeline\" placeholder=\"pipeline\" value=\"{}\">\
         <select name=\"state\">{states}</select><button>Filter</button></form>",
        esc(pipeline.unwrap_or(""))
    );
    if runs.is_empty() {
        body.push_str("<p class=\"muted\">No pipeline run matches.</p>");
    } else {
        body.push_str(
            "<table><thead><tr><th>Run</th><th>Pipeline</th><th>State</th><th>Params</th>\
             <th class=\"num\">Stages done</th><th class=\"num\">Attempt</th><th>Started</th>\
             <th>Finished</th><th>Backfill</th></tr></thead><tbody>",
        );
        for r in &runs {
            let _ = write!(
                body,
                "<tr><td><a href=\"/runs/{n}\">{n}</a></td><td>{p}</td><td>{st}</td>\
                 <td class=\"mono\">{params}</td><td class=\"num\">{done} / {all}</td>\
                 <td class=\"num\">{att}</td><td>{started}</td><td>{fin}</td><td>{bf}</td></tr>",
                n = esc(&r.name),
                p = esc(&r.pipeline),
                st = state(&r.state),
                params = esc(&cut(&r.params, 80)),
                done = r.stages_succeeded,
                all = r.stages,
                att = r.attempt,
                started = esc(r.started_at.as_deref().unwrap_or("queued")),
                fin = esc(r.finished_at.as_deref().unwrap_or("–")),
                bf = r.backfill_id.map(|b| format!("#{b}")).unwrap_or_default(),
            );
        }
        body.push_str("</tbody></table>");
    }
    if let (true, Some(last)) = (more, runs.last()) {
        let _ = write!(
            body,
            "<div class=\"pager\"><a href=\"/pipelines?before={}&amp;pipeline={}&amp;state={}\">older »</a></div>",
            last.id,
            esc(&super::html::url_value(pipeline.unwrap_or(""))),
            esc(&super::html::url_value(run_state.unwrap_or("")))
        );
    }
    body.push_str("<h2>Backfills</h2>");
    if backfills.is_empty() {
        body.push_str("<p class=\"muted\">No backfill.</p>");
    } else {
        body.push_str(
            "<table><thead><tr><th>#</th><th>Pipeline</th><th>Range</th><th>Step</th>\
             <th class=\"num\">At once</th><th>Reprocess</th><th class=\"num\">Runs</th>\
             <th class=\"num\">Succeeded</th><th class=\"num\">Failed</th>\
             <th class=\"num\">Skipped</th><th>State</th><th>Created</th><th>Finished</th></tr></thead><tbody>",
        );
        for f in &backfills {
            let _ = write!(
                body,
                "<tr><td>{id}</td><td>{p}</td><td>{from} → {to}</td><td>{step}</td>\
                 <td class=\"num\">{max}</td><td>{re}</td><td class=\"num\">{runs}</td>\
                 <td class=\"num\">{ok}</td><td class=\"num\">{bad}</td><td class=\"num\">{skip}</td>\
                 <td>{st}</td><td>{created}</td><td>{fin}</td></tr>",
                id = f.id,
                p = esc(&f.pipeline),
                from = esc(&f.range_from),
                to = esc(&f.range_to),
                step = esc(&f.step),
                max = f.max_active,
                re = esc(&f.reprocess),
                runs = f.runs,
                ok = f.succeeded,
                bad = f.failed,
                skip = f.skipped,
                st = state(&f.state),
                created = esc(&f.created_at),
                fin = esc(f.finished_at.as_deref().unwrap_or("–")),
            );
        }
        body.push_str("</tbody></table>");
    }
    Ok(viewer.page("Pipeline runs", Some(REFRESH_S), &body))
}

/// Each stage's column: the longest chain of dependencies before it.
fn depths(stages: &[StageStatus]) -> HashMap<&str, usize> {
    let mut depth: HashMap<&str, usize> = HashMap::new();
    // Stages are stored in an order where dependencies come first; a few passes settle any
    // other order too (a pipeline has no cycles).
    for _ in 0..=stages.len() {
        let mut changed = false;
        for s in stages {
            let d = s
                .depends_on
                .iter()
                .filter_map(|dep| depth.get(dep.as_str()))
                .map(|d| d + 1)
                .max()
                .unwrap_or(0);
            if depth.get(s.stage.as_str()) != Some(&d) {
                depth.insert(&s.stage, d);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

const BOX_W: f64 = 170.0;
const BOX_H: f64 = 58.0;
const GAP_X: f64 = 60.0;
const GAP_Y: f64 = 18.0;

/// The stages as boxes in columns by depth, with an arrow from each dependency.
pub fn graph(stages: &[StageStatus]) -> String {
    let depth = depths(stages);
    let mut rows_in: HashMap<usize, usize> = HashMap::new();
    let mut at: HashMap<&str, (f64, f64)> = HashMap::new();
    for s in stages {
        let d = depth.get(s.stage.as_str()).copied().unwrap_or(0);
        let row = rows_in.entry(d).or_insert(0);
        at.insert(
            &s.stage,
            (
                10.0 + d as f64 * (BOX_W + GAP_X),
                10.0 + *row as f64 * (BOX_H + GAP_Y),
            ),
        );
        *row += 1;
    }
    let cols = depth.values().max().map(|d| d + 1).unwrap_or(1);
    let rows = rows_in.values().max().copied().unwrap_or(1);
    let w = 20.0 + cols as f64 * (BOX_W + GAP_X) - GAP_X;
    let h = 20.0 + rows as f64 * (BOX_H + GAP_Y) - GAP_Y;
    let mut edges = String::new();
    let mut boxes = String::new();
    for s in stages {
        let Some(&(x, y)) = at.get(s.stage.as_str()) else {
            continue;
        };
        for dep in &s.depends_on {
            if let Some(&(dx, dy)) = at.get(dep.as_str()) {
                let _ = write!(
                    edges,
                    "<line class=\"edge\" x1=\"{:.0}\" y1=\"{:.0}\" x2=\"{:.0}\" y2=\"{:.0}\" marker-end=\"url(#arrow)\"></line>",
                    dx + BOX_W,
                    dy + BOX_H / 2.0,
                    x - 4.0,
                    y + BOX_H / 2.0
                );
            }
        }
        let class = state_class(&s.state);
        let counts = if s.total > 0 || s.complete + s.failed > 0 {
            format!(
                "{} / {} done{}",
                int(s.complete + s.failed),
                int(s.total),
                if s.failed > 0 {
                    format!(", {} failed", int(s.failed))
                } else {
                    String::new()
                }
            )
        } else {
            "no records yet".into()
        };
        let _ = write!(
            boxes,
            "<g class=\"stage {class}\"><title>{title}</title><rect x=\"{x:.0}\" y=\"{y:.0}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"6\"></rect>\
             <text class=\"name\" x=\"{tx:.0}\" y=\"{y1:.0}\">{name}</text>\
             <text x=\"{tx:.0}\" y=\"{y2:.0}\">{st}</text><text x=\"{tx:.0}\" y=\"{y3:.0}\">{counts}</text></g>",
            title = esc(&s.batch),
            name = esc(&cut(&s.stage, 22)),
            st = esc(&s.state.replace('_', " ")),
            counts = esc(&counts),
            tx = x + 10.0,
            y1 = y + 18.0,
            y2 = y + 34.0,
            y3 = y + 50.0,
        );
    }
    format!(
        "<svg class=\"graph\" viewBox=\"0 0 {w:.0} {h:.0}\" width=\"{w:.0}\" height=\"{h:.0}\" role=\"img\" aria-label=\"stages\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\">\
         <path d=\"M0,0 L10,5 L0,10 z\" class=\"arrowhead\"></path></marker></defs>{edges}{boxes}</svg>"
    )
}

pub async fn run(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let store = store(&shared)?;
    let status = store.pipeline_status(&name).await.map_err(|e| match e {
        tally::StoreError::Invalid(m) => Fail::NotFound(m),
        e => e.into(),
    })?;
    let history = store.audit_entries(None, Some(&name), 20).await?;
    let n = esc(&name);
    let mut body = format!(
        "<h1>Run {n} {}</h1><div class=\"actions\">",
        state(&status.state)
    );
    if status.stages.iter().any(|s| s.state == "failed") {
        body.push_str(&viewer.action_link("Repair", "pipeline-repair", &[("run", &name)]));
    }
    body.push_str("</div>");
    let _ = write!(
        body,
        "<dl class=\"facts\"><dt>Pipeline</dt><dd><a href=\"/pipelines?pipeline={pl}\">{p}</a></dd>\
         <dt>Params</dt><dd class=\"mono\">{params}</dd><dt>Version</dt><dd>{v}</dd>\
         <dt>Created</dt><dd>{c}</dd><dt>Finished</dt><dd>{f}</dd></dl>",
        pl = esc(&super::html::url_value(&status.pipeline)),
        p = esc(&status.pipeline),
        params = esc(&status.params.to_string()),
        v = status.version,
        c = esc(&status.created_at),
        f = esc(status.finished_at.as_deref().unwrap_or("–")),
    );
    let _ = write!(
        body,
        "<h2>Stages</h2><div class=\"scroll\">{}</div>",
        graph(&status.stages)
    );
    body.push_str(
        "<table><thead><tr><th>Stage</th><th>State</th><th>Batch</th><th>Depends on</th>\
         <th class=\"num\">Total</th><th class=\"num\">Complete</th><th class=\"num\">Failed</th>\
         <th class=\"num\">Pending</th><th>Reason</th></tr></thead><tbody>",
    );
    for s in &status.stages {
        let _ = write!(
            body,
            "<tr><td>{stage}</td><td>{st}</td><td><a href=\"/batches/{b}\">{b}</a></td><td>{deps}</td>\
             <td class=\"num\">{t}</td><td class=\"num\">{c}</td><td class=\"num\">{f}</td>\
             <td class=\"num\">{p}</td><td>{reason}</td></tr>",
            stage = esc(&s.stage),
            st = state(&s.state),
            b = esc(&s.batch),
            deps = esc(&s.depends_on.join(", ")),
            t = int(s.total),
            c = int(s.complete),
            f = int(s.failed),
            p = int(s.pending + s.running),
            reason = esc(s.reason.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</tbody></table><h2>Repairs and actions</h2>");
    body.push_str(&super::actions::audit_table(&history));
    let refresh = matches!(status.state.as_str(), "queued" | "running").then_some(REFRESH_S);
    Ok(viewer.page(&format!("Run {name}"), refresh, &body))
}
