//! HTTP: publishing with POST, polling, health, and every kind of bad request answered
//! precisely, with nothing broadcast by mistake.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{HttpResponse, PATIENCE, Server, post_head_read};

fn post_raw(server: &Server, head_extra: &str, body: &str) -> HttpResponse {
    server.http(
        format!("POST /emergencias HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{head_extra}\r\n{body}")
            .as_bytes(),
    )
}

#[test]
fn a_post_is_accepted_pushed_and_counted() {
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    let response = server.post(r#"{"tipo":"incendio","lat":-33.45}"#);
    assert_eq!(response.status, 202);
    assert_eq!(response.header("content-type").as_deref(), Some("application/json"));
    let reply = response.json();
    assert_eq!(
        (reply["ok"].as_bool(), reply["seq"].as_u64(), reply["queued_to"].as_u64()),
        (Some(true), Some(1), Some(1))
    );
    assert_eq!(reply["stream"], server.health()["stream"]);
    let event = client.recv_emergency(1);
    assert_eq!(event["source"], "http");
    assert_eq!(event["data"], serde_json::json!({"tipo": "incendio", "lat": -33.45}));
    let received_at = event["received_at"].as_str().unwrap();
    assert!(received_at.len() == 24 && received_at.ends_with('Z'), "{received_at}");
    assert_eq!(server.health()["seq"], 1);
}

#[test]
fn bad_bodies_get_400_and_nothing_is_broadcast() {
    let server = Server::start(&["--max-body-bytes", "100"]);
    let (mut client, _) = server.subscribe();
    let cases = [
        ("{\"a\":", "invalid JSON: EOF while parsing"),
        ("not json", "invalid JSON: expected"),
        ("[1,2]", "must be a JSON object"),
        ("\"text\"", "must be a JSON object"),
        ("  ", "empty body"),
        ("", "empty body"),
        ("{} {}", "trailing characters"),
    ];
    for (body, message) in cases {
        let response = server.post(body);
        assert_eq!(response.status, 400, "{body:?}: {}", response.body);
        assert!(response.error().contains(message), "{body:?}: {}", response.body);
    }
    let too_big = server.post(&format!(r#"{{"x":"{}"}}"#, "y".repeat(100)));
    assert_eq!(too_big.status, 413);
    assert_eq!(too_big.error(), "body larger than 100 bytes");

    assert_eq!(server.last_seq(), 0);
    // The next thing the client sees is the next good emergency, seq 1.
    assert_eq!(server.post("{}").status, 202);
    client.recv_emergency(1);
}

#[test]
fn wrong_methods_and_paths() {
    let server = Server::start(&[]);
    let put = server.http(b"PUT /emergencias HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
    assert_eq!(put.status, 405);
    assert_eq!(put.header("allow").as_deref(), Some("GET, POST"));
    let post_health = server.http(b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(post_health.status, 405);
    let post_ws = server.http(b"POST /ws/emergencias HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((post_ws.status, post_ws.header("allow").as_deref()), (405, Some("GET")));
    let missing = server.get("/nope");
    assert_eq!(missing.status, 404);
    assert!(missing.error().contains("/nope"));
    assert_eq!(server.last_seq(), 0);
}

#[test]
fn chunked_and_unsized_bodies_get_411() {
    let server = Server::start(&[]);
    let chunked = post_raw(&server, "Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\n\r\n");
    assert_eq!(chunked.status, 411);
    assert!(chunked.error().contains("Content-Length"));
    let no_length = post_raw(&server, "", "");
    assert_eq!(no_length.status, 411);
    let bad_length = post_raw(&server, "Content-Length: ten\r\n", "");
    assert_eq!(bad_length.status, 400);
    let conflicting = post_raw(&server, "Content-Length: 2\r\nContent-Length: 3\r\n", "{} ");
    assert_eq!(conflicting.status, 400);
    assert_eq!(server.last_seq(), 0);
}

#[test]
fn keep_alive_and_pipelined_requests_share_one_connection() {
    let server = Server::start(&[]);
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let post = |n: u32| {
        format!("POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n{{\"n\":{n:>2}}}")
    };
    writer.write_all(post(1).as_bytes()).unwrap();
    let first = HttpResponse::read(&mut reader);
    assert_eq!((first.status, first.header("connection").as_deref()), (202, Some("keep-alive")));
    // Two requests in one write, then a GET, all on the same connection.
    writer.write_all(format!("{}{}GET /healthz HTTP/1.1\r\n\r\n", post(2), post(3)).as_bytes()).unwrap();
    assert_eq!(HttpResponse::read(&mut reader).json()["seq"], 2);
    assert_eq!(HttpResponse::read(&mut reader).json()["seq"], 3);
    assert_eq!(HttpResponse::read(&mut reader).json()["seq"], 3);
}

/// `n` pipelined publishes of `{"n":i}`, `Connection: close` on the last.
fn pipelined_posts(n: u32) -> String {
    (1..=n)
        .map(|i| {
            let body = format!("{{\"n\":{i}}}");
            let close = if i == n { "Connection: close\r\n" } else { "" };
            format!(
                "POST /emergencias HTTP/1.1\r\nHost: t\r\n{close}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
        })
        .collect()
}

#[test]
fn pipelined_publishes_share_commits_and_are_answered_in_order() {
    const N: u32 = 48;
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer.write_all(pipelined_posts(N).as_bytes()).unwrap();
    for seq in 1..=u64::from(N) {
        let reply = HttpResponse::read(&mut reader);
        assert_eq!(reply.status, 202, "{}", reply.body);
        assert_eq!(reply.json()["seq"], seq);
        let expected = if seq == u64::from(N) { "close" } else { "keep-alive" };
        assert_eq!(reply.header("connection").as_deref(), Some(expected));
    }
    for seq in 1..=u64::from(N) {
        assert_eq!(client.recv_emergency(seq)["data"]["n"], seq);
    }
    // Answered one at a time, each publish would have had a commit of its own.
    let commits = server.counter(r#"resq_push_journal_commits_total{carrying="emergencies"}"#);
    assert!((1..u64::from(N)).contains(&commits), "{commits} commits for {N} pipelined publishes");
}

#[test]
fn every_request_of_a_pipeline_gets_its_own_answer_in_order() {
    let server = Server::start(&["--max-body-bytes", "100"]);
    let (mut client, _) = server.subscribe();
    let post = |body: &str, extra: &str| {
        format!(
            "POST /emergencias HTTP/1.1\r\nHost: t\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let too_large = format!(r#"{{"x":"{}"}}"#, "y".repeat(100));
    let pipeline = [
        post(r#"{"n":1}"#, ""),
        post("not json", ""),
        post(r#"{"n":2}"#, "Idempotency-Key: k-2\r\n"),
        post(r#"{"n":2}"#, "Idempotency-Key: k-2\r\n"),
        post(r#"{"n":3}"#, "Idempotency-Key: k-2\r\n"),
        "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
        post(r#"{"n":3}"#, ""),
        post(&too_large, ""),
        post(r#"{"n":4}"#, ""),
    ];
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer.write_all(pipeline.concat().as_bytes()).unwrap();
    let mut answers = Vec::new();
    for _ in 0..8 {
        let reply = HttpResponse::read(&mut reader);
        let seq = reply.json()["seq"].as_u64();
        let duplicate = reply.json()["duplicate"].as_bool();
        answers.push((reply.status, seq, duplicate));
    }
    assert_eq!(
        answers,
        [
            (202, Some(1), None),
            (400, None, None),
            (202, Some(2), None),
            (202, Some(2), Some(true)),
            (409, None, None),
            (200, Some(2), None),
            (202, Some(3), None),
            (413, None, None),
        ]
    );
    // The body of the 413 is never read: the connection closes after it, and the last request
    // is not taken.
    let mut rest = Vec::new();
    assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0, "{}", String::from_utf8_lossy(&rest));
    for seq in 1..=3 {
        assert_eq!(client.recv_emergency(seq)["data"]["n"], seq);
    }
    assert_eq!(server.last_seq(), 3);
}

#[test]
fn expect_100_continue_is_honoured() {
    let server = Server::start(&[]);
    let mut stream = post_head_read(&server, 2);
    stream.write_all(b"{}").unwrap();
    assert_eq!(HttpResponse::read(&mut BufReader::new(stream)).status, 202);
}

#[test]
fn a_stalled_head_or_body_is_closed_after_the_header_timeout() {
    let server = Server::start(&["--header-timeout", "0.3"]);
    for partial in
        ["GET /healthz HTTP/1.1\r\nHost:", "POST /emergencias HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\""]
    {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let started = Instant::now();
        stream.write_all(partial.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let waited = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{partial:?}: {answer}");
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "{waited:?}");
    }
    // A byte every 100 ms does not extend the deadline: it covers the whole head.
    let trickle = TcpStream::connect(server.addr).unwrap();
    let mut reader = trickle.try_clone().unwrap();
    let started = Instant::now();
    let answered = std::thread::spawn(move || {
        let mut answer = [0u8; 12];
        let result = reader.read_exact(&mut answer);
        (result.is_ok() && &answer == b"HTTP/1.1 408", started.elapsed())
    });
    let mut writer = &trickle;
    while !answered.is_finished() && started.elapsed() < PATIENCE {
        let _ = writer.write_all(b"a");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (got_408, waited) = answered.join().unwrap();
    assert!(got_408 && waited < Duration::from_secs(2), "408: {got_408}, after {waited:?}");
    assert_eq!(server.last_seq(), 0);
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn oversized_heads_and_garbage_are_refused() {
    let server = Server::start(&["--max-head-bytes", "1024"]);
    let long_header =
        server.http(format!("GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(2000)).as_bytes());
    assert_eq!(long_header.status, 431);
    let many = server.http(format!("GET /healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(40)).as_bytes());
    assert_eq!(many.status, 431);
    assert!(many.error().contains("headers"));
    let garbage = server.http(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n");
    assert_eq!(garbage.status, 400);
    assert!(garbage.error().starts_with("malformed HTTP request"));
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn polling_returns_retained_emergencies_after_since() {
    let server = Server::start(&["--history", "3"]);
    for n in 1..=4 {
        assert_eq!(server.post(&format!(r#"{{"n":{n}}}"#)).status, 202);
    }
    let all = server.get("/emergencias").json();
    let seqs: Vec<u64> = all.as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3, 4]);
    let after_three = server.get("/emergencias?since=3").json();
    assert_eq!(after_three.as_array().unwrap().len(), 1);
    assert_eq!(after_three[0]["data"], serde_json::json!({"n": 4}));
    assert_eq!(server.get("/emergencias?since=4").body, "[]");
    assert_eq!(server.get("/emergencias?since=-1").status, 400);
    let health = server.health();
    assert_eq!(health["history"], serde_json::json!({"first_seq": 2, "last_seq": 4, "count": 3}));
    assert_eq!(health["clients"], 0);
}

#[test]
fn head_requests_get_headers_without_a_body() {
    let server = Server::start(&[]);
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    writer
        .write_all(
            b"HEAD /healthz HTTP/1.1\r\n\r\nHEAD /nope HTTP/1.1\r\n\r\nHEAD /emergencias/1 HTTP/1.1\r\n\r\n\
              HEAD /emergencias/1/ack HTTP/1.1\r\n\r\nHEAD /tablets HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream);
    // HttpResponse::read would wait for a body that never comes: read heads by hand.
    let mut read_head = || {
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            let mut byte = [0u8; 1];
            reader.read_exact(&mut byte).unwrap();
            head.push(byte[0] as char);
        }
        head
    };
    let health = read_head();
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.contains("Content-Length: "), "{health}");
    assert!(read_head().starts_with("HTTP/1.1 404 "));
    let emergency = read_head();
    assert!(emergency.starts_with("HTTP/1.1 404 "), "{emergency}");
    let ack = read_head();
    assert!(ack.starts_with("HTTP/1.1 405 "), "{ack}");
    let tablets = read_head();
    assert!(tablets.starts_with("HTTP/1.1 200 "), "{tablets}");
    // The GET right behind them parses cleanly: no stray body bytes in between.
    assert!(read_head().starts_with("HTTP/1.1 200 OK\r\n"));
}

#[test]
fn ambiguous_lengths_and_unknown_expectations_are_refused() {
    let server = Server::start(&[]);
    let plus = post_raw(&server, "Content-Length: +2\r\n", "{}");
    assert_eq!(plus.status, 400);
    assert_eq!(plus.error(), "invalid Content-Length");
    let expect = post_raw(&server, "Content-Length: 2\r\nExpect: something-else\r\n", "{}");
    assert_eq!(expect.status, 417);
    assert_eq!(server.last_seq(), 0);
}

#[test]
fn the_request_timeout_starts_at_the_first_byte_not_at_idle() {
    let server = Server::start(&["--header-timeout", "1"]);
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(HttpResponse::read(&mut reader).status, 200);
    // Idle for most of the timeout, then a request that itself takes half of it.
    std::thread::sleep(Duration::from_millis(700));
    writer.write_all(b"POST /emergencias HTTP/1.1\r\nContent-Length: 2\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    writer.write_all(b"\r\n{}").unwrap();
    assert_eq!(HttpResponse::read(&mut reader).status, 202);
}

#[test]
fn polling_is_capped_in_bytes_but_always_makes_progress() {
    let server = Server::start(&["--max-poll-bytes", "300"]);
    for n in 1..=5 {
        assert_eq!(server.post(&format!(r#"{{"n":{n},"pad":"{}"}}"#, "p".repeat(60))).status, 202);
    }
    let mut since = 0;
    let mut pages = 0;
    while since < 5 {
        let page = server.get(&format!("/emergencias?since={since}")).json();
        let page = page.as_array().unwrap();
        assert!(!page.is_empty() && page.len() < 5, "page of {}", page.len());
        for event in page {
            since += 1;
            assert_eq!(event["seq"], since);
        }
        pages += 1;
    }
    assert!(pages >= 2);
}

#[test]
fn an_upgraded_connection_frees_its_http_slot() {
    let server = Server::start(&["--max-http-connections", "1"]);
    let (mut client, _) = server.subscribe();
    assert_eq!(server.post("{}").status, 202);
    client.recv_emergency(1);
}

#[test]
fn metrics_count_what_happened() {
    let server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    assert_eq!(server.post("{}").status, 202);
    assert_eq!(server.post("[]").status, 400);
    server.unix().publish("{}");
    let mut unix = server.unix();
    unix.send(b"nope\n");
    unix.reply();
    client.recv_emergency(1);
    client.recv_emergency(2);
    let metrics = server.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let page = metrics.body;
    for line in [
        "resq_push_clients 1\n",
        "resq_push_last_seq 2\n",
        "resq_push_history_entries 2\n",
        "resq_push_published_total{source=\"http\"} 1\n",
        "resq_push_published_total{source=\"unix\"} 1\n",
        "resq_push_http_responses_total{status=\"202\"} 1\n",
        "resq_push_http_responses_total{status=\"400\"} 1\n",
        "resq_push_http_responses_total{status=\"101\"} 1\n",
        "resq_push_unix_rejections_total{reason=\"invalid_json\"} 1\n",
        "# TYPE resq_push_start_time_seconds gauge\n",
    ] {
        assert!(page.contains(line), "missing {line:?} in:\n{page}");
    }
    // Deliveries are counted as they are written, and not again when the session ends.
    drop(client);
    server.wait_for_log("2 events sent");
    let delivered = "resq_push_delivered_total 2\n";
    common::wait_until(delivered, || server.get("/metrics").body.contains(delivered));
}

/// Publishers whose requests arrive in the same instant each wait for room before publishing,
/// so even 40 at once never push a client that keeps up past `--queue` (16 here: more than 40
/// would fit in the default).
#[test]
fn concurrent_publishers_never_push_a_client_that_keeps_up_past_its_queue() {
    let server = Server::start(&["--in-memory", "--queue", "16"]);
    let mut clients: Vec<_> = (0..3).map(|_| server.subscribe().0).collect();
    let ready = std::sync::Arc::new(std::sync::Barrier::new(40));
    let publishers: Vec<_> = (0..40)
        .map(|n| {
            let (addr, ready) = (server.addr, ready.clone());
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(PATIENCE)).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                // A first request on the same connection: once it is answered, the server
                // is waiting for this connection's next request.
                writer.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                assert_eq!(HttpResponse::read(&mut reader).status, 200);
                ready.wait();
                let body = format!(r#"{{"n":{n}}}"#);
                let post = format!(
                    "POST /emergencias HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                writer.write_all(post.as_bytes()).unwrap();
                HttpResponse::read(&mut reader).status
            })
        })
        .collect();
    for publisher in publishers {
        assert_eq!(publisher.join().unwrap(), 202);
    }
    for client in &mut clients {
        for seq in 1..=40 {
            client.recv_emergency(seq);
        }
    }
    assert_eq!(server.clients(), 3);
}

/// The seqs of a poll answer's emergencies.
fn polled_seqs(response: &HttpResponse) -> Vec<u64> {
    response.json().as_array().unwrap().iter().map(|event| event["seq"].as_u64().unwrap()).collect()
}

/// A poll answer's replay headers: last seq, missed, reset, stream changed.
fn poll_info(response: &HttpResponse) -> [Option<String>; 4] {
    ["x-resq-last-seq", "x-resq-missed", "x-resq-reset", "x-resq-stream-changed"]
        .map(|name| response.header(name))
}

#[test]
fn a_poll_says_when_the_history_changed_under_the_poller() {
    let origin = "https://console.site";
    let args = ["--history", "3", "--allowed-origin", origin];
    let server = Server::start(&args);
    for n in 1..=4 {
        assert_eq!(server.post(&format!(r#"{{"n":{n}}}"#)).status, 202);
    }
    let first = server.get("/emergencias?since=0");
    let stream = first.header("x-resq-stream").expect("an X-Resq-Stream header");
    assert_eq!(stream, server.health()["stream"].as_str().unwrap());
    let (yes, no) = (Some("true".to_owned()), Some("false".to_owned()));
    assert_eq!(poll_info(&first), [Some("4".to_owned()), Some("1".to_owned()), no.clone(), no.clone()]);
    assert_eq!(polled_seqs(&first), [2, 3, 4]);

    // The data dir is wiped: a new history, whose seqs start again at 1.
    let dir = server.stop();
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let server = Server::start_in(dir, &args);
    assert_eq!(server.post(r#"{"n":"new"}"#).status, 202);
    let changed = server.get(&format!("/emergencias?since=4&stream={stream}"));
    assert_ne!(changed.header("x-resq-stream"), Some(stream.clone()));
    assert_eq!(poll_info(&changed), [Some("1".to_owned()), Some("0".to_owned()), no.clone(), yes.clone()]);
    assert_eq!(polled_seqs(&changed), [1], "the new emergency must not hide behind the old seq");
    // A poller that sends no stream is told its seq is ahead of this history.
    let ahead = server.get("/emergencias?since=4");
    assert_eq!(poll_info(&ahead), [Some("1".to_owned()), Some("0".to_owned()), yes, no]);
    assert_eq!(polled_seqs(&ahead), [1]);

    // A browser page may read them.
    let cors = server.http(
        format!("GET /emergencias?since=0 HTTP/1.1\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    let exposed = cors.header("access-control-expose-headers").unwrap_or_default().to_ascii_lowercase();
    for name in ["x-resq-stream", "x-resq-last-seq", "x-resq-missed", "x-resq-reset", "x-resq-stream-changed"]
    {
        assert!(exposed.split(',').any(|item| item.trim() == name), "{name} not in {exposed:?}");
    }
}

#[test]
fn a_request_answered_after_shutdown_began_says_connection_close() {
    let server = Server::start(&[]);
    // The 100 says the head was read: the server waits for the body when the signal comes.
    let mut stream = post_head_read(&server, 2);
    server.terminate();
    server.wait_for_log("shutting down: refusing new emergencies");
    stream.write_all(b"{}").unwrap();
    let mut reader = BufReader::new(stream);
    let answer = HttpResponse::read(&mut reader);
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("connection").as_deref(), Some("close"), "{}", answer.head);
    let mut rest = Vec::new();
    assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0, "more after the last answer: {rest:?}");
}
