//! Speaking to a server that checks who connects: TLS on both ports (`--tls-ca`, with the
//! source presenting `--client-cert`/`--client-key` for mutual TLS) and a signed token per
//! client (`--jwt-key` HS256, `--jwt-private-key` ES256/RS256), sent as `ID TOKEN` on the id
//! line.
//!
//! [`Security`] is built once from the flags; [`Link`] is one blocking connection (a client
//! during its handshake and id line, the event source for the whole run), plain or TLS; a
//! reader thread takes a client's rustls session over and drives it on its nonblocking socket
//! ([`tls_read`]).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use serde::Serialize;

use super::workload::push_u64;

/// Default server name checked against the server's certificate.
pub const DEFAULT_TLS_SERVER_NAME: &str = "localhost";
/// Default lifetime of a client token, s.
pub const DEFAULT_JWT_TTL_S: u64 = 3_600;

/// Help heading of the security flags.
pub const SECURITY_HEADING: &str = "Security options (every workload)";

/// The security flags (global: they work with every workload).
#[derive(Args, Debug, Clone, Default, Serialize)]
pub struct SecurityArgs {
    /// Speak TLS on both ports, trusting the server certificates this PEM CA signed.
    #[arg(long, global = true, help_heading = SECURITY_HEADING, env = "EFR_LOAD_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Name the server's certificate must carry.
    #[arg(long, global = true, help_heading = SECURITY_HEADING, env = "EFR_LOAD_TLS_SERVER_NAME", default_value = DEFAULT_TLS_SERVER_NAME, value_name = "NAME")]
    pub tls_server_name: String,
    /// PEM certificate the event source presents (mutual TLS; needs --tls-ca and --client-key).
    #[arg(long, global = true, help_heading = SECURITY_HEADING, env = "EFR_LOAD_CLIENT_CERT", value_name = "PEM", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, global = true, help_heading = SECURITY_HEADING, env = "EFR_LOAD_CLIENT_KEY", value_name = "PEM", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Sign a token per client with this HS256 secret (the file's bytes, without a trailing
    /// line end) and send `ID TOKEN` as its id line.
    #[arg(long, global = true, help_heading = SECURITY_HEADING, env = "EFR_LOAD_JWT_KEY", value_name = "FILE", conflicts_with = "jwt_private_key")]
    pub jwt_key: Option<PathBuf>,
    /// Sign the tokens with this PEM private key instead: ES256 (P-256) or RS256 (RSA).
    #[arg(long, global = true, help_heading = SECURITY_HEADING, env = "EFR_LOAD_JWT_PRIVATE_KEY", value_name = "PEM")]
    pub jwt_private_key: Option<PathBuf>,
    /// Lifetime of each token (`exp` = now + this), s.
    #[arg(long, global = true, help_heading = SECURITY_HEADING, env = "EFR_LOAD_JWT_TTL_S", default_value_t = DEFAULT_JWT_TTL_S, value_name = "S")]
    pub jwt_ttl_s: u64,
}

impl SecurityArgs {
    /// Checks the combination of flags.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.client_cert.is_none() || self.tls_ca.is_some(),
            "--client-cert needs --tls-ca: the source presents its certificate over TLS"
        );
        anyhow::ensure!(self.jwt_ttl_s >= 1, "--jwt-ttl-s must be at least 1");
        Ok(())
    }
}

/// The claims of a client token.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
}

/// Signs one token per client.
pub struct TokenSigner {
    key: EncodingKey,
    header: Header,
    ttl_s: u64,
}

impl TokenSigner {
    /// An HS256 signer over the bytes of `path` (a trailing line end is not part of them).
    pub fn hmac_file(path: &Path, ttl_s: u64) -> anyhow::Result<TokenSigner> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let secret = bytes
            .strip_suffix(b"\n")
            .map(|rest| rest.strip_suffix(b"\r").unwrap_or(rest))
            .unwrap_or(&bytes);
        anyhow::ensure!(!secret.is_empty(), "{}: empty HS256 secret", path.display());
        Ok(TokenSigner {
            key: EncodingKey::from_secret(secret).context("unusable HS256 secret")?,
            header: Header::new(Algorithm::HS256),
            ttl_s,
        })
    }

    /// An ES256 or RS256 signer from a PEM private key (the algorithm follows the key).
    pub fn private_key_file(path: &Path, ttl_s: u64) -> anyhow::Result<TokenSigner> {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (key, algorithm) = if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
            (key, Algorithm::ES256)
        } else if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
            (key, Algorithm::RS256)
        } else {
            anyhow::bail!(
                "{}: not a P-256 EC or RSA private key in PEM form",
                path.display()
            );
        };
        Ok(TokenSigner {
            key,
            header: Header::new(algorithm),
            ttl_s,
        })
    }

    /// A token for `user`, valid for the signer's lifetime from now.
    pub fn token(&self, user: u64) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let sub = user.to_string();
        jsonwebtoken::encode(
            &self.header,
            &Claims {
                sub: &sub,
                exp: now + self.ttl_s,
            },
            &self.key,
        )
        .with_context(|| format!("signing the token of user {user}"))
    }
}

/// What efr-load needs to get past a server's checks, built once from [`SecurityArgs`].
#[derive(Default)]
pub struct Security {
    client_tls: Option<Arc<ClientConfig>>,
    source_tls: Option<Arc<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
    signer: Option<TokenSigner>,
}

fn tls_config(
    roots: &RootCertStore,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots.clone());
    Ok(Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading the certificate {}", cert.display()))?;
            anyhow::ensure!(!chain.is_empty(), "{}: no certificate", cert.display());
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading the private key {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the source's client certificate and key")?
        }
    }))
}

impl Security {
    /// Reads the files the flags name.
    pub fn from_args(args: &SecurityArgs) -> anyhow::Result<Security> {
        args.validate()?;
        let mut security = Security::default();
        if let Some(ca) = &args.tls_ca {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("reading the CA {}", ca.display()))?;
            anyhow::ensure!(!certs.is_empty(), "{}: no certificate", ca.display());
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
            }
            let identity = args.client_cert.as_deref().zip(args.client_key.as_deref());
            security.client_tls = Some(tls_config(&roots, None)?);
            security.source_tls = Some(tls_config(&roots, identity)?);
            security.server_name = Some(
                ServerName::try_from(args.tls_server_name.clone())
                    .with_context(|| format!("--tls-server-name {:?}", args.tls_server_name))?,
            );
        }
        security.signer = match (&args.jwt_key, &args.jwt_private_key) {
            (Some(path), _) => Some(TokenSigner::hmac_file(path, args.jwt_ttl_s)?),
            (None, Some(path)) => Some(TokenSigner::private_key_file(path, args.jwt_ttl_s)?),
            (None, None) => None,
        };
        Ok(security)
    }

    /// Whether the connections speak TLS.
    pub fn tls(&self) -> bool {
        self.client_tls.is_some()
    }

    /// Appends `user`'s id line: `ID`, or `ID TOKEN` when signing tokens, then `ending`.
    pub fn push_id_line(&self, out: &mut Vec<u8>, user: u64, ending: &[u8]) -> anyhow::Result<()> {
        push_u64(out, user);
        if let Some(signer) = &self.signer {
            out.push(b' ');
            out.extend_from_slice(signer.token(user)?.as_bytes());
        }
        out.extend_from_slice(ending);
        Ok(())
    }

    /// A new client session (`None` without TLS); the source's presents its certificate.
    pub fn session(&self, source: bool) -> anyhow::Result<Option<Box<ClientConnection>>> {
        let config = if source {
            &self.source_tls
        } else {
            &self.client_tls
        };
        match (config, &self.server_name) {
            (Some(config), Some(name)) => Ok(Some(Box::new(
                ClientConnection::new(config.clone(), name.clone()).context("TLS session")?,
            ))),
            _ => Ok(None),
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A blocking connection, plain or TLS.
pub struct Link {
    /// The socket.
    pub tcp: TcpStream,
    /// The TLS session over it, if any.
    pub tls: Option<Box<ClientConnection>>,
}

impl Link {
    /// Connects `addr` and, with TLS, completes the handshake, all within `timeout` per step.
    pub fn connect(
        addr: std::net::SocketAddr,
        timeout: Duration,
        security: &Security,
        source: bool,
    ) -> anyhow::Result<Link> {
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        let _ = tcp.set_nodelay(true);
        let mut link = Link {
            tcp,
            tls: security.session(source)?,
        };
        if let Some(tls) = &mut link.tls {
            link.tcp.set_read_timeout(Some(timeout))?;
            link.tcp.set_write_timeout(Some(timeout))?;
            while tls.is_handshaking() {
                tls.complete_io(&mut link.tcp)
                    .map_err(|e| anyhow::anyhow!("TLS handshake: {e}"))?;
            }
            link.tcp.set_read_timeout(None)?;
            link.tcp.set_write_timeout(None)?;
        }
        Ok(link)
    }

    /// Sends every pending TLS record; a write timeout is an error to retry later.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                tls.write_tls(&mut self.tcp)?;
            }
        }
        Ok(())
    }

    /// Writes some of `buf` (all pending TLS records first); with TLS the plaintext is taken
    /// once encrypted, whether or not its records could be sent yet.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.tcp.write(buf);
        }
        self.flush_tls()?;
        let tls = self.tls.as_mut().expect("a TLS link");
        let n = tls.writer().write(buf)?;
        match self.flush_tls() {
            Err(e) if !would_block(&e) => Err(e),
            _ => Ok(n),
        }
    }

    /// Writes all of `buf` and sends it (blocking; for the id lines).
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write(buf) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.flush_tls()
    }

    /// Ends the write side: TLS close_notify, then the TCP write shutdown.
    pub fn close_write(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
        }
        self.flush_tls()?;
        self.tcp.shutdown(Shutdown::Write)
    }
}

/// Most socket reads (rustls reads up to 4 KiB each) per fill of a reader's buffer.
const TLS_READS_PER_FILL: usize = 8;

/// Drives a client's rustls session over its nonblocking socket for a reader: fills `buf`
/// with as much plaintext as the socket has now, like a nonblocking read: `Ok(n > 0)` bytes,
/// `Ok(0)` at the end of the stream (close_notify or the TCP end), `Err(WouldBlock)` when
/// nothing is there yet.
pub fn tls_read(
    tls: &mut ClientConnection,
    socket: &mut (impl Read + Write),
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut filled = 0;
    let mut reads = 0;
    loop {
        match tls.reader().read(&mut buf[filled..]) {
            Ok(0) => return Ok(filled),
            Ok(n) => {
                filled += n;
                if filled == buf.len() {
                    return Ok(filled);
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The TCP end without close_notify: an end all the same (a missing line is
            // found by the verification).
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(filled),
            Err(e) => return Err(e),
        }
        if reads == TLS_READS_PER_FILL && filled > 0 {
            return Ok(filled);
        }
        reads += 1;
        match tls.read_tls(socket) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock && filled > 0 => return Ok(filled),
            Err(e) => return Err(e),
        }
        tls.process_new_packets()
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        // Alerts and key updates the session must answer; best effort.
        while tls.wants_write() {
            if tls.write_tls(socket).is_err() {
                break;
            }
        }
    }
}
