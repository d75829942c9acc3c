//! Clients of the live stream: WebSocket clients on `/ws/emergencias` (the handshake,
//! `handshake`) and Server-Sent Events clients on `/sse/emergencias` (`sse`, framed by `events`),
//! both admitted by `admission` and run by the same session loop (`session`), with frames as the
//! server writes them (`frame`). Uses `http` for
//! the request that asked for the stream; `http` never uses this layer.

pub mod admission;
pub mod events;
pub mod express;
pub mod frame;
pub mod handshake;
pub mod reader;
pub mod session;
pub mod sse;

use std::rc::Rc;

use crate::app::App;
use crate::http::routes::Upgrade;
use crate::ws::session::Session;

/// Admits the client a request for the stream came from, over the transport its path names:
/// its session, or `None` when it was refused (and answered).
pub async fn accept(app: &Rc<App>, upgrade: Upgrade) -> Option<Session> {
    if upgrade.request.path == "/sse/emergencias" {
        sse::open(app, upgrade).await
    } else {
        handshake::upgrade(app, upgrade).await
    }
}
