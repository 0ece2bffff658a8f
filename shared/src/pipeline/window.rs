//! Windows of time that runs cover, for backfills and watermarks. A pipeline whose params
//! hold `date` runs one day per run; one whose params hold `window_start` and `window_end`
//! runs any span (an hour with `--step 1h`). A window is `[start, end)`.

use super::params::Params;
use super::Pipeline;
use chrono::{NaiveDate, NaiveDateTime, TimeDelta};
use std::time::Duration;

/// Most windows one backfill may plan: a typo in `--to` should not queue a century.
pub const MAX_WINDOWS: usize = 10_000;

/// How a pipeline's params name a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// `date`: one day per run.
    Daily,
    /// `window_start` and `window_end`: any span.
    Span,
}

/// The span one run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Window {
    pub start: NaiveDateTime,
    pub end: NaiveDateTime,
}

/// The text PostgreSQL takes as a `timestamp` (and gives back with `to_char`).
pub const SQL_FORMAT: &str = "%Y-%m-%d %H:%M:%S";
const SPAN_FORMAT: &str = "%Y-%m-%dT%H:%M:%S";

impl Window {
    pub fn start_sql(&self) -> String {
        self.start.format(SQL_FORMAT).to_string()
    }

    pub fn end_sql(&self) -> String {
        self.end.format(SQL_FORMAT).to_string()
    }
}

/// The window kind of a pipeline, if its params name one.
pub fn kind(pipeline: &Pipeline) -> Option<WindowKind> {
    let has = |n: &str| pipeline.params.iter().any(|p| p == n);
    if has("window_start") && has("window_end") {
        Some(WindowKind::Span)
    } else if has("date") {
        Some(WindowKind::Daily)
    } else {
        None
    }
}

/// The params that are not the window's: a backfill or `--next` takes them from `--param`.
pub fn other_params(pipeline: &Pipeline, kind: WindowKind) -> Vec<String> {
    let window: &[&str] = match kind {
        WindowKind::Daily => &["date"],
        WindowKind::Span => &["window_start", "window_end"],
    };
    pipeline
        .params
        .iter()
        .filter(|p| !window.contains(&p.as_str()))
        .cloned()
        .collect()
}

/// A date, `YYYY-MM-DD`.
pub fn parse_date(text: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok()
}

/// A time: `YYYY-MM-DDTHH:MM[:SS]` (or with a space, or a trailing `Z`), or a date at
/// midnight.
pub fn parse_time(text: &str) -> Option<NaiveDateTime> {
    let t = text.trim().trim_end_matches('Z');
    for format in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(t, format) {
            return Some(t);
        }
    }
    parse_date(t).and_then(|d| d.and_hms_opt(0, 0, 0))
}

/// The window a run's params cover, if they are a window.
pub fn of_run(kind: WindowKind, params: &Params) -> Option<Window> {
    match kind {
        WindowKind::Daily => {
            let start = parse_date(params.get("date")?)?.and_hms_opt(0, 0, 0)?;
            Some(Window {
                start,
                end: start + TimeDelta::days(1),
            })
        }
        WindowKind::Span => {
            let start = parse_time(params.get("window_start")?)?;
            let end = parse_time(params.get("window_end")?)?;
            (end > start).then_some(Window { start, end })
        }
    }
}

/// The params of a window, beside `others`.
pub fn params_of(kind: WindowKind, window: &Window, others: &Params) -> Params {
    let mut params = others.clone();
    match kind {
        WindowKind::Daily => {
            params.insert("date".into(), window.start.format("%Y-%m-%d").to_string());
        }
        WindowKind::Span => {
            params.insert(
                "window_start".into(),
                window.start.format(SPAN_FORMAT).to_string(),
            );
            params.insert(
                "window_end".into(),
                window.end.format(SPAN_FORMAT).to_string(),
            );
        }
    }
    params
}

fn delta(step: Duration) -> Result<TimeDelta, String> {
    let secs = i64::try_from(step.as_secs()).map_err(|_| "--step is too long".to_string())?;
    if secs < 1 || step.subsec_nanos() != 0 {
        return Err("--step must be a whole number of seconds, at least 1s".into());
    }
    Ok(TimeDelta::seconds(secs))
}

/// The step of a kind: a day for dates, `step` (default a day) for spans.
pub fn step_of(kind: WindowKind, step: Option<Duration>) -> Result<TimeDelta, String> {
    match (kind, step) {
        (WindowKind::Daily, None) => Ok(TimeDelta::days(1)),
        (WindowKind::Daily, Some(s)) if s == Duration::from_secs(86_400) => Ok(TimeDelta::days(1)),
        (WindowKind::Daily, Some(_)) => Err(
            "--step: a pipeline with a `date` param runs one day per run; use params \
             [window_start, window_end] for other steps"
                .into(),
        ),
        (WindowKind::Span, None) => Ok(TimeDelta::days(1)),
        (WindowKind::Span, Some(s)) => delta(s),
    }
}

/// The windows of a backfill. Dates: `from` to `to`, both included. Spans: windows of `step`
/// from `from`, the last one ending at or before `to`.
pub fn plan(
    kind: WindowKind,
    from: &str,
    to: &str,
    step: Option<Duration>,
) -> Result<Vec<Window>, String> {
    let step = step_of(kind, step)?;
    let (start, end) = match kind {
        WindowKind::Daily => {
            let f = parse_date(from)
                .ok_or_else(|| format!("--from {from:?} is not a date (YYYY-MM-DD)"))?;
            let t =
                parse_date(to).ok_or_else(|| format!("--to {to:?} is not a date (YYYY-MM-DD)"))?;
            if t < f {
                return Err(format!("--to {to} is before --from {from}"));
            }
            let start = f.and_hms_opt(0, 0, 0).unwrap_or_default();
            (start, t.and_hms_opt(0, 0, 0).unwrap_or_default() + step)
        }
        WindowKind::Span => {
            let f = parse_time(from).ok_or_else(|| {
                format!("--from {from:?} is not a time (YYYY-MM-DDTHH:MM:SS or YYYY-MM-DD)")
            })?;
            let t = parse_time(to).ok_or_else(|| {
                format!("--to {to:?} is not a time (YYYY-MM-DDTHH:MM:SS or YYYY-MM-DD)")
            })?;
            if t <= f {
                return Err(format!("--to {to} is not after --from {from}"));
            }
            (f, t)
        }
    };
    let mut windows = Vec::new();
    let mut at = start;
    while at + step <= end {
        if windows.len() == MAX_WINDOWS {
            return Err(format!(
                "the range holds more than {MAX_WINDOWS} windows; backfill it in parts"
            ));
        }
        windows.push(Window {
            start: at,
            end: at + step,
        });
        at += step;
    }
    if windows.is_empty() {
        return Err(format!(
            "no whole window of the step fits between --from {from} and --to {to}"
        ));
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> NaiveDateTime {
        parse_time(s).unwrap()
    }

    #[test]
    fn dates_are_days_and_both_ends_are_included() {
        let w = plan(WindowKind::Daily, "2024-06-01", "2024-06-07", None).unwrap();
        assert_eq!(w.len(), 7);
        assert_eq!(w[0].start, t("2024-06-01"));
        assert_eq!(w[6].end, t("2024-06-08"));
        let p = params_of(WindowKind::Daily, &w[1], &Params::new());
        assert_eq!(p["date"], "2024-06-02");
        assert_eq!(of_run(WindowKind::Daily, &p), Some(w[1]));
        assert!(plan(WindowKind::Daily, "2024-06-07", "2024-06-01", None).is_err());
        assert!(plan(WindowKind::Daily, "2024-06-01", "June", None).is_err());
        assert!(plan(
            WindowKind::Daily,
            "2024-06-01",
            "2024-06-02",
            Some(Duration::from_secs(3600))
        )
        .is_err());
        assert!(plan(WindowKind::Daily, "1000-01-01", "9000-01-01", None).is_err());
    }

    #[test]
    fn hourly_windows_end_at_or_before_to() {
        let hour = Some(Duration::from_secs(3600));
        let w = plan(WindowKind::Span, "2024-06-01", "2024-06-02", hour).unwrap();
        assert_eq!(w.len(), 24);
        let p = params_of(WindowKind::Span, &w[23], &Params::new());
        assert_eq!(p["window_start"], "2024-06-01T23:00:00");
        assert_eq!(p["window_end"], "2024-06-02T00:00:00");
        assert_eq!(of_run(WindowKind::Span, &p), Some(w[23]));
        let w = plan(
            WindowKind::Span,
            "2024-06-01T00:00",
            "2024-06-01T02:30",
            hour,
        )
        .unwrap();
        assert_eq!(w.len(), 2, "a partial last hour is not a window");
        assert!(plan(
            WindowKind::Span,
            "2024-06-01T00:00",
            "2024-06-01T00:30",
            hour
        )
        .is_err());
    }

    #[test]
    fn params_that_are_no_window_have_none() {
        let mut p = Params::new();
        p.insert("date".into(), "'; drop table x; --".into());
        assert_eq!(of_run(WindowKind::Daily, &p), None);
        p.insert("date".into(), "2024-02-30".into());
        assert_eq!(of_run(WindowKind::Daily, &p), None);
    }
}
