//! The counters in the Prometheus text format over HTTP (`--metrics-addr`), so an operator's
//! existing monitoring can scrape efr: `GET /metrics` (or `HEAD`) gets the page, another path
//! 404, another method 405; the connection closes after the answer.
//!
//! The endpoint can never hurt the clients: at most `--metrics-max-connections` are open at
//! once (more are closed at once), and each has `--metrics-request-timeout-ms` for its whole
//! request, however slowly its bytes trickle in, and what is left of that time to take its
//! answer.

use std::cell::Cell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::os::fd::OwnedFd;

use glommio::net::TcpStream;

use crate::listener;
use crate::notify::Latch;
use crate::shared::Shared;
use crate::stats::{excerpt, Counters, Fault};

/// Longest request head read before answering; a scraper's is far shorter.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The metrics page: every counter as `efr_<name>`, plus the process's resident memory.
pub fn render(counters: &Counters) -> String {
    let mut page = String::with_capacity(4096);
    for ((name, value), (_, kind, help)) in counters
        .snapshot()
        .into_iter()
        .zip(Counters::descriptions())
    {
        let _ = writeln!(page, "# HELP efr_{name} {help}");
        let _ = writeln!(page, "# TYPE efr_{name} {kind}");
        let _ = writeln!(page, "efr_{name} {value}");
    }
    if let Some(rss) = resident_memory_bytes() {
        page.push_str(
            "# HELP process_resident_memory_bytes Resident memory of the server process.\n",
        );
        page.push_str("# TYPE process_resident_memory_bytes gauge\n");
        let _ = writeln!(page, "process_resident_memory_bytes {rss}");
    }
    page
}

/// The process's resident set size, from `/proc/self/statm`.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page_size.max(1) as u64)
}

/// Serves the metrics page until the stop signal, at most `--metrics-max-connections` at once.
pub async fn run(
    accepted: crate::channel::Receiver<OwnedFd>,
    shared: Arc<Shared>,
    stop: Rc<Latch>,
) {
    let mut accepted = accepted.attach();
    let open = Rc::new(Cell::new(0usize));
    loop {
        let Some(stream) = listener::next_connection(&mut accepted, &stop).await else {
            break;
        };
        let max = shared.config.metrics_max_connections;
        if open.get() >= max {
            Counters::add(&shared.counters.metrics_refused, 1);
            shared.faults.warn(Fault::Metrics, || {
                format!("refusing a metrics connection: --metrics-max-connections ({max}) are open")
            });
            drop(stream);
            continue;
        }
        open.set(open.get() + 1);
        let shared = shared.clone();
        let open = open.clone();
        glommio::spawn_local(async move {
            answer(stream, &shared).await;
            open.set(open.get() - 1);
        })
        .detach();
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET /metrics` (`head_only` for `HEAD`).
    Metrics { head_only: bool },
    /// Another path.
    NotFound,
    /// A method other than GET and HEAD.
    MethodNotAllowed,
    /// Not an HTTP request line.
    Bad,
}

/// Reads the request line `METHOD PATH VERSION` from a request head.
fn parse_request(head: &[u8]) -> Request {
    let line_end = memchr::memchr(b'\n', head).unwrap_or(head.len());
    let line = head[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&head[..line_end]);
    let mut parts = line
        .split(|&byte| byte == b' ')
        .filter(|part| !part.is_empty());
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if parts.next().is_some() || !version.starts_with(b"HTTP/") {
        return Request::Bad;
    }
    let head_only = match method {
        b"GET" => false,
        b"HEAD" => true,
        _ => return Request::MethodNotAllowed,
    };
    let path = target.split(|&byte| byte == b'?').next().unwrap_or(target);
    if path == b"/metrics" {
        Request::Metrics { head_only }
    } else {
        Request::NotFound
    }
}

/// Reads one request head within the whole-request deadline and answers it.
async fn answer(mut stream: TcpStream, shared: &Shared) {
    let counters = &shared.counters;
    let timeout = shared.config.metrics_request_timeout;
    let deadline = Instant::now() + timeout;
    let mut head = vec![0u8; MAX_REQUEST_HEAD];
    let mut filled = 0;
    let complete = loop {
        if filled == head.len() {
            break true; // answered as a bad request below
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break false;
        }
        let _ = stream.set_read_timeout(Some(remaining));
        match stream.read(&mut head[filled..]).await {
            Ok(0) => return,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => break false,
            Err(_) => return,
        }
        if memchr::memmem::find(&head[..filled], b"\r\n\r\n").is_some()
            || memchr::memmem::find(&head[..filled], b"\n\n").is_some()
        {
            break true;
        }
    };
    if !complete {
        Counters::add(&counters.metrics_timeouts, 1);
        shared.faults.warn(Fault::Metrics, || {
            format!(
                "closing a metrics connection: no whole request within {} ms",
                timeout.as_millis()
            )
        });
        return;
    }
    Counters::add(&counters.metrics_requests, 1);
    let request = if filled == head.len() {
        Request::Bad
    } else {
        parse_request(&head[..filled])
    };
    let (status, body, head_only, extra) = match request {
        Request::Metrics { head_only } => (
            "200 OK",
            {
                let mut page = render(counters);
                crate::latency::render(&mut page, &shared.delivery_latency);
                page
            },
            head_only,
            "",
        ),
        other => {
            Counters::add(&counters.metrics_bad_requests, 1);
            let request_line = excerpt(head[..filled].split(|&b| b == b'\n').next().unwrap_or(&[]));
            shared.faults.warn(Fault::Metrics, || {
                format!("metrics request refused ({other:?}): \"{request_line}\"")
            });
            match other {
                Request::NotFound => (
                    "404 Not Found",
                    "not found: try /metrics\n".into(),
                    false,
                    "",
                ),
                Request::MethodNotAllowed => (
                    "405 Method Not Allowed",
                    "method not allowed\n".into(),
                    false,
                    "Allow: GET, HEAD\r\n",
                ),
                _ => ("400 Bad Request", "bad request\n".into(), false, ""),
            }
        }
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        response.push_str(&body);
    }
    // A scraper that does not read its answer is held no longer than the request deadline.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_write_timeout(Some(remaining.max(Duration::from_millis(1))));
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_routed_by_method_and_path() {
        let parse = |text: &str| parse_request(text.as_bytes());
        assert_eq!(
            parse("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { head_only: false }
        );
        assert_eq!(
            parse("HEAD /metrics?x=1 HTTP/1.0\n\n"),
            Request::Metrics { head_only: true }
        );
        assert_eq!(parse("GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse("GET /metricsx HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            parse("POST /metrics HTTP/1.1\r\n\r\n"),
            Request::MethodNotAllowed
        );
        assert_eq!(parse("hello\r\n\r\n"), Request::Bad);
        assert_eq!(parse("GET /metrics\r\n\r\n"), Request::Bad);
    }
}
