//! `Subscription`: a connected client's membership in the hub, from `open` to its drop.

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::SystemTime;

use crate::auth::Identity;
use crate::core::Outgoing;
use crate::core::doorbell::Farewell;
use crate::core::handle::HubHandle;
use crate::core::hub::{ClientSummary, Greeting, Refusal, Resume};
use crate::core::receipts::{AckRequest, ReceiptEvent};

/// What a client holds while it is connected. Dropping it unsubscribes, whichever side ended
/// the session: join and leave come in pairs.
pub struct Subscription {
    pub client_id: u64,
    hub: HubHandle,
    /// Its slab key; checked against `client_id`, because keys are reused.
    key: usize,
}

impl Subscription {
    /// Registers a client and places its cursor: after `since` when it resumes (the replay),
    /// else after the last seq.
    pub fn open(
        hub: &HubHandle,
        peer: SocketAddr,
        identity: Option<Identity>,
        resume: Option<&Resume>,
    ) -> Result<(Subscription, Greeting), Refusal> {
        let (key, client_id, greeting) = hub.with(|hub| hub.subscribe(peer, identity, resume))?;
        Ok((Subscription { client_id, hub: hub.clone(), key }, greeting))
    }

    /// Ready once its doorbell was rung (there is something to send) or closed (the session must
    /// end: `farewell` says why).
    pub fn poll_rung(&self, cx: &mut Context<'_>) -> Poll<()> {
        let polled = self.hub.try_with(|hub| hub.poll_rung(self.key, self.client_id, cx));
        // The hub busy is unreachable from a session's poll; a spurious wake-up is harmless.
        polled.unwrap_or(Poll::Ready(()))
    }

    /// Why the hub closed its doorbell, once it has.
    pub fn farewell(&self) -> Option<Farewell> {
        self.hub.try_with(|hub| hub.farewell(self.key, self.client_id)).flatten()
    }

    /// Whether its doorbell was rung and not yet polled, for tests of the hub.
    #[cfg(test)]
    pub(crate) fn is_rung(&self) -> bool {
        self.hub.try_with(|hub| hub.is_rung(self.key, self.client_id)).unwrap_or(false)
    }

    /// Hands `push` what this client has not been sent yet (emergencies oldest first, then status
    /// notices), up to `max_frames` and to the first that reaches `max_bytes`, and advances its
    /// cursors past them. Returns how many; none once the client is no longer subscribed.
    pub fn take_pending(&self, max_frames: usize, max_bytes: usize, push: impl FnMut(Outgoing)) -> usize {
        let taken =
            self.hub.try_with(|hub| hub.take_pending(self.key, self.client_id, max_frames, max_bytes, push));
        taken.unwrap_or_else(|| {
            // Unreachable while the hub is borrowed only through `HubHandle::with`; say so loudly
            // if that changes.
            log::error!("client {} found the hub busy; it waits for the next emergency", self.client_id);
            0
        })
    }

    /// Records that `seqs` were written to this client in full: the events to store.
    pub fn delivered(&self, seqs: &[u64], at: SystemTime) -> Vec<ReceiptEvent> {
        let (key, client_id) = (self.key, self.client_id);
        self.hub.try_with(|hub| hub.delivered(key, client_id, seqs, at)).unwrap_or_default()
    }

    /// Emergencies written to this client in full so far, by its session or the express lane.
    pub fn sent(&self) -> u64 {
        self.summary().map_or(0, |summary| summary.sent)
    }

    /// `client ID (name) (peer)`, for log lines: made when needed, not kept by every client.
    pub fn label(&self, transport: &str) -> String {
        let Some(client) = self.summary() else { return format!("client {}", self.client_id) };
        let name = client.name.map(|name| format!(" ({name})")).unwrap_or_default();
        format!("client {}{name} ({}{transport})", self.client_id, client.peer)
    }

    fn summary(&self) -> Option<ClientSummary> {
        self.hub.try_with(|hub| hub.summary(self.key, self.client_id)).flatten()
    }

    /// See `Hub::park`.
    pub fn park(&self) {
        self.hub.try_with(|hub| hub.park(self.key, self.client_id));
    }

    /// See `Hub::unpark`.
    pub fn unpark(&self) {
        self.hub.try_with(|hub| hub.unpark(self.key, self.client_id));
    }

    /// The client's slab key, which the express lane knows it by.
    pub fn key(&self) -> usize {
        self.key
    }

    /// This client sent something.
    pub fn heard(&self, at: SystemTime) {
        let (key, client_id) = (self.key, self.client_id);
        self.hub.try_with(|hub| hub.heard(key, client_id, at));
    }

    /// This client acks `seq`.
    pub fn ack(&self, seq: u64, at: SystemTime) -> AckRequest {
        let (key, client_id) = (self.key, self.client_id);
        let request = self.hub.try_with(|hub| hub.ack_from_client(key, client_id, seq, at));
        request.unwrap_or(AckRequest::Unknown)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let (key, client_id) = (self.key, self.client_id);
        if self.hub.try_with(|hub| hub.unsubscribe(key, client_id)).is_none() {
            log::error!("client {client_id} left while the hub was busy");
        }
    }
}
