//! What ships beside the server: shell completions, the man page and the example systemd unit,
//! checked on the real binary.

use std::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_efr-sharded");
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dist/systemd/efr-sharded.service"
);

fn stdout_of(args: &[&str]) -> String {
    let output = Command::new(BINARY)
        .args(args)
        .output()
        .expect("efr-sharded runs");
    assert!(output.status.success(), "efr-sharded {args:?}: {output:?}");
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[test]
fn completions_cover_every_flag_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&["completions", shell]);
        for flag in [
            "max-clients",
            "resequencer",
            "metrics-addr",
            "shutdown-timeout-ms",
        ] {
            assert!(script.contains(flag), "{shell} completion lacks --{flag}");
        }
    }
    let refused = Command::new(BINARY)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "an unknown shell is refused");
}

#[test]
fn man_page_names_the_program_and_documents_the_flags() {
    let page = stdout_of(&["man"]);
    assert!(
        page.contains(".TH efr-sharded 1"),
        "roff title: {page:.200}"
    );
    for flag in [
        "max\\-client\\-backlog",
        "handshake\\-timeout\\-ms",
        "EFR_CORES",
    ] {
        assert!(page.contains(flag), "man page lacks {flag}");
    }
}

/// The unit's `Limit*` value for `key`, as a number.
fn unit_limit(unit: &str, key: &str) -> u64 {
    let value = unit
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit sets {key}"));
    match value.trim().strip_suffix('M') {
        Some(mebibytes) => mebibytes.parse::<u64>().unwrap() << 20,
        None => value.trim().parse().unwrap(),
    }
}

#[test]
fn systemd_unit_sets_the_limits_efr_needs_and_verifies() {
    let unit = std::fs::read_to_string(UNIT).expect("the example unit exists");
    // Every default client plus as many handshakes, and the default executors' io_uring memory.
    assert!(unit_limit(&unit, "LimitNOFILE") >= 2 * efr::config::DEFAULT_MAX_CLIENTS as u64);
    assert!(
        unit_limit(&unit, "LimitMEMLOCK")
            >= (efr::config::MAX_CORES * efr::config::DEFAULT_IO_MEMORY_KIB * 1024) as u64
    );
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: the unit's syntax was not verified");
        return;
    };
    assert!(version.status.success());
    // Verify a copy whose ExecStart is the binary under test (the example's path may not exist).
    let dir = std::env::temp_dir().join(format!("efr-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("efr-sharded.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/efr-sharded", BINARY)).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs");
    let _ = std::fs::remove_dir_all(&dir);
    let complaints = String::from_utf8_lossy(&verify.stderr);
    // verify exits 0 on unknown keys and bad values, but names them on stderr.
    assert!(
        verify.status.success() && !complaints.contains("efr-sharded.service"),
        "systemd-analyze verify: {complaints}"
    );
}
