//! The WebSocket handshake on `/ws/emergencias`: every check that can refuse a client with a
//! plain HTTP status before the 101 (the upgrade headers here; origin, token, `since` and room in
//! the hub in `admission`), the 101 itself, and the `Session` that follows.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use log::{info, warn};
use sha1::{Digest, Sha1};

use crate::app::App;
use crate::core::hub::Greeting;
use crate::core::subscription::Subscription;
use crate::http::conn::{Request, Response};
use crate::http::credentials::parse_resume;
use crate::http::routes::Upgrade;
use crate::http::status::Status;
use crate::protocol::error_json;
use crate::ws::admission::{Subscribed, cap_send_buffer, subscribe};
use crate::ws::reader::FrameReader;
use crate::ws::session::{Session, Wire};

/// The GUID that RFC 6455 appends to the client's key.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Answers an upgrade request on `/ws/emergencias`: the client's session, or `None` when it
/// was refused with a plain HTTP status. Until the 101 the connection counts against
/// `--max-http-connections`; from then on the hub counts it, under `--max-clients`.
pub async fn upgrade(app: &Rc<App>, upgrade: Upgrade) -> Option<Session> {
    let Upgrade { mut connection, request, slot, client: peer } = upgrade;
    let config = &app.config;
    let admitted = match admit(app, &request, peer) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            connection.respond_and_close(refusal, config.write_timeout, &slot).await;
            return None;
        }
    };
    let switching = Response::json(Status::SWITCHING_PROTOCOLS, String::new())
        .with_header("Upgrade", "websocket")
        .with_header("Connection", "Upgrade")
        .with_header("Sec-WebSocket-Accept", admitted.accept_key);
    if connection.respond(&switching, true, Instant::now() + config.write_timeout).await.is_err() {
        return None;
    }
    drop(slot);
    cap_send_buffer(connection.stream.tcp(), config.client_send_buffer);
    let socket = connection.stream.socket();
    let (client_id, name) = (admitted.subscription.client_id, admitted.name);
    let scheme = if connection.stream.is_tls() { "wss" } else { "ws" };
    match admitted.since {
        Some(since) => {
            info!("client {client_id}{name} connected from {peer} over {scheme}, resuming after seq {since}")
        }
        None => info!("client {client_id}{name} connected from {peer} over {scheme}"),
    }
    Some(Session::new(
        // What the client sent after its request head, parsed at the session's first read.
        Wire::WebSocket(FrameReader::with_early_bytes(connection.buffered), connection.stream),
        socket,
        Rc::clone(app),
        admitted.subscription,
        admitted.greeting,
    ))
}

/// A client that passed every check and is registered with the hub.
struct Admitted {
    accept_key: String,
    /// ` (token name)` for log lines, or nothing.
    name: String,
    since: Option<u64>,
    subscription: Subscription,
    greeting: Greeting,
}

/// Everything that can refuse a client with a plain HTTP status, before the 101: the upgrade
/// headers, then what every client of the stream must pass (`subscribe`).
fn admit(app: &App, request: &Request, peer: SocketAddr) -> Result<Admitted, Response> {
    let accept_key = check_upgrade(request).inspect_err(|refusal| {
        warn!("refused WebSocket upgrade from {peer}: {}", refusal.body);
    })?;
    let admitted = subscribe(app, request, peer, "WebSocket client", || parse_resume(request, peer))?;
    let Subscribed { name, resume, subscription, greeting } = admitted;
    Ok(Admitted { accept_key, name, since: resume.map(|resume| resume.since), subscription, greeting })
}

/// Checks the RFC 6455 upgrade headers and returns the `Sec-WebSocket-Accept` value.
fn check_upgrade(request: &Request) -> Result<String, Response> {
    if !request.header_has_token("upgrade", "websocket") || !request.header_has_token("connection", "upgrade")
    {
        return Err(Response::json(
            Status::UPGRADE_REQUIRED,
            error_json("this endpoint only speaks WebSocket"),
        )
        .with_header("Upgrade", "websocket")
        .with_header("Sec-WebSocket-Version", "13"));
    }
    if request.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Response::json(
            Status::UPGRADE_REQUIRED,
            error_json("unsupported Sec-WebSocket-Version, use 13"),
        )
        .with_header("Sec-WebSocket-Version", "13"));
    }
    let key = request.header("sec-websocket-key").map(str::trim).unwrap_or("");
    match data_encoding::BASE64.decode(key.as_bytes()) {
        Ok(decoded) if decoded.len() == 16 => Ok(accept_key(key)),
        _ => Err(Response::json(
            Status::BAD_REQUEST,
            error_json("Sec-WebSocket-Key must be 16 bytes in base64"),
        )),
    }
}

/// RFC 6455's accept key. tungstenite's `derive_accept_key` makes the same three calls, but behind
/// its `handshake` feature, which brings the `http` crate and 16.6 KB of binary (BENCHMARKS.md).
fn accept_key(key: &str) -> String {
    let digest = Sha1::new().chain_update(key.as_bytes()).chain_update(WEBSOCKET_GUID).finalize();
    data_encoding::BASE64.encode(&digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
