//! WebSocket clients on `/ws/emergencias`: the handshake (`handshake`), the session loop
//! (`session`), and frames as the server writes them (`frame`). Uses `http` for the request that
//! asked to upgrade; `http` never uses this layer.

pub mod frame;
pub mod handshake;
pub mod session;
