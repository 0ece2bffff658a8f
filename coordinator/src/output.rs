//! How the coordinator prints: tables for people, JSON for programs.

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tally::model::FailureGroup;
use tally::{BatchStatus, FailedRecord};

/// A spinner with a count and rate, only on a terminal.
pub fn progress_bar(on_terminal: bool) -> Option<ProgressBar> {
    if !on_terminal {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {human_pos} records written ({per_sec}) {elapsed}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(bar)
}

/// One object when `single`, else an array.
pub fn print_json<T: Serialize>(items: &[T], single: bool) {
    let text = match (single, items.first()) {
        (true, Some(first)) => serde_json::to_string_pretty(first),
        _ => serde_json::to_string_pretty(items),
    };
    match text {
        Ok(text) => println!("{text}"),
        Err(e) => tally::logging::report("coordinator", format!("cannot encode JSON: {e}")),
    }
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The state as people read it: an interrupted batch says what to do.
fn shown_state(s: &BatchStatus) -> String {
    if s.state == "interrupted" {
        "interrupted: re-run prepare".to_string()
    } else {
        s.state.clone()
    }
}

/// `batch: state, complete/total, failed, rate, eta` on one line.
pub fn status_line(s: &BatchStatus) -> String {
    let mut line = format!(
        "{}: {} — {}/{} complete, {} failed, {} pending, {} running",
        s.batch,
        shown_state(s),
        s.complete,
        s.total,
        s.failed,
        s.pending,
        s.running
    );
    if let Some(rate) = s.rate_per_s {
        line.push_str(&format!(", {rate:.0}/s"));
    }
    if let Some(eta) = s.eta_s {
        line.push_str(&format!(", ETA {}", duration(eta)));
    }
    if let Some(reason) = &s.paused_reason {
        line.push_str(&format!(" (paused: {reason})"));
    }
    if let Some(breaker) = &s.breaker {
        line.push_str(&format!(" (circuit breaker {breaker})"));
    }
    line
}

pub fn print_status_table(statuses: &[BatchStatus]) {
    if statuses.is_empty() {
        println!("no batches");
        return;
    }
    println!(
        "{:<24} {:<12} {:<27} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
        "BATCH",
        "QUEUE",
        "STATE",
        "TOTAL",
        "PENDING",
        "RUNNING",
        "COMPLETE",
        "FAILED",
        "RATE/S",
        "ETA"
    );
    for s in statuses {
        println!(
            "{:<24} {:<12} {:<27} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8}",
            s.batch,
            s.queue,
            shown_state(s),
            s.total,
            s.pending,
            s.running,
            s.complete,
            s.failed,
            s.rate_per_s
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
            s.eta_s.map(duration).unwrap_or_else(|| "-".into()),
        );
        if let Some(reason) = &s.paused_reason {
            println!("  {}: paused: {reason}", s.batch);
        }
        if let Some(breaker) = &s.breaker {
            println!(
                "  {}: circuit breaker of queue {} {breaker}",
                s.batch, s.queue
            );
        }
    }
}

pub fn print_failed_table(failed: &[FailedRecord]) {
    if failed.is_empty() {
        println!("no failed records");
        return;
    }
    println!(
        "{:<24} {:>8} {:<20}  LAST ERROR",
        "RECORD", "ATTEMPTS", "FAILED AT"
    );
    for f in failed {
        println!(
            "{:<24} {:>8} {:<20}  {}",
            f.record_id,
            f.attempts,
            f.failed_at,
            f.last_error.replace('\n', " ")
        );
    }
}

/// `failed --group-by error`: one block per cause, largest first.
pub fn print_failure_groups(groups: &[FailureGroup]) {
    if groups.is_empty() {
        println!("no failed records");
        return;
    }
    println!(
        "{:<12} {:>8} {:<20} {:<20}  PATTERN",
        "GROUP", "RECORDS", "FIRST FAILED", "LAST FAILED"
    );
    for g in groups {
        println!(
            "{:<12} {:>8} {:<20} {:<20}  {}",
            g.key,
            g.count,
            g.first_failed_at,
            g.last_failed_at,
            g.pattern.replace('\n', " ")
        );
        println!("{:<12} e.g. {}", "", g.sample_ids.join(", "));
    }
}
