//! The batches page (every batch, filtered and paged) and one batch's page: counts,
//! throughput, attempts, failures grouped by cause, actions and their audit.

use super::html::{bar, cut, esc, int, rate, state, took, url_value};
use super::{chart, given, store, Fail, Viewer, PAGE, REFRESH_S};
use crate::serve::Shared;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;
use tally::store::dashboard::{BatchFilter, ATTEMPTS_HISTOGRAM_MAX};
use tally::BatchStatus;

/// The states `status` shows, for the filter.
const STATES: [&str; 8] = [
    "preparing",
    "ready",
    "running",
    "paused",
    "complete",
    "complete_with_failures",
    "cancelled",
    "interrupted",
];

/// How far back the throughput chart looks.
const CHART_WINDOW_S: f64 = 6.0 * 3600.0;

#[derive(Deserialize, Default)]
pub struct ListQuery {
    state: Option<String>,
    queue: Option<String>,
    name: Option<String>,
    before: Option<i64>,
}

/// The state bar's parts.
fn parts(s: &BatchStatus) -> [(&'static str, i64); 5] {
    [
        ("complete", s.complete),
        ("failed", s.failed),
        ("running", s.running),
        ("cancelled", s.cancelled),
        ("pending", s.pending),
    ]
}

fn select(name: &str, options: &[&str], chosen: Option<&str>) -> String {
    let mut out = format!("<select name=\"{name}\"><option value=\"\">any {name}</option>");
    for o in options {
        let sel = if chosen == Some(*o) { " selected" } else { "" };
        let _ = write!(out, "<option{sel}>{}</option>", esc(o));
    }
    out.push_str("</select>");
    out
}

pub async fn index(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let store = store(&shared)?;
    let mut filter = BatchFilter {
        queue: given(&q.queue),
        name: given(&q.name),
        state: given(&q.state),
        before: q.before,
        limit: PAGE + 1,
    };
    // "interrupted" is a preparing batch whose prepare died: find it among those.
    let interrupted = filter.state.as_deref() == Some("interrupted");
    if interrupted {
        filter.state = Some("preparing".into());
    }
    let mut rows = store.dashboard_batches(&filter).await?;
    if interrupted {
        rows.retain(|r| r.status.state == "interrupted");
    }
    let more = rows.len() as i64 > PAGE;
    rows.truncate(PAGE as usize);
    let mut body = String::from("<h1>Batches</h1>");
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/\">{}\
         <input name=\"queue\" placeholder=\"queue\" value=\"{}\">\
         <input name=\"name\" placeholder=\"name contains\" value=\"{}\">\
         <button>Filter</button> <a href=\"/\">clear</a></form>",
        select("state", &STATES, q.state.as_deref()),
        esc(q.queue.as_deref().unwrap_or("")),
        esc(q.name.as_deref().unwrap_or("")),
    );
    if rows.is_empty() {
        body.push_str("<p class=\"muted\">No batch matches.</p>");
    } else {
        body.push_str(
            "<table><thead><tr><th>Batch</th><th>Queue</th><th>State</th><th>Progress</th>\
             <th class=\"num\">Done</th><th class=\"num\">Failed</th><th class=\"num\">Rate</th>\
             <th class=\"num\">ETA</th><th class=\"num\">Age</th></tr></thead><tbody>",
        );
        for r in &rows {
            let s = &r.status;
            let _ = write!(
                body,
                "<tr><td><a href=\"/batches/{n}\">{n}</a></td><td>{q}</td><td>{st}</td><td>{bar}</td>\
                 <td class=\"num\">{done} / {total}</td><td class=\"num\">{failed}</td>\
                 <td class=\"num\">{rate}</td><td class=\"num\">{eta}</td><td class=\"num\">{age}</td></tr>",
                n = esc(&s.batch),
                q = esc(&s.queue),
                st = state(&s.state),
                bar = bar(s.total, &parts(s)),
                done = int(s.complete + s.failed),
                total = int(s.total),
                failed = int(s.failed),
                rate = rate(s.rate_per_s),
                eta = took(s.eta_s),
                age = took(Some(r.age_s)),
            );
        }
        body.push_str("</tbody></table>");
    }
    let mut pager = String::new();
    if q.before.is_some() {
        pager.push_str("<a href=\"/\">« newest</a>");
    }
    if let (true, Some(last)) = (more, rows.last()) {
        let mut link = format!("/?before={}", last.id);
        for (k, v) in [("state", &q.state), ("queue", &q.queue), ("name", &q.name)] {
            if let Some(v) = given(v) {
                let _ = write!(link, "&{k}={}", url_value(&v));
            }
        }
        let _ = write!(pager, "<a href=\"{}\">older »</a>", esc(&link));
    }
    let _ = write!(body, "<div class=\"pager\">{pager}</div>");
    Ok(viewer.page("Batches", Some(REFRESH_S), &body))
}

pub async fn batch(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let store = store(&shared)?;
    let s = store
        .batch_status(Some(&name))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Fail::NotFound(format!("batch {name} does not exist")))?;
    let id = store.batch_id(&name).await?;
    let samples = store.batch_samples(id, CHART_WINDOW_S).await?;
    let groups = store.failure_groups(&name, 20).await?;
    let audit = store.audit_entries(Some(&name), None, 20).await?;
    let n = esc(&name);
    let mut body = format!(
        "<h1>Batch {n} {}</h1><div class=\"actions\">",
        state(&s.state)
    );
    let b = [("batch", name.as_str())];
    if s.failed > 0 {
        body.push_str(&viewer.action_link("Retry all failed", "retry-failed", &b));
    }
    match s.state.as_str() {
        "paused" => body.push_str(&viewer.action_link("Resume", "resume", &b)),
        "ready" | "running" => body.push_str(&viewer.action_link("Pause", "pause", &b)),
        _ => {}
    }
    if s.breaker.is_some() && s.state != "paused" {
        body.push_str(&viewer.action_link("Close breaker", "resume", &b));
    }
    if matches!(s.state.as_str(), "ready" | "running" | "paused") {
        body.push_str(&viewer.action_link("Cancel", "cancel", &b));
    }
    let _ = write!(
        body,
        "<a class=\"button\" href=\"/batches/{n}/records\">Search records</a></div>"
    );
    let _ = write!(
        body,
        "<div class=\"wide\">{}</div>",
        bar(s.total, &parts(&s))
    );
    let _ = write!(
        body,
        "<dl class=\"facts\"><dt>Queue</dt><dd>{q}</dd><dt>Total</dt><dd>{total}</dd>\
         <dt>Pending</dt><dd>{p}</dd><dt>Running</dt><dd>{r}</dd><dt>Complete</dt><dd>{c}</dd>\
         <dt>Failed</dt><dd>{f}</dd><dt>Cancelled</dt><dd>{x}</dd>\
         <dt>Rate</dt><dd>{rate}</dd><dt>ETA</dt><dd>{eta}</dd><dt>Created</dt><dd>{created}</dd>\
         <dt>Max attempts</dt><dd>{max}</dd><dt>Paused because</dt><dd>{paused}</dd>\
         <dt>Circuit breaker</dt><dd>{breaker}</dd></dl>",
        q = esc(&s.queue),
        total = int(s.total),
        p = int(s.pending),
        r = int(s.running),
        c = int(s.complete),
        f = int(s.failed),
        x = int(s.cancelled),
        rate = rate(s.rate_per_s),
        eta = took(s.eta_s),
        created = esc(&s.created_at),
        max = s.max_attempts,
        paused = esc(s.paused_reason.as_deref().unwrap_or("–")),
        breaker = esc(s.breaker.as_deref().unwrap_or("closed")),
    );
    let _ = write!(
        body,
        "<h2>Throughput (records/s, last 6 hours)</h2>{}",
        chart::throughput(&samples)
    );
    body.push_str("<h2>Failures by cause</h2>");
    if groups.is_empty() {
        body.push_str("<p class=\"muted\">No failed records.</p>");
    } else {
        body.push_str(
            "<table class=\"groups\"><thead><tr><th>Group</th><th>Error</th><th class=\"num\">Records</th>\
             <th>First</th><th>Last</th><th>Sample ids</th><th></th></tr></thead><tbody>",
        );
        for g in &groups {
            let samples: Vec<String> = g
                .sample_ids
                .iter()
                .map(|id| {
                    format!(
                        "<a href=\"/batches/{n}/record?id={}\">{}</a>",
                        esc(&url_value(id)),
                        esc(&cut(id, 40))
                    )
                })
                .collect();
            let _ = write!(
                body,
                "<tr data-group=\"{k}\"><td class=\"mono\"><a href=\"/batches/{n}/records?group={k}\">{k}</a></td>\
                 <td class=\"mono\" title=\"{ex}\">{pat}</td><td class=\"num\">{count}</td>\
                 <td>{first}</td><td>{last}</td><td class=\"mono\">{samples}</td><td>{retry}</td></tr>",
                k = esc(&g.key),
                ex = esc(&cut(&g.example, 500)),
                pat = esc(&cut(&g.pattern, 200)),
                count = int(g.count),
                first = esc(&g.first_failed_at),
                last = esc(&g.last_failed_at),
                samples = samples.join(" "),
                retry = viewer.action_link(
                    "Retry group",
                    "retry-failed",
                    &[("batch", name.as_str()), ("group", g.key.as_str())]
                ),
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Attempts</h2>");
    if s.total <= ATTEMPTS_HISTOGRAM_MAX {
        let hist = store.attempts_histogram(id).await?;
        let max = hist.iter().map(|h| h.records).max().unwrap_or(1).max(1);
        body.push_str(
            "<table class=\"hist\"><thead><tr><th class=\"num\">Attempts</th><th>State</th>\
             <th class=\"num\">Records</th><th></th></tr></thead><tbody>",
        );
        for h in &hist {
            let _ = write!(
                body,
                "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                h.attempt,
                state(&h.state),
                int(h.records),
                bar(max, &[(h.state.as_str(), h.records)])
            );
        }
        body.push_str("</tbody></table>");
    } else {
        let _ = write!(
            body,
            "<p class=\"muted\">Counted for batches of up to {} records; search the failed \
             records by attempts instead.</p>",
            int(ATTEMPTS_HISTOGRAM_MAX)
        );
    }
    body.push_str("<h2>Actions taken</h2>");
    body.push_str(&super::actions::audit_table(&audit));
    let refresh = (!s.is_finished()).then_some(REFRESH_S);
    Ok(viewer.page(&format!("Batch {name}"), refresh, &body))
}
