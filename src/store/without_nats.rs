//! What stands in for `nats` in a build without the cargo feature `cluster`: the same names,
//! with an `Engine` that cannot be made, so that the callers need no `cfg` of their own.
//! `Config::validate` refuses `--nats` in such a build, so none of this is ever reached.

use std::convert::Infallible;
use std::time::Duration;

use async_channel::{Receiver, Sender};

use crate::core::receipts::ReceiptEvent;
use crate::store::ClusterOnly;
use crate::store::engine::{Claim, EngineReply, EngineSettings, EngineStatus, Follow, Publication};

/// An engine that cannot exist in this build.
#[derive(Debug)]
pub struct Engine(Infallible);

pub fn start(_settings: EngineSettings) -> Result<(Engine, Option<String>), String> {
    Err("this resq-push was built without cluster mode (the cargo feature cluster): --nats is not available"
        .into())
}

impl Engine {
    pub fn follow(&self, _follow: Follow) {
        match self.0 {}
    }

    pub fn publish(&self, _publication: Publication) -> Result<Receiver<EngineReply>, String> {
        match self.0 {}
    }

    pub fn publish_receipts(
        &self,
        _events: Vec<ReceiptEvent>,
        _done: Option<Sender<()>>,
        _failed: Sender<(Vec<ReceiptEvent>, String)>,
    ) -> Result<(), (Vec<ReceiptEvent>, String)> {
        match self.0 {}
    }

    pub fn publish_deliveries(&self, _events: Vec<ReceiptEvent>) {
        match self.0 {}
    }

    pub fn claim(&self, _seq: u64, _time_limit: Duration) -> Receiver<Result<Claim, String>> {
        match self.0 {}
    }

    pub fn claim_done(&self, _seq: u64) {
        match self.0 {}
    }

    pub async fn publish_when_room(
        &self,
        _publication: Publication,
    ) -> Result<Receiver<EngineReply>, String> {
        match self.0 {}
    }

    pub fn cluster_only(&self) -> ClusterOnly {
        match self.0 {}
    }

    pub fn status(&self) -> EngineStatus {
        match self.0 {}
    }

    pub fn servers(&self) -> &[String] {
        match self.0 {}
    }

    pub fn stream_name(&self) -> &str {
        match self.0 {}
    }

    pub fn box_name(&self) -> &str {
        match self.0 {}
    }

    pub fn timeout(&self) -> Duration {
        match self.0 {}
    }
}
