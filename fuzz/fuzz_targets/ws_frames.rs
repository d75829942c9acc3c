//! A WebSocket client's bytes as a session reads them: `ws::reader::FrameReader` with the limit
//! of `--max-client-message-bytes`, started with what came after the request head
//! (`with_early_bytes`) and fed the rest in reads of 1 to `READ_CHUNK_BYTES` bytes, as a session's
//! stack buffer hands them over. Each text goes to `client_text`, as in `Session::read_once`.
//!
//! The first byte picks the limit (4096, the default, or a small one) and the second how many of
//! the client's bytes came with the head, and the sizes of the reads. Checks, besides not
//! panicking: no text is over the limit, no Ping payload over 125 bytes, a Close's code is one an
//! endpoint may send, and once a read ended in a Close or an error nothing more is fed (a session
//! ends there).

#![no_main]

use libfuzzer_sys::fuzz_target;
use resq_push::fuzz_api::{ClientFrame, FrameReader, READ_CHUNK_BYTES, client_text};

fuzz_target!(|data: &[u8]| {
    let [limit, pattern, client @ ..] = data else { return };
    let max_message = if *limit < 192 { 4096 } else { 128 + usize::from(*limit - 192) * 8 };
    let early = usize::from(*pattern % 32).min(client.len());
    let mut reader = FrameReader::with_early_bytes(client[..early].to_vec());
    let mut state = u32::from(*pattern);
    let mut rest = &client[early..];
    let mut first = true;
    while first || !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let take = if first { 0 } else { (state >> 16) as usize % READ_CHUNK_BYTES + 1 };
        first = false;
        let (chunk, after) = rest.split_at(take.min(rest.len()));
        rest = after;
        let mut chunk = chunk.to_vec();
        let outcome = reader.feed(&mut chunk, max_message, |frame| match frame {
            ClientFrame::Text(text) => {
                assert!(text.len() <= max_message, "a text of {} bytes", text.len());
                let _ = client_text(text);
            }
            ClientFrame::Ping(payload) => assert!(payload.len() <= 125, "a Ping of {} bytes", payload.len()),
        });
        match outcome {
            Ok(None) => {}
            Ok(Some(close)) => {
                assert!(close.code.is_none_or(|code| code.is_allowed()), "close code {:?}", close.code);
                assert!(close.payload.len() <= 125);
                return;
            }
            Err(_) => return,
        }
    }
});
