//! Holding up under abuse and load: connections that send their request too slowly must not lock
//! tablets and health checks out, and many large publishes at once must not take the server's
//! memory with them, and a flood of refusals must not flood the log.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, HttpResponse, PATIENCE, Server, TempDir, fill_disk, post_head_read, wait_until};

/// A POST whose head the server has read (its `100 Continue` says so) and whose body then
/// trickles: one byte of the 1000 it announced.
fn trickling_body(server: &Server) -> TcpStream {
    let mut stream = post_head_read(server, 1000);
    stream.write_all(b"{").unwrap();
    stream
}

/// Connects a tablet, or says with which status it was refused.
fn tablet(server: &Server) -> Result<Client, u16> {
    match Client::try_connect(server.addr, "/ws/emergencias", &[]) {
        Ok(client) => Ok(client),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("the handshake failed: {other}"),
    }
}

/// `GET /healthz` on a new connection kept open: its status (0 for none), and the connection.
fn health_kept_open(server: &Server) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut status_line = String::new();
    let _ = reader.read_line(&mut status_line);
    (status_line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0), stream)
}

#[test]
fn bodies_trickling_below_the_minimum_rate_make_room_for_tablets_and_health_checks() {
    // A request timeout far beyond the test's patience: only the body rate can free the slots.
    let server = Server::start(&["--max-http-connections", "4", "--header-timeout", "60"]);
    let mut tricklers: Vec<TcpStream> = (0..4).map(|_| trickling_body(&server)).collect();
    let mut monitor = None;
    wait_until("/healthz to get past the trickling bodies", || {
        let (status, stream) = health_kept_open(&server);
        monitor = Some(stream);
        status == 200
    });
    // The monitor's connection stays open and idle: a trickler goes before it.
    let mut client = tablet(&server).unwrap_or_else(|status| panic!("a tablet was refused with {status}"));
    assert_eq!(client.recv_json()["type"], "connection");
    // Each admission evicted a trickler, which is answered 408 as soon as its task runs: on a
    // loaded machine that can take a while, so wait for the answers instead of sampling once.
    let mut answered = vec![false; tricklers.len()];
    wait_until("a 408 for one trickler per admitted client", || {
        for (stream, answered) in tricklers.iter_mut().zip(answered.iter_mut()) {
            stream.set_nonblocking(true).unwrap();
            let ready = stream.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
            stream.set_nonblocking(false).unwrap();
            if ready && !*answered {
                stream.set_read_timeout(Some(PATIENCE)).unwrap();
                let response = HttpResponse::read(&mut BufReader::new(&*stream));
                assert_eq!(response.status, 408, "{response:?}");
                assert!(response.error().contains("--min-body-rate"), "{response:?}");
                *answered = true;
            }
        }
        // At least one for the monitor and one for the tablet; a /healthz attempt refused before
        // the first trickler fell behind may have evicted another on its retry.
        answered.iter().filter(|told| **told).count() >= 2
    });
    drop(monitor);
}

#[test]
fn a_body_arriving_at_a_normal_rate_is_never_evicted() {
    let server = Server::start(&["--max-http-connections", "2"]);
    let body = format!(r#"{{"pad":"{}"}}"#, "p".repeat(24 * 1024));
    let (mut stream, addr) = (TcpStream::connect(server.addr).unwrap(), server.addr);
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    let publisher = std::thread::spawn(move || {
        // About 20 KiB/s, well above the default minimum, for more than a second.
        for chunk in body.as_bytes().chunks(1024) {
            stream.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        HttpResponse::read(&mut BufReader::new(stream))
    });
    // Meanwhile every new connection needs a slot: an idle one gives it, the publisher never.
    let mut idle = None;
    while !publisher.is_finished() {
        idle = Some(TcpStream::connect(addr).unwrap());
        assert_eq!(server.get("/healthz").status, 200);
    }
    drop(idle);
    let response = publisher.join().unwrap();
    assert_eq!(response.status, 202, "{response:?}");
}

/// A JSON object of exactly `len` bytes.
fn object_of(len: usize) -> String {
    format!(r#"{{"pad":"{}"}}"#, "p".repeat(len - 10))
}

/// A POST of `len` bytes whose head the server has taken (its `100 Continue` says so), with half
/// its body sent: in flight, holding its share of `--max-inflight-bytes`.
fn half_sent(server: &Server, len: usize) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    let body = object_of(len);
    stream.write_all(&body.as_bytes()[..len / 2]).unwrap();
    (stream, body[len / 2..].to_owned())
}

fn server_memory_kib(server: &Server, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_publish_beyond_the_in_flight_budget_waits_for_room_then_is_refused_as_busy() {
    // No minimum body rate: the half-sent bodies below keep their share as long as they like.
    let server = Server::start(&["--max-inflight-bytes", "131072", "--min-body-rate", "0"]);
    let mut holders = [half_sent(&server, 65536), half_sent(&server, 65536)];
    let asked = Instant::now();
    let refused = server.post(&object_of(1000));
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(asked.elapsed() >= Duration::from_millis(1900), "answered after {:?}", asked.elapsed());
    assert_eq!(refused.header("retry-after").as_deref(), Some("5"));
    assert!(refused.error().contains("--max-inflight-bytes"), "{refused:?}");
    // One that comes while a holder finishes waits for its share, and gets through.
    let addr = server.addr;
    let waiting = std::thread::spawn(move || {
        let request = format!(
            "POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{}",
            object_of(1000)
        );
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        (Instant::now(), HttpResponse::read(&mut BufReader::new(stream)))
    });
    std::thread::sleep(Duration::from_millis(300));
    let (stream, rest) = &mut holders[0];
    stream.write_all(rest.as_bytes()).unwrap();
    assert_eq!(HttpResponse::read(&mut BufReader::new(&*stream)).status, 202);
    let (sent, response) = waiting.join().unwrap();
    assert_eq!(response.status, 202, "{response:?}");
    assert!(sent.elapsed() < Duration::from_millis(1500), "it waited {:?}", sent.elapsed());
}

#[test]
fn many_concurrent_large_publishes_stay_under_a_bound_and_give_their_memory_back() {
    // A small history, and as small a set of open emergencies, keep the retained emergencies out
    // of the figures.
    let server = Server::start(&["--history-bytes", "1048576", "--max-open-bytes", "1048576"]);
    let before = server_memory_kib(&server, "VmRSS:");
    let addr = server.addr;
    let publishers: Vec<_> = (0..400)
        .map(|_| {
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(PATIENCE * 3)).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let body = object_of(65000);
                let request =
                    format!("POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: 65000\r\n\r\n{body}");
                (0..2)
                    .map(|_| {
                        stream.write_all(request.as_bytes()).unwrap();
                        HttpResponse::read(&mut reader).status
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let statuses: Vec<u16> = publishers.into_iter().flat_map(|publisher| publisher.join().unwrap()).collect();
    assert!(statuses.iter().all(|status| *status == 202), "{statuses:?}");
    // 400 x 2 x 64 KB went through, 16 MiB at a time (each held about twice); before the budget
    // the peak was about 83 MiB and 29 MiB stayed (debug build), after it 41 and 10.
    let peak = server_memory_kib(&server, "VmHWM:");
    assert!(peak < before + 48 * 1024, "peak RSS {peak} kB, from {before} kB");
    wait_until("the burst's memory to be given back", || {
        server_memory_kib(&server, "VmRSS:") < before + 12 * 1024
    });
}

/// What a strict JSON parser (a browser's `JSON.parse`, Python's `json`) refuses, and why.
const NOT_STRICT_JSON: [(&str, &str); 2] = [
    (r#"{"calle":"\ud800"}"#, r"lone surrogate \ud800"),
    (r#"{"victimas":1e400}"#, "number out of range: 1e400"),
];

#[test]
fn emergencies_strict_json_parsers_refuse_are_refused_over_http_and_the_unix_socket() {
    let server = Server::start(&[]);
    let mut publisher = server.unix();
    for (body, problem) in NOT_STRICT_JSON {
        let response = server.post(body);
        assert_eq!(response.status, 400, "{body}: {response:?}");
        assert!(response.error().contains(problem), "{body}: {response:?}");
        publisher.send(format!("{body}\n").as_bytes());
        let reply = publisher.reply();
        assert_eq!(reply["ok"], false, "{body}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains(problem), "{body}: {reply}");
    }
    assert_eq!(server.last_seq(), 0, "nothing was published");
    let strict = r#"{"calle":"\ud83d\ude92 Los Aromos","victimas":1e3}"#;
    assert_eq!(server.post(strict).status, 202);
    // Kept byte for byte, escapes and all.
    let poll = server.get("/emergencias?since=0");
    assert!(poll.body.contains(&format!(r#""data":{strict}}}"#)), "{}", poll.body);
}

/// How many log lines contain `needle`.
fn log_lines(server: &Server, needle: &str) -> usize {
    server.logs().lines().filter(|line| line.contains(needle)).count()
}

/// Repeats `refuse` every 200 ms until the log says how many lines like `needle` it held back,
/// which it says with the first one after its period (10 s); returns that number.
fn held_back(server: &Server, needle: &str, mut refuse: impl FnMut()) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let summary = server.logs().lines().filter(|line| line.contains(needle)).find_map(|line| {
            let count = line.split("(and ").nth(1)?.split(' ').next()?;
            count.parse().ok()
        });
        if let Some(count) = summary {
            return count;
        }
        assert!(Instant::now() < deadline, "no summary of held-back {needle:?} lines:\n{}", server.logs());
        refuse();
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_flood_of_refused_tokens_is_a_few_log_lines_that_count_the_rest() {
    let dir = TempDir::new();
    let tokens = dir.path().join("subscribe.tokens");
    std::fs::write(&tokens, "tablet-1 t1-Zq8xR2vW9mK4pL7s\n").unwrap();
    let server = Server::start_in(dir, &["--subscribe-token-file", tokens.to_str().unwrap()]);
    // 2000 polls with a wrong token, pipelined on one connection.
    let poll = "GET /emergencias?token=wrong-token-0123456789 HTTP/1.1\r\nHost: t\r\n\r\n";
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || writer.write_all(poll.repeat(2000).as_bytes()).unwrap());
    let mut reader = BufReader::new(stream);
    for _ in 0..2000 {
        assert_eq!(HttpResponse::read(&mut reader).status, 401);
    }
    flood.join().unwrap();
    let logged = log_lines(&server, "refused poll from");
    assert!(logged <= 2, "{logged} lines for 2000 refused tokens");
    let refused = held_back(&server, "refused poll from", || {
        assert_eq!(server.get("/emergencias?token=wrong-token-0123456789").status, 401);
    });
    assert!(refused >= 1999, "held back {refused}");
}

#[test]
fn commits_failing_one_after_another_are_a_few_log_lines_that_count_the_rest() {
    let server = Server::start_on_small_disk("512k", &[]);
    fill_disk(&server.on_disk("filler"));
    let mut publisher = server.unix();
    for n in 0..100 {
        publisher.send(format!("{{\"n\":{n}}}\n").as_bytes());
        assert_eq!(publisher.reply()["ok"], false);
    }
    let logged = log_lines(&server, "ERROR");
    assert!(logged <= 2, "{logged} error lines for 100 failed commits");
    let failed = held_back(&server, "ERROR", || {
        publisher.send(b"{}\n");
        assert_eq!(publisher.reply()["ok"], false);
    });
    assert!(failed >= 99, "held back {failed}");
}

#[test]
fn a_publisher_refused_for_busy_slots_reads_the_busy_line_not_a_broken_pipe() {
    let server = Server::start(&["--in-memory", "--max-unix-connections", "1"]);
    // The only slot stays busy: a burst whose replies its publisher does not read fills the
    // socket, and the server waits to write the rest.
    let mut hog = std::os::unix::net::UnixStream::connect(&server.unix_socket).unwrap();
    hog.write_all("{}\n".repeat(6000).as_bytes()).unwrap();
    wait_until("the burst to be published", || server.last_seq() >= 5000);
    for attempt in 0..5 {
        let mut refused = std::os::unix::net::UnixStream::connect(&server.unix_socket).unwrap();
        refused.set_read_timeout(Some(PATIENCE)).unwrap();
        refused.write_all(b"{\"tipo\":\"incendio\"}\n").unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        let mut answer = String::new();
        let read = refused.read_to_string(&mut answer);
        assert!(read.is_ok(), "attempt {attempt}: {read:?} after {answer:?}");
        assert_eq!(answer, "{\"ok\":false,\"error\":\"server busy: too many publisher connections\"}\n");
    }
    drop(hog);
}

#[test]
fn a_busy_503_is_counted_like_every_other_response() {
    let server = Server::start(&["--max-http-connections", "1", "--min-body-rate", "0"]);
    let mut busy = TcpStream::connect(server.addr).unwrap();
    busy.set_read_timeout(Some(PATIENCE)).unwrap();
    busy.write_all(b"POST /emergencias HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    busy.read_exact(&mut [0u8; 25]).unwrap();
    assert_eq!(server.get("/healthz").status, 503);
    busy.write_all(b"{}").unwrap();
    assert_eq!(HttpResponse::read(&mut BufReader::new(&busy)).status, 202);
    drop(busy);
    let mut page = String::new();
    wait_until("/metrics to be served", || {
        let response = server.get("/metrics");
        page = response.body;
        response.status == 200
    });
    assert!(page.contains("resq_push_http_responses_total{status=\"503\"} 1\n"), "{page}");
}
