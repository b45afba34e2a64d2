//! `efr-sharded`: parse the flags, set up logging, run the server (which stops on SIGINT and
//! SIGTERM). Two helper subcommands print a shell completion script and the man page.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use efr::config::Args;

/// Forwards an unordered event stream, in sequence order, to the user clients it
/// concerns, on N thread-per-core executors (the Follower Maze protocol).
#[derive(Debug, Parser)]
#[command(name = "efr-sharded", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    #[command(flatten)]
    server: Args,
}

/// What the binary can print instead of running the server.
#[derive(Debug, Subcommand)]
enum Tool {
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `efr-sharded man > efr-sharded.1`.
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.tool {
        Some(Tool::Completions { shell }) => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "efr-sharded",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Some(Tool::Man) => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("efr-sharded: cannot write the man page: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    // Colours only on a terminal: a log written to a file or a pipe stays plain text.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let config = match cli.server.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("efr-sharded: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(tls) = &config.tls {
        if let Err(error) = efr::tls::reload_on_sighup(tls.clone()) {
            eprintln!("efr-sharded: cannot handle SIGHUP for certificate reloads: {error}");
            return ExitCode::from(2);
        }
    }
    match efr::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("efr-sharded: {error}");
            ExitCode::FAILURE
        }
    }
}
