//! The server's log as an operator reads it, on the real binary: plain text when written to a
//! pipe or file, a bind error that names the address, and connect/identify/close events at
//! `RUST_LOG=debug`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

/// The binary with its log lines delivered on a channel as they come.
fn start(args: &[&str], log_level: &str) -> (Child, Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_efr-sharded"))
        .args(["--cores", "1"])
        .args(args)
        .env("RUST_LOG", log_level)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("efr-sharded starts");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (lines, log) = channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, log)
}

/// The first log line containing `marker` (panics after the deadline).
fn wait_for(log: &Receiver<String>, marker: &str, seen: &mut Vec<String>) -> String {
    loop {
        let line = log
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("no log line with {marker:?}; log so far: {seen:#?}"));
        seen.push(line.clone());
        if line.contains(marker) {
            return line;
        }
    }
}

fn address_after(line: &str, marker: &str) -> SocketAddr {
    let rest = line.split(marker).nth(1).unwrap();
    rest[..rest.find([',', ' ']).unwrap_or(rest.len())]
        .parse()
        .unwrap()
}

fn stop(mut child: Child) {
    // SAFETY: plain kill(2) on our child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_log_written_to_a_pipe_is_plain_text_and_debug_shows_client_events() {
    let (child, log) = start(&["--event-port", "0", "--client-port", "0"], "debug");
    let mut seen = Vec::new();
    let listening = wait_for(&log, "clients on ", &mut seen);
    let client_addr = address_after(&listening, "clients on ");
    let event_addr = address_after(&listening, "events on ");
    let mut client = TcpStream::connect(client_addr).unwrap();
    client.write_all(b"42\n").unwrap();
    wait_for(&log, "client of user 42 identified", &mut seen);
    let mut source = TcpStream::connect(event_addr).unwrap();
    source.write_all(b"1|P|7|42\n").unwrap();
    drop(source);
    let mut received = Vec::new();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    client.read_to_end(&mut received).unwrap();
    assert_eq!(received, b"1|P|7|42\n");
    wait_for(
        &log,
        "client of user 42 closed: end of the source session",
        &mut seen,
    );
    stop(child);
    for line in &seen {
        assert!(
            !line.contains('\u{1b}'),
            "ANSI escape in a piped log: {line:?}"
        );
    }
}

#[test]
fn a_port_in_use_is_named_in_the_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = Command::new(env!("CARGO_BIN_EXE_efr-sharded"))
        .args(["--cores", "1", "--event-port", &port, "--client-port", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("efr-sharded runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn a_locked_memory_limit_too_small_fails_at_start_with_a_hint_and_no_listening_line() {
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -l 64 && exec {} --cores 2 --event-port 0 --client-port 0",
            env!("CARGO_BIN_EXE_efr-sharded")
        ))
        .stdin(Stdio::null())
        .env("RUST_LOG", "info")
        .output()
        .expect("sh runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cannot start executor"), "{stderr}");
    assert!(stderr.contains("raise the locked-memory limit"), "{stderr}");
    assert!(
        !stderr.contains("listening"),
        "listening logged before the executors were up: {stderr}"
    );
}

/// Connections of the session-end test, all of one user: each receives every notification.
const SLOW_CLIENTS: usize = 2;
/// Events of the session-end test: 8.5 MB per client, more than the kernel buffers of a
/// loopback connection hold (a send buffer grows to 4 MB here).
const SESSION_EVENTS: u64 = 130_000;
/// What a slow client reads at a time, and its pause after each read: it takes its output at
/// about 4 MB/s, so the server is still writing for a while after the source has closed.
const SLOW_READ: usize = 4 * 1024;
const SLOW_READ_PAUSE: Duration = Duration::from_millis(1);

/// The value of `name=N` in a counters summary.
fn counter_in(line: &str, name: &str) -> u64 {
    line.split([' ', '(', ')'])
        .find_map(|field| field.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        .parse()
        .unwrap()
}

/// A receive buffer this small keeps the kernel from taking a client's whole output for it.
fn shrink_receive_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 * 1024;
    // SAFETY: setsockopt on a socket we own, with a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn the_session_ended_line_counts_what_the_clients_received() {
    let (child, log) = start(&["--event-port", "0", "--client-port", "0"], "debug");
    let mut seen = Vec::new();
    let listening = wait_for(&log, "clients on ", &mut seen);
    let client_addr = address_after(&listening, "clients on ");
    let event_addr = address_after(&listening, "events on ");
    let mut readers = Vec::new();
    for _ in 0..SLOW_CLIENTS {
        let mut client = TcpStream::connect(client_addr).unwrap();
        shrink_receive_buffer(&client);
        client.write_all(b"42\n").unwrap();
        wait_for(&log, "client of user 42 identified", &mut seen);
        client.set_read_timeout(Some(DEADLINE)).unwrap();
        readers.push(std::thread::spawn(move || {
            let mut received = Vec::new();
            let mut chunk = vec![0; SLOW_READ];
            loop {
                match client.read(&mut chunk) {
                    Ok(0) => return received,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                    Err(error) => panic!("client read failed: {error}"),
                }
                // Pacing of a slow reader, not a wait for anything.
                std::thread::sleep(SLOW_READ_PAUSE);
            }
        }));
    }
    // Every field at its full twenty digits (leading zeros are allowed): 65 bytes a line.
    let mut events = Vec::new();
    for seq in 1..=SESSION_EVENTS {
        writeln!(
            events,
            "{seq:020}|P|{:020}|{:020}",
            10_000_000_000_000_000_000u64 + seq,
            42
        )
        .unwrap();
    }
    let mut source = TcpStream::connect(event_addr).unwrap();
    source.write_all(&events).unwrap();
    drop(source);
    let ended = wait_for(&log, "session ended", &mut seen);
    let received: Vec<Vec<u8>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    for stream in &received {
        assert!(stream == &events, "a client did not receive every event");
    }
    let lines = SESSION_EVENTS * SLOW_CLIENTS as u64;
    let bytes = (events.len() * SLOW_CLIENTS) as u64;
    assert_eq!(
        (
            counter_in(&ended, "notifications"),
            counter_in(&ended, "bytes_written")
        ),
        (lines, bytes),
        "the counters of {ended:?}"
    );
    stop(child);
}
