//! An emergency as a publisher submits it: `ingest::parse_emergency` and `parse_submission`, the
//! idempotency key taken from the `"idempotency_key"` member or from an `Idempotency-Key` header.
//!
//! An input `K<key>\n<body>` submits `<body>` with that header; any other input is the body alone.
//! Checks, besides not panicking: what is accepted is the body itself, without the whitespace
//! around it, and a JSON object; a body one byte over the limit is refused as too large; a key
//! taken is a valid key, is the header's when there is one, and is the member's string when the
//! object has one (serde_json's `Value` read of the same text says what the member is); and, once
//! the server refuses what is not strict JSON (a lone surrogate, a number beyond f64), everything
//! accepted also reads as a `Value`. That last check turns itself on when `{"a":"\ud800"}` and
//! `{"a":1e400}` are refused; `RESQ_FUZZ_STRICT_JSON=1` (or `0`) forces it on (or off).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use resq_push::fuzz_api::{KEY_MEMBER, Rejection, is_valid_key, parse_emergency, parse_submission};
use serde_json::Value;

/// `--max-body-bytes` by default.
const MAX_BODY: usize = 65536;

fn strict_json() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| {
        let strict = match std::env::var("RESQ_FUZZ_STRICT_JSON").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => {
                parse_emergency(br#"{"a":"\ud800"}"#, MAX_BODY).is_err()
                    && parse_emergency(br#"{"a":1e400}"#, MAX_BODY).is_err()
            }
        };
        eprintln!("emergency: the strict JSON check is {}", if strict { "on" } else { "off" });
        strict
    })
}

fn is_json_space(byte: &u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.strip_prefix(b"K") {
        Some(rest) => match rest.iter().position(|&b| b == b'\n') {
            Some(at) => (std::str::from_utf8(&rest[..at]).ok(), &rest[at + 1..]),
            None => (None, data),
        },
        None => (None, data),
    };
    if !body.is_empty() {
        assert!(matches!(parse_emergency(body, body.len() - 1), Err(Rejection::TooLarge { .. })));
    }
    let accepted = parse_emergency(body, MAX_BODY);
    let value = match accepted {
        Ok(text) => {
            let start = body.iter().position(|b| !is_json_space(b)).unwrap_or(body.len());
            let end = body.iter().rposition(|b| !is_json_space(b)).map_or(start, |at| at + 1);
            assert_eq!(text.as_bytes(), &body[start..end], "accepted text is not the body");
            assert!(text.starts_with('{') && text.ends_with('}'), "accepted a non-object: {text}");
            let value = serde_json::from_str::<Value>(text);
            if strict_json() {
                assert!(value.is_ok(), "accepted what is not strict JSON: {text}: {:?}", value.err());
            }
            value.ok()
        }
        Err(_) => None,
    };
    let submitted = parse_submission(body, MAX_BODY, header);
    match (&accepted, &submitted) {
        (Ok(text), Ok((data, key))) => {
            assert_eq!(text, data);
            if let Some(key) = key {
                assert!(is_valid_key(key), "key {key:?}");
            }
            if let Some(header) = header {
                assert_eq!(key.as_deref(), Some(header), "the header's key is not the one taken");
            }
            let member = value.as_ref().and_then(|value| value.get(KEY_MEMBER));
            match member {
                Some(Value::String(member)) => assert_eq!(key.as_deref(), Some(member.as_str())),
                Some(other) => panic!("a submission with {KEY_MEMBER} = {other} was taken"),
                None if value.is_some() && header.is_none() => assert_eq!(key, &None),
                None => {}
            }
        }
        (Ok(_), Err(rejection)) => {
            let key_related = matches!(rejection, Rejection::InvalidKey(_) | Rejection::KeyMismatch);
            assert!(key_related, "parse_emergency took it, parse_submission refused it: {rejection:?}");
        }
        (Err(refused), Ok(_)) => {
            panic!("parse_emergency refused it ({refused:?}), parse_submission took it")
        }
        (Err(_), Err(_)) => {}
    }
});
