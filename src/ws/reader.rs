//! Reading a WebSocket client's frames as RFC 6455 requires of a server, without a buffer per
//! client: the session reads into a stack array (`READ_CHUNK_BYTES`) on each wake and hands it to
//! `FrameReader::feed`, which unmasks and handles every complete frame in place. Only what a read
//! cut short (a frame's first bytes, a fragmented message's text so far) is kept, in a box
//! allocated when that happens and freed once the frame or the message is complete: an idle client
//! holds one null pointer. tungstenite parses the header (`FrameHeader::parse`) and names the
//! codes and errors; unmasking is ours (tungstenite's is private).

use std::io::Cursor;
use std::mem;

use async_tungstenite::tungstenite::Error as WsError;
use async_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use async_tungstenite::tungstenite::protocol::frame::FrameHeader;
use async_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

/// How many bytes a session reads at a time, on its stack: pongs (6 bytes), pings and acks (about
/// 46) fit many times over; a larger message takes several reads.
pub const READ_CHUNK_BYTES: usize = 512;
/// RFC 6455 section 5.5: a control frame's payload is at most this long.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame or message of the client's that the session acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    /// A whole text message (one frame, or its fragments joined), valid UTF-8.
    Text(&'a str),
    /// A Ping's payload (at most 125 bytes): to be answered with a Pong carrying it.
    Ping(&'a [u8]),
}

/// The client's Close frame: its code (none if it gave none) and its payload, which the reply
/// echoes.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientClose {
    pub code: Option<CloseCode>,
    pub payload: Vec<u8>,
}

/// A client's frames between reads: nothing while it is idle.
#[derive(Default)]
pub struct FrameReader {
    unfinished: Option<Box<Unfinished>>,
}

/// What a read left unfinished.
#[derive(Default)]
struct Unfinished {
    /// The bytes of a frame a read cut short, its header included, to be completed by the next.
    input: Vec<u8>,
    /// A fragmented message begun and not yet finished.
    message: Option<Fragments>,
}

/// A fragmented message so far.
struct Fragments {
    /// Its text so far, unmasked (a binary message's bytes are not kept: the server ignores them).
    text: Option<Vec<u8>>,
    /// Its length so far, to refuse it once it is over the limit.
    len: usize,
}

impl FrameReader {
    /// A reader that starts with the bytes the client sent right behind its upgrade request.
    pub fn with_early_bytes(early: Vec<u8>) -> FrameReader {
        if early.is_empty() {
            return FrameReader::default();
        }
        FrameReader { unfinished: Some(Box::new(Unfinished { input: early, message: None })) }
    }

    /// Whether bytes from before are waiting to be parsed (those that came with the upgrade).
    pub fn holds_input(&self) -> bool {
        self.unfinished.as_ref().is_some_and(|unfinished| !unfinished.input.is_empty())
    }

    /// Handles every complete frame of what was kept and then `chunk` (unmasked in place), calling
    /// `on_frame` for each text message and Ping, and keeps an incomplete frame for the next call.
    /// Returns the client's Close when a frame was one (what follows it is ignored), or the
    /// protocol, size (a message over `max_message` bytes, refused from its header, unbuffered)
    /// or UTF-8 error; after either the reader is not to be fed again.
    pub fn feed(
        &mut self,
        chunk: &mut [u8],
        max_message: usize,
        mut on_frame: impl FnMut(ClientFrame<'_>),
    ) -> Result<Option<ClientClose>, WsError> {
        let Some(mut unfinished) = self.unfinished.take() else {
            let mut message = None;
            let mut used = 0;
            let outcome = parse_frames(chunk, &mut used, &mut message, max_message, &mut on_frame);
            self.keep(&chunk[used..], message);
            return outcome;
        };
        let mut input = mem::take(&mut unfinished.input);
        input.extend_from_slice(chunk);
        let mut used = 0;
        let outcome =
            parse_frames(&mut input, &mut used, &mut unfinished.message, max_message, &mut on_frame);
        input.drain(..used);
        // Kept only while a frame is incomplete: at most its header and `max_message` bytes, and
        // one chunk more; not shrunk, since a frame trickling in would be copied at every read.
        if !input.is_empty() || unfinished.message.is_some() {
            unfinished.input = input;
            self.unfinished = Some(unfinished);
        }
        outcome
    }

    fn keep(&mut self, rest: &[u8], message: Option<Fragments>) {
        if !rest.is_empty() || message.is_some() {
            self.unfinished = Some(Box::new(Unfinished { input: rest.to_vec(), message }));
        }
    }
}

/// Handles the complete frames at the start of `input`, adding their length to `used`.
fn parse_frames(
    input: &mut [u8],
    used: &mut usize,
    message: &mut Option<Fragments>,
    max_message: usize,
    on_frame: &mut impl FnMut(ClientFrame<'_>),
) -> Result<Option<ClientClose>, WsError> {
    while *used < input.len() {
        let rest = &mut input[*used..];
        let Some((header, header_len, payload_len)) = parse_header(rest, message.as_ref(), max_message)?
        else {
            break;
        };
        let Some(frame) = rest.get_mut(header_len..header_len + payload_len) else { break };
        *used += header_len + payload_len;
        // `parse_header` refused an unmasked frame.
        unmask(frame, header.mask.unwrap_or_default());
        if let Some(close) = handle_frame(&header, frame, message, on_frame)? {
            return Ok(Some(close));
        }
    }
    Ok(None)
}

/// The header at the start of `input`, with its length and the payload's, if it is all there;
/// every rule that a header alone can break is checked here, before its payload is waited for.
fn parse_header(
    input: &[u8],
    message: Option<&Fragments>,
    max_message: usize,
) -> Result<Option<(FrameHeader, usize, usize)>, WsError> {
    let mut cursor = Cursor::new(input);
    let Some((header, payload_len)) = FrameHeader::parse(&mut cursor)? else { return Ok(None) };
    let header_len = cursor.position() as usize;
    if header.mask.is_none() {
        return Err(ProtocolError::UnmaskedFrameFromClient.into());
    }
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(ProtocolError::NonZeroReservedBits.into());
    }
    let payload_len = usize::try_from(payload_len).unwrap_or(usize::MAX);
    match header.opcode {
        OpCode::Control(_) if !header.is_final => return Err(ProtocolError::FragmentedControlFrame.into()),
        OpCode::Control(_) if payload_len > MAX_CONTROL_PAYLOAD => {
            return Err(ProtocolError::ControlFrameTooBig.into());
        }
        OpCode::Control(_) => {}
        OpCode::Data(Data::Continue) if message.is_none() => {
            return Err(ProtocolError::UnexpectedContinueFrame.into());
        }
        OpCode::Data(Data::Continue) => {}
        OpCode::Data(data) if message.is_some() => return Err(ProtocolError::ExpectedFragment(data).into()),
        OpCode::Data(_) => {}
    }
    if let OpCode::Data(_) = header.opcode {
        let size = message.map_or(0, |message| message.len).saturating_add(payload_len);
        if size > max_message {
            return Err(CapacityError::MessageTooLong { size, max_size: max_message }.into());
        }
    }
    Ok(Some((header, header_len, payload_len)))
}

/// Acts on one complete, unmasked frame.
fn handle_frame(
    header: &FrameHeader,
    payload: &[u8],
    message: &mut Option<Fragments>,
    on_frame: &mut impl FnMut(ClientFrame<'_>),
) -> Result<Option<ClientClose>, WsError> {
    match header.opcode {
        OpCode::Data(Data::Continue) => {
            let Some(fragments) = message.as_mut() else { return Ok(None) };
            fragments.len += payload.len();
            if let Some(text) = &mut fragments.text {
                text.extend_from_slice(payload);
            }
            if !header.is_final {
                return Ok(None);
            }
            if let Some(Fragments { text: Some(text), .. }) = message.take() {
                on_frame(ClientFrame::Text(utf8(&text)?));
            }
        }
        OpCode::Data(Data::Text) if header.is_final => on_frame(ClientFrame::Text(utf8(payload)?)),
        OpCode::Data(Data::Text) => {
            *message = Some(Fragments { text: Some(payload.to_vec()), len: payload.len() });
        }
        OpCode::Data(_) if header.is_final => {}
        OpCode::Data(_) => *message = Some(Fragments { text: None, len: payload.len() }),
        OpCode::Control(Control::Ping) => on_frame(ClientFrame::Ping(payload)),
        OpCode::Control(Control::Close) => return client_close(payload).map(Some),
        OpCode::Control(_) => {}
    }
    Ok(None)
}

/// A Close frame's payload: nothing, or a code that an endpoint may send and a UTF-8 reason.
fn client_close(payload: &[u8]) -> Result<ClientClose, WsError> {
    let code = match payload {
        [] => None,
        [high, low, reason @ ..] => {
            utf8(reason)?;
            let code = CloseCode::from(u16::from_be_bytes([*high, *low]));
            if !code.is_allowed() {
                return Err(ProtocolError::InvalidCloseSequence.into());
            }
            Some(code)
        }
        [_] => return Err(ProtocolError::InvalidCloseSequence.into()),
    };
    Ok(ClientClose { code, payload: payload.to_vec() })
}

fn utf8(bytes: &[u8]) -> Result<&str, WsError> {
    std::str::from_utf8(bytes).map_err(|error| WsError::Utf8(error.to_string()))
}

/// RFC 6455 section 5.3: byte `i` of the payload is XORed with byte `i mod 4` of the mask.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_tungstenite::tungstenite::protocol::frame::Frame as TungsteniteFrame;

    /// A frame as a client writes it, by tungstenite's own encoder with a mask.
    fn client_frame(opcode: OpCode, is_final: bool, payload: &[u8]) -> Vec<u8> {
        let header =
            FrameHeader { is_final, opcode, mask: Some([0x37, 0xfa, 0x21, 0x3d]), ..FrameHeader::default() };
        let mut wire = Vec::new();
        TungsteniteFrame::from_payload(header, payload.to_vec().into()).format(&mut wire).unwrap();
        wire
    }

    fn text(is_final: bool, payload: &[u8]) -> Vec<u8> {
        client_frame(OpCode::Data(Data::Text), is_final, payload)
    }

    fn control(control: Control, payload: &[u8]) -> Vec<u8> {
        client_frame(OpCode::Control(control), true, payload)
    }

    /// What a reader makes of `wire` handed over `step` bytes at a time: the texts and pings
    /// (as text), and how it ended.
    fn read_in_steps(
        wire: &[u8],
        step: usize,
        max: usize,
    ) -> (Vec<String>, Result<Option<ClientClose>, String>) {
        let mut reader = FrameReader::default();
        let mut seen = Vec::new();
        for chunk in wire.chunks(step) {
            let mut chunk = chunk.to_vec();
            let outcome = reader.feed(&mut chunk, max, |frame| {
                seen.push(match frame {
                    ClientFrame::Text(text) => text.to_string(),
                    ClientFrame::Ping(payload) => format!("ping {}", String::from_utf8_lossy(payload)),
                })
            });
            match outcome {
                Ok(None) => {}
                Ok(Some(close)) => return (seen, Ok(Some(close))),
                Err(error) => return (seen, Err(error.to_string())),
            }
        }
        let idle = reader.unfinished.is_none();
        (seen, if idle { Ok(None) } else { Err("holds an unfinished frame".into()) })
    }

    #[test]
    fn frames_of_every_length_are_read_whole_at_any_split() {
        for len in [0, 1, 125, 126, 127, 600, 65535, 65536, 70000] {
            let payload = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let mut wire = text(true, payload.as_bytes());
            wire.extend(control(Control::Pong, b""));
            wire.extend(control(Control::Ping, b"hi"));
            for step in [1, 7, READ_CHUNK_BYTES, wire.len()] {
                if len > 1000 && step < READ_CHUNK_BYTES {
                    continue;
                }
                let (seen, end) = read_in_steps(&wire, step, 100_000);
                assert_eq!(seen, [payload.clone(), "ping hi".into()], "length {len}, step {step}");
                assert!(matches!(end, Ok(None)), "length {len}, step {step}: {end:?}");
            }
        }
    }

    #[test]
    fn a_fragmented_text_is_joined_with_pings_between_its_fragments() {
        let mut wire = text(false, "{\"type\":\"a".as_bytes());
        wire.extend(control(Control::Ping, b"1"));
        wire.extend(client_frame(OpCode::Data(Data::Continue), false, "ck\",\"seq\":".as_bytes()));
        wire.extend(client_frame(OpCode::Data(Data::Continue), true, b"7}"));
        for step in [1, 3, wire.len()] {
            let (seen, end) = read_in_steps(&wire, step, 4096);
            assert_eq!(seen, ["ping 1", r#"{"type":"ack","seq":7}"#], "step {step}");
            assert!(matches!(end, Ok(None)));
        }
        // UTF-8 is checked on the whole message: a character may be cut between fragments.
        let mut split = text(false, &"é".as_bytes()[..1]);
        split.extend(client_frame(OpCode::Data(Data::Continue), true, &"é".as_bytes()[1..]));
        assert_eq!(read_in_steps(&split, 100, 4096).0, ["é"]);
    }

    #[test]
    fn a_close_ends_reading_with_its_code_and_payload() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend(b"bye");
        let mut wire = control(Control::Close, &payload);
        wire.extend(text(true, b"after"));
        let (seen, end) = read_in_steps(&wire, wire.len(), 4096);
        assert!(seen.is_empty());
        assert_eq!(end, Ok(Some(ClientClose { code: Some(CloseCode::Normal), payload })));
        let (_, end) = read_in_steps(&control(Control::Close, b""), 64, 4096);
        assert_eq!(end, Ok(Some(ClientClose { code: None, payload: Vec::new() })));
    }

    /// The error a reader ends `wire` with, read whole.
    fn error_of(wire: &[u8], max: usize) -> String {
        match read_in_steps(wire, wire.len(), max).1 {
            Err(error) => error,
            other => panic!("no error: {other:?}"),
        }
    }

    #[test]
    fn every_rule_a_server_must_enforce_is_enforced() {
        let unmasked = {
            let mut wire = Vec::new();
            TungsteniteFrame::message(b"x".to_vec(), OpCode::Data(Data::Text), true)
                .format(&mut wire)
                .unwrap();
            wire
        };
        let mut reserved = text(true, b"x");
        reserved[0] |= 0x40;
        let mut unknown = text(true, b"x");
        unknown[0] = 0x83;
        let mut unknown_control = control(Control::Ping, b"");
        unknown_control[0] = 0x8b;
        let fragmented_ping = client_frame(OpCode::Control(Control::Ping), false, b"");
        let long_ping = control(Control::Ping, &[b'p'; 126]);
        let orphan = client_frame(OpCode::Data(Data::Continue), true, b"x");
        let mut interleaved = text(false, b"a");
        interleaved.extend(text(true, b"b"));
        let mut bad_utf8_across = text(false, b"a");
        bad_utf8_across.extend(client_frame(OpCode::Data(Data::Continue), true, &[0xff]));
        let mut bad_code = 1005u16.to_be_bytes().to_vec();
        bad_code.extend(b"no");
        let cases: [(&str, Vec<u8>, &str); 12] = [
            ("unmasked", unmasked, "unmasked"),
            ("reserved bits", reserved, "Reserved bits"),
            ("unknown data opcode", unknown, "opcode"),
            ("unknown control opcode", unknown_control, "opcode"),
            ("fragmented ping", fragmented_ping, "Fragmented control"),
            ("ping of 126 bytes", long_ping, "Control frame too big"),
            ("continuation without a start", orphan, "Continue frame"),
            ("new message inside a fragmented one", interleaved, "fragment"),
            ("text not UTF-8", text(true, &[0xc3]), "UTF-8"),
            ("text not UTF-8 across fragments", bad_utf8_across, "UTF-8"),
            ("close of one byte", control(Control::Close, &[3]), "close sequence"),
            (
                "close with a code an endpoint may not send",
                control(Control::Close, &bad_code),
                "close sequence",
            ),
        ];
        for (case, wire, expected) in cases {
            let error = error_of(&wire, 4096);
            assert!(error.to_lowercase().contains(&expected.to_lowercase()), "{case}: {error}");
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_from_its_header_without_buffering() {
        let wire = text(true, &[b'x'; 5000]);
        // Only the header and a few bytes of its payload have arrived.
        let mut reader = FrameReader::default();
        let error = reader.feed(&mut wire[..20].to_vec(), 4096, |_| {}).unwrap_err();
        assert!(matches!(
            error,
            WsError::Capacity(CapacityError::MessageTooLong { size: 5000, max_size: 4096 })
        ));
        // Fragments count together.
        let mut fragments = text(false, &[b'x'; 3000]);
        fragments.extend(client_frame(OpCode::Data(Data::Continue), true, &[b'x'; 1500]));
        assert!(error_of(&fragments, 4096).contains("4500"));
        assert_eq!(read_in_steps(&text(true, &[b'x'; 4096]), 512, 4096).0.len(), 1);
    }

    #[test]
    fn an_idle_reader_holds_nothing_and_early_bytes_are_read_first() {
        let mut reader = FrameReader::with_early_bytes(text(true, b"early"));
        assert!(reader.holds_input());
        let mut seen = Vec::new();
        let mut chunk = text(true, b"late");
        let end = reader.feed(&mut chunk, 4096, |frame| {
            if let ClientFrame::Text(text) = frame {
                seen.push(text.to_string());
            }
        });
        assert!(matches!(end, Ok(None)));
        assert_eq!(seen, ["early", "late"]);
        assert!(reader.unfinished.is_none(), "nothing kept once every frame is complete");
        assert_eq!(size_of::<FrameReader>(), size_of::<usize>());
    }
}
