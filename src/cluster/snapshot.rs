//! The follow graph as a snapshot: a compact, versioned binary format with a checksum.
//!
//! Layout (integers little-endian, `varint` = LEB128 unsigned):
//!
//! ```text
//! magic        4 bytes  "EFRG"
//! version      u8       1
//! flags        u8       bit 0: a session is open (event_seq is meaningful)
//! reserved     u16      0
//! stream_seq   u64      the last stream message applied to the graph
//! event_seq    u64      the last event seq applied in the open session (0 when none)
//! edges        u64      number of follow edges
//! followers    u64      number of distinct followers
//! body         per follower, ascending: varint(follower - previous follower),
//!              varint(followees), then the followees ascending: varint(first),
//!              varint(next - previous - 1) ...
//! checksum     u64      FNV-1a 64 of every byte before it
//! ```
//!
//! Sorted deltas keep a graph of dense user ids near 2-3 bytes an edge. A decoder refuses a
//! wrong magic, an unknown version, a truncated body, trailing bytes and a wrong checksum.

use std::fmt;

/// The first bytes of every snapshot.
pub const MAGIC: &[u8; 4] = b"EFRG";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
const HEADER_BYTES: usize = 4 + 1 + 1 + 2 + 8 * 4;
const CHECKSUM_BYTES: usize = 8;
const FLAG_SESSION_OPEN: u8 = 1;

/// The follow graph of a cluster as of one stream message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphSnapshot {
    /// The last stream message applied to the graph.
    pub stream_seq: u64,
    /// The last event seq applied in the open session (None: no session open).
    pub event_seq: Option<u64>,
    /// Every follow edge, `(follower, followee)`, sorted and without duplicates.
    pub edges: Vec<(u64, u64)>,
}

/// Why bytes are not a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// Shorter than a header and a checksum, or the body ended early.
    Truncated,
    /// Not an efr graph snapshot.
    BadMagic,
    /// A version this code does not read.
    UnknownVersion(u8),
    /// The checksum does not match the bytes.
    BadChecksum,
    /// The body does not match its header (counts, order, trailing bytes).
    Corrupt(&'static str),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Truncated => write!(f, "truncated snapshot"),
            SnapshotError::BadMagic => write!(f, "not an efr graph snapshot"),
            SnapshotError::UnknownVersion(v) => write!(f, "unknown snapshot version {v}"),
            SnapshotError::BadChecksum => write!(f, "snapshot checksum mismatch"),
            SnapshotError::Corrupt(what) => write!(f, "corrupt snapshot: {what}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// FNV-1a, 64 bits.
pub fn checksum(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, &byte| {
        (hash ^ byte as u64).wrapping_mul(PRIME)
    })
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u64, SnapshotError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(SnapshotError::Truncated)?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return Err(SnapshotError::Corrupt("varint overflows 64 bits"));
        }
        value |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(SnapshotError::Corrupt("varint longer than 10 bytes"))
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

impl GraphSnapshot {
    /// A snapshot of `edges` in any order, duplicates allowed.
    pub fn new(stream_seq: u64, event_seq: Option<u64>, mut edges: Vec<(u64, u64)>) -> Self {
        edges.sort_unstable();
        edges.dedup();
        GraphSnapshot {
            stream_seq,
            event_seq,
            edges,
        }
    }

    /// The snapshot's bytes (edges must be sorted and distinct, as [`new`](Self::new) makes
    /// them).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.edges.windows(2).all(|pair| pair[0] < pair[1]));
        let followers = self
            .edges
            .iter()
            .enumerate()
            .filter(|(i, edge)| *i == 0 || self.edges[i - 1].0 != edge.0)
            .count();
        let mut out = Vec::with_capacity(HEADER_BYTES + self.edges.len() * 3 + 16);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(if self.event_seq.is_some() {
            FLAG_SESSION_OPEN
        } else {
            0
        });
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.stream_seq.to_le_bytes());
        out.extend_from_slice(&self.event_seq.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&(self.edges.len() as u64).to_le_bytes());
        out.extend_from_slice(&(followers as u64).to_le_bytes());
        let mut previous_follower = 0;
        let mut start = 0;
        while start < self.edges.len() {
            let follower = self.edges[start].0;
            let end = start
                + self.edges[start..]
                    .iter()
                    .take_while(|edge| edge.0 == follower)
                    .count();
            put_varint(&mut out, follower - previous_follower);
            put_varint(&mut out, (end - start) as u64);
            let mut previous_followee = None;
            for &(_, followee) in &self.edges[start..end] {
                match previous_followee {
                    None => put_varint(&mut out, followee),
                    Some(previous) => put_varint(&mut out, followee - previous - 1),
                }
                previous_followee = Some(followee);
            }
            previous_follower = follower;
            start = end;
        }
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads a snapshot, checking its magic, version, checksum and structure.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES {
            return Err(SnapshotError::Truncated);
        }
        if &bytes[..4] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(SnapshotError::UnknownVersion(bytes[4]));
        }
        let body_end = bytes.len() - CHECKSUM_BYTES;
        if checksum(&bytes[..body_end]) != get_u64(bytes, body_end) {
            return Err(SnapshotError::BadChecksum);
        }
        let session_open = bytes[5] & FLAG_SESSION_OPEN != 0;
        let stream_seq = get_u64(bytes, 8);
        let event_seq = get_u64(bytes, 16);
        let edge_count = get_u64(bytes, 24);
        let follower_count = get_u64(bytes, 32);
        let body = &bytes[..body_end];
        // Every edge takes at least one byte: a count beyond the body is a lie.
        if edge_count > body.len() as u64 || follower_count > edge_count {
            return Err(SnapshotError::Corrupt("counts larger than the body"));
        }
        let mut edges = Vec::with_capacity(edge_count as usize);
        let mut at = HEADER_BYTES;
        let mut follower = 0u64;
        for index in 0..follower_count {
            let delta = get_varint(body, &mut at)?;
            if index > 0 && delta == 0 {
                return Err(SnapshotError::Corrupt("followers not ascending"));
            }
            follower = follower
                .checked_add(delta)
                .ok_or(SnapshotError::Corrupt("follower overflows"))?;
            let followees = get_varint(body, &mut at)?;
            if followees == 0 || followees > edge_count - edges.len() as u64 {
                return Err(SnapshotError::Corrupt("followee count"));
            }
            let mut followee = get_varint(body, &mut at)?;
            edges.push((follower, followee));
            for _ in 1..followees {
                let gap = get_varint(body, &mut at)?;
                followee = followee
                    .checked_add(gap)
                    .and_then(|f| f.checked_add(1))
                    .ok_or(SnapshotError::Corrupt("followee overflows"))?;
                edges.push((follower, followee));
            }
        }
        if edges.len() as u64 != edge_count {
            return Err(SnapshotError::Corrupt("edge count"));
        }
        if at != body.len() {
            return Err(SnapshotError::Corrupt("trailing bytes"));
        }
        Ok(GraphSnapshot {
            stream_seq,
            event_seq: session_open.then_some(event_seq),
            edges,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> GraphSnapshot {
        GraphSnapshot::new(
            42,
            Some(1_000),
            vec![(3, 1), (1, 2), (1, 9), (3, 1), (u64::MAX, 0), (7, u64::MAX)],
        )
    }

    #[test]
    fn a_small_graph_round_trips_and_is_compact() {
        let snapshot = sample();
        assert_eq!(snapshot.edges.len(), 5);
        let bytes = snapshot.encode();
        assert_eq!(GraphSnapshot::decode(&bytes).unwrap(), snapshot);
        let dense = GraphSnapshot::new(
            1,
            None,
            (1..=1_000u64)
                .flat_map(|f| (0..10).map(move |i| (f, (f * 7 + i * 13) % 1_000 + 1)))
                .collect(),
        );
        let bytes = dense.encode();
        assert!(bytes.len() < dense.edges.len() * 3, "{} bytes", bytes.len());
        assert_eq!(GraphSnapshot::decode(&bytes).unwrap(), dense);
    }

    #[test]
    fn damaged_bytes_are_refused_with_a_reason() {
        let bytes = sample().encode();
        assert_eq!(
            GraphSnapshot::decode(&bytes[..10]),
            Err(SnapshotError::Truncated)
        );
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert_eq!(GraphSnapshot::decode(&wrong), Err(SnapshotError::BadMagic));
        let mut wrong = bytes.clone();
        wrong[4] = 9;
        assert_eq!(
            GraphSnapshot::decode(&wrong),
            Err(SnapshotError::UnknownVersion(9))
        );
        for index in 8..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[index] ^= 0x10;
            assert!(GraphSnapshot::decode(&flipped).is_err(), "byte {index}");
        }
        assert!(GraphSnapshot::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn any_graph_round_trips(
            stream_seq in any::<u64>(),
            event_seq in proptest::option::of(any::<u64>()),
            edges in proptest::collection::vec(
                (prop_oneof![0u64..64, any::<u64>()], prop_oneof![0u64..64, any::<u64>()]),
                0..300,
            ),
        ) {
            let snapshot = GraphSnapshot::new(stream_seq, event_seq, edges);
            let bytes = snapshot.encode();
            prop_assert_eq!(GraphSnapshot::decode(&bytes), Ok(snapshot));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = GraphSnapshot::decode(&bytes);
        }
    }
}
