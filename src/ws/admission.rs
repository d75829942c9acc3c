//! Admission to the live stream, whichever way a client connects (WebSocket or SSE): the checks
//! that can refuse it with a plain HTTP status (origin, token, where it resumes, room in the hub
//! under `--max-clients`), its registration with the hub, and the socket settings every admitted
//! client gets.

use std::net::SocketAddr;

use log::{debug, warn};
use std::os::fd::BorrowedFd;

use crate::app::App;
use crate::core::hub::{Greeting, Refusal, Resume};
use crate::core::subscription::Subscription;
use crate::http::conn::{Request, Response};
use crate::http::credentials::authorize;
use crate::http::status::Status;
use crate::protocol::error_json;

/// A client of the live stream, over WebSocket or SSE, registered with the hub.
pub struct Subscribed {
    /// ` (token name)` for log lines, or nothing.
    pub name: String,
    pub resume: Option<Resume>,
    pub subscription: Subscription,
    pub greeting: Greeting,
}

/// What every client of the live stream must pass, whichever way it connects (`kind` names it in
/// log lines): the origin, the token, where it resumes (`resume`), and room in the hub under
/// `--max-clients`, which then registers it.
pub fn subscribe(
    app: &App,
    request: &Request,
    peer: SocketAddr,
    kind: &str,
    resume: impl FnOnce() -> Result<Option<Resume>, Response>,
) -> Result<Subscribed, Response> {
    if let Some(origin) = request.header("origin") {
        let access = app.access.borrow();
        if !access.origin_allowed(origin) {
            let allowed = &access.allowed_origins;
            warn!("refused {kind} {peer}: origin {origin:?} not in --allowed-origin {allowed:?}");
            return Err(Response::json(Status::FORBIDDEN, error_json("origin not allowed")));
        }
    }
    let identity = authorize(app.access.borrow().subscribe.as_ref(), request, true, kind, peer)?;
    let name = identity.as_ref().map(|identity| format!(" ({})", identity.name)).unwrap_or_default();
    let resume = resume()?;
    let (subscription, greeting) =
        Subscription::open(&app.hub, peer, identity, resume.as_ref()).map_err(|refusal| {
            let reason = match refusal {
                Refusal::Full => "too many clients (--max-clients)",
                Refusal::ShuttingDown => "server shutting down",
            };
            warn!("refused {kind} {peer}: {reason}");
            if refusal == Refusal::Full {
                app.metrics.count("resq_push_connections_refused_total", "max_clients");
            }
            Response::json(Status::SERVICE_UNAVAILABLE, error_json(reason)).with_header("Retry-After", "5")
        })?;
    Ok(Subscribed { name, resume, subscription, greeting })
}

/// Caps the kernel's send buffer (`--client-send-buffer`, 0 for none): it holds what a client
/// that stopped reading has not taken, until `--write-timeout`, and autotuning would grow it to
/// megabytes a client. Set after the handshake, so HTTP answers (polls) keep the kernel's sizing.
pub fn cap_send_buffer(socket: BorrowedFd<'_>, bytes: usize) {
    if bytes == 0 {
        return;
    }
    // Linux keeps twice what `SO_SNDBUF` asks for (the other half is for its bookkeeping): half
    // is asked, so that the buffer is the size given.
    if let Err(error) = socket2::SockRef::from(&socket).set_send_buffer_size(bytes / 2) {
        debug!("could not cap a client's send buffer at {bytes} bytes: {error}");
    }
}
