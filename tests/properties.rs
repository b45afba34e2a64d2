//! Property tests of the code that touches peer bytes: arbitrary bytes in arbitrary splits
//! never panic the line splitter or the parser, splitting never changes what comes out, and the
//! resequencers put any permutation within the window back in order.

use efr::batch::OrderedBatch;
use efr::line::{Line, LineSplitter};
use efr::protocol::{parse_event, EventKind};
use efr::resequencer::{Resequencer, ResequencerKind};
use proptest::prelude::*;

#[derive(Debug, PartialEq, Eq)]
enum Item {
    Line(Vec<u8>),
    TooLong,
}

/// Feeds `input` cut at `cuts` (sorted, clamped) and collects every item and what each line
/// parses to.
fn split(input: &[u8], cuts: &[usize], max_line: usize) -> (Vec<Item>, bool) {
    let mut splitter = LineSplitter::new(max_line);
    let mut items = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    bounds.sort_unstable();
    bounds.push(input.len());
    let mut position = 0;
    for bound in bounds {
        while position < bound {
            let room = splitter.spare();
            let n = room.len().min(bound - position);
            room[..n].copy_from_slice(&input[position..position + n]);
            splitter.commit(n);
            position += n;
            while let Some(line) = splitter.next_line() {
                items.push(match line {
                    Line::Complete(bytes) => {
                        let _ = parse_event(bytes);
                        Item::Line(bytes.to_vec())
                    }
                    Line::TooLong => Item::TooLong,
                });
            }
        }
    }
    (items, splitter.has_partial_line())
}

fn peer_bytes() -> impl Strategy<Value = Vec<u8>> {
    // Mostly protocol-looking bytes, so lines and fields actually form, plus anything.
    let byte = prop_oneof![
        8 => prop::sample::select(b"0123456789|FUBPS\n\r".to_vec()),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..600)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_in_arbitrary_splits_give_the_same_lines(
        input in peer_bytes(),
        cuts in prop::collection::vec(0usize..600, 0..8),
        max_line in 16usize..64,
    ) {
        let whole = split(&input, &[], max_line);
        let pieces = split(&input, &cuts, max_line);
        prop_assert_eq!(&whole, &pieces);
        for item in &whole.0 {
            if let Item::Line(line) = item {
                prop_assert!(line.len() <= max_line);
                prop_assert!(!line.contains(&b'\n'));
            }
        }
    }

    #[test]
    fn the_parser_never_panics_and_keeps_valid_seqs(line in prop::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(event) = parse_event(&line) {
            prop_assert!(event.seq > 0);
            let text = String::from_utf8_lossy(&line);
            prop_assert!(text.starts_with(&event.seq.to_string()) || line.first() == Some(&b'0'));
        }
    }

    #[test]
    fn well_formed_lines_parse_to_their_fields(
        seq in 1u64..u64::MAX, from in any::<u64>(), to in any::<u64>(), kind in 0usize..5,
    ) {
        let (line, expected_kind) = match kind {
            0 => (format!("{seq}|F|{from}|{to}"), EventKind::Follow),
            1 => (format!("{seq}|U|{from}|{to}"), EventKind::Unfollow),
            2 => (format!("{seq}|P|{from}|{to}"), EventKind::Private),
            3 => (format!("{seq}|S|{from}"), EventKind::Status),
            _ => (format!("{seq}|B"), EventKind::Broadcast),
        };
        let event = parse_event(line.as_bytes()).unwrap();
        prop_assert_eq!(event.seq, seq);
        prop_assert_eq!(event.kind, expected_kind);
        if matches!(expected_kind, EventKind::Follow | EventKind::Unfollow | EventKind::Private | EventKind::Status) {
            prop_assert_eq!(event.from, from);
        }
        if matches!(expected_kind, EventKind::Follow | EventKind::Unfollow | EventKind::Private) {
            prop_assert_eq!(event.to, to);
        }
    }

    #[test]
    fn any_permutation_within_the_window_comes_out_in_order(
        mut seqs in Just((1u64..=300).collect::<Vec<u64>>()).prop_shuffle(),
        read_size in 1usize..100,
        heap in any::<bool>(),
    ) {
        let kind = if heap { ResequencerKind::Heap } else { ResequencerKind::Stream };
        let mut reseq = Resequencer::new(kind, 300, 1);
        let mut out = OrderedBatch::default();
        for read in seqs.chunks(read_size) {
            for &seq in read {
                let line = format!("{seq}|B");
                let event = parse_event(line.as_bytes()).unwrap();
                reseq.offer(event, line.as_bytes(), &mut out);
            }
            reseq.end_of_read(&mut out);
        }
        seqs.sort_unstable();
        prop_assert_eq!(out.seqs().collect::<Vec<_>>(), seqs);
        prop_assert_eq!(reseq.waiting(), 0);
    }
}
