//! What strict JSON parsers refuse that serde_json lets through as a `RawValue`, which it checks
//! for syntax without decoding: a `\u` escape of half a surrogate pair (not a character, so
//! a browser's `JSON.parse` makes a broken string of it and Python's `json` or Go's refuses it),
//! and a number beyond a double (`1e400`, infinity to JavaScript). One pass over text serde_json
//! has already parsed, which is kept byte for byte: nothing is decoded or re-encoded.

/// Why a JSON text is not strict JSON; `at` is the byte offset of the problem in the text.
#[derive(Debug, PartialEq, Eq)]
pub enum NotStrict<'a> {
    LoneSurrogate { escape: &'a str, at: usize },
    NumberOutOfRange { number: &'a str, at: usize },
}

/// Checks a text that is already valid JSON: every surrogate escape is one half of a pair, in
/// order, and every number is a finite double.
pub fn check(text: &str) -> Result<(), NotStrict<'_>> {
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        at = match byte {
            b'"' => check_string(text, at + 1)?,
            b'-' | b'0'..=b'9' => check_number(text, at)?,
            _ => at + 1,
        };
    }
    Ok(())
}

/// Checks a string from just after its opening quote; returns the offset after its closing one.
fn check_string(text: &str, mut at: usize) -> Result<usize, NotStrict<'_>> {
    let bytes = text.as_bytes();
    while let Some(&byte) = bytes.get(at) {
        at = match (byte, bytes.get(at + 1)) {
            (b'"', _) => return Ok(at + 1),
            (b'\\', Some(b'u')) => check_unicode_escape(text, at)?,
            (b'\\', _) => at + 2,
            _ => at + 1,
        };
    }
    Ok(at)
}

/// Checks the `\uXXXX` at `at`, and the one after it if it begins a surrogate pair; returns the
/// offset after them.
fn check_unicode_escape(text: &str, at: usize) -> Result<usize, NotStrict<'_>> {
    let lone = || NotStrict::LoneSurrogate { escape: text.get(at..at + 6).unwrap_or_default(), at };
    match code_unit(text, at) {
        Some(0xD800..=0xDBFF) => match code_unit(text, at + 6) {
            Some(0xDC00..=0xDFFF) => Ok(at + 12),
            _ => Err(lone()),
        },
        Some(0xDC00..=0xDFFF) => Err(lone()),
        _ => Ok(at + 6),
    }
}

/// The UTF-16 code unit of a `\uXXXX` escape at `at`, if there is one.
fn code_unit(text: &str, at: usize) -> Option<u16> {
    let escape = text.get(at..at + 6)?.strip_prefix("\\u")?;
    u16::from_str_radix(escape, 16).ok()
}

/// Checks the number at `at`; returns the offset after it.
fn check_number(text: &str, at: usize) -> Result<usize, NotStrict<'_>> {
    let length = text
        .as_bytes()
        .get(at..)
        .unwrap_or_default()
        .iter()
        .take_while(|byte| matches!(byte, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .count();
    let number = text.get(at..at + length).unwrap_or_default();
    // JSON's numbers are a subset of what `f64` parses; beyond its range it gives infinity.
    match number.parse::<f64>() {
        Ok(value) if value.is_infinite() => Err(NotStrict::NumberOutOfRange { number, at }),
        _ => Ok(at + length.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surrogates_must_come_in_pairs() {
        assert_eq!(check(r#"["\ud83d\ude00","\uD83D\uDE00","\u00e9"]"#), Ok(()));
        assert_eq!(check(r#"["\\ud800","\\\\","\""]"#), Ok(()), "escaped backslashes are not escapes");
        let lone = |text| match check(text) {
            Err(NotStrict::LoneSurrogate { escape, at }) => (escape, at),
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(lone(r#"["\ud800"]"#), (r"\ud800", 2));
        assert_eq!(lone(r#"["\ude00\ud83d"]"#), (r"\ude00", 2));
        assert_eq!(lone(r#"["\ud83d\u0041"]"#), (r"\ud83d", 2));
        assert_eq!(lone(r#"["ok","\"\ud83d"]"#), (r"\ud83d", 9));
    }

    #[test]
    fn numbers_must_fit_a_double() {
        assert_eq!(check(r#"[0,-0.0,1e308,1e-400,5E-3,123456789012345678901234567890]"#), Ok(()));
        assert_eq!(check(r#"{"1e400":"1e400"}"#), Ok(()), "text is not a number");
        assert_eq!(check("[1,2e999]"), Err(NotStrict::NumberOutOfRange { number: "2e999", at: 3 }));
        let digits = format!("[{}]", "9".repeat(400));
        assert!(matches!(check(&digits), Err(NotStrict::NumberOutOfRange { at: 1, .. })));
    }
}
