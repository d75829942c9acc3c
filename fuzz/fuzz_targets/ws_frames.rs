//! A WebSocket client's bytes as a session reads them: tungstenite (the server's version) with the
//! server's settings (`ws::handshake::websocket_config`: the 256-byte read buffer, no write
//! buffer, 1 KiB for control frames, `--max-client-message-bytes` for a message and a frame),
//! started with what came after the request head (`from_partially_read`) and reading the rest
//! from an in-memory socket that hands over a few bytes at a time, sometimes nothing yet
//! (`Pending`), and takes writes likewise. Each message goes where `Session::handle_frame` sends
//! it: text to `client_text`, a Close flushed, an error answered with tungstenite's close and the
//! rest drained, as `Session::close` does.
//!
//! The first byte picks `--max-client-message-bytes` (4096, the default, or a small one) and the
//! second how many of the client's bytes came with the head, and the pattern of reads and writes.
//! Checks, besides not panicking: every future completes (no read waits on a wake-up that never
//! comes), no message is over the limit, and what tungstenite writes is only unmasked control
//! frames (a Pong, a Close) of at most 125 bytes: the server sends everything else itself.

#![no_main]

use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use futures_io::{AsyncRead, AsyncWrite};
use futures_util::{SinkExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use resq_push::fuzz_api::async_tungstenite::WebSocketStream;
use resq_push::fuzz_api::async_tungstenite::tungstenite::protocol::WebSocketConfig;
use resq_push::fuzz_api::async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use resq_push::fuzz_api::async_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use resq_push::fuzz_api::async_tungstenite::tungstenite::{Error, Message};
use resq_push::fuzz_api::{Config, FromArgs, client_text, websocket_config};

/// Polls before a future must have completed: the socket is never `Pending` twice in a row.
const MAX_POLLS: usize = 100_000;
/// Messages read from one input, at most.
const MAX_MESSAGES: usize = 4096;

/// An in-memory socket: the client's bytes to read, what the server wrote.
struct Socket {
    input: Vec<u8>,
    read: usize,
    written: Vec<u8>,
    state: u32,
    /// The last call was `Pending`: the next one makes progress.
    was_pending: bool,
}

impl Socket {
    fn next(&mut self) -> u32 {
        self.state = self.state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        self.state >> 16
    }

    /// `None` for `Pending` (the waker is woken at once), else how many bytes at most.
    fn budget(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        let roll = self.next();
        if !self.was_pending && roll.is_multiple_of(5) {
            self.was_pending = true;
            cx.waker().wake_by_ref();
            return None;
        }
        self.was_pending = false;
        Some(roll as usize % 64 + 1)
    }
}

impl AsyncRead for Socket {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let Some(budget) = self.budget(cx) else { return Poll::Pending };
        let n = budget.min(buf.len()).min(self.input.len() - self.read);
        let start = self.read;
        buf[..n].copy_from_slice(&self.input[start..start + n]);
        self.read += n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let Some(budget) = self.budget(cx) else { return Poll::Pending };
        let n = budget.min(buf.len());
        self.written.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs `future` to completion on this thread; the socket wakes it whenever it says `Pending`.
fn block<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..MAX_POLLS {
        if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
            return value;
        }
    }
    panic!("a future did not complete in {MAX_POLLS} polls");
}

/// The frames tungstenite wrote: unmasked control frames. The last may be cut short, when reading
/// ended with a Pong or a Close still in tungstenite's buffer.
fn check_written(mut bytes: &[u8]) {
    while let [first, second, ..] = *bytes {
        assert_eq!(first & 0xf0, 0x80, "a fragment or reserved bits written: {first:#x}");
        assert!(matches!(first & 0x0f, 0x8 | 0xa), "opcode {:#x} written by tungstenite", first & 0x0f);
        assert_eq!(second & 0x80, 0, "a masked frame written");
        let len = usize::from(second & 0x7f);
        assert!(len <= 125, "a control frame of {len} bytes");
        bytes = bytes.get(2 + len..).unwrap_or_default();
    }
}

/// The settings a session reads its client with, given `--max-client-message-bytes`.
fn server_settings(max_client_message_bytes: usize) -> WebSocketConfig {
    let limit = max_client_message_bytes.to_string();
    let config = Config::from_args(&["resq-push"], &["--max-client-message-bytes", &limit]);
    websocket_config(&config.expect("a number of bytes over 128 is a valid --max-client-message-bytes"))
}

fuzz_target!(|data: &[u8]| {
    let [limit, pattern, client @ ..] = data else { return };
    let max_message = if *limit < 192 { 4096 } else { 128 + usize::from(*limit - 192) * 8 };
    let early = usize::from(*pattern % 32).min(client.len());
    let socket = Socket {
        input: client[early..].to_vec(),
        read: 0,
        written: Vec::new(),
        state: u32::from(*pattern),
        was_pending: false,
    };
    let config = server_settings(max_message);
    let mut ws = block(WebSocketStream::from_partially_read(
        socket,
        client[..early].to_vec(),
        Role::Server,
        Some(config),
    ));
    for _ in 0..MAX_MESSAGES {
        match block(ws.next()) {
            Some(Ok(Message::Text(text))) => {
                assert!(text.len() <= max_message, "a text of {} bytes", text.len());
                let _ = client_text(&text);
            }
            Some(Ok(Message::Binary(bytes))) => assert!(bytes.len() <= max_message),
            Some(Ok(Message::Close(_))) => {
                let _ = block(ws.flush());
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(error @ (Error::Capacity(_) | Error::Utf8(_) | Error::Protocol(_)))) => {
                let code = match error {
                    Error::Capacity(_) => CloseCode::Size,
                    Error::Utf8(_) => CloseCode::Invalid,
                    _ => CloseCode::Protocol,
                };
                let frame = CloseFrame { code, reason: "fuzz".into() };
                if block(ws.close(Some(frame))).is_ok() {
                    for _ in 0..MAX_MESSAGES {
                        if !matches!(block(ws.next()), Some(Ok(_))) {
                            break;
                        }
                    }
                }
                break;
            }
            Some(Err(_)) | None => break,
        }
    }
    check_written(&ws.get_ref().written);
});
