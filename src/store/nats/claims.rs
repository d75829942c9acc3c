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
//! The bucket also holds one key per box, `health.<box>`: its last quorum proof (`quorum`).

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};

use crate::store::engine::{Claim, StreamSettings, unix_millis};

/// What a box adds to `--escalation-time-limit` for a claim's lease: starting the command,
/// writing `done`, and clocks a little apart.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// The claims' bucket, created (or brought to this configuration) once per box, with the
/// replicas of the stream. Its stream is made here rather than by `create_key_value`, which
/// always allows direct gets: a direct get may be answered by a replica that has not applied the
/// write just made (or, on a bucket just created, by none: "503 no responders"), whereas a
/// claim must be read from the leader, which has applied every write it acked.
pub async fn bucket(context: &jetstream::Context, settings: &StreamSettings) -> Result<kv::Store, String> {
    let name = settings.escalations_bucket();
    let config = jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age: settings.max_age,
        num_replicas: settings.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: false,
        discard: jetstream::stream::DiscardPolicy::New,
        ..jetstream::stream::Config::default()
    };
    context.create_or_update_stream(config).await.map_err(|e| format!("bucket {name}: {e}"))?;
    context.get_key_value(&name).await.map_err(|e| format!("bucket {name}: {e}"))
}

/// Tries to claim `key` for `box_name` for `lease`. An error means that nothing is known (the
/// engine did not answer): ask again later, never run it on that account.
pub async fn claim(store: &kv::Store, key: &str, box_name: &str, lease: Duration) -> Result<Claim, String> {
    let now = SystemTime::now();
    let value = format!("claimed {box_name} {}", unix_millis(now + lease));
    // An update expecting revision 0 is a create that only one box wins; `kv::Store::create`
    // would read the key itself on losing and report a failed read as its error.
    match store.update(key, value.clone().into(), 0).await {
        Ok(_) => return Ok(Claim::Won),
        Err(e) if lost_race(&e) => {}
        Err(e) => return Err(format!("claim {key}: {e}")),
    }
    let entry = store.entry(key).await.map_err(|e| format!("read claim {key}: {e}"))?;
    let Some(entry) = entry else { return Err(format!("claim {key} exists but cannot be read yet")) };
    match parse(&String::from_utf8_lossy(&entry.value)) {
        Held::Done => Ok(Claim::Done),
        // Its own claim, whose answer was lost (a timeout after the engine stored it).
        Held::By(holder, until) if holder == box_name && until > now => Ok(Claim::Won),
        Held::By(_, until) if until > now => Ok(Claim::Held { until }),
        Held::By(..) => match store.update(key, value.into(), entry.revision).await {
            Ok(_) => Ok(Claim::Won),
            Err(e) if lost_race(&e) => Ok(Claim::Held { until: now + lease }),
            Err(e) => Err(format!("take over claim {key}: {e}")),
        },
    }
}

/// Whether an update failed because the key's revision was not the one expected: another box
/// wrote it first.
fn lost_race(error: &kv::UpdateError) -> bool {
    error.kind() == kv::UpdateErrorKind::WrongLastRevision
        || error.to_string().contains("wrong last sequence")
}

/// Marks `key`'s command as run: no box runs it again.
pub async fn done(store: &kv::Store, key: &str, box_name: &str) -> Result<(), String> {
    store.put(key, format!("done {box_name}").into()).await.map(|_| ()).map_err(|e| e.to_string())
}

/// What a claim's value says.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    Done,
    /// Claimed by that box until then; a value that cannot be read is a claim already over.
    By(String, SystemTime),
}

fn parse(value: &str) -> Held {
    let mut words = value.split_whitespace();
    let (kind, holder) = (words.next(), words.next());
    match (kind, holder, words.next().and_then(|until| until.parse::<u64>().ok())) {
        (Some("done"), ..) => Held::Done,
        (Some("claimed"), Some(holder), Some(until)) => {
            Held::By(holder.to_owned(), SystemTime::UNIX_EPOCH + Duration::from_millis(until))
        }
        _ => Held::By(String::new(), SystemTime::UNIX_EPOCH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_says_who_holds_it_until_when_or_that_it_is_done() {
        let until = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
        assert_eq!(parse("claimed box-a 1764000000000"), Held::By("box-a".into(), until));
        assert_eq!(parse("done box-a"), Held::Done);
        assert_eq!(parse("garbage"), Held::By(String::new(), SystemTime::UNIX_EPOCH));
    }
}
