//! Escalation claims (`--on-unacked` in cluster mode): a JetStream KV bucket `<NAME>_ESCALATIONS`
//! where the box that runs an emergency's command says so, so that one box runs it, not every
//! box.
//!
//! Every box tracks every deadline; at the deadline each tries to `create` the key
//! `<stream id>.<seq>`, which only one wins (the engine orders the creates). The winner's value
//! is `claimed <box> <until, Unix ms>`, the lease: `--escalation-time-limit` plus a margin. A box
//! that finds a live claim tries again once the lease is over; a claim past its lease is taken
//! over by compare-and-set on its revision (again one winner), so a command whose box died
//! mid-run runs on another. Once the command has ended its box writes `done <box>`, and nobody
//! runs it again. The lease is read against each box's wall clock: keep the boxes on NTP.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};

use crate::store::engine::{Claim, StreamSettings, unix_millis};

/// What a box adds to `--escalation-time-limit` for a claim's lease: starting the command,
/// writing `done`, and clocks a little apart.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// The claims' bucket, bound or created (by the first box to need it).
pub async fn bucket(context: &jetstream::Context, settings: &StreamSettings) -> Result<kv::Store, String> {
    let name = settings.escalations_bucket();
    if let Ok(store) = context.get_key_value(&name).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: name.clone(),
        history: 1,
        max_age: settings.max_age,
        num_replicas: settings.replicas,
        ..kv::Config::default()
    };
    match context.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Created by another box meanwhile.
        Err(_) => context.get_key_value(&name).await.map_err(|e| format!("bucket {name}: {e}")),
    }
}

/// Tries to claim `key` for `box_name` for `lease`.
pub async fn claim(store: &kv::Store, key: &str, box_name: &str, lease: Duration) -> Result<Claim, String> {
    let now = SystemTime::now();
    let value = format!("claimed {box_name} {}", unix_millis(now + lease));
    match store.create(key, value.clone().into()).await {
        Ok(_) => return Ok(Claim::Won),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.to_string()),
    }
    let Some(entry) = store.entry(key).await.map_err(|e| e.to_string())? else {
        // Deleted in between: the next try creates it.
        return Ok(Claim::Held { until: now });
    };
    match parse(&String::from_utf8_lossy(&entry.value)) {
        Held::Done => Ok(Claim::Done),
        Held::Until(until) if until > now => Ok(Claim::Held { until }),
        Held::Until(_) => match store.update(key, value.into(), entry.revision).await {
            Ok(_) => Ok(Claim::Won),
            Err(_) => Ok(Claim::Held { until: now + lease }),
        },
    }
}

/// Marks `key`'s command as run: no box runs it again.
pub async fn done(store: &kv::Store, key: &str, box_name: &str) -> Result<(), String> {
    store.put(key, format!("done {box_name}").into()).await.map(|_| ()).map_err(|e| e.to_string())
}

/// What a claim's value says.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    Done,
    /// Claimed until then; a value that cannot be read is a claim already over.
    Until(SystemTime),
}

fn parse(value: &str) -> Held {
    let mut words = value.split_whitespace();
    match (words.next(), words.nth(1).and_then(|until| until.parse::<u64>().ok())) {
        (Some("done"), _) => Held::Done,
        (Some("claimed"), Some(until)) => Held::Until(SystemTime::UNIX_EPOCH + Duration::from_millis(until)),
        _ => Held::Until(SystemTime::UNIX_EPOCH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_says_who_holds_it_until_when_or_that_it_is_done() {
        let until = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
        assert_eq!(parse("claimed box-a 1764000000000"), Held::Until(until));
        assert_eq!(parse("done box-a"), Held::Done);
        assert_eq!(parse("garbage"), Held::Until(SystemTime::UNIX_EPOCH));
    }
}
