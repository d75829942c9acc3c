//! Holding up under abuse: connections that send their request too slowly must not lock tablets
//! and health checks out.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Client, HttpResponse, PATIENCE, Server, wait_until};

/// A POST whose head the server has read (its `100 Continue` says so) and whose body then
/// trickles: one byte of the 1000 it announced.
fn trickling_body(server: &Server) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(
            b"POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
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
