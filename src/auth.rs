//! Who may connect: client tokens and the event source's address allow-list.
//!
//! - **Client tokens** (off by default, so the original protocol keeps working): with
//!   `--client-jwt-key FILE` (an HS256 secret) or `--client-jwt-public-key PEM` (RS256 or
//!   ES256), a client's id line is `ID TOKEN`, one space between. The token is a JWT whose `sub`
//!   is the decimal user id and whose `exp` is in the future; anything else closes the
//!   connection. A token is checked once, at the handshake, on the executor that accepted the
//!   connection; a token that expires later does not end a connection already served.
//!   Signatures are compared in constant time by the crypto crates underneath `jsonwebtoken`.
//!   A token never appears in a log line: refusals name the reason and the claimed id only.
//! - **Source allow-list** (`--source-allow CIDR[,CIDR...]`, off by default): an event source
//!   whose peer address is in none of the networks is closed at once, before it can send a
//!   byte that counts.

use std::net::IpAddr;
use std::path::Path;

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};

use crate::protocol::parse_u64;

/// Shortest HS256 secret accepted: 256 bits, the size of the hash (RFC 7518 section 3.2).
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

/// How clients prove who they are.
#[derive(Clone, Default)]
pub enum ClientAuth {
    /// The id line is the id alone, as in the original protocol.
    #[default]
    Open,
    /// The id line is `ID TOKEN`, the token a JWT signed with this key.
    Jwt(Box<JwtVerifier>),
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientAuth::Open => f.write_str("Open"),
            // Never print key material.
            ClientAuth::Jwt(verifier) => write!(f, "Jwt({:?})", verifier.algorithm),
        }
    }
}

impl From<JwtVerifier> for ClientAuth {
    fn from(verifier: JwtVerifier) -> Self {
        ClientAuth::Jwt(Box::new(verifier))
    }
}

/// Checks client tokens against one key.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

/// Why an id line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdRefusal {
    /// The id is not a u64 (or, with tokens off, the line is not an id alone).
    NotAnId,
    /// Tokens are on and the line holds no token.
    MissingToken,
    /// Not a JWT, not JSON, no `sub` or `exp`, or not one space between id and token.
    MalformedToken,
    /// The signature does not verify with the configured key (or the algorithm is another).
    BadSignature,
    /// `exp` has passed.
    Expired,
    /// A valid token of another user.
    OtherUser,
}

impl IdRefusal {
    /// A few words for the log line.
    pub fn describe(self) -> &'static str {
        match self {
            IdRefusal::NotAnId => "id is not a u64",
            IdRefusal::MissingToken => "no token after the id",
            IdRefusal::MalformedToken => "malformed token",
            IdRefusal::BadSignature => "token signature does not verify",
            IdRefusal::Expired => "token expired",
            IdRefusal::OtherUser => "token is another user's",
        }
    }
}

/// The claims efr reads; others are ignored.
#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

/// Why a key could not be loaded.
#[derive(Debug)]
pub struct KeyError(pub String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl JwtVerifier {
    /// An HS256 verifier whose secret is `secret` (at least [`MIN_HMAC_SECRET_BYTES`]).
    pub fn hmac(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < MIN_HMAC_SECRET_BYTES {
            return Err(KeyError(format!(
                "the HS256 secret has {} bytes; at least {MIN_HMAC_SECRET_BYTES} are needed",
                secret.len()
            )));
        }
        let key = DecodingKey::from_secret(secret)
            .map_err(|error| KeyError(format!("unusable HS256 secret: {error}")))?;
        Ok(Self::new(key, Algorithm::HS256))
    }

    /// An RS256 or ES256 verifier from a PEM public key (the algorithm follows the key type).
    pub fn public_key(pem: &[u8]) -> Result<Self, KeyError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::new(key, Algorithm::ES256));
        }
        Err(KeyError(
            "not an RSA or P-256 EC public key in PEM form".into(),
        ))
    }

    /// Reads an HS256 secret from `path` (its bytes, without a trailing line end).
    pub fn hmac_file(path: &Path) -> Result<Self, KeyError> {
        let bytes = read_key(path)?;
        let secret = bytes
            .strip_suffix(b"\n")
            .map(|rest| rest.strip_suffix(b"\r").unwrap_or(rest))
            .unwrap_or(&bytes);
        Self::hmac(secret).map_err(|KeyError(why)| KeyError(format!("{}: {why}", path.display())))
    }

    /// Reads a PEM public key from `path`.
    pub fn public_key_file(path: &Path) -> Result<Self, KeyError> {
        Self::public_key(&read_key(path)?)
            .map_err(|KeyError(why)| KeyError(format!("{}: {why}", path.display())))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        // No grace after `exp`: a token is valid until the second it names.
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtVerifier {
            key,
            algorithm,
            validation,
        }
    }

    /// Checks that `token` is valid now and names `user`.
    pub fn verify(&self, token: &[u8], user: u64) -> Result<(), IdRefusal> {
        let token = std::str::from_utf8(token).map_err(|_| IdRefusal::MalformedToken)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |error| match error.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                    IdRefusal::BadSignature
                }
                ErrorKind::ExpiredSignature => IdRefusal::Expired,
                _ => IdRefusal::MalformedToken,
            },
        )?;
        match parse_u64(data.claims.sub.as_bytes()) {
            Some(subject) if subject == user => Ok(()),
            Some(_) => Err(IdRefusal::OtherUser),
            None => Err(IdRefusal::MalformedToken),
        }
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path)
        .map_err(|error| KeyError(format!("cannot read {}: {error}", path.display())))
}

impl ClientAuth {
    /// The user an id line (terminator removed) identifies, or why it is refused.
    pub fn identify(&self, line: &[u8]) -> Result<u64, IdRefusal> {
        match self {
            ClientAuth::Open => parse_u64(line).ok_or(IdRefusal::NotAnId),
            ClientAuth::Jwt(verifier) => {
                let (id, token) = match memchr::memchr(b' ', line) {
                    Some(space) => (&line[..space], Some(&line[space + 1..])),
                    None => (line, None),
                };
                let user = parse_u64(id).ok_or(IdRefusal::NotAnId)?;
                match token {
                    None | Some([]) => Err(IdRefusal::MissingToken),
                    Some(token) => verifier.verify(token, user).map(|()| user),
                }
            }
        }
    }

    /// Whether tokens are required.
    pub fn requires_tokens(&self) -> bool {
        matches!(self, ClientAuth::Jwt(_))
    }
}

/// An IP network: an address and a prefix length (`10.0.0.0/8`, `::1/128`; a bare address is
/// the network of that one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR network"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={bits}"))?,
        };
        Ok(Cidr { network, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// Whether `address` is in this network. An IPv4 address mapped into IPv6
    /// (`::ffff:a.b.c.d`, as a dual-stack listener reports it) is compared as IPv4.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                prefix_matches(&network.octets(), &address.octets(), self.prefix)
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                prefix_matches(&network.octets(), &address.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_matches(network: &[u8], address: &[u8], prefix: u8) -> bool {
    let whole = prefix as usize / 8;
    let rest = prefix % 8;
    if network[..whole] != address[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    network[whole] & mask == address[whole] & mask
}

/// Whether a source at `address` may connect: always when `allowed` is empty.
pub fn source_allowed(allowed: &[Cidr], address: IpAddr) -> bool {
    allowed.is_empty() || allowed.iter().any(|network| network.contains(address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_matching() {
        let lan: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(lan.contains("10.1.200.3".parse().unwrap()));
        assert!(!lan.contains("10.2.0.1".parse().unwrap()));
        assert!(lan.contains("::ffff:10.1.0.9".parse().unwrap()));
        let odd: Cidr = "192.168.1.128/25".parse().unwrap();
        assert!(odd.contains("192.168.1.200".parse().unwrap()));
        assert!(!odd.contains("192.168.1.127".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.1/32");
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "::/129", "nonsense", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(source_allowed(&[], "1.2.3.4".parse().unwrap()));
        assert!(!source_allowed(&[lan], "1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn open_auth_takes_a_bare_id_only() {
        assert_eq!(ClientAuth::Open.identify(b"42"), Ok(42));
        assert_eq!(ClientAuth::Open.identify(b"42 x"), Err(IdRefusal::NotAnId));
    }

    #[test]
    fn short_hmac_secrets_are_refused() {
        assert!(JwtVerifier::hmac(&[7u8; MIN_HMAC_SECRET_BYTES - 1]).is_err());
        assert!(JwtVerifier::hmac(&[7u8; MIN_HMAC_SECRET_BYTES]).is_ok());
        assert!(JwtVerifier::public_key(b"-----BEGIN PUBLIC KEY-----\nxx\n").is_err());
    }
}
