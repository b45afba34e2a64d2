//! How ordered events travel through the stream: one message holds whole event lines (each
//! ended by `\n`, exactly the bytes clients receive), and its headers say where it sits.
//!
//! Headers of every message:
//! - `Nats-Msg-Id`: `<number>-<writer>`: the message's number in the chain (1, 2, ...) and the
//!   ingest that wrote it (random per ingest start). JetStream drops a message whose id it has
//!   seen within its duplicate window, so a publish retried after a lost acknowledgement is
//!   stored once; two ingests never share an id.
//! - `Nats-Expected-Last-Sequence`: the stream sequence of the message before it (0 on an
//!   empty stream), and `Nats-Expected-Last-Msg-Id`: that message's id. JetStream refuses the
//!   message unless the stream ends there: a lost message can never be overtaken, and an
//!   ingest whose view of the stream is stale is fenced off. Both, because a stale ingest's
//!   sequence alone may match by chance, and nats-server forgets the last message id when it
//!   restarts with a last message older than its duplicate window (the publisher then checks
//!   the stream's last message itself and publishes with the sequence alone).
//! - `Efr-Kind`: `batch` (ordered events) or `reset` (the event source closed: every edge
//!   ends its clients' session and forgets the follow graph).
//! - `Efr-First`, `Efr-Last` (batches): the seq range the message covers. Ranges of
//!   consecutive batches are contiguous: a hole skipped by the resequencer lies inside the
//!   range of the batch after it.

use async_nats::HeaderMap;

use crate::batch::OrderedBatch;
use crate::protocol::parse_event;

/// Header: the message's id, `<number>-<writer>`.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Header: the stream sequence the stream must end at for the message to be taken.
pub const HEADER_EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
/// Header: the id of the message the stream must end with for the message to be taken.
pub const HEADER_EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
/// Header: `batch` or `reset`.
pub const HEADER_KIND: &str = "Efr-Kind";
/// Header: first seq of a batch's range.
pub const HEADER_FIRST: &str = "Efr-First";
/// Header: last seq of a batch's range.
pub const HEADER_LAST: &str = "Efr-Last";

const KIND_BATCH: &str = "batch";
const KIND_RESET: &str = "reset";

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Ordered events covering seqs `first..=last`.
    Batch {
        /// First seq of the range (the one after the previous batch's last).
        first: u64,
        /// Last seq of the range (the seq of its last event).
        last: u64,
    },
    /// The event source closed without `--resume`: end every client's session, forget the
    /// follow graph; the next batch starts a new sequence.
    Reset,
}

/// A message's place in the chain and what it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Number in the chain.
    pub number: u64,
    /// The ingest that wrote it (random per ingest start).
    pub writer: u64,
    /// What it carries.
    pub kind: Kind,
}

/// Why a message could not be read.
#[derive(Debug, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Envelope {
    /// The message id (`Nats-Msg-Id`).
    pub fn msg_id(&self) -> String {
        format!("{}-{:016x}", self.number, self.writer)
    }

    /// The headers of this message, which the stream takes only if it ends at
    /// `expected_last_sequence` (and with the message `expected_last_msg_id`, when given).
    pub fn headers(
        &self,
        expected_last_sequence: u64,
        expected_last_msg_id: Option<&str>,
    ) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_MSG_ID, self.msg_id());
        headers.insert(
            HEADER_EXPECTED_LAST_SEQUENCE,
            expected_last_sequence.to_string(),
        );
        if let Some(id) = expected_last_msg_id {
            headers.insert(HEADER_EXPECTED_LAST_MSG_ID, id);
        }
        match self.kind {
            Kind::Batch { first, last } => {
                headers.insert(HEADER_KIND, KIND_BATCH);
                headers.insert(HEADER_FIRST, first.to_string());
                headers.insert(HEADER_LAST, last.to_string());
            }
            Kind::Reset => headers.insert(HEADER_KIND, KIND_RESET),
        }
        headers
    }

    /// Reads the envelope of a message from its headers.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Result<Envelope, WireError> {
        let headers = headers.ok_or_else(|| WireError("a message without headers".into()))?;
        let id = headers
            .get(HEADER_MSG_ID)
            .ok_or_else(|| WireError(format!("header {HEADER_MSG_ID} is missing")))?
            .as_str();
        let (number, writer) = id
            .split_once('-')
            .and_then(|(number, writer)| {
                Some((number.parse().ok()?, u64::from_str_radix(writer, 16).ok()?))
            })
            .ok_or_else(|| WireError(format!("{HEADER_MSG_ID} {id:?} is not <number>-<writer>")))?;
        let kind = match headers.get(HEADER_KIND).map(|value| value.as_str()) {
            Some(KIND_BATCH) => {
                let first = number_header(headers, HEADER_FIRST)?;
                let last = number_header(headers, HEADER_LAST)?;
                if last < first {
                    return Err(WireError(format!(
                        "message {number}: range {first}..={last} is empty"
                    )));
                }
                Kind::Batch { first, last }
            }
            Some(KIND_RESET) => Kind::Reset,
            other => {
                return Err(WireError(format!(
                    "message {number}: unknown {HEADER_KIND} {other:?}"
                )))
            }
        };
        Ok(Envelope {
            number,
            writer,
            kind,
        })
    }
}

fn number_header(headers: &HeaderMap, name: &str) -> Result<u64, WireError> {
    let value = headers
        .get(name)
        .ok_or_else(|| WireError(format!("header {name} is missing")))?;
    value.as_str().parse().map_err(|_| {
        WireError(format!(
            "header {name} is not a number: {:?}",
            value.as_str()
        ))
    })
}

/// Parses the event lines of a batch message into `batch`, in message order. Returns how many
/// lines could not be parsed (they are skipped; a well-formed stream has none).
pub fn decode_events(payload: &[u8], batch: &mut OrderedBatch) -> u64 {
    let mut unparseable = 0;
    for line in payload.split(|&byte| byte == b'\n') {
        if line.is_empty() {
            continue;
        }
        match parse_event(line) {
            Ok(event) => batch.push(event, line),
            Err(_) => unparseable += 1,
        }
    }
    unparseable
}

/// Appends a batch's events to message payloads of at most `limit` bytes (a single line longer
/// than `limit` gets a message of its own). `sealed` is called with each full payload and its
/// range; the last, partly filled payload stays in `open`.
#[derive(Debug)]
pub struct PayloadBuilder {
    /// Event lines of the message being filled.
    pub payload: Vec<u8>,
    /// First seq of its range.
    pub first: u64,
    /// Last seq of its range (the seq after the previous message's last, minus one, while
    /// empty).
    pub last: u64,
    limit: usize,
}

impl PayloadBuilder {
    /// A builder whose first range starts at `next_seq`.
    pub fn new(limit: usize, next_seq: u64) -> Self {
        PayloadBuilder {
            payload: Vec::with_capacity(limit),
            first: next_seq,
            last: next_seq.saturating_sub(1),
            limit,
        }
    }

    /// Whether the open message holds no event.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }

    /// The seq the next message's range starts at.
    pub fn next_seq(&self) -> u64 {
        self.last + 1
    }

    /// Starts over at `next_seq` (a new session), dropping nothing: call only when empty.
    pub fn restart_at(&mut self, next_seq: u64) {
        debug_assert!(self.payload.is_empty());
        self.first = next_seq;
        self.last = next_seq.saturating_sub(1);
    }

    /// Whether `bytes` more would pass the limit of a non-empty message.
    pub fn would_overflow(&self, bytes: usize) -> bool {
        !self.payload.is_empty() && self.payload.len() + bytes > self.limit
    }

    /// Appends one line (with its `\n`) of seq `seq`.
    pub fn push(&mut self, seq: u64, line: &[u8]) {
        self.payload.extend_from_slice(line);
        // The batch resequencer may release a seq below an earlier one; ranges only grow.
        self.last = self.last.max(seq);
    }

    /// Takes the open message's payload and range and starts the next one after it.
    pub fn take(&mut self) -> (Vec<u8>, Kind) {
        let kind = Kind::Batch {
            first: self.first,
            last: self.last.max(self.first),
        };
        self.first = self.last.max(self.first) + 1;
        self.last = self.first - 1;
        let payload = std::mem::replace(&mut self.payload, Vec::with_capacity(self.limit));
        (payload, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_through_headers() {
        for (envelope, expected_last, last_id) in [
            (
                Envelope {
                    number: 1,
                    writer: 0xabc,
                    kind: Kind::Batch { first: 1, last: 40 },
                },
                0,
                None,
            ),
            (
                Envelope {
                    number: 77,
                    writer: u64::MAX,
                    kind: Kind::Reset,
                },
                980,
                Some("76-0000000000000abc"),
            ),
        ] {
            let headers = envelope.headers(expected_last, last_id);
            assert_eq!(Envelope::from_headers(Some(&headers)), Ok(envelope));
            assert_eq!(
                headers.get(HEADER_EXPECTED_LAST_SEQUENCE).unwrap().as_str(),
                expected_last.to_string()
            );
            assert_eq!(
                headers
                    .get(HEADER_EXPECTED_LAST_MSG_ID)
                    .map(|id| id.as_str()),
                last_id
            );
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(Envelope::from_headers(None).is_err());
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_MSG_ID, "3");
        assert!(Envelope::from_headers(Some(&headers)).is_err());
        headers.insert(HEADER_MSG_ID, "3-zz");
        assert!(Envelope::from_headers(Some(&headers)).is_err());
        headers.insert(HEADER_MSG_ID, "3-00ff");
        headers.insert(HEADER_KIND, "batch");
        headers.insert(HEADER_FIRST, "9");
        headers.insert(HEADER_LAST, "8");
        assert!(Envelope::from_headers(Some(&headers)).is_err());
        headers.insert(HEADER_KIND, "other");
        assert!(Envelope::from_headers(Some(&headers)).is_err());
    }

    #[test]
    fn payloads_split_at_the_limit_with_contiguous_ranges() {
        let mut builder = PayloadBuilder::new(16, 1);
        let mut sealed = Vec::new();
        // seq 3 never arrived: its hole lies in the range of the batch holding seq 4.
        for (seq, line) in [(1, &b"1|B\n"[..]), (2, b"2|S|77\n"), (4, b"4|P|1|2\n")] {
            if builder.would_overflow(line.len()) {
                sealed.push(builder.take());
            }
            builder.push(seq, line);
        }
        sealed.push(builder.take());
        assert_eq!(
            sealed,
            vec![
                (b"1|B\n2|S|77\n".to_vec(), Kind::Batch { first: 1, last: 2 }),
                (b"4|P|1|2\n".to_vec(), Kind::Batch { first: 3, last: 4 }),
            ]
        );
        assert_eq!(builder.next_seq(), 5);
        let mut batch = OrderedBatch::default();
        assert_eq!(decode_events(b"1|B\n2|S|77\nnot a seq\n", &mut batch), 1);
        assert_eq!(batch.seqs().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(batch.notification(&batch.events()[1]), b"2|S|77\n");
    }
}
