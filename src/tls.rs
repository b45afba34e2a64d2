//! TLS on the client and event ports: rustls driven over glommio's sockets, certificates that
//! reload on SIGHUP, and mutual TLS for the event source.
//!
//! [`TlsStream`] is a rustls `ServerConnection` over a glommio `TcpStream`, written for efr's
//! two uses: a client task that writes coalesced output and discards what the client sends,
//! and the sequencer that reads the source. A write hands the plaintext to rustls and returns
//! only once every record it produced has been sent, so a writer never leaves encrypted bytes
//! behind (glommio has no flush). A read feeds raw bytes to rustls a buffer at a time and
//! returns plaintext as soon as there is some.
//!
//! A `TcpStream` cannot move between executors, but a rustls session can: after the
//! handshake and the id line on the accepting executor, [`PeerStream::into_parts`] gives the
//! descriptor and the session, and the owner shard puts them back together with
//! [`PeerStream::from_parts`].
//!
//! [`TlsConfigs`] holds the certificate, key and source CA paths and the configurations built
//! from them; [`TlsConfigs::reload`] re-reads the files (SIGHUP, see [`reload_on_sighup`]):
//! new handshakes use the new certificate, established sessions keep theirs. A reload that
//! fails keeps the previous configuration and says why.

use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// Raw TLS bytes read from the socket at a time: as much as a plaintext read of the source
/// takes, so a TLS source's batches are as large as a plaintext one's.
const TLS_READ_BUFFER: usize = 64 * 1024;

/// Where the certificate material lives.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    /// PEM certificate chain served on both ports.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA certificates that must have signed the event source's client certificate, if
    /// mutual TLS is required of the source.
    pub source_client_ca: Option<PathBuf>,
}

/// Why certificate material could not be used.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The two server configurations, rebuilt from [`TlsPaths`] at start and at each reload.
pub struct TlsConfigs {
    paths: TlsPaths,
    current: RwLock<(Arc<ServerConfig>, Arc<ServerConfig>)>,
}

impl std::fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl TlsConfigs {
    /// Reads the files and builds both configurations.
    pub fn load(paths: TlsPaths) -> Result<Self, TlsError> {
        let current = build(&paths)?;
        Ok(TlsConfigs {
            paths,
            current: RwLock::new(current),
        })
    }

    /// Re-reads the files; on success new handshakes use them, on failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = build(&self.paths)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The configuration of the client port.
    pub fn for_clients(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The configuration of the event port (with the client-certificate check, if any).
    pub fn for_sources(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Whether the event source must present a client certificate.
    pub fn source_needs_certificate(&self) -> bool {
        self.paths.source_client_ca.is_some()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(paths: &TlsPaths) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| TlsError(format!("{}: {e}", paths.cert.display())))?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate in it",
            paths.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key)
        .map_err(|e| TlsError(format!("{}: {e}", paths.key.display())))?;
    let builder = || {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS versions: {e}")))
    };
    let certified =
        |builder: rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>| {
            let mut config = builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| {
                    TlsError(format!(
                        "{} with {}: {e}",
                        paths.cert.display(),
                        paths.key.display()
                    ))
                })?;
            // No TLS 1.3 session tickets: efr has no use for resumption, and a source that
            // closes without reading them gets its connection reset by its own kernel, which
            // then drops events the server had not read yet.
            config.send_tls13_tickets = 0;
            Ok::<_, TlsError>(config)
        };
    let clients = certified(builder()?.with_no_client_auth())?;
    let sources = match &paths.source_client_ca {
        None => clients.clone(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?
            {
                let cert = cert.map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(TlsError(format!(
                    "{}: no CA certificate in it",
                    ca.display()
                )));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
            certified(builder()?.with_client_cert_verifier(verifier))?
        }
    };
    Ok((Arc::new(clients), Arc::new(sources)))
}

/// Reloads `configs` each time the process receives SIGHUP, on a thread that sleeps in
/// `sigwait` until then (no polling). Each reload is logged, a failure with its reason.
pub fn reload_on_sighup(configs: Arc<TlsConfigs>) -> io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
    std::thread::Builder::new()
        .name("efr-tls-reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                match configs.reload() {
                    Ok(()) => {
                        tracing::info!("SIGHUP: certificates reloaded; new connections use them")
                    }
                    Err(error) => tracing::warn!(
                        "SIGHUP: reload failed, keeping the previous certificates: {error}"
                    ),
                }
            }
        })?;
    Ok(())
}

/// A rustls server session over a glommio socket.
pub struct TlsStream {
    io: TcpStream,
    session: ServerConnection,
    /// Records produced by rustls, not yet sent, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// Raw bytes read but not yet given to rustls: `incoming[fed..read]`.
    incoming: Box<[u8]>,
    fed: usize,
    read: usize,
    /// Plaintext bytes of a write already handed to rustls, reported once its records are sent.
    accepted: Option<usize>,
}

fn invalid(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl TlsStream {
    fn new(io: TcpStream, session: ServerConnection) -> Self {
        TlsStream {
            io,
            session,
            outgoing: Vec::new(),
            sent: 0,
            incoming: vec![0u8; TLS_READ_BUFFER].into_boxed_slice(),
            fed: 0,
            read: 0,
            accepted: None,
        }
    }

    /// Sends every record rustls has produced.
    fn poll_send_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.sent < self.outgoing.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.sent += n;
                continue;
            }
            self.outgoing.clear();
            self.sent = 0;
            if !self.session.wants_write() {
                return Poll::Ready(Ok(()));
            }
            self.session.write_tls(&mut self.outgoing)?;
        }
    }

    /// Reads raw bytes from the socket into `incoming` (only when all earlier ones were given
    /// to rustls). Ready(false) at end of stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        debug_assert_eq!(self.fed, self.read);
        let n = ready!(Pin::new(&mut self.io).poll_read(cx, &mut self.incoming))?;
        self.fed = 0;
        self.read = n;
        Poll::Ready(Ok(n > 0))
    }

    /// Gives rustls the next records of the raw bytes received and decrypts them.
    fn feed_received(&mut self) -> io::Result<()> {
        let mut raw = &self.incoming[self.fed..self.read];
        let taken = self.session.read_tls(&mut raw)?;
        self.fed += taken;
        self.session.process_new_packets().map_err(invalid)?;
        Ok(())
    }

    /// Gives rustls the raw bytes already received, or receives more. Ready(false) at end of
    /// stream.
    fn poll_feed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.fed == self.read && !ready!(self.poll_receive(cx))? {
            return Poll::Ready(Ok(false));
        }
        self.feed_received()?;
        Poll::Ready(Ok(true))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send_records(cx))?;
            if !self.session.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if !ready!(self.poll_feed(cx))? {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

impl AsyncRead for TlsStream {
    /// Fills `buf` with as much plaintext as the raw bytes already received hold, reading the
    /// socket only when there is none: a read returns as much as a plaintext read of the same
    /// socket would (rustls takes a few KiB of records per `read_tls` and buffers 16 KiB of
    /// plaintext, so returning after one record made every read, every batch and every client
    /// write up to 20 times smaller).
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut filled = 0;
        loop {
            match this.session.reader().read(&mut buf[filled..]) {
                // close_notify: the end of the stream, after what was already taken.
                Ok(0) if filled < buf.len() => return Poll::Ready(Ok(filled)),
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) if filled == 0 => return Poll::Ready(Err(error)),
                Err(_) => return Poll::Ready(Ok(filled)),
            }
            if filled == buf.len() {
                return Poll::Ready(Ok(filled));
            }
            if this.fed < this.read {
                if let Err(error) = this.feed_received() {
                    return Poll::Ready(if filled == 0 { Err(error) } else { Ok(filled) });
                }
                continue;
            }
            if filled > 0 {
                return Poll::Ready(Ok(filled));
            }
            if !ready!(this.poll_receive(cx))? {
                // The peer closed without close_notify: an end of stream all the same.
                return Poll::Ready(Ok(0));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.accepted.is_none() {
            ready!(this.poll_send_records(cx))?;
            this.accepted = Some(this.session.writer().write(buf)?);
        }
        ready!(this.poll_send_records(cx))?;
        Poll::Ready(Ok(this.accepted.take().unwrap_or(0)))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send_records(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.session.send_close_notify();
        ready!(this.poll_send_records(cx))?;
        Pin::new(&mut this.io).poll_close(cx)
    }
}

/// Runs the server side of a TLS handshake on `io`.
pub async fn accept(io: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let session = ServerConnection::new(config).map_err(invalid)?;
    let mut stream = TlsStream::new(io, session);
    futures_lite::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// [`accept`], failing with `TimedOut` if the handshake has not finished by `deadline`.
pub async fn accept_within(
    io: TcpStream,
    config: Arc<ServerConfig>,
    deadline: std::time::Instant,
) -> io::Result<PeerStream> {
    let remaining = deadline.saturating_duration_since(std::time::Instant::now());
    futures_lite::future::or(
        async {
            accept(io, config)
                .await
                .map(|tls| PeerStream::Tls(Box::new(tls)))
        },
        async {
            glommio::timer::sleep(remaining).await;
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete handshake within the handshake timeout",
            ))
        },
    )
    .await
}

/// A peer's connection: plain TCP or TLS.
pub enum PeerStream {
    /// The original protocol.
    Plain(TcpStream),
    /// TLS; boxed because a session is large.
    Tls(Box<TlsStream>),
}

impl PeerStream {
    /// The socket's descriptor.
    pub fn socket(&self) -> &TcpStream {
        match self {
            PeerStream::Plain(io) => io,
            PeerStream::Tls(tls) => &tls.io,
        }
    }

    /// Splits off what can move to another executor: the socket (which the caller turns into
    /// a descriptor) and the TLS session, if any.
    pub fn into_parts(self) -> (TcpStream, Option<Box<ServerConnection>>) {
        match self {
            PeerStream::Plain(io) => (io, None),
            PeerStream::Tls(tls) => {
                let TlsStream { io, session, .. } = *tls;
                (io, Some(Box::new(session)))
            }
        }
    }

    /// Puts a connection back together on the executor that now owns it.
    pub fn from_parts(io: TcpStream, session: Option<Box<ServerConnection>>) -> Self {
        match session {
            None => PeerStream::Plain(io),
            Some(session) => PeerStream::Tls(Box::new(TlsStream::new(io, *session))),
        }
    }
}

impl AsRawFd for PeerStream {
    fn as_raw_fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(io) => Pin::new(io).poll_read(cx, buf),
            PeerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(io) => Pin::new(io).poll_write(cx, buf),
            PeerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(io) => Pin::new(io).poll_flush(cx),
            PeerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(io) => Pin::new(io).poll_close(cx),
            PeerStream::Tls(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}
