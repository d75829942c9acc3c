//! What a request presents: its token (checked against a token set) and where a reconnecting
//! client left off (`?since=`, `&stream=`). Shared by the HTTP handlers and the WebSocket
//! handshake.

use std::net::SocketAddr;

use log::warn;

use crate::auth::{Access, Identity, TokenSet, Verdict};
use crate::core::hub::Resume;
use crate::http::conn::{Request, Response, percent_decode};
use crate::http::status::Status;
use crate::protocol::error_json;
use crate::support::logger::WarningThrottle;

thread_local! {
    /// Refused tokens, one line per period: a client retrying a wrong token in a loop must not
    /// fill the disk with the log.
    static REFUSALS: WarningThrottle = WarningThrottle::default();
}

/// The token a request presents: `Authorization: Bearer <token>`, or `?token=` where allowed
/// (browsers cannot set headers on a WebSocket).
fn presented_token(request: &Request, query_allowed: bool) -> Option<String> {
    let bearer = request.header("authorization").and_then(|value| {
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    });
    bearer.or_else(|| query_allowed.then(|| request.query_param("token").and_then(percent_decode)).flatten())
}

/// Checks a request's token against `tokens` (if configured): the holder's identity, or the
/// `401` to send. Refusals are logged with the peer address, never with a token, at most once per
/// period with how many more there were.
pub fn authorize(
    tokens: Option<&TokenSet>,
    request: &Request,
    query_allowed: bool,
    action: &str,
    peer: SocketAddr,
) -> Result<Option<Identity>, Response> {
    let presented = presented_token(request, query_allowed);
    let problem = match Access::check(tokens, presented.as_deref()) {
        Verdict::Open => return Ok(None),
        Verdict::Holder(name) => {
            let token = presented.unwrap_or_default().into_boxed_str();
            return Ok(Some(Identity { name, token }));
        }
        Verdict::Missing => "missing token",
        Verdict::Invalid => "invalid token",
    };
    REFUSALS.with(|refusals| refusals.note(&format!("refused {action} from {peer}: {problem}")));
    Err(Response::json(Status::UNAUTHORIZED, error_json(problem)).with_header("WWW-Authenticate", "Bearer"))
}

/// Reads `?since=N` (the last seq the client has) and `&stream=ID` (the history it came from).
pub fn parse_resume(request: &Request, peer: SocketAddr) -> Result<Option<Resume>, Response> {
    let Some(text) = request.query_param("since") else { return Ok(None) };
    let since = text.parse().map_err(|_| {
        warn!("refused {peer}: since={text:?} is not a whole number");
        Response::json(
            Status::BAD_REQUEST,
            error_json("since must be a whole number: the last seq you received"),
        )
    })?;
    let stream = request.query_param("stream").map(str::to_owned);
    Ok(Some(Resume { since, stream }))
}
