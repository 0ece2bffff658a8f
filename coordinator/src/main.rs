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
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = tally::logging::init(log_format, "warn") {
        eprintln!("coordinator: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(runtime.block_on(tally_coordinator::run(cli)))
}
