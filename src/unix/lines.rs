//! Splitting a publisher's byte stream into bounded lines.

/// Splits a byte stream into lines of at most `max_line` bytes (not counting the `\n` or the
/// `\r\n` that ends them, as an HTTP body of `max_line` bytes has none), remembering a partial
/// line between reads. A longer line is discarded up to its newline and reported once, as too
/// large.
pub struct LineSplitter {
    partial: Vec<u8>,
    max_line: usize,
    discarding: bool,
}

/// One input line, or the marker of a line that was too long.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    Complete(&'a [u8]),
    TooLong,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        LineSplitter { partial: Vec::new(), max_line, discarding: false }
    }

    /// Feeds `bytes`; calls `on_line` for every line they complete, in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            let segment = &bytes[..newline];
            bytes = &bytes[newline + 1..];
            if std::mem::take(&mut self.discarding) || content_len(&self.partial, segment) > self.max_line {
                on_line(Line::TooLong);
            } else if self.partial.is_empty() {
                on_line(Line::Complete(strip_cr(segment)));
            } else {
                self.partial.extend_from_slice(segment);
                on_line(Line::Complete(strip_cr(&self.partial)));
            }
            self.partial.clear();
        }
        // A `\r` at the end may be the line ending, with its `\n` still to come: it is held
        // (one byte over the limit at most) and counted once the line is complete.
        if self.discarding || content_len(&self.partial, bytes) > self.max_line {
            self.discarding = true;
            self.partial.clear();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// At end of input: the last line if it had no newline.
    pub fn finish(&mut self, on_line: impl FnMut(Line<'_>)) {
        if self.has_unfinished_line() {
            self.feed(b"\n", on_line);
        }
    }

    /// Whether bytes after the last newline are waiting for the rest of their line.
    pub fn has_unfinished_line(&self) -> bool {
        self.discarding || !self.partial.is_empty()
    }
}

/// The length of `partial` followed by `segment`, without a final `\r`.
fn content_len(partial: &[u8], segment: &[u8]) -> usize {
    let last = segment.last().or(partial.last());
    partial.len() + segment.len() - usize::from(last == Some(&b'\r'))
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(splitter: &mut LineSplitter, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        splitter.feed(bytes, |line| {
            lines.push(match line {
                Line::Complete(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Line::TooLong => "<too long>".to_owned(),
            })
        });
        lines
    }

    #[test]
    fn lines_split_across_reads_and_joined_in_one() {
        let mut splitter = LineSplitter::new(8);
        assert_eq!(split(&mut splitter, b"{\"a\"").len(), 0);
        assert_eq!(split(&mut splitter, b":1}\r\n{}\n\n{"), ["{\"a\":1}", "{}", ""]);
        assert_eq!(split(&mut splitter, b"}\n"), ["{}"]);
    }

    #[test]
    fn a_long_line_is_reported_once_and_the_next_line_works() {
        let mut splitter = LineSplitter::new(4);
        assert_eq!(split(&mut splitter, b"123456"), Vec::<String>::new());
        assert_eq!(split(&mut splitter, b"789"), Vec::<String>::new());
        assert_eq!(split(&mut splitter, b"0\n{}\n12345\n"), ["<too long>", "{}", "<too long>"]);
        assert!(splitter.partial.is_empty());
    }

    #[test]
    fn the_limit_is_on_the_line_without_its_crlf() {
        let mut splitter = LineSplitter::new(8);
        assert_eq!(split(&mut splitter, b"12345678\r\n123456789\r\n"), ["12345678", "<too long>"]);
        // The `\r` and the `\n` in different reads, and a line over several.
        assert_eq!(split(&mut splitter, b"12345678\r"), Vec::<String>::new());
        assert_eq!(split(&mut splitter, b"\n1234"), ["12345678"]);
        assert_eq!(split(&mut splitter, b"5678\r"), Vec::<String>::new());
        assert_eq!(split(&mut splitter, b"\n"), ["12345678"]);
        // A `\r` that turns out not to end the line counts like any byte.
        assert_eq!(split(&mut splitter, b"12345678\r"), Vec::<String>::new());
        assert_eq!(split(&mut splitter, b"x\n{}\n"), ["<too long>", "{}"]);
    }

    #[test]
    fn the_last_line_without_newline_counts_at_end() {
        let mut splitter = LineSplitter::new(8);
        split(&mut splitter, b"{}\n{\"b\":2}");
        assert!(splitter.has_unfinished_line());
        let mut last = Vec::new();
        splitter.finish(|line| last.push(matches!(line, Line::Complete(b"{\"b\":2}"))));
        assert_eq!(last, [true]);
        assert!(!splitter.has_unfinished_line());
    }
}
