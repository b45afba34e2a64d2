//! Who may connect, over real loopback TCP: client tokens (HS256 and ES256), the event source's
//! address allow-list, and the idle-source timeout. Every refusal is counted, and a refused
//! peer never gets a byte through.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use efr::auth::{ClientAuth, JwtVerifier};
use efr::config::Config;
use efr::server::RunningServer;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const SECRET: &[u8] = b"a test secret of thirty-two bytes or more, for HS256";
const OTHER_SECRET: &[u8] = b"another secret of thirty-two bytes or more, not the key";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `sub` expiring at `exp`, signed with `key` under `algorithm`.
fn token(sub: &str, exp: u64, key: &EncodingKey, algorithm: Algorithm) -> String {
    let claims = serde_json::json!({ "sub": sub, "exp": exp });
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).expect("token signs")
}

fn hs256(sub: &str, exp: u64, secret: &[u8]) -> String {
    let key = EncodingKey::from_secret(secret).unwrap();
    token(sub, exp, &key, Algorithm::HS256)
}

/// True when the server closed the connection without sending a byte.
fn closed_without_data(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(TEST_DEADLINE)).unwrap();
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes) {
        Ok(_) => bytes.is_empty(),
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset && bytes.is_empty(),
    }
}

fn connect_with_line(server: &RunningServer, line: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.client_addr).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream
}

/// Runs the refusal matrix against a server whose tokens verify with `good(sub, exp)`.
fn refusals_are_counted_and_a_right_token_is_served(
    config: Config,
    good: impl Fn(&str, u64) -> String,
) {
    let server = start_server(config);
    let later = now() + 3600;
    let mut refused = vec![
        connect_with_line(&server, "2\n"),
        connect_with_line(&server, "3 \n"),
        connect_with_line(&server, "4 not.a.jwt\n"),
        connect_with_line(&server, &format!("5 {}\n", hs256("5", later, OTHER_SECRET))),
        connect_with_line(&server, &format!("6 {}\n", good("6", now() - 120))),
        connect_with_line(&server, &format!("7 {}\n", good("8", later))),
        connect_with_line(&server, &format!("9  {}\n", good("9", later))),
    ];
    let served = connect_with_line(&server, &format!("1 {}\r\n", good("1", later)));
    for stream in &mut refused {
        assert!(closed_without_data(stream), "a bad token was served");
    }
    wait_registered(&server, 1);
    assert_eq!(count(&server, |c| &c.clients_token_missing), 2);
    assert_eq!(count(&server, |c| &c.clients_token_malformed), 2);
    assert_eq!(count(&server, |c| &c.clients_token_bad_signature), 1);
    assert_eq!(count(&server, |c| &c.clients_token_expired), 1);
    assert_eq!(count(&server, |c| &c.clients_token_other_user), 1);
    assert_eq!(count(&server, |c| &c.clients_registered), 1);
    let mut source = TcpStream::connect(server.event_addr).unwrap();
    source.write_all(b"2|P|4|1\n1|F|7|1\n3|B\n").unwrap();
    assert_eq!(
        read_lines(&served, 3),
        vec!["1|F|7|1\n", "2|P|4|1\n", "3|B\n"]
    );
    drop(source);
    server.stop_and_wait().unwrap();
}

#[test]
fn hs256_tokens_missing_malformed_wrong_expired_or_foreign_are_refused_and_counted() {
    let config = Config {
        client_auth: ClientAuth::Jwt(Box::new(JwtVerifier::hmac(SECRET).unwrap())),
        ..Config::ephemeral(2)
    };
    refusals_are_counted_and_a_right_token_is_served(config, |sub, exp| hs256(sub, exp, SECRET));
}

#[test]
fn es256_tokens_verify_with_a_public_key() {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let signing = p256::ecdsa::SigningKey::from_slice(&[0x5a; 32]).expect("a valid scalar");
    let private_pem = signing.to_pkcs8_pem(LineEnding::LF).unwrap();
    let public_pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let key = EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap();
    let config = Config {
        client_auth: ClientAuth::Jwt(Box::new(
            JwtVerifier::public_key(public_pem.as_bytes()).unwrap(),
        )),
        ..Config::ephemeral(1)
    };
    refusals_are_counted_and_a_right_token_is_served(config, |sub, exp| {
        token(sub, exp, &key, Algorithm::ES256)
    });
}

#[test]
fn a_source_outside_source_allow_never_gets_an_event_through() {
    let config = Config {
        source_allow: vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let clients = connect_all(&server, &[1], "\n");
    let mut intruder = TcpStream::connect(server.event_addr).unwrap();
    let _ = intruder.write_all(b"1|P|666|1\n2|B\n");
    assert!(closed_without_data(&mut intruder));
    eventually("the intruder is counted", || {
        count(&server, |c| &c.sources_refused_address) == 1
    });
    assert_eq!(count(&server, |c| &c.events_received), 0);
    assert_eq!(count(&server, |c| &c.sessions), 0);
    server.stop_and_wait().unwrap();
    for client in clients {
        assert!(
            client.finish().is_empty(),
            "an intruder's event reached a client"
        );
    }
}

#[test]
fn a_source_inside_source_allow_is_served() {
    let config = Config {
        source_allow: vec!["127.0.0.0/8".parse().unwrap()],
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let workload = harness_workload(3, 2_000, 100, 10);
    harness_run(&server, &workload, 3, "\n");
    assert_eq!(count(&server, |c| &c.sources_refused_address), 0);
    server.stop_and_wait().unwrap();
}

#[test]
fn an_idle_source_loses_the_slot_after_the_idle_timeout() {
    let config = Config {
        source_idle_timeout: Some(Duration::from_millis(300)),
        ..Config::ephemeral(2)
    };
    let server = start_server(config);
    let mut squatter = TcpStream::connect(server.event_addr).unwrap();
    assert!(closed_without_data(&mut squatter));
    assert_eq!(count(&server, |c| &c.sources_idle_closed), 1);
    // The slot is free again: a real source is served, and its pauses stay under the timeout.
    let workload = harness_workload(5, 2_000, 100, 10);
    harness_run(&server, &workload, 5, "\n");
    assert_eq!(count(&server, |c| &c.sources_idle_closed), 1);
    server.stop_and_wait().unwrap();
}

#[test]
fn the_binary_refuses_bad_tokens_without_logging_them() {
    let dir = std::env::temp_dir().join(format!("efr-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("client.key");
    std::fs::write(&key_file, [SECRET, b"\n"].concat()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_efr-sharded"))
        .args(["--event-port", "0", "--client-port", "0", "--cores", "1"])
        .arg("--client-jwt-key")
        .arg(&key_file)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("efr-sharded starts");
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let client_addr = loop {
        line.clear();
        assert!(log.read_line(&mut line).unwrap() > 0, "exited early");
        if let Some(rest) = line.split("clients on ").nth(1) {
            let end = rest.find([',', ' ']).unwrap_or(rest.len());
            break rest[..end].trim().parse::<std::net::SocketAddr>().unwrap();
        }
    };
    let expired = hs256("6", now() - 120, SECRET);
    let forged = hs256("5", now() + 3600, OTHER_SECRET);
    for line in [format!("6 {expired}\n"), format!("5 {forged}\n")] {
        let mut stream = TcpStream::connect(client_addr).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        assert!(closed_without_data(&mut stream));
    }
    // SAFETY: plain kill(2) on our child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let mut rest = String::new();
    log.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        rest.contains("token expired"),
        "the refusal is logged: {rest}"
    );
    for secret_part in [&expired, &forged] {
        let signature = secret_part.rsplit('.').next().unwrap();
        assert!(!rest.contains(signature), "a token reached the log: {rest}");
        assert!(!rest.contains(secret_part.as_str()));
    }
}
