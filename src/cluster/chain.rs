//! Where the stream's chain of messages ends: what an ingest needs to go on with `--resume`
//! (the next event seq, the last message's number and id) or to start a new session.
//!
//! The stream's last message says it, while the stream holds one. The stream forgets its
//! messages after its retention, so an idle stream older than that holds none, only its last
//! sequence number. The ingest therefore also keeps the end in the key-value bucket
//! `<stream>-chain` (key [`CHAIN_KEY`]): the last acknowledged message, saved once the
//! publisher has been quiet for a moment and at most about once a second while it publishes
//! (a one-shot wait after the last message, no timer while idle), and at a graceful stop.
//! When the stream holds no message, the saved end counts only if it names the stream's last
//! sequence: a saved end older than that (an ingest killed within a second of its last
//! publish, then left down longer than the retention) means where the chain ends is lost.

use async_nats::jetstream::{self, kv, stream};
use std::time::Duration;

use super::store::key_value;
use super::subject;
use super::wire::{Envelope, Kind};
use crate::config::NatsConfig;

/// The key of the saved chain end.
pub const CHAIN_KEY: &str = "end";

/// Where the stream's chain ends: its last message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainEnd {
    /// The last message's envelope.
    pub envelope: Envelope,
    /// Its stream sequence.
    pub stream_seq: u64,
}

impl ChainEnd {
    /// The event seq after the last published batch (None after a reset).
    pub fn next_event_seq(&self) -> Option<u64> {
        match self.envelope.kind {
            Kind::Batch { last, .. } => Some(last + 1),
            Kind::Reset => None,
        }
    }

    /// One line of `key=value` fields.
    pub fn encode(&self) -> String {
        let kind = match self.envelope.kind {
            Kind::Batch { first, last } => format!("batch first={first} last={last}"),
            Kind::Reset => "reset".to_string(),
        };
        format!(
            "stream_seq={} number={} writer={:016x} kind={kind}",
            self.stream_seq, self.envelope.number, self.envelope.writer
        )
    }

    /// Reads [`encode`](Self::encode)'s line.
    pub fn parse(bytes: &[u8]) -> Result<ChainEnd, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "chain end is not UTF-8".to_string())?;
        let field = |name: &str| -> Result<&str, String> {
            text.split(' ')
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| format!("chain end has no {name}: {text:?}"))
        };
        let number = |name: &str| -> Result<u64, String> {
            field(name)?
                .parse()
                .map_err(|_| format!("chain end's {name} is not a number: {text:?}"))
        };
        let kind = match field("kind")? {
            "reset" => Kind::Reset,
            "batch" => Kind::Batch {
                first: number("first")?,
                last: number("last")?,
            },
            other => return Err(format!("chain end's kind {other:?} is unknown: {text:?}")),
        };
        Ok(ChainEnd {
            envelope: Envelope {
                number: number("number")?,
                writer: u64::from_str_radix(field("writer")?, 16)
                    .map_err(|_| format!("chain end's writer is not hex: {text:?}"))?,
                kind,
            },
            stream_seq: number("stream_seq")?,
        })
    }
}

/// What an ingest finds at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The chain ends here (None: the stream never held a message).
    Known(Option<ChainEnd>),
    /// The stream's messages are gone and no saved end names its last sequence.
    Lost {
        /// The stream's last sequence.
        last_stream_seq: u64,
        /// The saved end, older than that.
        saved: Option<ChainEnd>,
    },
}

/// The saved chain end of one stream.
pub struct ChainStore {
    bucket: kv::Store,
}

impl ChainStore {
    /// Opens (creating when needed) the bucket `<stream>-chain`.
    pub async fn open(
        context: &jetstream::Context,
        config: &NatsConfig,
    ) -> Result<ChainStore, String> {
        let bucket =
            key_value(context, &format!("{}-chain", config.stream), Duration::ZERO).await?;
        Ok(ChainStore { bucket })
    }

    /// Saves `end` as where the chain ends.
    pub async fn save(&self, end: &ChainEnd) -> Result<(), String> {
        self.bucket
            .put(CHAIN_KEY, end.encode().into())
            .await
            .map(|_| ())
            .map_err(|error| format!("cannot save the chain end: {error}"))
    }

    /// The saved end, if any.
    pub async fn saved(&self) -> Result<Option<ChainEnd>, String> {
        let entry = self
            .bucket
            .entry(CHAIN_KEY)
            .await
            .map_err(|error| format!("cannot read the saved chain end: {error}"))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Ok(Some(ChainEnd::parse(&entry.value)?))
            }
            _ => Ok(None),
        }
    }

    /// Where the stream's chain ends: its last message, or when the stream holds none, the
    /// saved end if it names the stream's last sequence.
    pub async fn find(
        &self,
        stream: &stream::Stream,
        config: &NatsConfig,
        last_stream_seq: u64,
    ) -> Result<Found, String> {
        if let Some(end) = last_message(stream, config).await? {
            return Ok(Found::Known(Some(end)));
        }
        if last_stream_seq == 0 {
            return Ok(Found::Known(None));
        }
        let saved = self.saved().await?;
        Ok(match saved {
            Some(end) if end.stream_seq == last_stream_seq => Found::Known(Some(end)),
            saved => Found::Lost {
                last_stream_seq,
                saved,
            },
        })
    }
}

/// Reads the last message of the stream (None when the stream holds none).
async fn last_message(
    stream: &stream::Stream,
    config: &NatsConfig,
) -> Result<Option<ChainEnd>, String> {
    match stream
        .get_last_raw_message_by_subject(&subject(config))
        .await
    {
        Ok(message) => {
            let envelope = Envelope::from_headers(Some(&message.headers)).map_err(|error| {
                format!(
                    "the last message of stream {} is not an efr message: {error}",
                    config.stream
                )
            })?;
            Ok(Some(ChainEnd {
                envelope,
                stream_seq: message.sequence,
            }))
        }
        Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(error) => Err(format!(
            "cannot read the last message of stream {}: {error}",
            config.stream
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_end_reads_back_as_written() {
        for kind in [Kind::Reset, Kind::Batch { first: 7, last: 99 }] {
            let end = ChainEnd {
                envelope: Envelope {
                    number: 12,
                    writer: 0xfeed_0000_0000_beef,
                    kind,
                },
                stream_seq: 345,
            };
            assert_eq!(ChainEnd::parse(end.encode().as_bytes()), Ok(end));
        }
        assert!(ChainEnd::parse(b"stream_seq=1 number=2 writer=zz kind=reset").is_err());
        assert!(ChainEnd::parse(b"stream_seq=1 number=2 writer=0 kind=batch").is_err());
    }
}
