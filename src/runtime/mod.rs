//! How work runs on the one thread: the scheduler and its two executors, connection tasks and
//! their shutdown tokens, connection caps, the in-flight byte budget, deadlines, lingering before
//! a close. Knows nothing of HTTP, WebSocket or the hub.

pub mod budget;
pub mod deadline;
pub mod linger;
pub mod scheduler;
pub mod slots;
pub mod tasks;
