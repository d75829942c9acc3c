//! Idempotency keys: how a publisher's retry is recognized as the emergency it already sent.
//!
//! A publisher may name an emergency with a key. Wherever seqs are assigned (the journal for a
//! durable history, the hub in memory), the key is remembered with the emergency's seq and the
//! digest of its body for as long as the emergency is retained. A submission under a remembered
//! key is then a retry (the same body: its answer is the original seq) or a conflict (another
//! body under the same key: refused). Deciding in the same place, in the same step, as the seq is
//! assigned is what makes two submissions racing with one key end as one emergency.

use std::collections::HashMap;

use sha1::{Digest, Sha1};

use crate::core::Outcome;

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 128;

/// A publisher's name for one emergency: 1 to `MAX_KEY_BYTES` visible ASCII characters (`!` to
/// `~`; no spaces, which proxies and shells may trim or split).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Box<str>);

/// Why a text is not an idempotency key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    TooLong { bytes: usize },
    NotVisibleAscii,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Empty => write!(f, "empty; give 1 to {MAX_KEY_BYTES} visible ASCII characters"),
            KeyError::TooLong { bytes } => write!(f, "{bytes} bytes, more than {MAX_KEY_BYTES}"),
            KeyError::NotVisibleAscii => {
                f.write_str("only visible ASCII characters (! to ~), no spaces or control characters")
            }
        }
    }
}

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<IdempotencyKey, KeyError> {
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        if text.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong { bytes: text.len() });
        }
        if !text.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(KeyError::NotVisibleAscii);
        }
        Ok(IdempotencyKey(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The SHA-1 of a submission's JSON text. Not a defence against anyone: it tells a retry (the
/// same bytes) from another emergency under a reused key, in 20 bytes, and unlike std's hasher it
/// stays the same across restarts and upgrades, so it can be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyDigest(pub [u8; 20]);

impl BodyDigest {
    pub fn of(text: &str) -> BodyDigest {
        BodyDigest(Sha1::digest(text.as_bytes()).into())
    }

    /// A digest as stored; `None` if it is not 20 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<BodyDigest> {
        bytes.try_into().ok().map(BodyDigest)
    }
}

/// What identifies a keyed submission: its key, and the digest of its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    pub key: IdempotencyKey,
    pub digest: BodyDigest,
}

impl Fingerprint {
    pub fn new(key: IdempotencyKey, body: &str) -> Fingerprint {
        Fingerprint { key, digest: BodyDigest::of(body) }
    }

    /// This submission, given that seq `seq` is already stored under its key with `stored`.
    pub fn against<T>(&self, seq: u64, stored: &BodyDigest) -> Outcome<T> {
        if *stored == self.digest { Outcome::Duplicate { seq } } else { Outcome::Conflict { seq } }
    }
}

/// The keys of the in-memory history: each retained emergency's key, its seq and its digest.
/// Bounded by the history: the hub forgets a key when its emergency leaves the ring.
#[derive(Debug, Default)]
pub struct KeyIndex(HashMap<IdempotencyKey, (u64, BodyDigest)>);

impl KeyIndex {
    /// What a submission is if its key is remembered; `None` if it is new.
    pub fn recall<T>(&self, fingerprint: &Fingerprint) -> Option<Outcome<T>> {
        let (seq, digest) = self.0.get(&fingerprint.key)?;
        Some(fingerprint.against(*seq, digest))
    }

    pub fn remember(&mut self, fingerprint: Fingerprint, seq: u64) {
        self.0.insert(fingerprint.key, (seq, fingerprint.digest));
    }

    /// Forgets `key` if it still names `seq`.
    pub fn forget(&mut self, key: &IdempotencyKey, seq: u64) {
        if self.0.get(key).is_some_and(|(remembered, _)| *remembered == seq) {
            self.0.remove(key);
        }
    }
}

#[cfg(test)]
impl KeyIndex {
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_1_to_128_visible_ascii_characters() {
        for good in ["a", "550e8400-e29b-41d4-a716-446655440000", "~!#$%&'*+/=?^_`{|}", &"k".repeat(128)] {
            assert_eq!(IdempotencyKey::parse(good).map(|key| key.as_str().to_owned()), Ok(good.to_owned()));
        }
        assert_eq!(IdempotencyKey::parse(""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(&"k".repeat(129)), Err(KeyError::TooLong { bytes: 129 }));
        for bad in ["two words", " leading", "tab\there", "new\nline", "caf\u{e9}", "nul\0", "del\x7f"] {
            assert_eq!(IdempotencyKey::parse(bad), Err(KeyError::NotVisibleAscii), "{bad:?}");
        }
        let message = KeyError::TooLong { bytes: 129 }.to_string();
        assert_eq!(message, "129 bytes, more than 128");
    }

    #[test]
    fn the_same_body_is_a_duplicate_and_another_is_a_conflict() {
        let key = || IdempotencyKey::parse("k").unwrap();
        let mut index = KeyIndex::default();
        assert_eq!(index.recall::<()>(&Fingerprint::new(key(), "{}")), None);
        index.remember(Fingerprint::new(key(), "{}"), 7);
        assert_eq!(index.recall::<()>(&Fingerprint::new(key(), "{}")), Some(Outcome::Duplicate { seq: 7 }));
        assert_eq!(index.recall::<()>(&Fingerprint::new(key(), "{ }")), Some(Outcome::Conflict { seq: 7 }));
        index.forget(&key(), 6);
        assert_eq!(index.len(), 1, "a key is forgotten only with its own seq");
        index.forget(&key(), 7);
        assert_eq!(index.recall::<()>(&Fingerprint::new(key(), "{}")), None);
    }

    #[test]
    fn a_stored_digest_must_be_20_bytes() {
        let digest = BodyDigest::of("{}");
        assert_eq!(BodyDigest::from_slice(&digest.0), Some(digest));
        assert_eq!(BodyDigest::from_slice(&digest.0[..19]), None);
    }
}
