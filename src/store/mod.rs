//! Where the history is kept beyond memory. `journal`: SQLite on a thread of its own. A store
//! assigns seqs and serializes envelopes as it commits them, and hands the committed emergencies
//! back to the executor in seq order; it uses the core's types and nothing above them.
//!
//! `nats` (cargo feature `cluster`): NATS JetStream, the engine of cluster mode, beside the
//! journal, which is then its cache; `engine` is the plain data the two sides exchange. Without
//! the feature `without_nats` stands in for `nats` with the same names and an `Engine` that
//! cannot be made, so no caller has a `cfg` of its own; a cluster-only `.await` goes through
//! `in_cluster`, so that the edge binary leaves its code out.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_channel::Receiver;

// Plain data: in a build without `cluster`, only the stand-in names it.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub mod engine;
pub mod journal;
#[cfg(feature = "cluster")]
mod nats;
#[cfg(not(feature = "cluster"))]
mod without_nats;

use journal::{Committed, Journal, Loaded};
#[cfg(feature = "cluster")]
pub use nats::{Engine, start};
#[cfg(not(feature = "cluster"))]
pub use without_nats::{Engine, start};

/// A value only cluster mode can make (`Engine::cluster_only`): a unit struct with the cargo
/// feature `cluster`, uninhabited without it. The variants only cluster mode takes (a publish waiting for
/// the engine, the follower's requests to the journal) hold one, so that in the edge build they
/// are provably dead and the compiler leaves their code out.
#[cfg(feature = "cluster")]
#[derive(Clone, Copy, Debug)]
pub struct ClusterOnly;
#[cfg(not(feature = "cluster"))]
#[derive(Clone, Copy, Debug)]
pub enum ClusterOnly {}

impl ClusterOnly {
    /// Nothing in cluster mode; in the edge build a point the code never reaches.
    #[inline(always)]
    fn reached(self) {
        #[cfg(not(feature = "cluster"))]
        match self {}
    }
}

/// `future`, awaited only in cluster mode, where `only` can be had. An `.await` on an async fn
/// keeps the states it may resume in even behind a branch the edge build never takes (the state
/// is read from memory at each poll); this future's poll and drop begin at a point the edge
/// build never reaches, so there `future`'s code is left out. `only` comes last: in the edge
/// build a call that makes one never returns, and an argument after it would be unreachable
/// code (a warning).
pub fn in_cluster<F: Future>(future: F, only: ClusterOnly) -> InCluster<F> {
    InCluster { future: Box::pin(future), only }
}

/// A future of cluster mode only (`in_cluster`).
pub struct InCluster<F> {
    future: Pin<Box<F>>,
    only: ClusterOnly,
}

impl<F: Future> Future for InCluster<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.only.reached();
        this.future.as_mut().poll(cx)
    }
}

impl<F> Drop for InCluster<F> {
    fn drop(&mut self) {
        self.only.reached();
    }
}

/// Where the history lives.
#[derive(Debug)]
pub enum Storage {
    /// Lost at restart.
    Memory,
    /// In a data dir: what it held at start, and the journal that keeps it; in cluster mode the
    /// journal is the cache of `engine`'s stream.
    Durable { journal: Journal, loaded: Loaded, committed: Receiver<Committed>, engine: Option<Box<Engine>> },
}
