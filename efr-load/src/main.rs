//! efr-load: load generator and verifier for Follower Maze servers. Parses the command line
//! (clap: the workloads, `compare`, `null-server`, `relay`) and runs the command. Exit status: 0 pass,
//! 1 verification failure (or, for `compare`, a row that did not behave as designed), 2 usage
//! or connection error.

use clap::{CommandFactory, FromArgMatches};
use efr_load::config::RUN_HEADING;
use efr_load::{Command, LoadConfig, EXIT_FAIL, EXIT_USAGE};

fn main() {
    let matches = LoadConfig::command().get_matches();
    let config = match LoadConfig::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    match &config.command {
        Some(Command::Compare(args)) => {
            refuse_run_options(&matches, "compare");
            std::process::exit(efr_load::compare::main(args, &command_line));
        }
        Some(Command::NullServer(args)) => {
            refuse_run_options(&matches, "null-server");
            std::process::exit(efr_load::ceiling::main(args));
        }
        Some(Command::Relay(args)) => {
            refuse_run_options(&matches, "relay");
            std::process::exit(efr_load::relay::main(args));
        }
        Some(Command::Workload(_)) | None => {}
    }
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

/// The run options (global, so that they may follow a workload's name) mean nothing to
/// `compare`, `null-server` and `relay`, which have flags of their own: refuse them there rather than
/// ignore them.
fn refuse_run_options(matches: &clap::ArgMatches, name: &str) {
    let Some((_, sub)) = matches.subcommand() else {
        return;
    };
    let cmd = LoadConfig::command();
    for arg in cmd.get_arguments() {
        let run_option = arg.is_global_set();
        let id = arg.get_id().as_str();
        let given = sub.try_contains_id(id).unwrap_or(false)
            && sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        if run_option && given {
            let flag = arg.get_long().unwrap_or(id);
            eprintln!(
                "efr-load {name}: --{flag} is one of the {RUN_HEADING:?}, which apply to a single \
                 run; `efr-load {name} --help` lists the flags of {name}"
            );
            std::process::exit(EXIT_USAGE);
        }
    }
}
