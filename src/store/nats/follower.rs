//! The follower: each box reads the emergencies' stream in order, from the seq after the one
//! its cache holds, into the journal (`Cacher`), whose commits reach the hub by the path local
//! commits take (so every limit and fairness rule holds). A stream recreated under the same
//! name has another identity: the cache is emptied and the box follows the new one from seq 1.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::{self, stream::Stream};
use futures_util::{FutureExt, StreamExt};
use log::{info, warn};

use super::SharedStatus;
use super::stream;
use crate::core::Stored;
use crate::core::receipts::ReceiptEvent;
use crate::store::engine::{self, EngineSettings, Follow, RECEIVED_AT, SOURCE, StreamSettings};
use crate::store::journal::{Cacher, new_stream_id};

/// Emergencies taken from the stream into one cache transaction, at most.
pub const FOLLOW_BATCH: usize = 256;
/// How often the follower checks that the stream is still the one it follows (same identity,
/// seqs not gone back) and that its consumer still delivers: a stream that holds seqs the
/// follower has not had at two checks in a row is read again from a new consumer (after a NATS
/// server restart, an ordered consumer took some 15 s to notice it was gone).
const STREAM_CHECK: Duration = Duration::from_millis(500);
/// Longest a receipt waits for its emergency to be followed before it is applied anyway (and
/// then changes nothing if the emergency never comes).
const RECEIPT_WAIT: Duration = Duration::from_secs(10);
/// Wait between attempts to bind or follow the stream while it fails.
const RETRY: Duration = Duration::from_millis(500);

/// Why following one binding of the stream ended.
enum Ended {
    /// The storage thread is gone: the server is stopping.
    CacheGone,
    /// Reconnected to NATS: bind again at once, nothing failed.
    Reconnected,
    /// The stream must be bound again: it failed, vanished, or is another stream now.
    Rebind(String),
}

/// Binds the stream at start, retrying until `--nats-timeout`: its identity, or `None` if the
/// engine did not answer in time.
pub async fn bind_at_start(
    context: &jetstream::Context,
    settings: &EngineSettings,
    status: &Arc<SharedStatus>,
) -> Option<String> {
    let attempts = async {
        loop {
            match stream::bind(context, &settings.stream, &new_stream_id()).await {
                Ok((bound, identity)) => {
                    for difference in stream::differences(bound.cached_info(), &settings.stream) {
                        warn!(
                            "engine: stream {} has {difference}; it is used as it is",
                            settings.stream.name
                        );
                    }
                    return identity;
                }
                Err(e) => {
                    status.update(|status| status.last_error = Some(e));
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    };
    let identity = tokio::time::timeout(settings.timeout, attempts).await.ok();
    match &identity {
        Some(identity) => info!("engine: stream {} bound, identity {identity}", settings.stream.name),
        None => warn!(
            "engine: stream {} not bound within {:?}: starting on the cache, publishes refused until it is",
            settings.stream.name, settings.timeout
        ),
    }
    identity
}

/// Follows the stream for as long as the cache is there, binding it again whenever it fails.
pub async fn run(
    context: jetstream::Context,
    settings: StreamSettings,
    follow: Follow,
    status: Arc<SharedStatus>,
) {
    let Follow { cacher, mut stream_id, mut last_seq } = follow;
    // The connection made at start is no reconnect.
    let _ = status.reconnected.1.try_recv();
    status.update(|status| status.last_seq = last_seq);
    loop {
        let (bound, identity) = match stream::bind(&context, &settings, &new_stream_id()).await {
            Ok(bound) => bound,
            Err(e) => {
                status.update(|status| {
                    status.stream_ok = false;
                    status.last_error = Some(e);
                });
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if identity != stream_id {
            info!(
                "engine: stream {} is now {identity} (the cache held {stream_id}): the cache starts over, \
                 tablets are told stream_changed",
                settings.name
            );
            if !cacher.reset(identity.clone()).await {
                return;
            }
            (stream_id, last_seq) = (identity.clone(), 0);
            status.update(|status| status.last_seq = 0);
        }
        status.update(|status| {
            status.stream_id = Some(identity.clone());
            status.last_error = None;
        });
        match follow_binding(&bound, &settings, &cacher, &mut last_seq, &identity, &status).await {
            Ended::CacheGone => return,
            Ended::Reconnected => {}
            Ended::Rebind(reason) => {
                super::note_throttled(&format!("engine: following stream {} again: {reason}", settings.name));
                status.update(|status| {
                    status.stream_ok = false;
                    status.last_error = Some(reason);
                });
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// An ordered consumer of `subject` in `bound`, from the seq after `last_seq`.
async fn read_after(bound: &Stream, subject: String, last_seq: u64) -> Result<Ordered, Ended> {
    let deliver_policy = match last_seq {
        0 => DeliverPolicy::All,
        last => DeliverPolicy::ByStartSequence { start_sequence: last + 1 },
    };
    let config = OrderedConfig { filter_subject: subject, deliver_policy, ..Default::default() };
    let consumer = bound
        .create_consumer(config)
        .await
        .map_err(|e| Ended::Rebind(format!("cannot create its consumer: {e}")))?;
    consumer.messages().await.map_err(|e| Ended::Rebind(format!("cannot read it: {e}")))
}

/// Reads one binding of the stream into the cache, checking meanwhile that it stays the same
/// stream.
async fn follow_binding(
    bound: &Stream,
    settings: &StreamSettings,
    cacher: &Cacher,
    last_seq: &mut u64,
    identity: &str,
    status: &SharedStatus,
) -> Ended {
    let mut messages = match read_after(bound, settings.emergencies_subject(), *last_seq).await {
        Ok(messages) => messages,
        Err(ended) => return ended,
    };
    let mut checks = tokio::time::interval(STREAM_CHECK);
    // The seq the follower was at when a check last found the stream ahead of it.
    let mut behind_at = None;
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = {
            let tick = std::pin::pin!(checks.tick());
            let reconnect = std::pin::pin!(status.reconnect());
            let check = futures_util::future::select(tick, reconnect);
            match futures_util::future::select(messages.next(), check).await {
                futures_util::future::Either::Left((next, _)) => Some(next),
                futures_util::future::Either::Right((futures_util::future::Either::Left(_), _)) => None,
                futures_util::future::Either::Right((futures_util::future::Either::Right(_), _)) => {
                    return Ended::Reconnected;
                }
            }
        };
        let first = match next {
            Some(Some(Ok(message))) => message,
            Some(Some(Err(e))) => return Ended::Rebind(e.to_string()),
            Some(None) => return Ended::Rebind("its consumer ended".into()),
            None => match still_the_same(bound, identity, *last_seq).await {
                Ok(stream_last) if stream_last <= *last_seq => {
                    behind_at = None;
                    continue;
                }
                Ok(stream_last) if behind_at == Some(*last_seq) => {
                    return Ended::Rebind(format!(
                        "its consumer stalled at seq {last_seq}, the stream is at {stream_last}"
                    ));
                }
                Ok(_) => {
                    behind_at = Some(*last_seq);
                    continue;
                }
                Err(reason) => return Ended::Rebind(reason),
            },
        };
        let mut batch = Vec::new();
        let mut message = Some(first);
        while let Some(taken) = message.take() {
            match stored(&taken) {
                Some(stored) if stored.seq > *last_seq => batch.push(stored),
                Some(_) => {}
                None => return Ended::Rebind("a message without its stream sequence".into()),
            }
            if batch.len() < FOLLOW_BATCH
                && let Some(Some(Ok(next))) = messages.next().now_or_never()
            {
                message = Some(next);
            }
        }
        let Some(newest) = batch.last().map(|stored| stored.seq) else { continue };
        if batch[0].seq > *last_seq + 1 && *last_seq > 0 {
            warn!(
                "engine: seqs {} to {} are no longer in the stream (its retention): this box never had them",
                *last_seq + 1,
                batch[0].seq - 1
            );
        }
        if !cacher.cache(batch).await {
            return Ended::CacheGone;
        }
        *last_seq = newest;
        status.update(|status| status.last_seq = newest);
    }
}

/// The stream bound is still there with the same identity, and its seqs have not gone back:
/// its last seq.
async fn still_the_same(bound: &Stream, identity: &str, last_seq: u64) -> Result<u64, String> {
    let info = bound.get_info().await.map_err(|e| format!("its info: {e}"))?;
    if !stream::leader_known(&info) {
        return Err("it has no leader (no JetStream quorum)".into());
    }
    let now = stream::identity_of(&info);
    if now != identity {
        return Err(format!("its identity changed from {identity} to {now}"));
    }
    if info.state.last_sequence < last_seq {
        return Err(format!("its last seq went back from {last_seq} to {}", info.state.last_sequence));
    }
    Ok(info.state.last_sequence)
}

/// The emergency a message of the stream holds.
fn stored(taken: &jetstream::Message) -> Option<Stored> {
    let seq = taken.info().ok()?.stream_sequence;
    let header =
        |name: &str| taken.headers.as_ref().and_then(|headers| headers.get(name)).map(|v| v.as_str());
    Some(engine::decode(seq, header(RECEIVED_AT), header(SOURCE), &taken.payload))
}

/// The identity of the emergencies' stream, once its follower has bound it: receipts are of it.
async fn bound_identity(status: &SharedStatus) -> String {
    loop {
        if let Some(identity) = status.lock().stream_id.clone() {
            return identity;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most `RECEIPT_WAIT`) until the emergencies' follower has handed `seq` to the cache:
/// a receipt applied before its emergency is there would be lost (the two streams are read
/// apart, and at start the receipts are read again from their beginning).
async fn emergency_followed(status: &SharedStatus, seq: u64) {
    let waited = tokio::time::Instant::now();
    while status.lock().last_seq < seq && waited.elapsed() < RECEIPT_WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows the receipts stream into the cache, for as long as the cache is there: every ack
/// and close of every box, each applied here (those this box published come back too, and
/// change nothing the second time). From the start of the stream at each start of the box:
/// applying a receipt twice changes nothing, so no position needs keeping.
pub async fn run_receipts(
    context: jetstream::Context,
    settings: StreamSettings,
    box_name: String,
    cacher: Cacher,
    status: Arc<SharedStatus>,
) {
    let mut last_seq = 0;
    loop {
        let bound = match context.get_stream(settings.receipts_stream()).await {
            Ok(bound) => bound,
            Err(e) => {
                super::note_throttled(&format!("engine: stream {}: {e}", settings.receipts_stream()));
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        match follow_receipts(&bound, (&settings, &box_name), &cacher, &mut last_seq, &status).await {
            Ended::CacheGone => return,
            Ended::Reconnected => {}
            Ended::Rebind(reason) => {
                super::note_throttled(&format!(
                    "engine: following {} again: {reason}",
                    settings.receipts_stream()
                ));
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Reads one binding of the receipts stream into the cache; `(settings, box_name)`: the
/// streams, and this box, whose own deliveries are stored already.
async fn follow_receipts(
    bound: &Stream,
    (settings, box_name): (&StreamSettings, &str),
    cacher: &Cacher,
    last_seq: &mut u64,
    status: &SharedStatus,
) -> Ended {
    let mut messages = match read_after(bound, settings.receipts_subject(), *last_seq).await {
        Ok(messages) => messages,
        Err(ended) => return ended,
    };
    let mut checks = tokio::time::interval(STREAM_CHECK);
    let mut behind_at = None;
    loop {
        let next = {
            let tick = std::pin::pin!(checks.tick());
            match futures_util::future::select(messages.next(), tick).await {
                futures_util::future::Either::Left((next, _)) => Some(next),
                futures_util::future::Either::Right(_) => None,
            }
        };
        let first = match next {
            Some(Some(Ok(message))) => message,
            Some(Some(Err(e))) => return Ended::Rebind(e.to_string()),
            Some(None) => return Ended::Rebind("its consumer ended".into()),
            None => {
                let ahead = match bound.get_info().await {
                    Ok(info) => info.state.last_sequence > *last_seq,
                    Err(e) => return Ended::Rebind(format!("its info: {e}")),
                };
                if ahead && behind_at == Some(*last_seq) {
                    return Ended::Rebind(format!("its consumer stalled at seq {last_seq}"));
                }
                behind_at = ahead.then_some(*last_seq);
                continue;
            }
        };
        let stream_id = bound_identity(status).await;
        let mut events = Vec::new();
        let mut message = Some(first);
        while let Some(taken) = message.take() {
            let Ok(info) = taken.info() else {
                return Ended::Rebind("a message without its sequence".into());
            };
            if info.stream_sequence > *last_seq {
                *last_seq = info.stream_sequence;
                events.extend(engine::decode_receipts(&stream_id, box_name, &taken.payload));
            }
            if events.len() < FOLLOW_BATCH
                && let Some(Some(Ok(next))) = messages.next().now_or_never()
            {
                message = Some(next);
            }
        }
        if let Some(newest) = events.iter().map(ReceiptEvent::seq).max() {
            emergency_followed(status, newest).await;
        }
        if !events.is_empty() && !cacher.cache_events(events).await {
            return Ended::CacheGone;
        }
    }
}
