//! TLS on both ports over real loopback TCP, with certificates the tests make themselves: every
//! byte arrives through TLS, a plaintext client is closed within the handshake deadline, a
//! source without a certificate from the configured CA never gets an event through, and a
//! SIGHUP reload serves new connections with the new certificate while old ones keep receiving.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use efr::config::Config;
use efr::server::RunningServer;
use efr::tls::{TlsConfigs, TlsPaths};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate authority and what it signed, written as PEM files in a folder of the test's.
struct Pki {
    dir: PathBuf,
    ca: String,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    /// A new CA named `name`, with a server certificate for localhost/127.0.0.1 and a client
    /// certificate for the event source, in a fresh folder.
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("efr-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("efr test CA {name}"));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let sign = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        sign(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        sign(vec![], ExtendedKeyUsagePurpose::ClientAuth, "source");
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca: ca.pem() }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Server paths for the server certificate; the source CA is `source_ca`'s, if given.
    fn server_paths(&self, source_ca: Option<&Pki>) -> TlsPaths {
        TlsPaths {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            source_client_ca: source_ca.map(|pki| pki.path("ca.pem")),
        }
    }

    /// A client configuration trusting this CA, presenting `identity`'s source certificate.
    fn client_config(&self, identity: Option<&Pki>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match identity {
            None => builder.with_no_client_auth(),
            Some(pki) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_file(pki.path("source.pem")).unwrap()],
                    PrivateKeyDer::from_pem_file(pki.path("source.key")).unwrap(),
                )
                .unwrap(),
        })
    }
}

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsClient {
    let socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let session =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    rustls::StreamOwned::new(session, socket)
}

/// A TLS user client whose received bytes a thread collects until the server closes it.
fn tls_client(
    addr: SocketAddr,
    user: u64,
    config: Arc<rustls::ClientConfig>,
) -> std::thread::JoinHandle<Vec<u8>> {
    let mut stream = connect_tls(addr, config);
    stream.write_all(format!("{user}\n").as_bytes()).unwrap();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return bytes,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// Sends `text` as a TLS source, then closes and waits for the server to end the session.
fn tls_source(addr: SocketAddr, config: Arc<rustls::ClientConfig>, text: &[u8]) -> bool {
    let mut source = connect_tls(addr, config);
    if source.write_all(text).is_err() || source.flush().is_err() {
        return false;
    }
    source.conn.send_close_notify();
    let _ = source.flush();
    let _ = source.sock.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = source.read_to_end(&mut rest);
    true
}

fn tls_server(paths: TlsPaths, handshake_timeout: Duration) -> RunningServer {
    start_server(Config {
        tls: Some(Arc::new(TlsConfigs::load(paths).unwrap())),
        handshake_timeout,
        ..Config::ephemeral(2)
    })
}

#[test]
fn harness_run_over_tls_on_both_ports_is_byte_for_byte() {
    let pki = Pki::new("run");
    let server = tls_server(pki.server_paths(Some(&pki)), Duration::from_secs(5));
    let workload = harness_workload(11, 20_000, 300, 30);
    let readers: Vec<_> = workload
        .clients
        .iter()
        .map(|&user| {
            (
                user,
                tls_client(server.client_addr, user, pki.client_config(None)),
            )
        })
        .collect();
    wait_registered(&server, workload.clients.len() as u64);
    let mut text = Vec::new();
    for batch in harness_batches(11, workload.events.len(), 100) {
        for index in batch {
            text.extend_from_slice(workload.events[index].as_bytes());
            text.push(b'\n');
        }
    }
    assert!(tls_source(
        server.event_addr,
        pki.client_config(Some(&pki)),
        &text
    ));
    let expected = expected_notifications(&workload.events, &workload.clients);
    for (user, reader) in readers {
        let got = String::from_utf8(reader.join().unwrap()).unwrap();
        let want: String = expected[&user]
            .iter()
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(got, want, "client {user}");
    }
    assert_eq!(
        server.counters().clients_tls_failed.load(Ordering::Relaxed),
        0
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn a_plaintext_client_on_a_tls_port_is_closed_within_the_handshake_deadline() {
    let pki = Pki::new("plain");
    let server = tls_server(pki.server_paths(None), Duration::from_millis(500));
    let started = Instant::now();
    let mut plain = TcpStream::connect(server.client_addr).unwrap();
    plain.write_all(b"42\n").unwrap();
    plain.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let mut bytes = Vec::new();
    let _ = plain.read_to_end(&mut bytes);
    assert!(bytes.is_empty(), "a plaintext client got {bytes:?}");
    assert!(started.elapsed() < TEST_DEADLINE);
    // Garbage that is not a TLS record at all is refused without waiting for the deadline.
    let mut garbage = TcpStream::connect(server.client_addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    garbage.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let _ = garbage.read_to_end(&mut bytes);
    eventually("both refusals are counted", || {
        server.counters().clients_tls_failed.load(Ordering::Relaxed) == 2
    });
    assert_eq!(
        server.counters().clients_registered.load(Ordering::Relaxed),
        0
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn a_source_without_a_certificate_from_the_source_ca_never_gets_an_event_through() {
    let pki = Pki::new("mtls");
    let rogue = Pki::new("rogue");
    let server = tls_server(pki.server_paths(Some(&pki)), Duration::from_secs(5));
    let reader = tls_client(server.client_addr, 1, pki.client_config(None));
    wait_registered(&server, 1);
    // No client certificate, then one signed by another CA.
    tls_source(server.event_addr, pki.client_config(None), b"1|P|666|1\n");
    tls_source(
        server.event_addr,
        pki.client_config(Some(&rogue)),
        b"1|P|666|1\n",
    );
    eventually("both sources are refused", || {
        server.counters().sources_tls_failed.load(Ordering::Relaxed) == 2
    });
    assert_eq!(server.counters().events_received.load(Ordering::Relaxed), 0);
    // The real source is served.
    assert!(tls_source(
        server.event_addr,
        pki.client_config(Some(&pki)),
        b"1|P|7|1\n"
    ));
    assert_eq!(reader.join().unwrap(), b"1|P|7|1\n");
    server.stop_and_wait().unwrap();
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

#[test]
fn sighup_reload_serves_new_connections_with_the_new_certificate_while_old_ones_keep_receiving() {
    let old = Pki::new("old");
    let new = Pki::new("new");
    let live = Pki::new("live");
    copy(&old.path("server.pem"), &live.path("server.pem"));
    copy(&old.path("server.key"), &live.path("server.key"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_efr-sharded"))
        .args(["--event-port", "0", "--client-port", "0", "--cores", "2"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(live.path("server.pem"))
        .arg("--tls-key")
        .arg(live.path("server.key"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("efr-sharded starts");
    let (lines, log) = std::sync::mpsc::channel::<String>();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |marker: &str| -> String {
        loop {
            let line = log
                .recv_timeout(TEST_DEADLINE)
                .unwrap_or_else(|_| panic!("no log line with {marker:?}"));
            if line.contains(marker) {
                return line;
            }
        }
    };
    let listening = wait_for("clients on ");
    let metrics_line = wait_for("metrics on http://");
    let address = |line: &str, marker: &str| -> SocketAddr {
        let rest = line.split(marker).nth(1).unwrap();
        rest[..rest.find([',', ' ', '/']).unwrap_or(rest.len())]
            .parse()
            .unwrap()
    };
    let event_addr = address(&listening, "events on ");
    let client_addr = address(&listening, "clients on ");
    let metrics_addr = address(&metrics_line, "metrics on http://");
    let registered = || -> u64 {
        let mut page = String::new();
        let mut http = TcpStream::connect(metrics_addr).unwrap();
        http.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let _ = http.read_to_string(&mut page);
        page.lines()
            .find_map(|line| line.strip_prefix("efr_clients_registered "))
            .and_then(|value| value.trim().parse().ok())
            .expect("the registration counter is on the metrics page")
    };
    let before = tls_client(client_addr, 1, old.client_config(None));
    eventually("the first client is registered", || registered() == 1);
    copy(&new.path("server.pem"), &live.path("server.pem"));
    copy(&new.path("server.key"), &live.path("server.key"));
    // SAFETY: plain kill(2) on our child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
    wait_for("certificates reloaded");
    let after = tls_client(client_addr, 2, new.client_config(None));
    eventually("the second client is registered", || registered() == 2);
    // A client that trusts only the old CA cannot complete a handshake any more.
    let mut stale = connect_tls(client_addr, old.client_config(None));
    let refused = stale
        .write_all(b"3\n")
        .and_then(|()| stale.flush())
        .is_err()
        || stale.read(&mut [0u8; 16]).map_or(true, |n| n == 0);
    assert!(refused, "the old certificate is still served");
    // The source trusts the new CA; both clients get their event and a broadcast.
    assert!(tls_source(
        event_addr,
        new.client_config(None),
        b"1|P|9|1\n2|P|9|2\n3|B\n"
    ));
    assert_eq!(before.join().unwrap(), b"1|P|9|1\n3|B\n");
    assert_eq!(after.join().unwrap(), b"2|P|9|2\n3|B\n");
    // SAFETY: as above.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
}
