//! `efr-sharded`: parse the flags, set up logging, run the server (which stops on SIGINT and
//! SIGTERM).

use std::process::ExitCode;

use clap::Parser;
use efr::config::Args;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Args::parse().into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("efr-sharded: {error}");
            return ExitCode::from(2);
        }
    };
    match efr::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("efr-sharded: {error}");
            ExitCode::FAILURE
        }
    }
}
