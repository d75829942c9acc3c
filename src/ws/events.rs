//! The framing of a Server-Sent Events session (`/sse/emergencias`): every message the hub hands
//! a session, as an event, around the same shared envelope a WebSocket frame carries.
//!
//! ```text
//! event: welcome            the welcome ({"type":"connection",...}), first
//! data: {...}
//!
//! id: 9f2c4e1ab07d3356:43   an emergency: no event name, `id` = stream and seq
//! data: {"type":"emergencia","seq":43,...}
//!
//! event: ack                every other message, named by its `type`
//! data: {"type":"ack",...}
//!
//! : ping                    the heartbeat, every --ping-interval: a comment for proxies, and an
//! event: ping               event the page can see (EventSource hides comments)
//! data: {"type":"ping"}
//! ```
//!
//! Ids only grow within a connection: an open emergency resent with an older seq carries none,
//! so the `Last-Event-ID` a browser sends back never goes back.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

use smol::future;
use smol::io::AsyncRead;

use crate::core::SharedEnvelope;
use crate::core::hub::{Greeting, Resume};
use crate::protocol::{self, ReplayInfo, ResetNotice};
use crate::tls::transport::Transport;
use crate::ws::frame::{Frame, MAX_HEAD_BYTES};

/// Reads of 512 bytes in one `EventStream::drain`.
const DRAIN_READS: usize = 8;

/// The SSE side of a session: how its messages are framed, and the socket it drains.
pub struct EventStream {
    /// `id: <stream>:`, shared by every emergency's frame.
    id_prefix: Rc<str>,
    /// The highest seq sent as an `id` (or the seq the client already had): only a higher one
    /// gets an `id`.
    last_id: u64,
    /// Sent before the welcome, when the client's position belongs to another history.
    reset: Option<SharedEnvelope>,
}

impl EventStream {
    /// The framing for a client `greeting` admitted, resuming from `resume` (if it did).
    pub fn new(greeting: &Greeting, resume: Option<&Resume>) -> EventStream {
        let stream = &greeting.stream;
        let (last_id, reset) = match (resume, greeting.replay) {
            (Some(_), Some(replay)) if replay.reset || replay.stream_changed => {
                (0, Some(reset_notice(&replay, stream).into()))
            }
            (Some(resume), _) => (resume.since, None),
            (None, _) => (greeting.seq, None),
        };
        EventStream { id_prefix: format!("id: {stream}:").into(), last_id, reset }
    }

    /// The reset event (if any), then the welcome, as the first events of the stream.
    pub fn welcome(&mut self, welcome: SharedEnvelope) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(2);
        if let Some(reset) = self.reset.take() {
            frames.push(named_event("reset", reset));
        }
        frames.push(named_event("welcome", welcome));
        frames
    }

    /// One message from the hub: an emergency (`seq`) as an event with an `id` (when its seq is
    /// new to the client), any other message as an event named by its `type`.
    pub fn message(&mut self, json: SharedEnvelope, seq: Option<u64>) -> Frame {
        let Some(seq) = seq else {
            let head = format!("event: {}\ndata: ", message_type(&json).unwrap_or("message"));
            return Frame::event(None, head.as_bytes(), single_line(json), "\n\n");
        };
        let payload = single_line(json);
        if seq <= self.last_id {
            return Frame::event(None, b"data: ", payload, "\n\n");
        }
        self.last_id = seq;
        let head = format!("{seq}\ndata: ");
        Frame::event(Some(Rc::clone(&self.id_prefix)), head.as_bytes(), payload, "\n\n")
    }

    /// The heartbeat: a comment, which keeps proxies from timing out an idle stream, and a `ping`
    /// event, which a page can see and time (EventSource hides comments).
    pub fn heartbeat() -> Frame {
        Frame::event(None, b": ping\nevent: ping\ndata: ", protocol::PING.into(), "\n\n")
    }

    /// The last words before the server ends the stream: a comment saying why.
    pub fn farewell(reason: &'static str) -> Frame {
        Frame::event(None, b": ", reason.into(), "\n\n")
    }

    /// Reads and drops what the client sent (it has nothing to say: acks go over HTTP), at most
    /// `DRAIN_READS` reads of a small buffer, so that a flood cannot hold the thread. `Ok(false)`
    /// once it closed its side, which ends the session. Under TLS the reads go through rustls, so
    /// its state stays whole (a close_notify is an end like any other).
    pub async fn drain(transport: &mut Transport) -> io::Result<bool> {
        future::poll_fn(|cx| {
            let mut scratch = [0u8; 512];
            for _ in 0..DRAIN_READS {
                match Pin::new(&mut *transport).poll_read(cx, &mut scratch) {
                    Poll::Pending => return Poll::Ready(Ok(true)),
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(error)) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                }
            }
            Poll::Ready(Ok(true))
        })
        .await
    }
}

/// `event: <name>\ndata: <json>\n\n`.
fn named_event(name: &str, json: SharedEnvelope) -> Frame {
    let head = format!("event: {name}\ndata: ");
    Frame::event(None, head.as_bytes(), single_line(json), "\n\n")
}

/// A message's `type`, when it is a short lower-case name (an event name must not break a line).
fn message_type(json: &str) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
    }
    let kind = serde_json::from_str::<Typed>(json).ok()?.kind;
    let fits = !kind.is_empty() && kind.len() <= MAX_HEAD_BYTES - "event: \ndata: ".len();
    (fits && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')).then_some(kind)
}

/// The JSON as one `data:` field. A published object may hold line breaks between its tokens
/// (JSON never has one inside a string): each becomes `\ndata: `, which EventSource joins back
/// into a line feed. The copy is made only for such an object; every other one is shared as is.
fn single_line(json: SharedEnvelope) -> SharedEnvelope {
    if !json.contains(['\n', '\r']) {
        return json;
    }
    json.replace("\r\n", "\n").replace('\r', "\n").replace('\n', "\ndata: ").into()
}

fn reset_notice(replay: &ReplayInfo, stream: &str) -> String {
    let reason = if replay.stream_changed { "stream_changed" } else { "ahead" };
    protocol::to_json(&ResetNotice { kind: "reset", reason, since: replay.since, stream })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HistoryRange;

    fn wire(frames: &[Frame]) -> String {
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::parts).flatten().copied().collect();
        String::from_utf8(bytes).unwrap()
    }

    fn greeting(seq: u64, replay: Option<ReplayInfo>) -> Greeting {
        let history = HistoryRange { first_seq: 1, last_seq: seq, count: seq as usize };
        Greeting { stream: "s1".into(), seq, history, replay, open: Vec::new() }
    }

    #[test]
    fn emergencies_carry_stream_and_seq_as_their_id_and_ids_only_grow() {
        let mut events = EventStream::new(&greeting(4, None), None);
        let five = events.message(r#"{"seq":5}"#.into(), Some(5));
        let again = events.message(r#"{"seq":3}"#.into(), Some(3));
        let ack = events.message(r#"{"type":"ack","seq":5}"#.into(), None);
        assert_eq!(
            wire(&[five, again, ack]),
            "id: s1:5\ndata: {\"seq\":5}\n\ndata: {\"seq\":3}\n\nevent: ack\ndata: {\"type\":\"ack\",\"seq\":5}\n\n"
        );
        assert_eq!(wire(&[EventStream::heartbeat()]), ": ping\nevent: ping\ndata: {\"type\":\"ping\"}\n\n");
    }

    #[test]
    fn a_position_in_another_history_gets_a_reset_before_the_welcome() {
        let replay = ReplayInfo { since: 40, count: 2, missed: 0, reset: false, stream_changed: true };
        let resume = Resume { since: 40, stream: Some("old".into()) };
        let mut events = EventStream::new(&greeting(2, Some(replay)), Some(&resume));
        let first = wire(&events.welcome("{}".into()));
        assert_eq!(
            first,
            "event: reset\ndata: {\"type\":\"reset\",\"reason\":\"stream_changed\",\"since\":40,\"stream\":\"s1\"}\n\n\
             event: welcome\ndata: {}\n\n"
        );
        assert!(wire(&[events.message("{}".into(), Some(1))]).starts_with("id: s1:1\n"), "ids start over");
        let resumed = Resume { since: 1, stream: Some("s1".into()) };
        let replay = ReplayInfo { since: 1, count: 1, missed: 0, reset: false, stream_changed: false };
        let mut events = EventStream::new(&greeting(2, Some(replay)), Some(&resumed));
        assert_eq!(wire(&events.welcome("{}".into())), "event: welcome\ndata: {}\n\n");
    }

    #[test]
    fn line_breaks_in_a_published_object_stay_inside_its_data() {
        let json: SharedEnvelope = "{\"data\":{\r\n \"a\": 1,\n\"b\":2\r}}".into();
        let framed = wire(&[EventStream::new(&greeting(0, None), None).message(json, Some(1))]);
        assert_eq!(framed, "id: s1:1\ndata: {\"data\":{\ndata:  \"a\": 1,\ndata: \"b\":2\ndata: }}\n\n");
        let shared: SharedEnvelope = "{\"seq\":1}".into();
        assert!(Rc::ptr_eq(&single_line(Rc::clone(&shared)), &shared), "copied without a line break");
    }

    #[test]
    fn event_names_are_the_message_types_that_fit() {
        assert_eq!(message_type(r#"{"type":"unacked","seq":1}"#), Some("unacked"));
        assert_eq!(message_type(r#"{"seq":1,"type":"closed"}"#), Some("closed"));
        assert_eq!(message_type(r#"{"type":"a\nb"}"#), None);
        assert_eq!(message_type(r#"{"type":"a_type_name_too_long_for_the_head"}"#), None);
        assert_eq!(message_type("not json"), None);
    }
}
