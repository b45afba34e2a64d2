//! The counters in the Prometheus text format over HTTP (`--metrics-addr`), so an operator's
//! existing monitoring can scrape efr. Any request gets the full page; the connection closes
//! after the answer.

use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::os::fd::OwnedFd;

use glommio::net::TcpStream;

use crate::listener;
use crate::notify::Latch;
use crate::server::Shared;
use crate::stats::Counters;

/// Longest request head read before answering; a scraper's is far shorter.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A scraper that sends no complete request head within this time is closed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Serves the metrics page until the stop signal.
pub async fn run(
    accepted: crate::channel::Receiver<OwnedFd>,
    shared: Arc<Shared>,
    stop: Rc<Latch>,
) {
    let mut accepted = accepted.attach();
    loop {
        let Some(stream) = listener::next_connection(&mut accepted, &stop).await else {
            break;
        };
        glommio::spawn_local(answer(stream, shared.clone())).detach();
    }
}

async fn answer(mut stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut head = vec![0u8; MAX_REQUEST_HEAD];
    let mut filled = 0;
    while filled < head.len() {
        match stream.read(&mut head[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        if memchr::memmem::find(&head[..filled], b"\r\n\r\n").is_some()
            || memchr::memmem::find(&head[..filled], b"\n\n").is_some()
        {
            break;
        }
    }
    let body = render(&shared.counters);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.close().await;
}
