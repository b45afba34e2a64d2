//! efr-load against the real server (efr-sharded's library, 2 executors) with TLS on both
//! ports, a token per client and mutual TLS for the source: the harness, fanout, ping and a
//! `--chaos` run pass, verified byte for byte, with every client's token accepted; a CA that
//! did not sign the server's certificate makes the run fail to connect (exit status 2), and
//! tokens signed with another key fail the verification (exit status 1), refused and counted
//! by the server. ES256 tokens signed with `--jwt-private-key` pass a server that verifies
//! them with the public key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::Parser;
use efr::auth::{ClientAuth, JwtVerifier};
use efr::config::Config;
use efr::server::RunningServer;
use efr::tls::{TlsConfigs, TlsPaths};
use efr_load::LoadConfig;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// The HS256 secret the server checks tokens with.
const SECRET: &[u8] = b"efr-load test secret, 32 bytes or more";
/// Another secret, the server does not know.
const OTHER_SECRET: &[u8] = b"not the server's secret, also long enough";

/// A CA, a server certificate for localhost and a source certificate it signed, and two
/// token secrets, as files in a folder of the test's.
struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("efr-load-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("efr-load test CA {name}"),
        );
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
            vec!["localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        sign(vec![], ExtendedKeyUsagePurpose::ClientAuth, "source");
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        // With a line end, as `base64 > file` writes it: not part of the secret.
        std::fs::write(dir.join("jwt.key"), [SECRET, b"\n"].concat()).unwrap();
        std::fs::write(dir.join("other-jwt.key"), OTHER_SECRET).unwrap();
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}

/// The server: TLS on both ports with `pki`'s certificate, the source's certificate checked
/// against `pki`'s CA, HS256 tokens on the client port, and its metrics endpoint.
fn start(pki: &Pki) -> RunningServer {
    let paths = TlsPaths {
        cert: Path::new(&pki.path("server.pem")).into(),
        key: Path::new(&pki.path("server.key")).into(),
        source_client_ca: Some(Path::new(&pki.path("ca.pem")).into()),
    };
    let config = Config {
        tls: Some(Arc::new(TlsConfigs::load(paths).unwrap())),
        client_auth: ClientAuth::Jwt(Box::new(JwtVerifier::hmac(SECRET).unwrap())),
        metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Config::ephemeral(2)
    };
    efr::server::start(config).expect("server starts")
}

/// efr-load flags for `server` trusting `ca`, the source presenting `pki`'s certificate,
/// tokens signed with the secret in `jwt_key`; each run waits for the registration counter.
fn config(server: &RunningServer, pki: &Pki, ca: &str, jwt_key: &str, args: &[&str]) -> LoadConfig {
    let event = server.event_addr.port().to_string();
    let client = server.client_addr.port().to_string();
    let metrics = server.metrics_addr.expect("metrics endpoint").to_string();
    let (cert, key) = (pki.path("source.pem"), pki.path("source.key"));
    let mut all = vec![
        "efr-load",
        "--event-port",
        &event,
        "--client-port",
        &client,
        "--metrics-url",
        &metrics,
        "--progress",
        "off",
        "--tls-ca",
        ca,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
        "--jwt-key",
        jwt_key,
    ];
    all.extend_from_slice(args);
    LoadConfig::try_parse_from(all).expect("valid flags")
}

fn refused_tokens(server: &RunningServer) -> u64 {
    let c = server.counters();
    [
        &c.clients_token_missing,
        &c.clients_token_malformed,
        &c.clients_token_bad_signature,
        &c.clients_token_expired,
        &c.clients_token_other_user,
    ]
    .iter()
    .map(|n| n.load(Ordering::Relaxed))
    .sum()
}

#[test]
fn every_workload_passes_over_tls_with_a_token_per_client_and_a_certified_source() {
    let pki = Pki::new("pass");
    let server = start(&pki);
    let (ca, jwt) = (pki.path("ca.pem"), pki.path("jwt.key"));
    let runs: [&[&str]; 4] = [
        &["harness", "--total-events", "20000", "--concurrency", "50"],
        &[
            "fanout",
            "--users",
            "2000",
            "--clients",
            "300",
            "--events",
            "5000",
        ],
        &["ping", "--count", "100"],
        &[
            "--chaos",
            "--chaos-clients",
            "8",
            "harness",
            "--total-events",
            "20000",
            "--concurrency",
            "20",
        ],
    ];
    let mut notifications = 0;
    let mut clients = 0;
    for args in runs {
        let report = efr_load::run(&config(&server, &pki, &ca, &jwt, args)).expect("efr-load runs");
        assert!(report.pass, "{args:?}: {}", report.summary());
        assert!(report.notifications > 0, "{args:?}");
        notifications += report.notifications;
        clients += report.clients;
    }
    let counters = server.counters();
    // Every notification the server wrote went through TLS and was checked by efr-load
    // (the chaos clients' own are not: they are not verified).
    assert!(counters.notifications.load(Ordering::Relaxed) >= notifications);
    assert!(counters.clients_registered.load(Ordering::Relaxed) >= clients);
    assert_eq!(refused_tokens(&server), 0);
    assert_eq!(counters.clients_tls_failed.load(Ordering::Relaxed), 0);
    assert_eq!(counters.sources_tls_failed.load(Ordering::Relaxed), 0);
    server.stop_and_wait().unwrap();
}

#[test]
fn a_ca_that_did_not_sign_the_server_certificate_fails_the_connect() {
    let pki = Pki::new("ca");
    let stranger = Pki::new("stranger");
    let server = start(&pki);
    let run = efr_load::run(&config(
        &server,
        &pki,
        &stranger.path("ca.pem"),
        &pki.path("jwt.key"),
        &["harness", "--total-events", "1000", "--concurrency", "5"],
    ));
    let error = format!("{:#}", run.expect_err("a connect error (exit status 2)"));
    assert!(error.contains("TLS handshake"), "{error}");
    assert!(error.contains("certificate"), "{error}");
    assert_eq!(
        server.counters().events_delivered.load(Ordering::Relaxed),
        0
    );
    server.stop_and_wait().unwrap();
}

#[test]
fn tokens_signed_with_another_key_fail_the_verification_and_are_refused() {
    let pki = Pki::new("token");
    let server = start(&pki);
    let mut config = config(
        &server,
        &pki,
        &pki.path("ca.pem"),
        &pki.path("other-jwt.key"),
        &["harness", "--total-events", "2000", "--concurrency", "5"],
    );
    // Nothing registers: the source connects after a short pause instead.
    config.metrics_url = None;
    config.settle_ms = Some(100);
    config.timeout = 2_000;
    let report = efr_load::run(&config).expect("efr-load runs (exit status 1)");
    assert!(!report.pass, "{}", report.summary());
    assert_eq!(report.notifications, 0);
    assert!(
        report
            .errors
            .iter()
            .all(|e| e.contains("closed by the server") || e.contains("aborted")),
        "{:?}",
        report.errors
    );
    let bad = &server.counters().clients_token_bad_signature;
    assert_eq!(bad.load(Ordering::Relaxed), 5);
    server.stop_and_wait().unwrap();
}

#[test]
fn es256_tokens_from_a_private_key_pass_without_tls() {
    let dir = std::env::temp_dir().join(format!("efr-load-es256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let private = dir.join("es256.pem");
    std::fs::write(&private, key.serialize_pem()).unwrap();
    let config = Config {
        client_auth: ClientAuth::Jwt(Box::new(
            JwtVerifier::public_key(key.public_key_pem().as_bytes()).unwrap(),
        )),
        metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Config::ephemeral(2)
    };
    let server = efr::server::start(config).expect("server starts");
    let event = server.event_addr.port().to_string();
    let client = server.client_addr.port().to_string();
    let metrics = server.metrics_addr.expect("metrics endpoint").to_string();
    let private = private.to_string_lossy().into_owned();
    let args = [
        "efr-load",
        "--event-port",
        &event,
        "--client-port",
        &client,
        "--metrics-url",
        &metrics,
        "--progress",
        "off",
        "--jwt-private-key",
        &private,
        "harness",
        "--total-events",
        "5000",
        "--concurrency",
        "20",
    ];
    let report = efr_load::run(&LoadConfig::try_parse_from(args).expect("valid flags"))
        .expect("efr-load runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(report.pass, "{}", report.summary());
    assert!(report.notifications > 0);
    assert_eq!(refused_tokens(&server), 0);
    server.stop_and_wait().unwrap();
}
