//! An emergency as a publisher submits it: `ingest::parse_emergency` and `parse_submission`, the
//! idempotency key taken from the `"idempotency_key"` member or from an `Idempotency-Key` header.
//!
//! An input `K<key>\n<body>` submits `<body>` with that header; any other input is the body alone.
//! Checks, besides not panicking: what is accepted is the body itself, without the whitespace
//! around it, and a JSON object that strict parsers read too (no lone surrogate, no number beyond
//! a double: `Strict` below reads every string and number as serde_json's `Value` would, but
//! without `Value`'s own rule that an object keyed `$serde_json::private::RawValue` is one of
//! serde_json's raw values, which is valid JSON to every other parser); a body one byte over the limit is refused as too large;
//! a key taken is a valid key, is the header's when there is one, and is the member's string when
//! the object has one (the `Value` read of the same text says what the member is); and what is
//! stored (`owned_submission`, without a copy when no whitespace is around the object) is that
//! same text under that same key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use resq_push::fuzz_api::{
    IdempotencyKey, KEY_MEMBER, Rejection, owned_submission, parse_emergency, parse_submission,
};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// `--max-body-bytes` by default.
const MAX_BODY: usize = 65536;

/// Any JSON value, read through: strings decoded (a lone surrogate is an error), numbers as
/// `u64`, `i64` or a finite `f64` (one beyond a double is an error), object keys as strings.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E: serde::de::Error>(self, number: f64) -> Result<Strict, E> {
        if number.is_finite() { Ok(Strict) } else { Err(E::custom("a number beyond a double")) }
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        while map.next_key::<String>()?.is_some() {
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
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
    let accepted = parse_emergency(body, MAX_BODY).map(|raw| raw.get());
    let value = match accepted {
        Ok(text) => {
            let start = body.iter().position(|b| !is_json_space(b)).unwrap_or(body.len());
            let end = body.iter().rposition(|b| !is_json_space(b)).map_or(start, |at| at + 1);
            assert_eq!(text.as_bytes(), &body[start..end], "accepted text is not the body");
            assert!(text.starts_with('{') && text.ends_with('}'), "accepted a non-object: {text}");
            let strict = serde_json::from_str::<Strict>(text);
            assert!(strict.is_ok(), "accepted what is not strict JSON: {text}: {:?}", strict.err());
            let value = serde_json::from_str::<Value>(text);
            if let Err(error) = &value {
                assert!(text.contains("$serde_json::private::"), "not a Value: {text}: {error}");
            }
            value.ok()
        }
        Err(_) => None,
    };
    // An invalid header is refused before the body is read (`http::routes`).
    let Ok(header_key) = header.map(IdempotencyKey::parse).transpose() else { return };
    let submitted = parse_submission(body, MAX_BODY, header_key.clone()).map(|submission| {
        (submission.data.get(), submission.fingerprint.map(|fingerprint| fingerprint.key.as_str().to_owned()))
    });
    check_stored(body, header_key, &submitted);
    match (&accepted, &submitted) {
        (Ok(text), Ok((data, key))) => {
            assert_eq!(text, data);
            if let Some(key) = key {
                assert!(IdempotencyKey::parse(key).is_ok(), "key {key:?}");
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

/// What `Publisher::stage` stores: the submission's text and key, whether or not it is copied.
fn check_stored(
    body: &[u8],
    header: Option<IdempotencyKey>,
    submitted: &Result<(&str, Option<String>), Rejection>,
) {
    let stored = owned_submission(body.to_vec(), MAX_BODY, header);
    match (submitted, stored) {
        (Ok((text, key)), Ok((data, fingerprint))) => {
            assert_eq!(*text, data.get(), "stored text differs from the submission");
            let stored_key = fingerprint.map(|fingerprint| fingerprint.key.as_str().to_owned());
            assert_eq!(key, &stored_key, "stored under another key");
        }
        (Err(_), Err(_)) => {}
        (submitted, stored) => panic!("submission {submitted:?}, stored {:?}", stored.map(|(data, _)| data)),
    }
}
