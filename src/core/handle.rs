//! `HubHandle`: the one way tasks reach the hub; `Ingress`: the one way emergencies enter it.
//!
//! The hub lives in an `Rc<RefCell<Hub>>` that only this file borrows. Callers pass a plain
//! closure, so a borrow ends before the caller's next `.await`: "no borrow of the hub across an
//! await" is kept by the type, not by convention. Likewise "one publish path": `Hub::publish` and
//! `Hub::deliver` are private to the core, and the one `Ingress` that calls them is made with the
//! handle, for the composition root to give to `ingest::Publisher`.

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::value::RawValue;

use crate::core::hub::{Hub, Refusal};
use crate::core::idempotency::Fingerprint;
use crate::core::{Outcome, Receipt, Stored};
use crate::protocol::Source;

#[derive(Clone)]
pub struct HubHandle(Rc<RefCell<Hub>>);

/// The right to add emergencies to one hub. There is one per hub, made with its handle.
pub struct Ingress(HubHandle);

impl HubHandle {
    /// Shares `hub`, and makes the one `Ingress` into it.
    pub fn new(hub: Hub) -> (HubHandle, Ingress) {
        let handle = HubHandle(Rc::new(RefCell::new(hub)));
        (handle.clone(), Ingress(handle))
    }

    /// Runs `work` with the hub. The closure cannot await, and what it returns cannot borrow the
    /// hub, so no borrow outlives the call.
    pub fn with<R>(&self, work: impl FnOnce(&mut Hub) -> R) -> R {
        work(&mut self.0.borrow_mut())
    }

    /// As `with`, from a `Drop` or another path that may run while the hub is borrowed (a client
    /// dropped inside a hub method): `None` instead of a panic if it is.
    pub fn try_with<R>(&self, work: impl FnOnce(&mut Hub) -> R) -> Option<R> {
        self.0.try_borrow_mut().ok().map(|mut hub| work(&mut hub))
    }
}

impl Ingress {
    /// See `Hub::publish`: the in-memory history's way in.
    pub fn publish(
        &self,
        data: &RawValue,
        source: Source,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Outcome<Receipt>, Refusal> {
        self.0.with(|hub| hub.publish(data, source, fingerprint))
    }

    /// See `Hub::deliver`: the way in for what the journal committed.
    pub fn deliver(&self, stored: Stored) -> Receipt {
        self.0.with(|hub| hub.deliver(stored))
    }

    /// The hub it adds to.
    pub fn hub(&self) -> &HubHandle {
        &self.0
    }
}

#[cfg(test)]
impl HubHandle {
    /// The hub itself, for tests that look inside it.
    pub(crate) fn borrow(&self) -> std::cell::RefMut<'_, Hub> {
        self.0.borrow_mut()
    }
}
