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

/// Reads the decimal field that starts at `start` and ends at the next `|` or at the end of
/// the line, in one pass: returns its value and where it ends (the index of that `|`, or
/// `line.len()`). `None` when the field is empty, holds a non-digit, or is not a u64, exactly
/// as [`parse_u64`] on the same field.
///
/// One pass instead of finding the `|` first and then parsing the digits: up to 19 digits
/// cannot overflow a u64, so those need no overflow checks; a 20-digit or longer field (rare)
/// goes through [`parse_u64`]. Always inlined: its three or four calls per line are most of
/// the parse.
#[inline(always)]
fn field_u64(line: &[u8], start: usize) -> Option<(u64, usize)> {
    let mut end = start;
    let mut value: u64 = 0;
    while let Some(&byte) = line.get(end) {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        value = value.wrapping_mul(10).wrapping_add(digit as u64);
        end += 1;
    }
    if end == start || line.get(end).is_some_and(|&byte| byte != b'|') {
        return None;
    }
    if end - start >= 20 {
        value = parse_u64(&line[start..end])?;
    }
    Some((value, end))
}

/// Parses one event line, without its terminator (no LF, no CR).
///
/// `Err` means the line has no usable seq and is dropped; `Ok` with
/// [`EventKind::Malformed`] means the seq parsed but the rest did not.
pub fn parse_event(line: &[u8]) -> Result<Event, LineError> {
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    let (seq, seq_end) = match field_u64(line, 0) {
        Some((seq, end)) if seq > 0 => (seq, end),
        _ => return Err(LineError::BadSeq),
    };
    let malformed = Event {
        seq,
        kind: EventKind::Malformed,
        from: 0,
        to: 0,
    };
    // The type is one byte after the seq's `|`, followed by the end of the line or a `|`.
    let kind_at = seq_end + 1;
    let kind = match (line.get(kind_at), line.get(kind_at + 1)) {
        (Some(&byte), None | Some(&b'|')) => match byte {
            b'F' => EventKind::Follow,
            b'U' => EventKind::Unfollow,
            b'B' => EventKind::Broadcast,
            b'P' => EventKind::Private,
            b'S' => EventKind::Status,
            _ => return Ok(malformed),
        },
        _ => return Ok(malformed),
    };
    // Where the fields after the type start, when there is a `|` after the type.
    let rest = (kind_at + 1 < line.len()).then_some(kind_at + 2);
    let event = match (kind, rest) {
        (EventKind::Broadcast, None) => Event {
            seq,
            kind,
            from: 0,
            to: 0,
        },
        (EventKind::Status, Some(rest)) => match field_u64(line, rest) {
            Some((from, end)) if end == line.len() => Event {
                seq,
                kind,
                from,
                to: 0,
            },
            _ => malformed,
        },
        (EventKind::Follow | EventKind::Unfollow | EventKind::Private, Some(rest)) => {
            let to = match field_u64(line, rest) {
                Some((from, end)) if end < line.len() => {
                    field_u64(line, end + 1).map(|(to, to_end)| (from, to, to_end))
                }
                _ => None,
            };
            match to {
                Some((from, to, end)) if end == line.len() => Event {
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

    /// The split-then-parse parser that `parse_event` replaced (one pass since the
    /// benchmarks): every input must give the same result.
    fn reference_parse(line: &[u8]) -> Result<Event, LineError> {
        fn split(line: &[u8]) -> (&[u8], Option<&[u8]>) {
            match line.iter().position(|&b| b == b'|') {
                Some(i) => (&line[..i], Some(&line[i + 1..])),
                None => (line, None),
            }
        }
        if line.is_empty() {
            return Err(LineError::Empty);
        }
        let (seq_field, rest) = split(line);
        let seq = match parse_u64(seq_field) {
            Some(seq) if seq > 0 => seq,
            _ => return Err(LineError::BadSeq),
        };
        let malformed = Ok(Event {
            seq,
            kind: EventKind::Malformed,
            from: 0,
            to: 0,
        });
        let Some(rest) = rest else { return malformed };
        let (kind_field, rest) = split(rest);
        let kind = match kind_field {
            b"F" => EventKind::Follow,
            b"U" => EventKind::Unfollow,
            b"B" => EventKind::Broadcast,
            b"P" => EventKind::Private,
            b"S" => EventKind::Status,
            _ => return malformed,
        };
        match (kind, rest) {
            (EventKind::Broadcast, None) => ev(seq, kind, 0, 0),
            (EventKind::Status, Some(rest)) => match parse_u64(rest) {
                Some(from) => ev(seq, kind, from, 0),
                None => malformed,
            },
            (EventKind::Follow | EventKind::Unfollow | EventKind::Private, Some(rest)) => {
                let (from, to) = split(rest);
                match (parse_u64(from), to.and_then(parse_u64)) {
                    (Some(from), Some(to)) => ev(seq, kind, from, to),
                    _ => malformed,
                }
            }
            _ => malformed,
        }
    }

    proptest::proptest! {
        #[test]
        fn one_pass_parser_matches_the_split_parser(
            line in proptest::collection::vec(
                proptest::sample::select(&b"0123456789|||FUBPSx -"[..]), 0..30),
        ) {
            proptest::prop_assert_eq!(parse_event(&line), reference_parse(&line));
        }

        #[test]
        fn one_pass_parser_matches_on_long_numbers(
            seq in proptest::num::u64::ANY, from in proptest::num::u64::ANY,
            to in proptest::num::u64::ANY, zeros in 0usize..3, extra in 0u8..12,
            kind in proptest::sample::select(&b"FUBPS"[..]),
        ) {
            let pad = "0".repeat(zeros);
            let line = match kind {
                b'B' => format!("{pad}{seq}|B"),
                b'S' => format!("{seq}|S|{pad}{from}{extra}"),
                _ => format!("{seq}|{}|{from}|{pad}{to}{extra}", kind as char),
            };
            proptest::prop_assert_eq!(
                parse_event(line.as_bytes()),
                reference_parse(line.as_bytes())
            );
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
