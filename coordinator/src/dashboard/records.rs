//! Record search in one batch (by id, exact or prefix; by state, error group or attempts) and
//! one record in full. Every page is a keyset page over an index.

use super::html::{cut, esc, state, url_value};
use super::{given, store, Fail, Viewer, PAGE};
use crate::serve::Shared;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;
use tally::store::dashboard::RecordFilter;

const RECORD_STATES: [&str; 5] = ["pending", "running", "complete", "failed", "cancelled"];

#[derive(Deserialize, Default)]
pub struct SearchQuery {
    id: Option<String>,
    /// `prefix`, or exact.
    #[serde(rename = "match")]
    mode: Option<String>,
    state: Option<String>,
    group: Option<String>,
    min_attempts: Option<String>,
    after: Option<String>,
}

pub async fn search(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<SearchQuery>,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let store = store(&shared)?;
    let batch_id = store.batch_id(&name).await?;
    let state_filter = given(&q.state);
    if let Some(s) = &state_filter {
        if !RECORD_STATES.contains(&s.as_str()) {
            return Err(Fail::Bad(format!(
                "state {s:?} is not one of {}",
                RECORD_STATES.join(", ")
            )));
        }
    }
    let min_attempts = match given(&q.min_attempts) {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<i32>()
                .map_err(|_| Fail::Bad(format!("min_attempts {v:?} is not a whole number")))?,
        ),
    };
    let prefix = q.mode.as_deref() == Some("prefix");
    let filter = RecordFilter {
        id: given(&q.id),
        prefix,
        state: state_filter.clone(),
        group: given(&q.group),
        min_attempts,
        after: given(&q.after),
        limit: PAGE,
    };
    let page = store.dashboard_records(batch_id, &filter).await?;
    let n = esc(&name);
    let mut body = format!("<h1>Records of <a href=\"/batches/{n}\">{n}</a></h1>");
    let mut states = String::from("<option value=\"\">any state</option>");
    for s in RECORD_STATES {
        let sel = if state_filter.as_deref() == Some(s) {
            " selected"
        } else {
            ""
        };
        let _ = write!(states, "<option{sel}>{s}</option>");
    }
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/batches/{n}/records\">\
         <input name=\"id\" placeholder=\"record id\" value=\"{id}\">\
         <select name=\"match\"><option value=\"exact\">exact</option>\
         <option value=\"prefix\"{pre}>prefix</option></select>\
         <select name=\"state\">{states}</select>\
         <input name=\"group\" placeholder=\"error group\" value=\"{group}\">\
         <input name=\"min_attempts\" placeholder=\"attempts ≥\" value=\"{min}\" size=\"8\">\
         <button>Search</button></form>",
        id = esc(q.id.as_deref().unwrap_or("")),
        pre = if prefix { " selected" } else { "" },
        group = esc(q.group.as_deref().unwrap_or("")),
        min = esc(q.min_attempts.as_deref().unwrap_or("")),
    );
    if page.rows.is_empty() {
        body.push_str("<p class=\"muted\">No record matches.</p>");
    } else {
        body.push_str(
            "<table class=\"records\"><thead><tr><th>Record id</th><th>State</th>\
             <th class=\"num\">Attempts</th><th>Last error</th><th>Updated</th></tr></thead><tbody>",
        );
        for r in &page.rows {
            let _ = write!(
                body,
                "<tr><td class=\"mono\"><a href=\"/batches/{n}/record?id={link}\">{id}</a></td>\
                 <td>{st}</td><td class=\"num\">{a}</td><td class=\"mono\">{err}</td><td>{at}</td></tr>",
                link = esc(&url_value(&r.record_id)),
                id = esc(&cut(&r.record_id, 80)),
                st = state(&r.state),
                a = r.attempt,
                err = esc(&cut(r.last_error.as_deref().unwrap_or(""), 160)),
                at = esc(&r.updated_at),
            );
        }
        body.push_str("</tbody></table>");
    }
    if let Some(next) = &page.next {
        let mut link = format!("/batches/{name}/records?after={}", url_value(next));
        for (k, v) in [
            ("id", &q.id),
            ("match", &q.mode),
            ("state", &q.state),
            ("group", &q.group),
            ("min_attempts", &q.min_attempts),
        ] {
            if let Some(v) = given(v) {
                let _ = write!(link, "&{k}={}", url_value(&v));
            }
        }
        let _ = write!(
            body,
            "<div class=\"pager\"><a href=\"{}\">next page »</a></div>",
            esc(&link)
        );
    }
    Ok(viewer.page(&format!("Records of {name}"), None, &body))
}

#[derive(Deserialize)]
pub struct DetailQuery {
    id: String,
}

pub async fn detail(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<DetailQuery>,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let store = store(&shared)?;
    let batch_id = store.batch_id(&name).await?;
    let r = store
        .dashboard_record(batch_id, &q.id)
        .await?
        .ok_or_else(|| Fail::NotFound(format!("batch {name} has no record {:?}", q.id)))?;
    let n = esc(&name);
    let dash = |v: &Option<String>| esc(v.as_deref().unwrap_or("–"));
    let body = format!(
        "<h1>Record <code>{id}</code> of <a href=\"/batches/{n}\">{n}</a></h1>\
         <dl class=\"facts\"><dt>State</dt><dd>{st}</dd><dt>Attempts</dt><dd>{a}</dd>\
         <dt>Last error</dt><dd class=\"mono\">{err}</dd><dt>Created</dt><dd>{created}</dd>\
         <dt>Updated</dt><dd>{updated}</dd><dt>Claimable from</dt><dd>{avail}</dd>\
         <dt>Lease holder</dt><dd class=\"mono\">{owner}</dd><dt>Lease</dt><dd>{lease}</dd>\
         <dt>Lease expires</dt><dd>{expires}</dd></dl><h2>Payload</h2><pre class=\"payload\">{payload}</pre>",
        id = esc(&r.record_id),
        st = state(&r.state),
        a = r.attempt,
        err = dash(&r.last_error),
        created = esc(&r.created_at),
        updated = esc(&r.updated_at),
        avail = dash(&r.available_at),
        owner = dash(&r.lease_owner),
        lease = r.lease_id.map(|l| l.to_string()).unwrap_or_else(|| "–".into()),
        expires = dash(&r.lease_expires_at),
        payload = esc(&r.payload),
    );
    Ok(viewer.page(
        &format!("Record {} of {name}", cut(&r.record_id, 40)),
        None,
        &body,
    ))
}
