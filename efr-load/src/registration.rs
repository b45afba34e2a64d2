//! Waiting for the server to register the clients before the source connects. The protocol
//! acknowledges no id line, so a source that connects at once can send events before the
//! server knows a client, and that client misses them. With `--metrics-url`, efr-load reads
//! the server's registered-clients counter (Prometheus text, e.g. efr-sharded's
//! `efr_clients_registered`) before connecting the clients and waits until it rose by their
//! number; without it, it pauses `--settle-ms` (servers that expose nothing).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How often the counter is read while waiting.
pub const REGISTRATION_POLL: Duration = Duration::from_millis(5);
/// Timeout of one metrics request (connect, write, read).
pub const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest metrics page read, bytes.
pub const MAX_METRICS_PAGE: u64 = 4 << 20;

/// A Prometheus text endpoint: where to connect and what to ask for.
#[derive(Clone, Debug)]
pub struct MetricsEndpoint {
    addr: SocketAddr,
    host: String,
    path: String,
}

impl MetricsEndpoint {
    /// Parses `host:port`, `host:port/path` or `http://host:port/path` (path `/metrics` when
    /// none is given).
    pub fn parse(url: &str) -> anyhow::Result<MetricsEndpoint> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        anyhow::ensure!(
            !rest.contains("://"),
            "--metrics-url {url:?}: only http:// is supported"
        );
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/metrics".to_string()),
        };
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("--metrics-url {url:?}: expected host:port"))?
            .next()
            .with_context(|| format!("--metrics-url {url:?}: no address for {authority}"))?;
        Ok(MetricsEndpoint {
            addr,
            host: authority.to_string(),
            path,
        })
    }

    /// Reads the page and returns the value of the sample named `metric` (without labels).
    pub fn read(&self, metric: &str) -> anyhow::Result<u64> {
        let page = self.fetch()?;
        parse_sample(&page, metric).with_context(|| {
            format!(
                "no sample {metric} in the metrics of http://{}{}",
                self.host, self.path
            )
        })
    }

    /// Reads the whole page (the body of a `200` answer).
    pub fn fetch(&self) -> anyhow::Result<String> {
        let what = || format!("reading metrics from http://{}{}", self.host, self.path);
        let mut stream =
            TcpStream::connect_timeout(&self.addr, METRICS_REQUEST_TIMEOUT).with_context(what)?;
        stream.set_read_timeout(Some(METRICS_REQUEST_TIMEOUT))?;
        stream.set_write_timeout(Some(METRICS_REQUEST_TIMEOUT))?;
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nAccept: text/plain\r\n\r\n",
            self.path, self.host
        );
        stream.write_all(request.as_bytes()).with_context(what)?;
        let mut response = Vec::new();
        stream
            .take(MAX_METRICS_PAGE)
            .read_to_end(&mut response)
            .with_context(what)?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("{}: not an HTTP response", what()))?;
        let status = head.lines().next().unwrap_or("");
        anyhow::ensure!(
            status.split_whitespace().nth(1) == Some("200"),
            "{}: {status}",
            what()
        );
        Ok(body.to_string())
    }
}

/// The value of the unlabelled sample `metric` in a Prometheus text page.
pub fn parse_sample(page: &str, metric: &str) -> Option<u64> {
    page.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?;
        let value = rest.strip_prefix(' ')?.split_whitespace().next()?;
        value
            .parse::<u64>()
            .ok()
            .or_else(|| value.parse::<f64>().ok().map(|v| v as u64))
    })
}

/// Waits until `read()` returns at least `target`, or fails after `timeout` naming how many
/// of the clients were registered.
pub fn wait_for_count(
    mut read: impl FnMut() -> anyhow::Result<u64>,
    baseline: u64,
    clients: u64,
    timeout: Duration,
    metric: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let target = baseline + clients;
    loop {
        let now = read()?;
        if now >= target {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the server registered {} of the {clients} clients within {timeout:?} ({metric} went \
             from {baseline} to {now}); raise --register-timeout-ms if it is only slow",
            now.saturating_sub(baseline)
        );
        std::thread::sleep(REGISTRATION_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_urls() {
        let page = "# HELP efr_clients_registered x\n# TYPE efr_clients_registered counter\n\
                    efr_clients_registered_total 9\nefr_clients_registered 42\nother 1\n";
        assert_eq!(parse_sample(page, "efr_clients_registered"), Some(42));
        assert_eq!(parse_sample(page, "efr_clients_registered_total"), Some(9));
        assert_eq!(parse_sample(page, "missing"), None);
        assert_eq!(parse_sample("m 1.5e3\n", "m"), Some(1500));
        let e = MetricsEndpoint::parse("127.0.0.1:9100").unwrap();
        assert_eq!((e.addr.port(), e.path.as_str()), (9100, "/metrics"));
        let e = MetricsEndpoint::parse("http://127.0.0.1:9100/x").unwrap();
        assert_eq!(e.path, "/x");
        assert!(MetricsEndpoint::parse("https://127.0.0.1:1/").is_err());
        assert!(MetricsEndpoint::parse("nonsense").is_err());
    }

    #[test]
    fn waiting_ends_when_the_count_rose_by_the_clients_or_fails_naming_them() {
        let mut n = 10;
        let waited = wait_for_count(
            || {
                n += 1;
                Ok(n)
            },
            10,
            3,
            Duration::from_secs(60),
            "m",
        );
        assert!(waited.is_ok() && n == 13);
        let err = wait_for_count(|| Ok(11), 10, 3, Duration::from_millis(20), "m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("registered 1 of the 3 clients"), "{err}");
    }
}
