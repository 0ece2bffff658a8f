//! `coordinator`: migrate the schema, prepare batches, watch and retry them.

use clap::Parser;
use std::process::ExitCode;
use tally::logging::LogFormat;
use tally_coordinator::{exit, Cli};

/// The commands, plus how to log.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Prepare batches of records, watch them and retry their failures"
)]
struct Args {
    #[command(flatten)]
    cli: Cli,
    /// Log lines on stderr: text (human-readable) or json (one object per line). The level
    /// comes from RUST_LOG (default warn).
    #[arg(long, global = true, env = tally::logging::ENV_LOG_FORMAT, value_name = "text|json", default_value_t = tally::logging::DEFAULT_LOG_FORMAT)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let Args { cli, log_format } = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => return ExitCode::from(usage_error(&e)),
    };
    if let Err(e) = tally::logging::init(log_format, "warn") {
        tally::logging::report_in(log_format, "coordinator", e);
        return ExitCode::from(exit::USAGE);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            let message = format!("cannot start the async runtime: {e}");
            tally::logging::report("coordinator", message);
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(runtime.block_on(tally_coordinator::run(cli)))
}

/// Prints what clap says (help and version on stdout, errors on stderr); returns the exit
/// code. Errors come before `--log-format` is parsed, so the format is read from the raw
/// arguments and the environment: with json, an error is one JSON line holding clap's message
/// without its colours and its `error: ` prefix (the level says it).
fn usage_error(e: &clap::Error) -> u8 {
    if !e.use_stderr() {
        let _ = e.print();
        return exit::OK;
    }
    match tally::logging::format_from_args(std::env::args_os()) {
        LogFormat::Text => {
            let _ = e.print();
        }
        LogFormat::Json => {
            let text = e.render().to_string();
            let text = text.trim_end();
            let message = text.strip_prefix("error: ").unwrap_or(text);
            tally::logging::report_in(LogFormat::Json, "coordinator", message);
        }
    }
    exit::USAGE
}
