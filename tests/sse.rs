//! `/sse/emergencias` over a raw TCP socket: the exact framing of each event, resuming with
//! `Last-Event-ID` as with `?since=`, the reset event, the heartbeat, and the same admission,
//! limits and slow-client rule as WebSocket clients.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use common::{HttpResponse, PATIENCE, Server, TempDir};
use serde_json::{Value, json};

/// One SSE connection, read event by event.
struct EventClient {
    reader: BufReader<TcpStream>,
    head: String,
}

/// One event as it came: its fields in order (`name`, value), comments as `("", text)`.
#[derive(Debug)]
struct Event {
    lines: Vec<(String, String)>,
}

impl Event {
    fn field(&self, name: &str) -> Option<&str> {
        self.lines.iter().find(|(field, _)| field == name).map(|(_, value)| value.as_str())
    }

    fn data(&self) -> Value {
        let data = self.field("data").unwrap_or_else(|| panic!("no data in {self:?}"));
        serde_json::from_str(data).unwrap_or_else(|e| panic!("data is not JSON ({e}): {data}"))
    }
}

impl EventClient {
    /// Sends the request with `headers` and reads the response head, whatever its status.
    fn connect(server: &Server, query: &str, headers: &[(&str, &str)]) -> Result<EventClient, HttpResponse> {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
        let request = format!(
            "GET /sse/emergencias{query} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n{extra}\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let head = HttpResponse::read_head(&mut reader);
        if !head.starts_with("HTTP/1.1 200 ") {
            return Err(HttpResponse::read_body(head, &mut reader));
        }
        Ok(EventClient { reader, head })
    }

    fn open(server: &Server, query: &str, headers: &[(&str, &str)]) -> EventClient {
        EventClient::connect(server, query, headers).unwrap_or_else(|refused| panic!("refused: {refused:?}"))
    }

    /// The raw text of the next event, up to and including its blank line.
    fn next_raw(&mut self) -> String {
        let mut event = String::new();
        loop {
            let mut line = String::new();
            let read = self.reader.read_line(&mut line).unwrap();
            assert!(read > 0, "the stream ended inside an event: {event:?}");
            event.push_str(&line);
            if line == "\n" {
                return event;
            }
        }
    }

    fn next(&mut self) -> Event {
        let raw = self.next_raw();
        let lines = raw
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                (name.to_owned(), value.strip_prefix(' ').unwrap_or(value).to_owned())
            })
            .collect();
        Event { lines }
    }

    /// The next event that is not a heartbeat.
    fn next_message(&mut self) -> Event {
        loop {
            let event = self.next();
            if event.field("event") != Some("ping") {
                return event;
            }
        }
    }

    fn welcome(&mut self) -> Value {
        let event = self.next_message();
        assert_eq!(event.field("event"), Some("welcome"), "{event:?}");
        let welcome = event.data();
        assert_eq!(welcome["type"], "connection", "{welcome}");
        welcome
    }

    /// Whether the server closed the stream (after whatever it still had to send).
    fn ended(&mut self) -> bool {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).is_ok()
    }
}

/// The envelopes `GET /emergencias` holds, by seq.
fn stored(server: &Server) -> Vec<Value> {
    server.poll_all()
}

#[test]
fn each_emergency_is_one_event_whose_id_is_stream_and_seq() {
    let server = Server::start(&[]);
    let mut client = EventClient::open(&server, "", &[]);
    let head = client.head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-store") && !head.contains("content-length"), "{head}");
    let welcome = client.welcome();
    let stream = welcome["stream"].as_str().unwrap().to_owned();
    assert_eq!(server.clients(), 1, "an SSE client counts as a client");

    let first = server.post(r#"{"tipo":"incendio"}"#);
    assert_eq!(first.status, 202);
    // A published object with line breaks between its tokens.
    assert_eq!(server.unix().publish(r#"{"tipo":"rescate","n":2}"#), 2);
    let pretty = "{\n  \"tipo\": \"choque\"\n}";
    assert_eq!(server.post(pretty).status, 202);
    let envelopes = stored(&server);
    for (seq, envelope) in (1..).zip(&envelopes) {
        let raw = client.next_raw();
        let text = serde_json::to_string(envelope).unwrap();
        if seq < 3 {
            // Byte for byte: the envelope the history holds (compact JSON, as polls show it).
            assert!(
                raw.starts_with(&format!("id: {stream}:{seq}\ndata: {{\"type\":\"emergencia\"")),
                "{raw}"
            );
            let data = raw.strip_prefix(&format!("id: {stream}:{seq}\ndata: ")).unwrap();
            assert_eq!(serde_json::from_str::<Value>(data.trim_end()).unwrap(), *envelope, "{raw}");
            assert_eq!(raw.matches('\n').count(), 3, "one id line, one data line, a blank line: {raw}");
        } else {
            let expected = format!("id: {stream}:3\n");
            assert!(raw.starts_with(&expected), "{raw}");
            assert!(
                raw.contains("data:   \"tipo\": \"choque\"\n"),
                "each line of the object is a data line: {raw}"
            );
            let joined: String =
                raw.lines().filter_map(|line| line.strip_prefix("data: ")).collect::<Vec<_>>().join("\n");
            assert_eq!(serde_json::from_str::<Value>(&joined).unwrap(), *envelope, "{text}");
        }
    }
}

#[test]
fn last_event_id_resumes_exactly_like_since() {
    let server = Server::start(&["--history", "3"]);
    let mut unix = server.unix();
    for n in 1..=5 {
        assert_eq!(unix.publish(&json!({"n": n}).to_string()), n);
    }
    let stream = server.health()["stream"].as_str().unwrap().to_owned();
    let id = format!("{stream}:3");

    let mut by_id = EventClient::open(&server, "", &[("Last-Event-ID", &id)]);
    let welcome = by_id.welcome();
    assert_eq!(
        welcome["replay"],
        json!({"since": 3, "count": 2, "missed": 0, "reset": false, "stream_changed": false})
    );
    let mut by_query = EventClient::open(&server, &format!("?since=3&stream={stream}"), &[]);
    assert_eq!(by_query.welcome()["replay"], welcome["replay"]);
    for seq in 4..=5 {
        let (a, b) = (by_id.next(), by_query.next());
        assert_eq!(a.field("id"), Some(format!("{stream}:{seq}").as_str()), "{a:?}");
        assert_eq!((a.field("id"), a.data()), (b.field("id"), b.data()));
    }
    // The id wins over an older `since` in the URL (EventSource keeps the URL it first used).
    let mut newer = EventClient::open(&server, "?since=1", &[("Last-Event-ID", &format!("{stream}:4"))]);
    assert_eq!(newer.welcome()["replay"]["since"], 4);
    assert_eq!(newer.next().field("id"), Some(format!("{stream}:5").as_str()));
    // Older than the history: seq 2 is gone from it, but still open, so it comes first (with
    // its id: the client never had it), then the history.
    let mut old = EventClient::open(&server, "", &[("Last-Event-ID", &format!("{stream}:1"))]);
    let welcome = old.welcome();
    assert_eq!((welcome["replay"]["missed"].as_u64(), &welcome["open"]), (Some(1), &json!([2])), "{welcome}");
    for seq in 2..=5 {
        assert_eq!(old.next().field("id"), Some(format!("{stream}:{seq}").as_str()));
    }
}

#[test]
fn an_id_of_another_history_or_ahead_of_the_server_gets_a_reset_event() {
    let server = Server::start(&[]);
    assert_eq!(server.unix().publish("{}"), 1);
    let stream = server.health()["stream"].as_str().unwrap().to_owned();
    for (id, reason) in
        [("0123456789abcdef:7".to_owned(), "stream_changed"), (format!("{stream}:9"), "ahead")]
    {
        let mut client = EventClient::open(&server, "", &[("Last-Event-ID", &id)]);
        let reset = client.next_message();
        assert_eq!(reset.field("event"), Some("reset"), "{reset:?}");
        assert_eq!(reset.field("id"), None);
        let since = id.rsplit_once(':').unwrap().1.parse::<u64>().unwrap();
        assert_eq!(
            reset.data(),
            json!({"type": "reset", "reason": reason, "since": since, "stream": stream})
        );
        let welcome = client.welcome();
        assert_eq!(welcome["replay"]["count"], 1, "{welcome}");
        // Everything retained follows, with ids of this history.
        assert_eq!(client.next().field("id"), Some(format!("{stream}:1").as_str()));
    }
    let refused = EventClient::connect(&server, "", &[("Last-Event-ID", "garbage:x")]).err().unwrap();
    assert_eq!(refused.status, 400);
    assert!(refused.error().contains("Last-Event-ID"), "{}", refused.body);
}

#[test]
fn the_heartbeat_is_a_comment_and_a_ping_event() {
    let server = Server::start(&["--in-memory", "--ping-interval", "0.1", "--pong-timeout", "0.3"]);
    let mut client = EventClient::open(&server, "", &[]);
    client.welcome();
    for _ in 0..3 {
        assert_eq!(client.next_raw(), ": ping\nevent: ping\ndata: {\"type\":\"ping\"}\n\n");
    }
    assert_eq!(server.clients(), 1, "a client that never answers pings stays: SSE clients cannot");
}

/// A subscribe token file in `dir` naming one tablet, `tablet-1`, token `s3cret-one-long-enough`.
fn tablet_one(dir: &TempDir) -> std::path::PathBuf {
    let tokens = dir.path().join("subscribe.tokens");
    std::fs::write(&tokens, "tablet-1 s3cret-one-long-enough\n").unwrap();
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    tokens
}

#[test]
fn tokens_limits_and_acks_are_those_of_websocket_clients() {
    let dir = TempDir::new();
    let tokens = tablet_one(&dir);
    let server = Server::start(&["--max-clients", "1", "--subscribe-token-file", tokens.to_str().unwrap()]);
    let missing = EventClient::connect(&server, "", &[]).err().unwrap();
    assert_eq!(missing.status, 401);
    let mut client = EventClient::open(&server, "?token=s3cret-one-long-enough", &[]);
    client.welcome();
    let full = EventClient::connect(&server, "?token=s3cret-one-long-enough", &[]).err().unwrap();
    assert_eq!((full.status, full.header("retry-after").as_deref()), (503, Some("5")));
    assert!(full.error().contains("--max-clients"), "{}", full.body);
    let ws = common::Client::refusal_status(server.addr, "/ws/emergencias?token=s3cret-one-long-enough", &[]);
    assert_eq!(ws, 503, "the SSE client holds the one place");
    // It cannot send: it acks over HTTP, and every client hears of it as an `ack` event.
    let published = server.post("{\"tipo\":\"incendio\"}");
    assert_eq!(published.status, 202, "{}", published.body);
    assert_eq!(client.next_message().data()["seq"], 1);
    let acked = server.http(
        b"POST /emergencias/1/ack HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s3cret-one-long-enough\r\n\
          Content-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(acked.status, 200, "{}", acked.body);
    let ack = client.next_message();
    assert_eq!(ack.field("event"), Some("ack"), "{ack:?}");
    assert_eq!(
        (ack.field("id"), ack.data()["by"].as_str(), ack.data()["seq"].as_u64()),
        (None, Some("tablet-1"), Some(1))
    );
    server.terminate();
    assert!(client.ended(), "closed at shutdown");
}

/// An SSE page cannot send on its stream: its HTTP acks are what the roster hears from it.
#[test]
fn an_sse_tablets_http_ack_is_its_last_heard() {
    let dir = TempDir::new();
    let tokens = tablet_one(&dir);
    let server = Server::start(&["--in-memory", "--subscribe-token-file", tokens.to_str().unwrap()]);
    let heard = || {
        let roster = server.get("/tablets?token=s3cret-one-long-enough");
        assert_eq!(roster.status, 200, "{}", roster.body);
        roster.json()["tablets"][0]["last_heard"].as_str().unwrap().to_owned()
    };
    let mut client = EventClient::open(&server, "?token=s3cret-one-long-enough", &[]);
    client.welcome();
    let connected = heard();
    let since = Instant::now();
    // RFC 3339 in milliseconds: the ack must come in a later one to be told apart.
    common::wait_until("the next milliseconds", || since.elapsed().as_millis() >= 3);
    assert_eq!(server.post("{\"tipo\":\"incendio\"}").status, 202);
    assert_eq!(client.next_message().data()["seq"], 1);
    let acked = server.http(
        b"POST /emergencias/1/ack HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s3cret-one-long-enough\r\n\
          Content-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(acked.status, 200, "{}", acked.body);
    let at = client.next_message().data()["at"].as_str().unwrap().to_owned();
    assert!(at > connected, "{at} after {connected}");
    assert_eq!(heard(), at, "the ack is the last the server heard of tablet-1");
}

#[test]
fn a_client_that_stops_reading_is_dropped_as_too_slow() {
    let server = Server::start(&[
        "--in-memory",
        "--queue",
        "8",
        "--write-timeout",
        "2",
        "--client-send-buffer",
        "65536",
    ]);
    let (mut reader, _) = server.subscribe();
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled.write_all(b"GET /sse/emergencias HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut first = [0u8; 15];
    stalled.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK");
    server.wait_for_clients(2);
    let payload = json!({"blob": "x".repeat(60_000)}).to_string();
    let mut unix = server.unix();
    let started = Instant::now();
    let mut n = 0;
    while server.clients() > 1 {
        n += 1;
        assert_eq!(unix.publish(&payload), n);
        reader.recv_emergency(n);
        assert!(started.elapsed() < PATIENCE, "still connected after {n} emergencies");
    }
    server.wait_for_log("too slow: --queue events behind");
}

#[test]
fn an_allowed_origin_gets_cors_and_another_is_refused() {
    let server = Server::start(&["--in-memory", "--allowed-origin", "https://console.site"]);
    let mut allowed = EventClient::open(&server, "", &[("Origin", "https://console.site")]);
    assert!(
        allowed.head.contains("Access-Control-Allow-Origin: https://console.site\r\n"),
        "{}",
        allowed.head
    );
    allowed.welcome();
    let refused = EventClient::connect(&server, "", &[("Origin", "https://evil.example")]).err().unwrap();
    assert_eq!(refused.status, 403);
    server.wait_for_log(r#"refused SSE client 127.0.0.1"#);
}
