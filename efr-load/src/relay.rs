//! `efr-load relay`: the floor under `ping`. A trivial server that does what a round trip
//! cannot avoid and nothing else: it copies every byte the event source sends to every
//! connected client, as it comes (each `\r` dropped, so a CRLF source gives the `\n` lines
//! clients expect), with no parsing, ordering or routing. One thread accepts clients and reads
//! their id line; one thread accepts a source and copies its bytes with blocking reads and
//! writes, so a round trip through it costs loopback TCP twice and two thread wake-ups (the
//! relay's and the client's). `ping` against it is correct only because a ping's lines are
//! already in order and all go to its single client; it is no Follower Maze server.
//!
//! When the source closes, the relay closes every client (as a server does at the end of a
//! session) and waits for the next source. Plain TCP only. With a metrics port it answers any
//! HTTP request with `efr_clients_registered N` (Prometheus text), so that `--metrics-url`
//! waits for its client's registration instead of a fixed `--settle-ms`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest wait for a client's id line before the relay drops the connection.
pub const RELAY_ID_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest id line the relay reads, bytes.
pub const RELAY_MAX_ID_LINE: usize = 4_096;
/// The relay's read buffer for the source, bytes.
pub const RELAY_READ_BUFFER: usize = 64 * 1024;

/// Longest wait for a metrics request, and for writing the answer.
pub const RELAY_METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// The metric the relay's metrics endpoint serves: clients registered since it started.
pub const RELAY_REGISTERED_METRIC: &str = "efr_clients_registered";

/// The connected clients (id line read). Locked once per source read, never contended in a
/// ping: the client connects before the source.
type Clients = Arc<Mutex<Vec<TcpStream>>>;

/// A running relay.
pub struct Relay {
    /// Where the event source connects.
    pub event_addr: SocketAddr,
    /// Where clients connect.
    pub client_addr: SocketAddr,
    /// The metrics endpoint, if one was asked for.
    pub metrics_addr: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    clients: Clients,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Binds the ports (port 0: any free one) and starts a thread for each.
    pub fn start(
        event: SocketAddr,
        client: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> io::Result<Relay> {
        let event_listener = TcpListener::bind(event)?;
        let client_listener = TcpListener::bind(client)?;
        let metrics_listener = metrics.map(TcpListener::bind).transpose()?;
        let event_addr = event_listener.local_addr()?;
        let client_addr = client_listener.local_addr()?;
        let metrics_addr = metrics_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::new(Mutex::new(Vec::new()));
        let registered = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        threads.push({
            let (stop, clients, registered) = (stop.clone(), clients.clone(), registered.clone());
            std::thread::Builder::new()
                .name("efr-load-relay-clients".into())
                .spawn(move || accept_clients(client_listener, clients, registered, stop))?
        });
        if let Some(listener) = metrics_listener {
            let (stop, registered) = (stop.clone(), registered.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("efr-load-relay-metrics".into())
                    .spawn(move || serve_metrics(listener, registered, stop))?,
            );
        }
        threads.push({
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("efr-load-relay-source".into())
                .spawn({
                    let clients = clients.clone();
                    move || serve_sources(event_listener, clients, stop)
                })?
        });
        Ok(Relay {
            event_addr,
            client_addr,
            metrics_addr,
            stop,
            clients,
            threads,
        })
    }

    /// Clients connected now (id line read, not closed yet).
    pub fn connected_clients(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stops accepting and waits for both threads (a source still connected is served to its
    /// end first).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accepts.
        let _ = TcpStream::connect(self.event_addr);
        let _ = TcpStream::connect(self.client_addr);
        if let Some(m) = self.metrics_addr {
            let _ = TcpStream::connect(m);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads a client's id line (its content is not used) and adds the client.
fn register(mut stream: TcpStream, clients: &Clients) -> io::Result<()> {
    stream.set_read_timeout(Some(RELAY_ID_TIMEOUT))?;
    let mut byte = [0u8; 1];
    let mut len = 0;
    loop {
        if stream.read(&mut byte)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        len += 1;
        if len > RELAY_MAX_ID_LINE {
            return Err(ErrorKind::InvalidData.into());
        }
    }
    stream.set_read_timeout(None)?;
    stream.set_nodelay(true)?;
    clients
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(stream);
    Ok(())
}

fn accept_clients(
    listener: TcpListener,
    clients: Clients,
    registered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        // One at a time: an idle connection delays the next by at most RELAY_ID_TIMEOUT.
        if let Ok(s) = stream {
            if register(s, &clients).is_ok() {
                registered.fetch_add(1, Ordering::Release);
            }
        }
    }
}

/// Answers every connection with the registered-clients counter, whatever it asked.
fn serve_metrics(listener: TcpListener, registered: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut s) = stream else { continue };
        let _ = s.set_read_timeout(Some(RELAY_METRICS_TIMEOUT));
        let _ = s.set_write_timeout(Some(RELAY_METRICS_TIMEOUT));
        // The request's head, up to its blank line (its content does not matter).
        let mut head = [0u8; 1024];
        let mut got = 0;
        while got < head.len() && !head[..got].windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut head[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let body = format!(
            "# TYPE {RELAY_REGISTERED_METRIC} counter\n{RELAY_REGISTERED_METRIC} {}\n",
            registered.load(Ordering::Acquire)
        );
        let _ = write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

fn serve_sources(listener: TcpListener, clients: Clients, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; RELAY_READ_BUFFER];
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        if let Ok(mut source) = stream {
            let _ = source.set_nodelay(true);
            copy_source(&mut source, &clients, &mut buf);
            let mut all = clients.lock().unwrap_or_else(|p| p.into_inner());
            for c in all.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Copies the source's bytes (without `\r`) to every client until the source ends; a client
/// whose write fails is dropped.
fn copy_source(source: &mut TcpStream, clients: &Clients, buf: &mut [u8]) {
    loop {
        let n = match source.read(buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut kept = 0;
        for i in 0..n {
            if buf[i] != b'\r' {
                buf[kept] = buf[i];
                kept += 1;
            }
        }
        let mut all = clients.lock().unwrap_or_else(|p| p.into_inner());
        all.retain_mut(|c| c.write_all(&buf[..kept]).is_ok());
    }
}

/// `efr-load relay`: runs the relay until the process is stopped. Exit status 2 when a port
/// cannot be bound.
pub fn main(args: &super::config::RelayArgs) -> i32 {
    let addr = |port| SocketAddr::new(args.listen_host, port);
    let started = Relay::start(
        addr(args.listen_event_port),
        addr(args.listen_client_port),
        args.listen_metrics_port.map(addr),
    );
    match started {
        Ok(relay) => {
            let metrics = relay
                .metrics_addr
                .map_or(String::new(), |m| format!(", metrics port {}", m.port()));
            println!(
                "efr-load relay: event port {}, client port {}{metrics}",
                relay.event_addr.port(),
                relay.client_addr.port()
            );
            let _ = io::stdout().flush();
            for t in relay.threads {
                let _ = t.join();
            }
            0
        }
        Err(e) => {
            eprintln!("efr-load relay: {e}");
            super::EXIT_USAGE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn copies_source_bytes_to_the_client_without_cr_and_closes_it_at_the_end() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let relay = Relay::start(any, any, Some(any)).unwrap();
        let metrics =
            crate::registration::MetricsEndpoint::parse(&relay.metrics_addr.unwrap().to_string())
                .unwrap();
        assert_eq!(metrics.read(RELAY_REGISTERED_METRIC).unwrap(), 0);
        let mut client = TcpStream::connect(relay.client_addr).unwrap();
        client.write_all(b"2\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while relay.connected_clients() == 0 {
            assert!(
                Instant::now() < deadline,
                "the relay never registered the client"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(metrics.read(RELAY_REGISTERED_METRIC).unwrap(), 1);
        let mut source = TcpStream::connect(relay.event_addr).unwrap();
        source.write_all(b"1|P|1|2\r\n2|B").unwrap();
        source.write_all(b"\r\n").unwrap();
        source.shutdown(Shutdown::Write).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "1|P|1|2\n2|B\n");
        assert_eq!(relay.connected_clients(), 0, "closed at the source's end");
        drop(source);
        relay.stop();
    }
}
