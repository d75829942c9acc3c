//! HTTP requests as a connection reads them: `parse_head` on what has arrived, then what the
//! routes read from the head (Content-Length, Idempotency-Key, `?since=`, the forwarded client),
//! a POST's body taken from the same buffer, and the next pipelined request after it, as
//! `HttpConnection` and `http::routes` do.
//!
//! Checks, besides not panicking: a complete head fits in the buffer and the limit, and every
//! shorter prefix of it is incomplete (the server parses again after each read, wherever TCP split
//! the bytes); an incomplete head is under the limit; a smaller limit refuses exactly the heads
//! longer than it; the path holds no `?`; a body is announced exactly when Content-Length says so
//! (or Transfer-Encoding is there); a checked header key is the one header the request has.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use resq_push::fuzz_api::{
    HeadError, IdempotencyKey, IpBlock, Request, Resume, client_address, content_length, idempotency_key,
    parse_head, parse_resume, parse_submission, percent_decode,
};

/// `--max-head-bytes` and `--max-body-bytes` by default, and the smallest `--max-head-bytes`.
const MAX_HEAD: usize = 8192;
const MAX_BODY: usize = 65536;
const MIN_HEAD: usize = 256;
/// Requests read from one input, at most.
const MAX_REQUESTS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let trusted = [IpBlock::parse("127.0.0.0/8").unwrap(), IpBlock::parse("::1").unwrap()];
    let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, 40000));
    let stranger = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 7), 40000));
    let mut rest = data;
    for _ in 0..MAX_REQUESTS {
        let Some((request, head_len)) = read_head(rest) else { return };
        rest = &rest[head_len..];
        check_request(&request, &trusted, proxy, stranger);
        // The body: only a POST's is read (`routes::publish`); any other request that announces
        // one ends the connection after its answer (`HttpConnection::can_continue`).
        if request.method == "POST" {
            if request.header("transfer-encoding").is_some() {
                return; // 411, and the connection closes
            }
            let length = match content_length(&request) {
                Ok(Some(length)) => length,
                Ok(None) => {
                    assert!(!request.declares_body(), "a body announced without a length");
                    0
                }
                Err(_) => return, // 400
            };
            if length > MAX_BODY || rest.len() < length {
                return; // 413, or the body never comes
            }
            let (body, after) = rest.split_at(length);
            rest = after;
            if let Ok(header) = idempotency_key(&request) {
                let _ = parse_submission(body, MAX_BODY, header);
            }
        } else if request.declares_body() {
            return;
        }
        if !request.keep_alive() {
            return;
        }
    }
});

/// What `HttpConnection::read_head` gets from the bytes so far: a request and its head's length,
/// or `None` when it would wait for more or answer an error.
fn read_head(buffer: &[u8]) -> Option<(Request, usize)> {
    let parsed = parse_head(buffer, MAX_HEAD);
    let small = parse_head(buffer, MIN_HEAD);
    match &parsed {
        Ok(Some((_, len))) if *len <= MIN_HEAD => {
            assert!(
                matches!(small, Ok(Some((_, small_len))) if small_len == *len),
                "the limit changed a head"
            )
        }
        Ok(Some(_)) => assert!(matches!(small, Err(HeadError::TooLarge)), "a head over the limit taken"),
        Ok(None) if buffer.len() >= MIN_HEAD => assert!(matches!(small, Err(HeadError::TooLarge))),
        _ => {}
    }
    match parsed {
        Ok(Some((request, len))) => {
            assert!(len > 0 && len <= buffer.len() && len <= MAX_HEAD, "head length {len}");
            let step = (len / 16).max(1);
            for cut in (0..len).step_by(step).chain([len - 1]) {
                assert!(
                    matches!(parse_head(&buffer[..cut], MAX_HEAD), Ok(None)),
                    "a prefix of {cut} of a {len}-byte head is not incomplete"
                );
            }
            Some((request, len))
        }
        Ok(None) => {
            assert!(buffer.len() < MAX_HEAD, "an incomplete head of {} bytes", buffer.len());
            None
        }
        Err(HeadError::TooLarge | HeadError::TooManyHeaders | HeadError::Malformed(_)) => None,
        Err(other) => panic!("parse_head cannot fail with {other:?}"),
    }
}

fn check_request(request: &Request, trusted: &[IpBlock], proxy: SocketAddr, stranger: SocketAddr) {
    assert!(!request.path.contains('?'), "path {:?}", request.path);
    assert!(request.minor_version <= 1);
    if request.header_has_token("connection", "close") {
        assert!(!request.keep_alive());
    }
    match content_length(request) {
        Ok(Some(length)) => {
            assert!(request.declares_body() || length == 0 || request.header("transfer-encoding").is_some());
            for value in request.headers("content-length") {
                assert_eq!(value.trim().parse::<usize>().ok(), Some(length), "Content-Length {value:?}");
            }
        }
        Ok(None) => assert!(request.header("content-length").is_none()),
        Err(_) => assert!(request.header("content-length").is_some()),
    }
    if let Ok(Some(key)) = idempotency_key(request) {
        assert!(IdempotencyKey::parse(key.as_str()).is_ok());
        assert_eq!(request.headers("idempotency-key").collect::<Vec<_>>(), [key.as_str()]);
    }
    if let Some(query) = &request.query {
        for pair in query.split('&') {
            let value = pair.split_once('=').map_or("", |(_, value)| value);
            if let Some(decoded) = percent_decode(value) {
                assert!(decoded.len() <= value.len());
            }
        }
    }
    match parse_resume(request, proxy) {
        Ok(Some(Resume { since, stream })) => {
            assert_eq!(request.query_param("since").and_then(|text| text.parse().ok()), Some(since));
            assert_eq!(stream.as_deref(), request.query_param("stream"));
        }
        Ok(None) => assert!(request.query_param("since").is_none()),
        Err(refusal) => assert_eq!(refusal.status.code, 400),
    }
    // A peer that is not a trusted proxy is always the client; a trusted one names a client or
    // stays the client itself.
    assert_eq!(client_address(trusted, stranger, request), stranger);
    let client = client_address(trusted, proxy, request);
    let forwarded = request.header("x-forwarded-for").is_some() || request.header("forwarded").is_some();
    if !forwarded {
        assert_eq!(client, proxy);
    }
    if client != proxy && client.ip() != IpAddr::from(Ipv4Addr::LOCALHOST) {
        assert!(forwarded);
    }
}
