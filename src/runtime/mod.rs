//! How work runs on the one thread: the scheduler and its two executors, connection tasks and
//! their shutdown tokens, connection caps, the in-flight byte budget, the heartbeat's one timer,
//! deadlines, lingering before a close. Knows nothing of HTTP, WebSocket or the hub.

pub mod budget;
pub mod deadline;
pub mod heartbeat;
pub mod linger;
pub mod scheduler;
pub mod slots;
pub mod tasks;
