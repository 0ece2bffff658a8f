//! The workers seen recently, from their heartbeats and leases, with their queue's breaker.

use super::html::{esc, int, state, took};
use super::{store, Fail, Viewer, REFRESH_S};
use crate::serve::Shared;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use std::fmt::Write;
use std::sync::Arc;

/// Workers seen within this long are listed.
const SEEN_WITHIN_S: f64 = 3600.0;
/// A worker silent for longer than this is shown as silent (it beats every rescue interval,
/// 5 s by default).
const SILENT_AFTER_S: f64 = 60.0;

pub async fn index(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let workers = store(&shared)?.dashboard_workers(SEEN_WITHIN_S).await?;
    let mut body = String::from("<h1>Workers</h1>");
    if workers.is_empty() {
        body.push_str("<p class=\"muted\">No worker seen in the last hour.</p>");
    } else {
        body.push_str(
            "<table><thead><tr><th>Worker</th><th>Queue</th><th>Handler</th><th>Status</th>\
             <th class=\"num\">Concurrency</th><th class=\"num\">Leases</th>\
             <th class=\"num\">Leased rows</th><th>Breaker</th><th>Started</th>\
             <th class=\"num\">Last seen</th></tr></thead><tbody>",
        );
        for w in &workers {
            let status = if w.stopped {
                "stopped"
            } else if w.seen_ago_s > SILENT_AFTER_S {
                "silent"
            } else {
                "live"
            };
            let _ = write!(
                body,
                "<tr><td class=\"mono\">{id}</td><td>{q}</td><td>{h}</td><td>{st}</td>\
                 <td class=\"num\">{c}</td><td class=\"num\">{l}</td><td class=\"num\">{rows}</td>\
                 <td>{b}</td><td>{started}</td><td class=\"num\">{seen} ago</td></tr>",
                id = esc(&w.id),
                q = esc(&w.queue),
                h = esc(&w.handler),
                st = state(status),
                c = w.concurrency,
                l = int(w.leases),
                rows = int(w.leased_rows),
                b = state(&w.breaker),
                started = esc(&w.started_at),
                seen = took(Some(w.seen_ago_s)),
            );
        }
        body.push_str("</tbody></table>");
        body.push_str(
            "<p class=\"muted\">Leased rows: rows under the worker's unexpired leases; a lease \
             whose rows are all written back is dropped at the worker's next renewal.</p>",
        );
    }
    Ok(viewer.page("Workers", Some(REFRESH_S), &body))
}
