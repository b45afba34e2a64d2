//! efr-load: load generator and verifier for Follower Maze servers. Parses the flags, runs
//! [`efr_load::run`], prints the summary. Exit status: 0 pass, 1 verification failure,
//! 2 usage or connection error. `efr-load compare` and `efr-load null-server` have flags of
//! their own (src/compare.rs, src/ceiling.rs).

use clap::Parser;
use efr_load::{LoadConfig, EXIT_FAIL, EXIT_USAGE};

fn main() {
    // `efr-load compare ...` has flags of its own (src/compare.rs).
    match std::env::args().nth(1).as_deref() {
        Some("compare") => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            std::process::exit(efr_load::compare::main_from_args(args));
        }
        // The ceiling as a process of its own, started by `compare`.
        Some("null-server") => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            std::process::exit(efr_load::ceiling::main_from_args(args));
        }
        _ => {}
    }
    let config = LoadConfig::parse();
    match efr_load::run(&config) {
        Ok(report) => {
            print!("{}", report.summary());
            std::process::exit(if report.pass { 0 } else { EXIT_FAIL });
        }
        Err(e) => {
            eprintln!("efr-load: {e:#}");
            std::process::exit(EXIT_USAGE);
        }
    }
}
