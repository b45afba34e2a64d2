//! Splitting a byte stream into lines: LF or CRLF terminated, with a length limit.
//!
//! [`LineSplitter`] owns one reusable buffer. The reader fills its spare room, then takes
//! complete lines out of it. A line longer than the limit is skipped up to its LF and reported
//! once as [`Line::TooLong`]; memory stays bounded by the buffer whatever the peer sends.

/// One item taken out of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line, without its LF and without a CR right before the LF.
    Complete(&'a [u8]),
    /// A line longer than the limit was skipped (up to and including its LF).
    TooLong,
}

/// The smallest room a read is given; the buffer is compacted to offer at least this much.
pub const MIN_READ_ROOM: usize = 64 * 1024;

/// A reusable line buffer for one connection.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Where the LF search resumes (bytes before it in `start..end` hold no LF).
    scanned: usize,
    max_line: usize,
    skipping: bool,
}

impl LineSplitter {
    /// A splitter for lines of at most `max_line` bytes (terminator excluded).
    pub fn new(max_line: usize) -> Self {
        let capacity = (max_line + 2).max(MIN_READ_ROOM) * 2;
        LineSplitter {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
            scanned: 0,
            max_line,
            skipping: false,
        }
    }

    /// Room to read into; call [`commit`](Self::commit) with the number of bytes read.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.scanned = 0;
        } else if self.buf.len() - self.end < MIN_READ_ROOM {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.scanned -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`spare`](Self::spare).
    pub fn commit(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// Takes the next complete line, or `None` when only a partial line is left.
    pub fn next_line(&mut self) -> Option<Line<'_>> {
        {
            let from = self.scanned.max(self.start);
            match memchr::memchr(b'\n', &self.buf[from..self.end]) {
                Some(offset) => {
                    let lf = from + offset;
                    let line_start = self.start;
                    self.start = lf + 1;
                    self.scanned = self.start;
                    if self.skipping {
                        self.skipping = false;
                        return Some(Line::TooLong);
                    }
                    let mut line = &self.buf[line_start..lf];
                    if let [rest @ .., b'\r'] = line {
                        line = rest;
                    }
                    if line.len() > self.max_line {
                        return Some(Line::TooLong);
                    }
                    Some(Line::Complete(line))
                }
                None => {
                    // A partial line longer than the limit (plus room for a CR) can never
                    // become valid: drop what we have and skip up to the next LF.
                    if self.end - self.start > self.max_line + 1 {
                        self.skipping = true;
                        self.start = self.end;
                    }
                    self.scanned = self.end;
                    if self.skipping && self.start == self.end {
                        // Keep skipping; nothing buffered.
                        self.start = 0;
                        self.end = 0;
                        self.scanned = 0;
                    }
                    None
                }
            }
        }
    }

    /// Whether the stream so far ends inside a line (an unterminated last line, or an
    /// overlong line still being skipped).
    pub fn has_partial_line(&self) -> bool {
        self.skipping || self.end > self.start
    }

    /// Whether an overlong line is being skipped at the end of the stream.
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    /// The unterminated bytes at the end of the stream (for a log excerpt).
    pub fn partial(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Forgets everything buffered, for reuse on a new connection.
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.scanned = 0;
        self.skipping = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Item {
        Line(Vec<u8>),
        TooLong,
    }

    /// Feeds `input` in chunks cut at `cuts`, returns the items and the partial length at end.
    fn feed(input: &[u8], cuts: &[usize], max_line: usize) -> (Vec<Item>, bool) {
        let mut splitter = LineSplitter::new(max_line);
        let mut items = Vec::new();
        let mut position = 0;
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.push(input.len());
        for bound in bounds {
            while position < bound {
                let room = splitter.spare();
                let n = room.len().min(bound - position);
                room[..n].copy_from_slice(&input[position..position + n]);
                splitter.commit(n);
                position += n;
                while let Some(line) = splitter.next_line() {
                    items.push(match line {
                        Line::Complete(bytes) => Item::Line(bytes.to_vec()),
                        Line::TooLong => Item::TooLong,
                    });
                }
            }
        }
        (items, splitter.has_partial_line())
    }

    fn line(s: &str) -> Item {
        Item::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn lf_and_crlf_lines() {
        let (items, partial) = feed(b"1|B\n2|S|3\r\n\n4|P|1|2\r\n", &[], 100);
        assert_eq!(
            items,
            vec![line("1|B"), line("2|S|3"), line(""), line("4|P|1|2")]
        );
        assert!(!partial);
    }

    #[test]
    fn partial_last_line_is_reported() {
        let (items, partial) = feed(b"1|B\n2|S", &[], 100);
        assert_eq!(items, vec![line("1|B")]);
        assert!(partial);
    }

    #[test]
    fn every_split_point_gives_the_same_lines() {
        let input = b"1|F|2|3\r\n22|B\n\n333|S|4\nxyz\r\n5|P|6|7\r\n";
        let (whole, whole_partial) = feed(input, &[], 100);
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let (items, partial) = feed(input, &[a, b], 100);
                assert_eq!(items, whole, "cuts {a} {b}");
                assert_eq!(partial, whole_partial);
            }
        }
    }

    #[test]
    fn overlong_lines_are_skipped_to_their_lf_at_every_split() {
        let mut input = b"1|B\n".to_vec();
        input.extend(std::iter::repeat_n(b'9', 40));
        input.extend(b"\n2|B\n");
        input.extend(std::iter::repeat_n(b'8', 11));
        input.extend(b"\r\n3|B\n0123456789\r\n");
        let expected = vec![
            line("1|B"),
            Item::TooLong,
            line("2|B"),
            Item::TooLong,
            line("3|B"),
            line("0123456789"),
        ];
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let (items, partial) = feed(&input, &[a, b], 10);
                assert_eq!(items, expected, "cuts {a} {b}");
                assert!(!partial);
            }
        }
    }

    #[test]
    fn long_streams_compact_the_buffer() {
        let mut input = Vec::new();
        for i in 0..50_000 {
            input.extend(format!("{i}|S|{}\n", i % 97).as_bytes());
        }
        let (items, partial) = feed(&input, &[1, 70_000, 70_001, 200_000], 4096);
        assert_eq!(items.len(), 50_000);
        assert_eq!(items[49_999], line("49999|S|44"));
        assert!(!partial);
    }
}
