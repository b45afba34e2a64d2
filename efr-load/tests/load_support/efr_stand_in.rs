//! efr-sharded for the tests that start servers as processes (`efr-load compare`): the test
//! binary itself, re-run with one ignored test selected, parses efr-sharded's own flags
//! (`efr::config::Args`) and runs `efr::server::run` until SIGTERM, exactly as the
//! efr-sharded binary does. A test of another package cannot name efr-sharded's binary
//! (`CARGO_BIN_EXE_*` exists only inside its package) and a binary found in `target/` may be
//! stale or missing; this one is always built from the code under test.
//!
//! Each test file that uses [`command`] declares the ignored test [`STAND_IN_TEST`] calling
//! [`serve_if_asked`].

use clap::Parser;

/// Set (to efr-sharded's flags) when the test binary runs as the stand-in.
pub const STAND_IN_ARGS_ENV: &str = "EFR_LOAD_TEST_EFR_SHARDED_ARGS";
/// The name of the ignored test that serves.
pub const STAND_IN_TEST: &str = "efr_sharded_stand_in";

/// A shell command that runs efr-sharded with `flags` (which may hold compare's
/// `{event_port}`, `{client_port}` and `{metrics_port}`).
pub fn command(flags: &str) -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    format!(
        "{STAND_IN_ARGS_ENV}='{flags}' exec {} {STAND_IN_TEST} --exact --ignored --nocapture --test-threads 1",
        exe.display()
    )
}

/// Runs efr-sharded with the flags of [`STAND_IN_ARGS_ENV`] until SIGTERM/SIGINT; returns at
/// once when that variable is not set (an ordinary `--ignored` run).
pub fn serve_if_asked() {
    let Ok(flags) = std::env::var(STAND_IN_ARGS_ENV) else {
        return;
    };
    let args = std::iter::once("efr-sharded").chain(flags.split_whitespace());
    let config = efr::config::Args::try_parse_from(args)
        .unwrap_or_else(|e| e.exit())
        .into_config()
        .expect("a valid efr-sharded configuration");
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, config.shutdown.clone()).expect("signal handler");
    }
    efr::server::run(config).expect("efr-sharded stand-in runs");
}
