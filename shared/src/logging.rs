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

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;
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
    installed.map_err(|e| LogError::AlreadySet(e.to_string()))
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
}
