//! Behind a TLS terminator: the `X-Forwarded-For` and `Forwarded` headers of a `--trusted-proxy`
//! name the client in logs and `/healthz`; nobody else's are believed, and malformed ones are
//! ignored.

mod common;

use common::{Client, Server, spawn_raw, wait_until};

/// The `peer` of every client `/healthz` lists.
fn peers(server: &Server) -> Vec<String> {
    let health = server.health();
    let list = health["client_list"].as_array().unwrap();
    list.iter().map(|client| client["peer"].as_str().unwrap().to_owned()).collect()
}

fn connect_with(server: &Server, headers: &[(&str, &str)]) -> Client {
    let mut client = Client::try_connect(server.addr, "/ws/emergencias", headers).unwrap();
    assert_eq!(client.recv_json()["type"], "connection");
    client
}

fn post_with(server: &Server, header: &str) -> u16 {
    let request = format!(
        "POST /emergencias HTTP/1.1\r\nHost: t\r\n{header}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    server.http(request.as_bytes()).status
}

#[test]
fn a_trusted_proxy_is_believed_about_its_client() {
    let server = Server::start(&["--in-memory", "--trusted-proxy", "127.0.0.0/8", "--trusted-proxy", "::1"]);
    // The rightmost hop that is not a trusted proxy is the client; what it claimed itself is not.
    let _first = connect_with(&server, &[("X-Forwarded-For", "198.51.100.1, 203.0.113.9, 127.0.0.2")]);
    server.wait_for_log("connected from 203.0.113.9:0");
    let _second =
        connect_with(&server, &[("Forwarded", r#"for=192.0.2.60;proto=https, for="[2001:db8::7]:4711""#)]);
    server.wait_for_log("connected from [2001:db8::7]:4711");
    let mut shown = peers(&server);
    shown.sort();
    assert_eq!(shown, ["203.0.113.9:0", "[2001:db8::7]:4711"]);

    assert_eq!(post_with(&server, "X-Forwarded-For: 203.0.113.10"), 202);
    server.wait_for_log("published seq 1 (2 bytes) over http from 203.0.113.10:0");
}

#[test]
fn an_untrusted_peer_keeps_its_socket_address_whatever_it_claims() {
    for flags in [&["--in-memory"][..], &["--in-memory", "--trusted-proxy", "10.0.0.0/8"][..]] {
        let server = Server::start(flags);
        let _client =
            connect_with(&server, &[("X-Forwarded-For", "203.0.113.9"), ("Forwarded", "for=192.0.2.1")]);
        let shown = peers(&server);
        assert!(shown.len() == 1 && shown[0].starts_with("127.0.0.1:"), "{flags:?}: {shown:?}");
        assert_eq!(post_with(&server, "X-Forwarded-For: 203.0.113.9"), 202);
        server.wait_for_log("over http from 127.0.0.1:");
        let logs = server.logs();
        assert!(!logs.contains("203.0.113.9") && !logs.contains("192.0.2.1"), "{flags:?}: {logs}");
    }
}

#[test]
fn a_malformed_forwarding_header_is_ignored() {
    let server = Server::start(&["--in-memory", "--trusted-proxy", "127.0.0.1"]);
    for header in [
        ("X-Forwarded-For", "not-an-address"),
        ("X-Forwarded-For", "203.0.113.9, 10.0.0.300"),
        ("X-Forwarded-For", "203.0.113.9,,"),
        ("Forwarded", "for=unknown"),
        ("Forwarded", "for=\"[2001:db8::7\""),
        ("Forwarded", "proto=https"),
    ] {
        let client = connect_with(&server, &[header]);
        let shown = peers(&server);
        assert!(shown.len() == 1 && shown[0].starts_with("127.0.0.1:"), "{header:?}: {shown:?}");
        drop(client);
        server.wait_for_clients(0);
    }
}

#[test]
fn a_bad_trusted_proxy_stops_the_start_with_exit_code_2() {
    for (value, expected) in [
        ("proxy.local", "'--trusted-proxy' with value 'proxy.local': "),
        ("10.1.2.3/8", "did you mean 10.0.0.0/8"),
        ("10.0.0.0/33", "'--trusted-proxy' with value '10.0.0.0/33': "),
        ("::1/129", "'--trusted-proxy' with value '::1/129': "),
    ] {
        let (mut child, logs) =
            spawn_raw(&["--in-memory", "--listen", "127.0.0.1:0", "--trusted-proxy", value]);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(2), "{value}");
        wait_until(&format!("an error naming {expected:?}"), || logs.lock().unwrap().contains(expected));
    }
}
