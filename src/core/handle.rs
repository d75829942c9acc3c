//! `HubHandle`: the one way tasks reach the hub.
//!
//! The hub lives in an `Rc<RefCell<Hub>>` that only this file borrows. Callers pass a plain
//! closure, so a borrow ends before the caller's next `.await`: "no borrow of the hub across an
//! await" is kept by the type, not by convention.

use std::cell::RefCell;
use std::rc::Rc;

use crate::core::hub::Hub;

#[derive(Clone)]
pub struct HubHandle(Rc<RefCell<Hub>>);

impl HubHandle {
    pub fn new(hub: Hub) -> HubHandle {
        HubHandle(Rc::new(RefCell::new(hub)))
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

#[cfg(test)]
impl HubHandle {
    /// The hub itself, for tests that look inside it.
    pub(crate) fn borrow(&self) -> std::cell::RefMut<'_, Hub> {
        self.0.borrow_mut()
    }
}
