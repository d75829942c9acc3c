//! The quorum proof behind `/healthz`'s engine state (`EngineStatus::stream_ok`).
//!
//! Only a write the engine commits proves that the stream's servers have a quorum: an answer
//! naming a leader does not (right after two of three servers die, the survivor can still name
//! a leader that is gone). So `stream_ok` is set only by a committed write, a publish's ack or,
//! while it is false, this probe: a put of the key `health.<box>` in the claims bucket, which
//! has the stream's replicas and keeps one value per key. Anything that fails clears it: a
//! disconnect, a failed bind or check of the stream, a publish without its ack.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};

use super::{SharedStatus, claims};
use crate::store::engine::{EngineSettings, unix_millis};

/// How often the probe runs while the quorum is not proven; it does not run while it is.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Proves the quorum again whenever it is not proven, for as long as the thread runs.
pub async fn prove_whenever_lost(
    context: jetstream::Context,
    settings: EngineSettings,
    status: Arc<SharedStatus>,
) {
    let key = format!("health.{}", settings.box_name);
    let mut bucket: Option<kv::Store> = None;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let wanted = {
            let status = status.lock();
            status.connected && status.stream_id.is_some() && !status.stream_ok
        };
        if !wanted {
            continue;
        }
        let store = match bucket.take() {
            Some(store) => store,
            None => match claims::bucket(&context, &settings.stream).await {
                Ok(store) => store,
                Err(_) => continue,
            },
        };
        let written = store.put(&key, unix_millis(SystemTime::now()).to_string().into()).await;
        bucket = Some(store);
        if written.is_ok() {
            status.update(|status| status.stream_ok = true);
        }
    }
}
