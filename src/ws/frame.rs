//! What a session writes, framed: WebSocket frames (`Frame::text`, `Frame::ping`, and the
//! answers to a client, `Frame::pong` and `Frame::close`) and, through
//! `Frame::event`, Server-Sent Events (`ws::sse` builds them); and the `writev` slices that send
//! them.

use std::io::IoSlice;
use std::rc::Rc;

use crate::core::SharedEnvelope;

/// One frame as the server writes it. The payload is shared, never copied: an emergency is
/// serialized once and written from the history's own buffer to every socket, whatever its
/// framing. A WebSocket frame is final and unmasked, so the same bytes suit every client; an
/// SSE event is `prefix` (the session's `id: <stream>:`, shared), a small head (the seq and
/// `data: `, or `event: <name>`), the payload, and a tail (`\n\n`).
pub struct Frame {
    prefix: Option<Rc<str>>,
    header: FrameHeader,
    /// An envelope's bytes (`SharedEnvelope`, the same allocation), or a control frame's payload.
    payload: Rc<[u8]>,
    tail: &'static str,
}

/// The parts of a frame, in the order they are written.
const PARTS: usize = 4;

impl Frame {
    pub fn text(json: SharedEnvelope) -> Frame {
        Frame {
            prefix: None,
            header: FrameHeader::new(OPCODE_TEXT, json.len()),
            payload: json.into(),
            tail: "",
        }
    }

    pub fn ping() -> Frame {
        Frame::control(OPCODE_PING, b"")
    }

    /// The answer to a client's Ping: its payload (at most 125 bytes) back.
    pub fn pong(payload: &[u8]) -> Frame {
        Frame::control(OPCODE_PONG, payload)
    }

    /// A Close frame: `payload` is a code (two bytes, big-endian) and a reason, or nothing.
    pub fn close(payload: &[u8]) -> Frame {
        Frame::control(OPCODE_CLOSE, payload)
    }

    fn control(opcode: u8, payload: &[u8]) -> Frame {
        Frame {
            prefix: None,
            header: FrameHeader::new(opcode, payload.len()),
            payload: Rc::from(payload),
            tail: "",
        }
    }

    /// A frame of other bytes around a payload (an SSE event): `prefix`, `head` (at most
    /// `MAX_HEAD_BYTES`: longer is cut), `payload`, `tail`.
    pub fn event(prefix: Option<Rc<str>>, head: &[u8], payload: SharedEnvelope, tail: &'static str) -> Frame {
        Frame { prefix, header: FrameHeader::raw(head), payload: payload.into(), tail }
    }

    /// The prefix's bytes, the header's, the payload's, then the tail's (the first and the last are
    /// empty in a WebSocket frame).
    pub fn parts(&self) -> [&[u8]; PARTS] {
        [
            self.prefix.as_deref().unwrap_or("").as_bytes(),
            &self.header.bytes[..usize::from(self.header.len)],
            &self.payload,
            self.tail.as_bytes(),
        ]
    }

    pub fn len(&self) -> usize {
        self.parts().iter().map(|part| part.len()).sum()
    }
}

/// A batch of frames, one `writev`, stops adding emergencies at this many bytes...
pub const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// ...or at this many.
pub const WRITE_BATCH_FRAMES: usize = 32;

/// Slices a `writev` needs for `frames` frames.
pub const fn slices_for(frames: usize) -> usize {
    PARTS * frames
}

/// The longest head a frame holds inline: an SSE event's `<seq>\ndata: ` or `event: <name>\ndata: `.
pub const MAX_HEAD_BYTES: usize = 40;

/// A Ping with no payload, as `Frame::ping` frames it: what the express lane sends as it is.
pub const PING: &[u8] = &[0x80 | OPCODE_PING, 0];

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;
const OPCODE_PONG: u8 = 0xa;

/// RFC 6455 section 5.2: FIN and the opcode, then the length in 7, 7+16 or 7+64 bits, no mask;
/// or an SSE event's head.
#[derive(Clone, Copy)]
struct FrameHeader {
    bytes: [u8; MAX_HEAD_BYTES],
    len: u8,
}

impl FrameHeader {
    fn raw(head: &[u8]) -> FrameHeader {
        let mut bytes = [0u8; MAX_HEAD_BYTES];
        let len = head.len().min(MAX_HEAD_BYTES);
        bytes[..len].copy_from_slice(&head[..len]);
        FrameHeader { bytes, len: len as u8 }
    }

    fn new(opcode: u8, payload_len: usize) -> FrameHeader {
        let mut bytes = [0u8; MAX_HEAD_BYTES];
        bytes[0] = 0x80 | opcode;
        let len = match u16::try_from(payload_len) {
            Ok(short @ 0..=125) => {
                bytes[1] = short as u8;
                2
            }
            Ok(medium) => {
                bytes[1] = 126;
                bytes[2..4].copy_from_slice(&medium.to_be_bytes());
                4
            }
            Err(_) => {
                bytes[1] = 127;
                bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
                10
            }
        };
        FrameHeader { bytes, len }
    }
}

/// Fills `slices` with the parts of `frames` after the first `skip` bytes; returns how many.
pub fn unwritten_slices<'a>(frames: &'a [Frame], mut skip: usize, slices: &mut [IoSlice<'a>]) -> usize {
    let mut count = 0;
    for part in frames.iter().flat_map(Frame::parts) {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        if count == slices.len() {
            break;
        }
        slices[count] = IoSlice::new(&part[skip..]);
        skip = 0;
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_tungstenite::tungstenite::Bytes;
    use async_tungstenite::tungstenite::protocol::CloseFrame;
    use async_tungstenite::tungstenite::protocol::frame::Frame as TungsteniteFrame;
    use async_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

    #[test]
    fn the_ping_bytes_are_the_ping_frame() {
        assert_eq!(Frame::ping().parts().concat(), PING);
    }

    #[test]
    fn unwritten_slices_resume_mid_frame() {
        let frames = [Frame::text("abc".into()), Frame::ping(), Frame::text("de".into())];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::parts).flatten().copied().collect();
        for skip in 0..=wire.len() {
            let mut slices = [IoSlice::new(&[]); 6];
            let count = unwritten_slices(&frames, skip, &mut slices);
            let rest: Vec<u8> = slices[..count].iter().flat_map(|slice| slice.iter().copied()).collect();
            assert_eq!(rest, wire[skip..], "skip {skip}");
        }
        let mut two = [IoSlice::new(&[]); 2];
        assert_eq!(unwritten_slices(&frames, 1, &mut two), 2);
        let events = [
            Frame::event(Some("id: s:".into()), b"7\ndata: ", "{}".into(), "\n\n"),
            Frame::event(None, b": ping\n\n", "".into(), ""),
        ];
        let wire: Vec<u8> = events.iter().flat_map(Frame::parts).flatten().copied().collect();
        assert_eq!(wire, b"id: s:7\ndata: {}\n\n: ping\n\n");
        for skip in 0..=wire.len() {
            let mut slices = [IoSlice::new(&[]); slices_for(2)];
            let count = unwritten_slices(&events, skip, &mut slices);
            let rest: Vec<u8> = slices[..count].iter().flat_map(|slice| slice.iter().copied()).collect();
            assert_eq!(rest, wire[skip..], "skip {skip}");
        }
    }

    fn wire(frame: &Frame) -> Vec<u8> {
        frame.parts().concat()
    }

    #[test]
    fn frames_match_tungstenite_at_every_length_boundary() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 70000] {
            let text = "x".repeat(len);
            let mut expected = Vec::new();
            TungsteniteFrame::message(text.clone(), OpCode::Data(Data::Text), true)
                .format(&mut expected)
                .unwrap();
            let ours = Frame::text(text.as_str().into());
            assert_eq!(wire(&ours), expected, "length {len}");
            assert_eq!(ours.len(), expected.len());
        }
        let mut ping = Vec::new();
        TungsteniteFrame::ping(Bytes::new()).format(&mut ping).unwrap();
        assert_eq!(wire(&Frame::ping()), ping);
        let mut pong = Vec::new();
        TungsteniteFrame::pong(vec![0xff; 125]).format(&mut pong).unwrap();
        assert_eq!(wire(&Frame::pong(&[0xff; 125])), pong);
        let mut close = Vec::new();
        let reason = CloseFrame { code: CloseCode::Size, reason: "message too large".into() };
        TungsteniteFrame::close(Some(reason)).format(&mut close).unwrap();
        assert_eq!(wire(&Frame::close(b"\x03\xf1message too large")), close);
    }
}
