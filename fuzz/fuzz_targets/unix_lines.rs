//! The Unix socket's line splitter (`unix::lines::LineSplitter`), fed a publisher's stream in
//! reads of every size, and each complete line taken as the emergency to store
//! (`ingest::owned_submission`, as `Publisher::stage` does for `unix::publisher`).
//!
//! The first byte picks the line limit (small ones, so that lines go over it, or the default
//! 64 KiB) and the second how the stream is cut into reads; the rest is the stream. The lines must
//! be exactly those of the whole stream split at each `\n`, without one `\r` before it, a line
//! over the limit reported as too long once (wherever the reads cut it, a `\r` held back included),
//! the last line without `\n` given at the end; and `has_unfinished_line` must say whether bytes
//! follow the last `\n`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use resq_push::fuzz_api::{Line, LineSplitter, owned_submission};

#[derive(Debug, PartialEq, Eq)]
enum Got {
    Complete(Vec<u8>),
    TooLong,
}

fn got(line: Line<'_>) -> Got {
    match line {
        Line::Complete(bytes) => Got::Complete(bytes.to_vec()),
        Line::TooLong => Got::TooLong,
    }
}

/// The lines of a whole stream, read at once.
fn expected(stream: &[u8], max_line: usize) -> Vec<Got> {
    let mut lines = Vec::new();
    let mut segments: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    // After the last `\n`: a line only if something is there (given at the end, by `finish`).
    if segments.last().is_some_and(|last| last.is_empty()) {
        segments.pop();
    }
    for segment in segments {
        let content = segment.strip_suffix(b"\r").unwrap_or(segment);
        lines.push(if content.len() > max_line { Got::TooLong } else { Got::Complete(content.to_vec()) });
    }
    lines
}

fuzz_target!(|data: &[u8]| {
    let [limit, cuts, stream @ ..] = data else { return };
    let max_line = match limit {
        0..=239 => usize::from(*limit % 24) + 1,
        _ => 65536,
    };
    let mut splitter = LineSplitter::new(max_line);
    let mut lines = Vec::new();
    // Reads of 1 to 16 bytes in a pattern the second byte sets (a few-byte LCG), or all at once.
    let mut state = u32::from(*cuts);
    let mut rest = stream;
    while !rest.is_empty() {
        let size = if *cuts == 0 {
            rest.len()
        } else {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            ((state >> 16) as usize % 16 + 1).min(rest.len())
        };
        let (read, after) = rest.split_at(size);
        rest = after;
        splitter.feed(read, |line| lines.push(got(line)));
        let unfinished = stream[..stream.len() - rest.len()].last().is_some_and(|&b| b != b'\n');
        assert_eq!(splitter.has_unfinished_line(), unfinished, "after {} bytes", stream.len() - rest.len());
    }
    splitter.finish(|line| lines.push(got(line)));
    assert!(!splitter.has_unfinished_line());
    assert_eq!(lines, expected(stream, max_line));
    for line in &lines {
        if let Got::Complete(bytes) = line {
            let _ = owned_submission(bytes.clone(), max_line, None);
        }
    }
});
