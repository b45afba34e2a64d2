//! Parsing of event lines (`seq|T|from|to`), pure and allocation-free.
//!
//! The parser never panics on peer bytes. A line whose sequence number parses but whose rest
//! does not is still an event: it consumes its sequence number as a no-op, so ordering goes on
//! (PROTOCOL.md section 6).

/// What an event does to the follow graph and whom it notifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// `from` starts following `to`; `to` is notified.
    Follow,
    /// `from` stops following `to`; nobody is notified.
    Unfollow,
    /// Every connected client is notified.
    Broadcast,
    /// `to` is notified.
    Private,
    /// Every connected follower of `from` is notified.
    Status,
    /// A line whose seq parsed but whose rest did not: it only consumes its seq.
    Malformed,
}

/// One parsed event. The payload bytes travel beside it (see `batch.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Sequence number, from 1 up.
    pub seq: u64,
    /// What the event does.
    pub kind: EventKind,
    /// The acting user (Follow, Unfollow, Private, Status); 0 otherwise.
    pub from: u64,
    /// The target user (Follow, Unfollow, Private); 0 otherwise.
    pub to: u64,
}

/// Why a line is not an event at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineError {
    /// The line is empty.
    Empty,
    /// The sequence number field is not a u64 (or is 0).
    BadSeq,
}

/// Parses a decimal u64: one or more ASCII digits, no sign, no spaces, no overflow.
#[inline]
pub fn parse_u64(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &byte in field {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(digit as u64)?;
    }
    Some(value)
}

/// Splits `line` at the first `|`: (field, rest-after-separator or None when there is no `|`).
#[inline]
fn split_field(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    match line.iter().position(|&b| b == b'|') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    }
}

/// Parses one event line, without its terminator (no LF, no CR).
///
/// `Err` means the line has no usable seq and is dropped; `Ok` with
/// [`EventKind::Malformed`] means the seq parsed but the rest did not.
pub fn parse_event(line: &[u8]) -> Result<Event, LineError> {
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    let (seq_field, rest) = split_field(line);
    let seq = match parse_u64(seq_field) {
        Some(seq) if seq > 0 => seq,
        _ => return Err(LineError::BadSeq),
    };
    let malformed = Event {
        seq,
        kind: EventKind::Malformed,
        from: 0,
        to: 0,
    };
    let Some(rest) = rest else {
        return Ok(malformed);
    };
    let (kind_field, rest) = split_field(rest);
    let kind = match kind_field {
        b"F" => EventKind::Follow,
        b"U" => EventKind::Unfollow,
        b"B" => EventKind::Broadcast,
        b"P" => EventKind::Private,
        b"S" => EventKind::Status,
        _ => return Ok(malformed),
    };
    let event = match (kind, rest) {
        (EventKind::Broadcast, None) => Event {
            seq,
            kind,
            from: 0,
            to: 0,
        },
        (EventKind::Status, Some(rest)) => match parse_u64(rest) {
            Some(from) => Event {
                seq,
                kind,
                from,
                to: 0,
            },
            None => malformed,
        },
        (EventKind::Follow | EventKind::Unfollow | EventKind::Private, Some(rest)) => {
            let (from_field, to_field) = split_field(rest);
            match (parse_u64(from_field), to_field.and_then(parse_u64)) {
                (Some(from), Some(to)) => Event {
                    seq,
                    kind,
                    from,
                    to,
                },
                _ => malformed,
            }
        }
        _ => malformed,
    };
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, kind: EventKind, from: u64, to: u64) -> Result<Event, LineError> {
        Ok(Event {
            seq,
            kind,
            from,
            to,
        })
    }

    #[test]
    fn parses_every_valid_form() {
        assert_eq!(
            parse_event(b"666|F|60|50"),
            ev(666, EventKind::Follow, 60, 50)
        );
        assert_eq!(parse_event(b"1|U|12|9"), ev(1, EventKind::Unfollow, 12, 9));
        assert_eq!(
            parse_event(b"542532|B"),
            ev(542532, EventKind::Broadcast, 0, 0)
        );
        assert_eq!(
            parse_event(b"43|P|32|56"),
            ev(43, EventKind::Private, 32, 56)
        );
        assert_eq!(parse_event(b"634|S|32"), ev(634, EventKind::Status, 32, 0));
        assert_eq!(
            parse_event(b"18446744073709551615|S|18446744073709551615"),
            ev(u64::MAX, EventKind::Status, u64::MAX, 0)
        );
        assert_eq!(parse_event(b"007|P|01|2"), ev(7, EventKind::Private, 1, 2));
    }

    #[test]
    fn malformed_rest_keeps_the_seq() {
        let malformed = |seq| ev(seq, EventKind::Malformed, 0, 0);
        for line in [
            &b"5"[..],
            b"5|",
            b"5|X|1|2",
            b"5|FF|1|2",
            b"5|F|1",
            b"5|F|1|2|3",
            b"5|F|1|",
            b"5|F||2",
            b"5|F|a|2",
            b"5|F|1|-2",
            b"5|F| 1|2",
            b"5|B|1",
            b"5|B|",
            b"5|S",
            b"5|S|",
            b"5|S|1|2",
            b"5|P|1|18446744073709551616",
            b"5|f|1|2",
        ] {
            assert_eq!(
                parse_event(line),
                malformed(5),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn unusable_seq_drops_the_line() {
        assert_eq!(parse_event(b""), Err(LineError::Empty));
        for line in [
            &b"|F|1|2"[..],
            b"x|F|1|2",
            b"0|B",
            b"-1|B",
            b" 1|B",
            b"18446744073709551616|B",
            b"1 |B",
        ] {
            assert_eq!(parse_event(line), Err(LineError::BadSeq), "{:?}", line);
        }
    }

    #[test]
    fn parse_u64_rejects_overflow_and_signs() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"+1"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"000000000000000000001"), None);
    }
}
