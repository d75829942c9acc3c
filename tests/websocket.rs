//! The WebSocket endpoint: the welcome, staying connected, heartbeats, dead and slow clients,
//! fan-out to many clients, and catch-up with `?since=`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, PATIENCE, Server, wait_until};
use serde_json::Value;
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn welcome_names_the_stream_state() {
    let server = Server::start(&["--ping-interval", "7.5", "--pong-timeout", "2"]);
    server.unix().publish(r#"{"n":1}"#);
    let (_client, welcome) = server.subscribe();
    assert_eq!(welcome["message"], "Conectado! listo para recibir emergencias");
    assert_eq!(welcome["seq"], 1);
    assert_eq!(welcome["history"], serde_json::json!({"first_seq": 1, "last_seq": 1, "count": 1}));
    assert_eq!(welcome["ping_interval_ms"], 7500);
    assert_eq!(welcome["pong_timeout_ms"], 2000);
    assert!(welcome.get("replay").is_none(), "{welcome}");
}

#[test]
fn a_passive_client_stays_connected_through_many_pings() {
    let server = Server::start(&["--ping-interval", "0.1", "--pong-timeout", "0.3"]);
    let (mut client, _) = server.subscribe();
    // Reading answers the server's pings (tungstenite replies automatically); the client sends
    // nothing else. Wait for 20 pings: 2 s, more than six pong timeouts.
    client.ws.get_ref().set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while client.pings < 20 {
        assert!(Instant::now() < deadline, "only {} pings arrived", client.pings);
        match client.ws.read() {
            Ok(tungstenite::Message::Ping(_)) => client.pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = client.ws.flush();
            }
            Err(error) => panic!("connection ended after {} pings: {error}", client.pings),
        }
    }
    client.ws.get_ref().set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(server.clients(), 1);
    let seq = server.unix().publish(r#"{"still":"here"}"#);
    client.recv_emergency(seq);
}

#[test]
fn a_client_that_never_answers_pings_is_dropped_and_its_slot_freed() {
    let server = Server::start(&["--ping-interval", "0.2", "--pong-timeout", "0.3"]);
    // The healthy client reads on its own thread, which answers every ping.
    let (mut healthy, _) = server.subscribe();
    let reader = std::thread::spawn(move || while healthy.ws.read().is_ok() {});
    // Completes the handshake and then never reads, so it never answers a ping.
    let _silent = server.ws("/ws/emergencias");
    server.wait_for_log("no answer to ping within --pong-timeout");
    server.wait_for_clients(1);
    assert_eq!(server.logs().matches("no answer to ping").count(), 1, "{}", server.logs());
    let metrics = server.get("/metrics").body;
    assert!(metrics.contains("resq_push_clients_dropped_total{reason=\"pong_timeout\"} 1\n"), "{metrics}");
    drop(server);
    reader.join().unwrap();
}

#[test]
fn text_pings_get_pongs_and_other_text_is_ignored() {
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    client.send_text("ping");
    assert_eq!(client.recv_text(), r#"{"type":"pong"}"#);
    client.send_text(r#"{"type":"ping"}"#);
    assert_eq!(client.recv_text(), r#"{"type":"pong"}"#);
    client.send_text("hola");
    client.send_text(r#"{"type":"ack","seq":99}"#);
    client.ws.send(tungstenite::Message::binary(vec![1, 2, 3])).unwrap();
    let seq = server.unix().publish("{}");
    client.recv_emergency(seq);
    assert_eq!(server.clients(), 1);
}

#[test]
fn a_client_close_is_answered_and_frees_the_slot() {
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    client
        .ws
        .close(Some(tungstenite::protocol::CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))
        .unwrap();
    let reply = loop {
        match client.ws.read() {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(error) => panic!("no Close reply: {error}"),
        }
    };
    assert_eq!(reply.map(|f| f.code), Some(CloseCode::Normal));
    server.wait_for_clients(0);
    server.wait_for_log("disconnected after");
}

#[test]
fn fifty_clients_get_every_emergency_from_both_paths_in_order_verbatim() {
    let server = Server::start(&[]);
    let mut clients: Vec<Client> = (0..50).map(|_| server.subscribe().0).collect();
    server.wait_for_clients(50);

    let mut published = Vec::new();
    let mut unix = server.unix();
    for n in 1..=20 {
        let data = format!(r#"{{"n":{n}, "via":"unix",  "text":"calle {n} \u00f1 ✓"}}"#);
        let seq = unix.publish(&data);
        published.push((seq, data));
        let data = format!(r#"{{ "n" : {n},"via":"http" }}"#);
        let response = server.post(&data);
        assert_eq!(response.status, 202, "{}", response.body);
        let reply = response.json();
        assert_eq!(reply["queued_to"], 50, "{reply}");
        published.push((reply["seq"].as_u64().unwrap(), data));
    }
    let seqs: Vec<u64> = published.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());

    for client in &mut clients {
        for (seq, data) in &published {
            let text = client.recv_text();
            let expected_prefix = format!(r#"{{"type":"emergencia","seq":{seq},"received_at":""#);
            assert!(text.starts_with(&expected_prefix), "{text}");
            assert!(text.ends_with(&format!(r#","data":{data}}}"#)), "data not verbatim: {text}");
        }
    }
}

#[test]
fn since_replays_what_was_missed_then_continues_live() {
    let server = Server::start(&[]);
    let mut unix = server.unix();
    for n in 1..=5 {
        unix.publish(&format!(r#"{{"n":{n}}}"#));
    }
    let mut client = server.ws("/ws/emergencias?since=2");
    let welcome = client.recv_json();
    assert_eq!(
        welcome["replay"],
        serde_json::json!({"since": 2, "count": 3, "missed": 0, "reset": false, "stream_changed": false})
    );
    for seq in 3..=5 {
        assert_eq!(client.recv_emergency(seq)["data"]["n"], seq);
    }
    unix.publish(r#"{"n":6}"#);
    client.recv_emergency(6);

    // Already up to date: nothing replayed.
    let mut current = server.ws("/ws/emergencias?since=6");
    assert_eq!(current.recv_json()["replay"]["count"], 0);
    unix.publish(r#"{"n":7}"#);
    current.recv_emergency(7);
}

#[test]
fn since_ahead_of_the_server_replays_everything_retained() {
    let server = Server::start(&[]);
    let mut unix = server.unix();
    unix.publish("{}");
    unix.publish("{}");
    let mut client = server.ws("/ws/emergencias?since=500");
    let welcome = client.recv_json();
    assert_eq!(
        welcome["replay"],
        serde_json::json!({"since": 500, "count": 2, "missed": 0, "reset": true, "stream_changed": false})
    );
    client.recv_emergency(1);
    client.recv_emergency(2);
}

#[test]
fn since_older_than_history_says_how_many_are_gone() {
    // No emergency stays open beyond the history (tests/acks.rs covers those that do).
    let server = Server::start(&["--history", "3", "--max-open", "0"]);
    let mut unix = server.unix();
    for _ in 0..10 {
        unix.publish("{}");
    }
    let mut client = server.ws("/ws/emergencias?since=2");
    let welcome = client.recv_json();
    assert_eq!(welcome["history"], serde_json::json!({"first_seq": 8, "last_seq": 10, "count": 3}));
    assert_eq!(
        welcome["replay"],
        serde_json::json!({"since": 2, "count": 3, "missed": 5, "reset": false, "stream_changed": false})
    );
    for seq in 8..=10 {
        client.recv_emergency(seq);
    }
}

#[test]
fn replay_and_live_meet_without_gap_or_duplicate_while_publishing() {
    let server = Server::start(&[]);
    let socket = server.unix_socket.clone();
    let publisher = std::thread::spawn(move || {
        let mut unix = common::UnixPublisher::connect(&socket);
        for n in 0..400 {
            unix.publish(&format!(r#"{{"n":{n}}}"#));
        }
    });
    wait_until("some emergencies published", || server.last_seq() >= 50);
    let mut client = server.ws("/ws/emergencias?since=10");
    let welcome = client.recv_json();
    assert_eq!(welcome["replay"]["missed"], 0);
    for seq in 11..=400 {
        client.recv_emergency(seq);
    }
    publisher.join().unwrap();
}

#[test]
fn a_client_that_stops_reading_is_dropped_while_others_get_everything() {
    let server = Server::start(&["--queue", "8", "--write-timeout", "2"]);
    let (mut reader, _) = server.subscribe();
    // A raw WebSocket handshake, then never a read: the kernel buffers fill, then its queue.
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled
        .write_all(
            b"GET /ws/emergencias HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut first = [0u8; 12];
    stalled.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 101");
    server.wait_for_clients(2);

    let blob = "x".repeat(60_000);
    let payload = format!(r#"{{"blob":"{blob}"}}"#);
    let started = Instant::now();
    let mut unix = server.unix();
    let total = 300; // about 18 MB through each client
    for n in 1..=total {
        assert_eq!(unix.publish(&payload), n);
        // The healthy client keeps up, as a tablet on a working network does.
        reader.recv_emergency(n);
    }
    let elapsed = started.elapsed();
    server.wait_for_log("too slow: --queue events behind");
    server.wait_for_clients(1);
    // The hub dropped it before its session ended: its last line still names it and counts.
    let peer = stalled.local_addr().unwrap();
    let logs = server.logs();
    let line = logs.lines().find(|line| line.contains("too slow: --queue")).unwrap();
    assert!(line.contains(&format!("({peer}) disconnected after")), "{line}");
    assert!(!line.contains(" 0 events sent"), "{line}");
    assert!(elapsed < PATIENCE, "publishing took {elapsed:?}");
    println!("{total} emergencies of {} bytes to the healthy client in {elapsed:?}", payload.len());
}

#[test]
fn clients_over_the_limit_are_refused_with_503() {
    let server = Server::start(&["--max-clients", "2"]);
    let (mut first, _) = server.subscribe();
    let (_second, _) = server.subscribe();
    let refused = server.http(
        b"GET /ws/emergencias HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after").as_deref(), Some("5"));
    assert!(refused.error().contains("--max-clients"));
    let seq = server.unix().publish("{}");
    first.recv_emergency(seq);
}

#[test]
fn bad_upgrades_are_refused_before_switching_protocols() {
    let server = Server::start(&[]);
    let plain = server.get("/ws/emergencias");
    assert_eq!(plain.status, 426);
    assert_eq!(plain.header("upgrade").as_deref(), Some("websocket"));

    let upgrade = |extra: &str| {
        server.http(
            format!(
                "GET /ws/emergencias{extra} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            )
            .replace("\r\n\r\n", "\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            .as_bytes(),
        )
    };
    let bad_since = upgrade("?since=abc");
    assert_eq!(bad_since.status, 400);
    assert!(bad_since.error().contains("since"));

    let old_version = server.http(
        b"GET /ws/emergencias HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    );
    assert_eq!(old_version.status, 426);
    assert_eq!(old_version.header("sec-websocket-version").as_deref(), Some("13"));

    let bad_key = server.http(
        b"GET /ws/emergencias HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(bad_key.status, 400);
    assert_eq!(server.clients(), 0);
}

#[test]
fn an_oversized_client_message_closes_only_that_client() {
    let server = Server::start(&["--max-client-message-bytes", "256"]);
    let (mut other, _) = server.subscribe();
    let (mut noisy, _) = server.subscribe();
    noisy.send_text(&"x".repeat(1000));
    let close = noisy.recv_close();
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Size));
    server.wait_for_clients(1);
    let seq = server.unix().publish("{}");
    other.recv_emergency(seq);
}

#[test]
fn text_that_is_not_utf8_closes_with_1007() {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    let invalid = Frame::message(vec![0xff, 0xfe], OpCode::Data(Data::Text), true);
    client.ws.send(tungstenite::Message::Frame(invalid)).unwrap();
    assert_eq!(client.recv_close().map(|f| f.code), Some(CloseCode::Invalid));
    server.wait_for_clients(0);
}

/// Writes `count` empty masked Pong frames at a time straight to the client's socket, pausing
/// `pause` between writes, until `stop` is set.
fn flood_pongs(
    mut flooder: Client,
    count: usize,
    pause: Duration,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let stop = stop.clone();
    let frames: Vec<u8> = [0x8a, 0x80, 1, 2, 3, 4].repeat(count);
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if flooder.ws.get_mut().write_all(&frames).is_err() {
                break;
            }
            std::thread::sleep(pause);
        }
    })
}

#[test]
fn a_client_flooding_frames_does_not_starve_the_server() {
    let server = Server::start(&[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 60 KiB at a time, without pause.
    let flooding = flood_pongs(server.subscribe().0, 10_000, Duration::ZERO, &stop);
    // While the flood goes on, other requests keep being answered promptly.
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(server.health()["status"], "ok");
        answered += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooding.join().unwrap();
    assert!(answered >= 20, "only {answered} health checks answered in 2 s during the flood");
}

/// Emergencies are framed once by the server and written straight to every socket: frames with
/// 7-, 16- and 64-bit lengths, a replay longer than one write, and a client Ping answered
/// between them must all reach a standard client intact.
#[test]
fn frames_of_every_length_arrive_intact_in_replay_and_live() {
    // The live client reads only once all 40 (1.2 MB) are published, more than the kernel holds
    // for it (`--client-send-buffer`): it may fall that far behind.
    let server = Server::start(&["--history", "100", "--queue", "64"]);
    let (mut live, _) = server.subscribe();
    let mut unix = server.unix();
    let pads = [0, 100, 60_000, 65_400];
    let data: Vec<String> =
        (0..40).map(|i| format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(pads[i % 4]))).collect();
    for json in &data {
        unix.publish(json);
    }
    live.ws.send(Message::Ping("mid-stream".into())).unwrap();
    let mut pong = false;
    let mut received = Vec::new();
    while received.len() < data.len() || !pong {
        match live.ws.read().unwrap() {
            Message::Text(text) => received.push(text.to_string()),
            Message::Pong(payload) => pong = &payload[..] == b"mid-stream",
            Message::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut replayed = server.ws("/ws/emergencias?since=0");
    assert_eq!(replayed.recv_json()["replay"]["count"], 40);
    for (seq, json) in (1..).zip(&data) {
        let frame = &received[seq as usize - 1];
        assert!(frame.ends_with(&format!(r#","data":{json}}}"#)), "live seq {seq} altered");
        let again = replayed.recv_emergency(seq);
        assert_eq!(again.to_string(), serde_json::from_str::<Value>(frame).unwrap().to_string());
    }
}

/// Clients that never stop sending keep their sessions runnable in every scheduling round;
/// publishing, which waits for the sessions after each burst, must still go on.
#[test]
fn publishing_goes_on_while_many_clients_flood_frames() {
    let server = Server::start(&["--max-clients", "200"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // More than one scheduling round's worth of sessions (64), each with frames always waiting.
    // 12 KiB every 5 ms: far more than the server reads between two writes (one frame a turn).
    let flooders: Vec<_> =
        (0..70).map(|_| flood_pongs(server.subscribe().0, 2_000, Duration::from_millis(5), &stop)).collect();
    let (mut listener, _) = server.subscribe();
    let mut unix = server.unix();
    // Each publish waits for its reply, at most PATIENCE: a stalled publisher fails here.
    for n in 1..=40 {
        assert_eq!(unix.publish(&format!(r#"{{"n":{n}}}"#)), n);
    }
    for seq in 1..=40 {
        listener.recv_emergency(seq);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().unwrap();
    }
}

/// A client may send frames right behind its upgrade request, in the same packet: they are
/// buffered before the session starts, and must still be read.
#[test]
fn frames_sent_with_the_upgrade_request_are_answered() {
    let server = Server::start(&[]);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut request = format!(
        "GET /ws/emergencias HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    )
    .into_bytes();
    // A masked text frame "ping" (mask 1, 2, 3, 4).
    let mask = [1u8, 2, 3, 4];
    request.extend_from_slice(&[0x81, 0x84]);
    request.extend_from_slice(&mask);
    request.extend(b"ping".iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key));
    stream.write_all(&request).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains(r#"{"type":"pong"}"#) {
        let n = stream.read(&mut chunk).expect("no pong before the read timeout");
        assert!(n > 0, "closed before the pong: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..n]);
    }
}

/// The server's end of `client` as `ss -tmn` reports it: bytes queued to send (`skmem` `w`) and
/// the send buffer's size (`tb`).
fn server_side_send_queue(server: &Server, client: &TcpStream) -> (u64, u64) {
    let (port, peer) = (server.addr.port(), client.local_addr().unwrap().port());
    let filter = format!("( sport = :{port} and dport = :{peer} )");
    let ss = std::process::Command::new("ss").args(["-tmnH", "state", "established", &filter]).output();
    let text = String::from_utf8(ss.expect("ss (iproute2) reads the kernel's socket table").stdout).unwrap();
    let field = |name: &str| -> u64 {
        let (_, rest) =
            text.split_once(&format!(",{name}")).unwrap_or_else(|| panic!("no {name} in {text:?}"));
        rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (field("w"), field("tb"))
}

#[test]
fn a_client_that_stops_reading_holds_at_most_its_send_buffer_in_the_kernel() {
    const CAP: u64 = 32 * 1024;
    let server = Server::start(&["--in-memory", "--queue", "64", "--client-send-buffer", &CAP.to_string()]);
    let (stalled, _) = server.subscribe();
    let mut unix = server.unix();
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(60_000));
    for _ in 0..40 {
        unix.publish(&body);
    }
    let (queued, buffer) = server_side_send_queue(&server, stalled.ws.get_ref());
    assert!(buffer <= CAP, "a send buffer of {buffer} bytes ({queued} queued) for a cap of {CAP}");
}

/// A client frame as its bytes go on the wire: `first` is FIN, the RSV bits and the opcode; the
/// payload is masked with `mask`, or sent in the clear when there is none.
fn raw_frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let masked = if mask.is_some() { 0x80 } else { 0 };
    let mut wire = vec![first];
    match payload.len() {
        short @ 0..=125 => wire.push(masked | short as u8),
        medium @ 126..=65535 => {
            wire.push(masked | 126);
            wire.extend((medium as u16).to_be_bytes());
        }
        long => {
            wire.push(masked | 127);
            wire.extend((long as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            wire.extend(mask);
            wire.extend(payload.iter().zip(mask.iter().cycle()).map(|(byte, key)| byte ^ key));
        }
        None => wire.extend(payload),
    }
    wire
}

const MASK: Option<[u8; 4]> = Some([0x9c, 0x08, 0x71, 0xe6]);

/// RFC 6455's rules for what a server reads, each broken by one client: each is closed with the
/// code that says why, counted as dropped for the protocol, and the others go on being served.
#[test]
fn frames_a_server_must_refuse_close_only_their_client_with_the_right_code() {
    let server = Server::start(&[]);
    let (mut bystander, _) = server.subscribe();
    let cases = [
        ("unmasked", raw_frame(0x81, b"ping", None), CloseCode::Protocol),
        ("RSV1 without an extension", raw_frame(0xc1, b"ping", MASK), CloseCode::Protocol),
        ("unknown data opcode", raw_frame(0x83, b"", MASK), CloseCode::Protocol),
        ("unknown control opcode", raw_frame(0x8b, b"", MASK), CloseCode::Protocol),
        ("fragmented Ping", raw_frame(0x09, b"", MASK), CloseCode::Protocol),
        ("Ping of 126 bytes", raw_frame(0x89, &[b'p'; 126], MASK), CloseCode::Protocol),
        ("continuation without a start", raw_frame(0x80, b"x", MASK), CloseCode::Protocol),
        (
            "a new text inside a fragmented one",
            [raw_frame(0x01, b"a", MASK), raw_frame(0x81, b"b", MASK)].concat(),
            CloseCode::Protocol,
        ),
        ("Close of one byte", raw_frame(0x88, &[3], MASK), CloseCode::Protocol),
        (
            "a character cut between fragments, never completed",
            [raw_frame(0x01, "é".as_bytes().split_at(1).0, MASK), raw_frame(0x80, b"(", MASK)].concat(),
            CloseCode::Invalid,
        ),
        (
            "fragments larger than --max-client-message-bytes together",
            [raw_frame(0x01, &[b'x'; 3000], MASK), raw_frame(0x80, &[b'x'; 1500], MASK)].concat(),
            CloseCode::Size,
        ),
    ];
    for (case, bytes, code) in &cases {
        let (mut client, _) = server.subscribe();
        client.ws.get_mut().write_all(bytes).unwrap();
        assert_eq!(client.recv_close().map(|f| f.code), Some(*code), "{case}");
        // tungstenite answers the Close: the server need not wait for CLOSE_REPLY_TIMEOUT.
        let _ = client.ws.flush();
    }
    server.wait_for_clients(1);
    let seq = server.unix().publish("{}");
    bystander.recv_emergency(seq);
    let dropped = server.counter(r#"resq_push_clients_dropped_total{reason="protocol"}"#);
    assert_eq!(dropped, cases.len() as u64);
}

/// A Close's code (and reason) come back in the server's Close, and the session ends as the
/// client's; a code no endpoint may send is answered with 1002.
#[test]
fn a_client_close_is_echoed_with_its_code() {
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    let mut payload = 4321u16.to_be_bytes().to_vec();
    payload.extend(b"leaving");
    client.ws.get_mut().write_all(&raw_frame(0x88, &payload, MASK)).unwrap();
    let reply = client.recv_close().unwrap();
    assert_eq!((reply.code, reply.reason.as_str()), (CloseCode::from(4321), "leaving"));
    server.wait_for_log("client closed (4321)");
    let (mut reserved, _) = server.subscribe();
    reserved.ws.get_mut().write_all(&raw_frame(0x88, &1005u16.to_be_bytes(), MASK)).unwrap();
    assert_eq!(reserved.recv_close().map(|f| f.code), Some(CloseCode::Protocol));
    server.wait_for_clients(0);
}

/// An ack may come in fragments, with a Ping between them, and every frame cut across reads:
/// it is still an ack, and the Ping gets a Pong with its payload (any bytes, up to 125).
#[test]
fn a_fragmented_ack_with_a_ping_inside_is_an_ack() {
    let server = Server::start(&["--in-memory"]);
    let (mut acking, _) = server.subscribe();
    let (mut other, _) = server.subscribe();
    server.wait_for_clients(2);
    assert_eq!(server.unix().publish("{}"), 1);
    acking.recv_emergency(1);
    other.recv_emergency(1);
    let ping: Vec<u8> = (0..125).map(|i| 0x80 | i as u8).collect();
    let bytes = [
        raw_frame(0x01, br#"{"type":"a"#, MASK),
        raw_frame(0x89, &ping, MASK),
        raw_frame(0x00, br#"ck","seq""#, MASK),
        raw_frame(0x80, b":1}", MASK),
    ]
    .concat();
    let socket = acking.ws.get_mut();
    socket.set_nodelay(true).unwrap();
    for piece in bytes.chunks(5) {
        socket.write_all(piece).unwrap();
    }
    let pong = loop {
        match acking.ws.read().unwrap() {
            Message::Pong(payload) => break payload,
            Message::Ping(_) => {}
            unexpected => panic!("expected the Pong, got {unexpected:?}"),
        }
    };
    assert_eq!(&pong[..], &ping[..]);
    let told = loop {
        let message = other.recv_json();
        if message["type"] == "ack" {
            break message;
        }
    };
    assert_eq!(told["seq"], 1, "{told}");
    assert!(told["by"].as_str().unwrap().starts_with("client-"), "{told}");
}
