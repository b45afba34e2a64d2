//! The `ping` workload: one event at a time. The source writes `n|P|1|2`, waits until client 2
//! received it, then writes the next one, so each latency is one round trip through the server
//! with nothing queued behind it (the source never has more than one batch in flight, see
//! [`Workload::lockstep`]). With `--rate` the pings are also spaced out in time. `efr-load
//! ping` runs it in the round-trip loop of [`crate::ping_loop`], not through the source and
//! reader threads.

use serde::Serialize;

use super::workload::{Batch, Event, Kind, LineEnding, ModelChunk, Workload};

/// The user that sends every private message.
pub const PING_FROM: u64 = 1;
/// The user that receives them (the one connected client).
pub const PING_TO: u64 = 2;

/// Parameters of `ping`.
#[derive(Clone, Debug, Serialize)]
pub struct PingParams {
    /// Number of events, each sent after the previous one arrived.
    pub count: u64,
}

/// The `ping` workload.
pub struct Ping {
    params: PingParams,
    clients: [u64; 1],
    next_seq: u64,
    ending: LineEnding,
}

impl Ping {
    /// Validates the parameters and builds the workload.
    pub fn new(params: PingParams, ending: LineEnding) -> anyhow::Result<Ping> {
        anyhow::ensure!(
            params.count >= 1,
            "ping: --count must be at least 1 (the number of round trips to measure)"
        );
        Ok(Ping {
            params,
            clients: [PING_TO],
            next_seq: 1,
            ending,
        })
    }
}

impl Workload for Ping {
    fn clients(&self) -> &[u64] {
        &self.clients
    }
    fn max_user(&self) -> u64 {
        PING_TO
    }
    fn total_events(&self) -> Option<u64> {
        Some(self.params.count)
    }
    fn lockstep(&self) -> bool {
        true
    }
    fn next_batch(&mut self) -> anyhow::Result<Option<Batch>> {
        if self.next_seq > self.params.count {
            return Ok(None);
        }
        let mut model = ModelChunk::default();
        model.push(Event {
            seq: self.next_seq,
            kind: Kind::Private,
            from: PING_FROM,
            to: PING_TO,
        });
        self.next_seq += 1;
        let mut wire = model.payload.clone();
        wire.extend_from_slice(self.ending.bytes());
        Ok(Some(Batch {
            wire,
            wire_events: 1,
            model,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_private_message_per_batch_in_seq_order() {
        let mut p = Ping::new(PingParams { count: 3 }, LineEnding::Crlf).unwrap();
        assert!(p.lockstep());
        assert_eq!(p.clients(), &[PING_TO]);
        let mut wires = Vec::new();
        while let Some(b) = p.next_batch().unwrap() {
            assert_eq!(b.wire_events, 1);
            assert_eq!(b.model.events.len(), 1);
            wires.push(String::from_utf8(b.wire).unwrap());
        }
        assert_eq!(wires, ["1|P|1|2\r\n", "2|P|1|2\r\n", "3|P|1|2\r\n"]);
        assert!(Ping::new(PingParams { count: 0 }, LineEnding::Lf).is_err());
    }
}
