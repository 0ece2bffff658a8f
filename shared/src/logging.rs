//! Log output of both binaries: human-readable text or JSON lines on stderr, with the level
//! taken from `RUST_LOG`.
//!
//! ```no_run
//! use tally::logging::{self, LogFormat};
//!
//! logging::init(LogFormat::Json, "info").expect("logging set up once");
//! tracing::info!(queue = "emails", "worker started");
//! // {"timestamp":"…","level":"INFO","fields":{"message":"worker started","queue":"emails"},…}
//! ```

use std::ffi::OsStr;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::sync::OnceLock;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::EnvFilter;

/// Environment variable that chooses the log format (`text` or `json`).
pub const ENV_LOG_FORMAT: &str = "TALLY_LOG_FORMAT";
/// Log format used unless `--log-format` or [`ENV_LOG_FORMAT`] says otherwise.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event; coloured when stderr is a terminal.
    Text,
    /// One JSON object per line, with the event's fields under `fields` and the enclosing
    /// spans' fields (batch, queue, record id) under `span` and `spans`: for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}; use text or json")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `RUST_LOG` holds a directive that does not parse.
    #[error("RUST_LOG is invalid: {0}")]
    Filter(String),
    /// A global subscriber was already installed in this process.
    #[error("logging is already set up: {0}")]
    AlreadySet(String),
}

/// Installs the process-wide subscriber writing to stderr in `format`. The level comes from
/// `RUST_LOG` (e.g. `debug`, `tally_worker=debug,info`), else `default_level`. Call once,
/// early in `main`.
pub fn init(format: LogFormat, default_level: &str) -> Result<(), LogError> {
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(&spec).map_err(|e| LogError::Filter(e.to_string()))?
        }
        _ => EnvFilter::try_new(default_level).map_err(|e| LogError::Filter(e.to_string()))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    installed.map_err(|e| LogError::AlreadySet(e.to_string()))?;
    // Errors reported later through `report` follow the same format.
    let _ = INSTALLED.set(format);
    Ok(())
}

/// The format [`init`] installed in this process.
static INSTALLED: OnceLock<LogFormat> = OnceLock::new();

/// The format [`init`] installed, or `None` before it (or when it failed).
pub fn installed_format() -> Option<LogFormat> {
    INSTALLED.get().copied()
}

/// The format a command line asks for, for messages written before it is parsed (usage
/// errors): the value of the last `--log-format json` or `--log-format=json` in `args` (up to
/// a `--`), else [`ENV_LOG_FORMAT`], else [`DEFAULT_LOG_FORMAT`]. An unknown value counts as
/// the default, so the complaint about it is readable text.
pub fn format_from_args<I>(args: I) -> LogFormat
where
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    let mut from_args = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(arg) = arg.as_ref().to_str() else {
            continue;
        };
        if arg == "--" {
            break;
        }
        let value = match arg.strip_prefix("--log-format") {
            Some("") => args
                .next()
                .and_then(|v| v.as_ref().to_str().map(str::to_owned)),
            Some(rest) => rest.strip_prefix('=').map(str::to_owned),
            None => continue,
        };
        if let Some(value) = value {
            from_args = Some(value.parse().unwrap_or(DEFAULT_LOG_FORMAT));
        }
    }
    from_args.unwrap_or_else(|| {
        std::env::var(ENV_LOG_FORMAT)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_LOG_FORMAT)
    })
}

/// Writes an error that ends (or explains the end of) a run of `binary` to stderr, in the
/// format [`init`] installed, else as text. See [`report_in`].
pub fn report(binary: &str, message: impl fmt::Display) {
    report_in(
        installed_format().unwrap_or(DEFAULT_LOG_FORMAT),
        binary,
        message,
    );
}

/// Writes an error of `binary` to stderr in `format`, whatever `RUST_LOG` says (the one
/// line that explains an exit must not be filtered away): as text `binary: message`, or as
/// one JSON object shaped like the other JSON lines:
/// `{"timestamp":"…","level":"ERROR","fields":{"message":"…"},"target":"worker"}`.
pub fn report_in(format: LogFormat, binary: &str, message: impl fmt::Display) {
    let line = match format {
        LogFormat::Text => format!("{binary}: {message}\n"),
        LogFormat::Json => json_error_line(binary, &message.to_string()),
    };
    // One write, so that the line does not interleave with the subscriber's lines.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// One JSON error line (with its newline), timestamped like the subscriber's lines.
fn json_error_line(target: &str, message: &str) -> String {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        timestamp: String,
        level: &'static str,
        fields: Fields<'a>,
        target: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Fields<'a> {
        message: &'a str,
    }
    let mut timestamp = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut timestamp));
    let line = Line {
        timestamp,
        level: "ERROR",
        fields: Fields { message },
        target,
    };
    // Serialising strings into a string cannot fail; the fallback keeps the line JSON anyway.
    let mut text = serde_json::to_string(&line)
        .unwrap_or_else(|_| r#"{"level":"ERROR","fields":{"message":"unprintable error"}}"#.into());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_by_name_and_reject_others() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!(" JSON ".parse::<LogFormat>(), Ok(LogFormat::Json));
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(
            err.contains("\"yaml\"") && err.contains("text or json"),
            "{err}"
        );
        assert_eq!(DEFAULT_LOG_FORMAT.to_string(), "text");
    }

    #[test]
    fn the_command_line_format_is_found_before_parsing() {
        let scan = |args: &[&str]| format_from_args(args.iter());
        assert_eq!(scan(&["worker", "--log-format", "json"]), LogFormat::Json);
        assert_eq!(
            scan(&["worker", "--log-format=JSON", "-x"]),
            LogFormat::Json
        );
        assert_eq!(
            scan(&["w", "--log-format", "json", "--log-format=text"]),
            LogFormat::Text
        );
        assert_eq!(
            scan(&["w", "--log-format=yaml", "--log-format"]),
            scan(&["w"]),
            "unknown or missing values fall back"
        );
        assert_eq!(
            scan(&["w", "--", "--log-format", "json"]),
            scan(&["w"]),
            "not after --"
        );
    }

    #[test]
    fn json_error_lines_are_one_object_with_level_message_and_target() {
        let line = json_error_line("worker", "--queue \"a\nb\" is bad");
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["target"], "worker");
        assert_eq!(v["fields"]["message"], "--queue \"a\nb\" is bad");
        assert!(
            v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{v}"
        );
    }
}
