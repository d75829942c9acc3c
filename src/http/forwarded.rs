//! The client behind a reverse proxy: a peer in `--trusted-proxy` says who it forwards for in
//! `X-Forwarded-For` (or, without it, `Forwarded: for=`, RFC 7239). Each proxy appends the address
//! it received the request from, so the list is read from the right: the first hop that is not a
//! trusted proxy is the client, and whatever that client wrote further left is its own claim,
//! never believed. A header from any other peer, or one that cannot be read up to the client, is
//! ignored: the client is then the peer itself.
//!
//! `X-Forwarded-For` goes first because it is what common proxies (nginx, HAProxy, Caddy) add
//! by default, and they pass a client's own `Forwarded` header through untouched.

use std::net::{IpAddr, SocketAddr};

use crate::config::IpBlock;
use crate::http::conn::Request;

/// The address the request is believed to come from. A client named without a port (as
/// `X-Forwarded-For` names them) gets port 0.
pub fn client_address(trusted: &[IpBlock], peer: SocketAddr, request: &Request) -> SocketAddr {
    if !is_trusted(trusted, peer.ip()) {
        return peer;
    }
    let believed = if request.header("x-forwarded-for").is_some() {
        let hops = request.headers("x-forwarded-for").flat_map(|value| value.split(','));
        rightmost_untrusted(trusted, hops.collect(), parse_hop)
    } else if request.header("forwarded").is_some() {
        let elements = request.headers("forwarded").flat_map(split_unquoted_commas);
        rightmost_untrusted(trusted, elements.collect(), forwarded_for)
    } else {
        None
    };
    believed.unwrap_or(peer)
}

fn is_trusted(trusted: &[IpBlock], address: IpAddr) -> bool {
    trusted.iter().any(|block| block.contains(address))
}

/// Walks `hops` (leftmost first) from the right, past every trusted proxy, to the client; when
/// every hop is trusted, the leftmost is the client. `None` if a hop on the way is unreadable.
fn rightmost_untrusted(
    trusted: &[IpBlock],
    hops: Vec<&str>,
    parse: fn(&str) -> Option<SocketAddr>,
) -> Option<SocketAddr> {
    let mut client = None;
    for hop in hops.into_iter().rev() {
        let address = parse(hop)?;
        client = Some(address);
        if !is_trusted(trusted, address.ip()) {
            break;
        }
    }
    client
}

/// One hop: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_hop(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(SocketAddr::new(address.ip().to_canonical(), address.port()));
    }
    let bare = text.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).unwrap_or(text);
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip.to_canonical(), 0))
}

/// The `for=` of one `Forwarded` element (`for=192.0.2.60;proto=https`); `None` without one, or
/// for an obfuscated or `unknown` node, which names no address.
fn forwarded_for(element: &str) -> Option<SocketAddr> {
    let value = element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then_some(value.trim())
    })?;
    let unquoted = match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => value,
    };
    parse_hop(unquoted)
}

/// Splits a `Forwarded` value into its elements at the commas outside quoted strings.
fn split_unquoted_commas(value: &str) -> Vec<&str> {
    let mut elements = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (index, byte) in value.bytes().enumerate() {
        match byte {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                elements.push(&value[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    elements.push(&value[start..]);
    elements
}

#[cfg(test)]
mod tests {
    use super::*;

    fn believed(trusted: &[&str], peer: &str, headers: &[(&str, &str)]) -> String {
        let trusted: Vec<_> = trusted.iter().map(|text| IpBlock::parse(text).unwrap()).collect();
        client_address(&trusted, peer.parse().unwrap(), &Request::with_headers(headers)).to_string()
    }

    const PROXY: &str = "10.0.0.2:5000";

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let chain = [("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.1")];
        assert_eq!(believed(&["10.0.0.0/8"], PROXY, &chain), "203.0.113.9:0");
        let split = [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "203.0.113.9:4711")];
        assert_eq!(believed(&["10.0.0.0/8"], PROXY, &split), "203.0.113.9:4711");
        let all_trusted = [("x-forwarded-for", "10.0.0.7, 10.0.0.1")];
        assert_eq!(believed(&["10.0.0.0/8"], PROXY, &all_trusted), "10.0.0.7:0");
        let v6 = [("x-forwarded-for", "2001:db8::1, [2001:db8::2]")];
        assert_eq!(believed(&["10.0.0.0/8"], PROXY, &v6), "[2001:db8::2]:0");
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let forwarded = [("forwarded", r#"for=1.1.1.1, For="[2001:db8::7]:4711";proto=https;by="a,b""#)];
        assert_eq!(believed(&["10.0.0.2"], PROXY, &forwarded), "[2001:db8::7]:4711");
        let both = [("forwarded", "for=192.0.2.1"), ("x-forwarded-for", "203.0.113.9")];
        assert_eq!(believed(&["10.0.0.2"], PROXY, &both), "203.0.113.9:0");
    }

    #[test]
    fn only_trusted_peers_are_believed_and_only_when_readable() {
        let claim = [("x-forwarded-for", "203.0.113.9")];
        assert_eq!(believed(&[], PROXY, &claim), PROXY);
        assert_eq!(believed(&["10.0.0.1"], PROXY, &claim), PROXY);
        assert_eq!(believed(&["10.0.0.2"], "[::ffff:10.0.0.2]:5000", &claim), "203.0.113.9:0");
        for malformed in [
            [("x-forwarded-for", "")],
            [("x-forwarded-for", "203.0.113.9, nonsense")],
            [("x-forwarded-for", "203.0.113.9,")],
            [("forwarded", "for=unknown")],
            [("forwarded", "for=_hidden")],
            [("forwarded", "proto=https")],
            [("forwarded", r#"for="203.0.113.9"#)],
        ] {
            assert_eq!(believed(&["10.0.0.2"], PROXY, &malformed), PROXY, "{malformed:?}");
        }
        // Junk further left than the client is the client's own, and does not matter.
        let junk_left = [("x-forwarded-for", "nonsense, 203.0.113.9")];
        assert_eq!(believed(&["10.0.0.2"], PROXY, &junk_left), "203.0.113.9:0");
    }
}
