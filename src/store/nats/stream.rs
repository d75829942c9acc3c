//! The site's streams in JetStream (`StreamSettings` names them): created by the first box that
//! finds none, bound by every other, and the stream identity kept in the stream's metadata. Both
//! deny deletes and purges, so the retained range stays contiguous.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::store::engine::StreamSettings;

/// The metadata key of the stream identity (`stream` in the welcome).
pub const IDENTITY_KEY: &str = "resq_stream_id";
/// How long JetStream remembers a `Nats-Msg-Id`: a retry within it is stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60);
/// Receipts kept per emergency of the history, at most: every tablet's delivery does not go to
/// the engine, only acks and closes, so a few dozen per emergency cover a large site.
const RECEIPTS_PER_EMERGENCY: i64 = 64;

/// The streams' configurations, as a box creates them.
trait StreamConfigs {
    /// The emergencies' stream as a box creates it, with a new identity.
    fn emergencies_config(&self, identity: &str) -> stream::Config;
    fn receipts_config(&self) -> stream::Config;
    fn common(&self) -> stream::Config;
}

impl StreamConfigs for StreamSettings {
    fn emergencies_config(&self, identity: &str) -> stream::Config {
        let metadata = HashMap::from([(IDENTITY_KEY.to_owned(), identity.to_owned())]);
        stream::Config {
            name: self.name.clone(),
            subjects: vec![self.emergencies_subject()],
            max_messages: self.max_messages.min(i64::MAX as usize) as i64,
            metadata,
            ..self.common()
        }
    }

    fn receipts_config(&self) -> stream::Config {
        let max = (self.max_messages as i64).saturating_mul(RECEIPTS_PER_EMERGENCY);
        stream::Config {
            name: self.receipts_stream(),
            subjects: vec![self.receipts_subject()],
            max_messages: max,
            ..self.common()
        }
    }

    fn common(&self) -> stream::Config {
        stream::Config {
            max_age: self.max_age,
            num_replicas: self.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            deny_delete: true,
            deny_purge: true,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            ..stream::Config::default()
        }
    }
}

/// The identity of a stream: its metadata's, or (a stream made by hand, without it) one made
/// of its name and creation time, which a recreated stream changes too.
pub fn identity_of(info: &stream::Info) -> String {
    match info.config.metadata.get(IDENTITY_KEY) {
        Some(identity) if !identity.is_empty() => identity.clone(),
        _ => format!("{}-{}", info.config.name, info.created.unix_timestamp_nanos()),
    }
}

/// Whether the stream answers with a leader (a standalone server's has no cluster part): a
/// stream without one (no quorum, or just created and not elected yet) refuses publishes,
/// though another server may still answer for its info.
pub fn leader_known(info: &stream::Info) -> bool {
    info.cluster
        .as_ref()
        .is_none_or(|cluster| cluster.leader.as_ref().is_some_and(|leader| !leader.is_empty()))
}

/// How an existing stream differs from what this box would have created (another box's flags,
/// or a stream made by hand): the stream is bound as it is, and the start-up log says so.
pub fn differences(info: &stream::Info, settings: &StreamSettings) -> Vec<String> {
    let config = &info.config;
    let mut found = Vec::new();
    if config.max_messages != settings.max_messages.min(i64::MAX as usize) as i64 {
        found.push(format!("max_msgs {} (--history {})", config.max_messages, settings.max_messages));
    }
    if config.max_age != settings.max_age {
        found.push(format!("max_age {:?} (--history-max-age {:?})", config.max_age, settings.max_age));
    }
    if !(config.deny_delete && config.deny_purge) {
        found.push("deletes or purges allowed: the retained seqs may have gaps".into());
    }
    if config.duplicate_window < DUPLICATE_WINDOW {
        found.push(format!("duplicate window {:?} (retries dedupe within it only)", config.duplicate_window));
    }
    found
}

/// Binds the emergencies' stream, creating it (with `new_identity`) if there is none, and the
/// receipts' stream likewise; returns the first and its identity. Two boxes creating it at
/// once: one wins, the other's create fails, and its next try binds the winner's.
pub async fn bind(
    context: &jetstream::Context,
    settings: &StreamSettings,
    new_identity: &str,
) -> Result<(stream::Stream, String), String> {
    let mut emergencies = context
        .get_or_create_stream(settings.emergencies_config(new_identity))
        .await
        .map_err(|e| format!("stream {}: {e}", settings.name))?;
    context
        .get_or_create_stream(settings.receipts_config())
        .await
        .map_err(|e| format!("stream {}: {e}", settings.receipts_stream()))?;
    let info = emergencies.info().await.map_err(|e| format!("stream {}: {e}", settings.name))?;
    if !leader_known(info) {
        return Err(format!("stream {}: no leader (no JetStream quorum, or not elected yet)", settings.name));
    }
    let identity = identity_of(info);
    Ok((emergencies, identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streams_keep_a_contiguous_range_and_the_identity() {
        let settings = StreamSettings {
            name: "SITE".into(),
            replicas: 3,
            max_messages: 1000,
            max_age: Duration::from_secs(3600),
        };
        let config = settings.emergencies_config("abc");
        assert_eq!(config.subjects, ["SITE.emergencias"]);
        assert_eq!(config.metadata.get(IDENTITY_KEY).map(String::as_str), Some("abc"));
        assert!(config.deny_delete && config.deny_purge);
        assert!(config.duplicate_window >= Duration::from_secs(120));
        assert_eq!((config.max_messages, config.max_age, config.num_replicas), (1000, settings.max_age, 3));
        let receipts = settings.receipts_config();
        assert_eq!(
            (receipts.name.as_str(), receipts.subjects[0].as_str()),
            ("SITE_RECEIPTS", "SITE.receipts")
        );
        assert!(receipts.deny_delete && receipts.deny_purge);
    }
}
