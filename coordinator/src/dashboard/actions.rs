//! Actions from the dashboard: a confirmation page that says how many records an action will
//! touch, then a POST that checks credentials and the CSRF token and takes the same action as
//! the CLI ([`crate::actions::Action`]), written to the audit table. Also signing in and out.

use super::auth::{Identity, COOKIE, SESSION};
use super::html::{esc, int};
use super::{store, Fail, Viewer};
use crate::actions::Action;
use crate::serve::Shared;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::SystemTime;
use tally::store::dashboard::AuditEntry;

/// The action named `kind` with its fields; a missing field is an error naming it.
fn parse(kind: &str, f: &HashMap<String, String>) -> Result<Action, Fail> {
    let field = |k: &str| -> Result<String, Fail> {
        f.get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| Fail::Bad(format!("action {kind}: the field {k:?} is missing")))
    };
    let opt = |k: &str| f.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(match kind {
        "retry-failed" => Action::RetryFailed {
            batch: field("batch")?,
            group: opt("group"),
            reset_attempts: f
                .get("reset_attempts")
                .is_some_and(|v| v == "on" || v == "true"),
        },
        "pause" => Action::Pause {
            batch: field("batch")?,
        },
        "resume" => Action::Resume {
            batch: field("batch")?,
        },
        "cancel" => Action::Cancel {
            batch: field("batch")?,
        },
        "pipeline-repair" => Action::Repair {
            run: field("run")?,
            stage: opt("stage"),
        },
        other => return Err(Fail::NotFound(format!("no action {other:?}"))),
    })
}

/// Where to go after the action: the batch's page or the run's.
fn back(action: &Action) -> String {
    match action {
        Action::RetryFailed { batch, .. }
        | Action::Pause { batch }
        | Action::Resume { batch }
        | Action::Cancel { batch } => format!("/batches/{batch}"),
        Action::Repair { run, .. } => format!("/runs/{run}"),
    }
}

fn title(action: &Action) -> String {
    match action {
        Action::RetryFailed {
            batch,
            group: Some(g),
            ..
        } => format!("Retry error group {g} of batch {batch}"),
        Action::RetryFailed { batch, .. } => format!("Retry every failed record of batch {batch}"),
        Action::Pause { batch } => format!("Pause batch {batch}"),
        Action::Resume { batch } => format!("Resume batch {batch}"),
        Action::Cancel { batch } => format!("Cancel batch {batch}"),
        Action::Repair { run, .. } => format!("Repair pipeline run {run}"),
    }
}

fn disabled() -> Fail {
    Fail::Forbidden(
        "actions are off: start serve with --dashboard-actions and credentials to enable them"
            .into(),
    )
}

pub async fn confirm(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(kind): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Fail> {
    let viewer = Viewer::of(&shared, &headers);
    let auth = shared.dashboard.as_ref().ok_or_else(disabled)?;
    let action = parse(&kind, &q)?;
    let (what, rows) = action.preview(store(&shared)?).await?;
    let mut body = format!(
        "<h1>{}</h1><p class=\"confirm\">This touches <strong>{} records</strong>: {}.</p>",
        esc(&title(&action)),
        int(rows),
        esc(&what)
    );
    match &viewer.who {
        Some(who) => {
            let mut hidden = String::new();
            for (k, v) in &q {
                let _ = write!(
                    hidden,
                    "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                    esc(k),
                    esc(v)
                );
            }
            let reset = if matches!(action, Action::RetryFailed { .. }) {
                "<label><input type=\"checkbox\" name=\"reset_attempts\"> reset their attempts \
                 (each gets max attempts again)</label>"
            } else {
                ""
            };
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/actions/{kind}\" class=\"confirm\">{hidden}\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{reset}\
                 <button class=\"danger\" id=\"confirm\">Yes, {label}</button> \
                 <a href=\"{back}\">No, go back</a></form>",
                kind = esc(&kind),
                csrf = esc(&auth.csrf(&who.user)),
                label = esc(&title(&action).to_lowercase()),
                back = esc(&back(&action)),
            );
        }
        None => {
            body.push_str("<p>Sign in to take this action: <a href=\"/login\">sign in</a>.</p>")
        }
    }
    Ok(viewer.page(&title(&action), None, &body))
}

pub async fn perform(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(kind): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Result<Response, Fail> {
    let auth = shared.dashboard.as_ref().ok_or_else(disabled)?;
    let Some(Identity { user, bearer }) = auth.identify(&headers, SystemTime::now()) else {
        return Err(Fail::Forbidden(
            "no credentials: sign in at /login, or send a bearer token".into(),
        ));
    };
    if !bearer && !f.get("csrf").is_some_and(|t| auth.csrf_ok(&user, t)) {
        return Err(Fail::Forbidden(
            "the form's CSRF token is missing or wrong: reload the page and try again".into(),
        ));
    }
    let action = parse(&kind, &f)?;
    let done = action.run(store(&shared)?, &user).await?;
    tracing::info!(actor = %user, action = action.name(), rows = done.rows, "dashboard action");
    let viewer = Viewer::of(&shared, &headers);
    let body = format!(
        "<h1>{}</h1><p class=\"done\" id=\"done\">{}</p><p><a href=\"{}\">Back</a></p>",
        esc(&title(&action)),
        esc(&done.message).replace('\n', "<br>"),
        esc(&back(&action))
    );
    Ok(viewer.page("Done", None, &body))
}

/// The audit entries as a table.
pub fn audit_table(entries: &[AuditEntry]) -> String {
    if entries.is_empty() {
        return "<p class=\"muted\">None yet.</p>".into();
    }
    let mut out = String::from(
        "<table class=\"audit\"><thead><tr><th>When</th><th>Who</th><th>Action</th>\
         <th>Detail</th><th class=\"num\">Rows</th></tr></thead><tbody>",
    );
    for e in entries {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            esc(&e.at),
            esc(&e.actor),
            esc(&e.action),
            esc(e.detail.as_deref().unwrap_or("")),
            int(e.rows)
        );
    }
    out.push_str("</tbody></table>");
    out
}

pub async fn login_form(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    shared.dashboard.as_ref().ok_or_else(disabled)?;
    let viewer = Viewer::of(&shared, &headers);
    Ok(viewer.page(
        "Sign in",
        None,
        "<h1>Sign in</h1><form method=\"post\" action=\"/login\" class=\"login\">\
         <label>User <input name=\"user\" autocomplete=\"username\"></label>\
         <label>Password or token <input name=\"password\" type=\"password\" autocomplete=\"current-password\"></label>\
         <button id=\"sign-in\">Sign in</button></form>\
         <p class=\"muted\">With TALLY_DASHBOARD_TOKEN, the token is the password and the user \
         name is what the audit records.</p>",
    ))
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

fn redirect(to: &str, cookie: Option<String>) -> Response {
    let mut r = (StatusCode::SEE_OTHER, "").into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    super::html::secure(r)
}

pub async fn login(
    State(shared): State<Arc<Shared>>,
    Form(f): Form<LoginForm>,
) -> Result<Response, Fail> {
    let auth = shared.dashboard.as_ref().ok_or_else(disabled)?;
    let Some(user) = auth.login(&f.user, &f.password) else {
        tracing::warn!(user = %f.user, "dashboard: a sign-in was refused");
        return Err(Fail::Forbidden("wrong user or password".into()));
    };
    let session = auth.session(&user, SystemTime::now());
    Ok(redirect(
        "/",
        Some(format!(
            "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            SESSION.as_secs()
        )),
    ))
}

pub async fn logout() -> Response {
    redirect(
        "/",
        Some(format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        )),
    )
}
