//! `worker`: claims records of a queue and processes them until SIGTERM/SIGINT.

use clap::Parser;
use std::process::ExitCode;
use tally_worker::cli::{self, Args};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => return ExitCode::from(cli::usage_error(&e)),
    };
    if let Err(e) = tally::logging::init(args.log_format(), "info") {
        tally::logging::report_in(args.log_format(), "worker", e);
        return ExitCode::from(cli::EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tally::logging::report("worker", format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // First signal: drain; second: exit at once (leases then expire as after a crash).
        let shutdown = CancellationToken::new();
        tokio::spawn(tally::shutdown::on_signals(
            shutdown.clone(),
            "no new claims, finishing in-flight records",
        ));
        cli::run(args, shutdown).await
    });
    ExitCode::from(code)
}
