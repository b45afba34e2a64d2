//! A real nats-server for the cluster tests and the snapshot drills: JetStream on a free port
//! with a store of its own in a temporary directory, killed on drop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a NATS test waits for the server (starts and restarts take seconds on a loaded
/// machine).
pub const NATS_DEADLINE: Duration = Duration::from_secs(60);

/// Whether nats-server can be run; under CI=true its absence is a failure.
pub fn nats_available() -> bool {
    let found = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nats-server is not installed (CI must run scripts/install-nats.sh)"
        );
        // Straight to the process's stderr (not the test's captured output), once per run.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            let _ = std::io::stderr().write_all(
                b"SKIPPED: the NATS tests need nats-server (run scripts/install-nats.sh)\n",
            );
        });
    }
    found
}

/// A nats-server with JetStream on a free port and a store of its own.
pub struct NatsServer {
    pub child: Child,
    pub dir: PathBuf,
    pub port: u16,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl NatsServer {
    pub fn start() -> NatsServer {
        let dir = std::env::temp_dir().join(format!(
            "efr-nats-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ports")).unwrap();
        // Owned by the server value at once, so that a failing wait still kills it.
        let mut server = NatsServer {
            child: Self::spawn(&dir, None),
            dir,
            port: 0,
        };
        server.port = server.wait_for_port();
        server
    }

    /// Starts nats-server on `port` (or a free one). The child is kept by a `NatsServer`,
    /// whose drop kills and waits for it.
    #[allow(clippy::zombie_processes)]
    pub fn spawn(dir: &Path, port: Option<u16>) -> Child {
        let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("nats.log"))
            .unwrap();
        Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(dir.join("store"))
            .arg("--ports_file_dir")
            .arg(dir.join("ports"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts")
    }

    /// Waits for the running server's ports file and returns its client port.
    pub fn wait_for_port(&self) -> u16 {
        let ports_file = self
            .dir
            .join("ports")
            .join(format!("nats-server_{}.ports", self.child.id()));
        let deadline = Instant::now() + NATS_DEADLINE;
        loop {
            if let Ok(text) = std::fs::read_to_string(&ports_file) {
                if let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text) {
                    // nats-server 2.9 names the client ports "nats"; later ones "client".
                    let url = ports["nats"][0]
                        .as_str()
                        .or(ports["client"][0].as_str())
                        .expect("a client url");
                    return url.rsplit(':').next().unwrap().parse().unwrap();
                }
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// A new server on the same port and store.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.dir, Some(self.port));
        assert_eq!(self.wait_for_port(), self.port);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
