//! Start-up and shutdown: invalid flags fail clearly; SIGTERM and SIGINT close every client with
//! 1001, exit 0 and remove the Unix socket.

mod common;

use common::{Server, signal, spawn_raw, wait_until};
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let mut server = Server::start(&[]);
    let mut clients: Vec<_> = (0..3).map(|_| server.subscribe().0).collect();
    let seq = server.unix().publish("{}");
    server.terminate();
    for client in &mut clients {
        // Events queued before the signal are delivered before the Close.
        client.recv_emergency(seq);
        let close = client.recv_close().expect("a close frame with a code");
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason, "server shutting down");
    }
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.logs());
    assert!(!server.unix_socket.exists(), "the socket file is left behind");
    assert!(server.logs().contains("all connections closed"), "{}", server.logs());
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let mut server = Server::start(&[]);
    let (mut client, _) = server.subscribe();
    signal(server.pid(), "INT");
    assert_eq!(client.recv_close().map(|f| f.code), Some(CloseCode::Away));
    assert!(server.wait_exit().success());
}

#[test]
fn invalid_flags_fail_at_start_with_the_flag_named() {
    for (args, expected) in [
        (&["--queue", "0"][..], "--queue must be at least 1"),
        (&["--ping-interval", "often"][..], "often"),
        (&["--listen", "nowhere"][..], "nowhere"),
    ] {
        let (mut child, logs) = spawn_raw(args);
        let status = child.wait().unwrap();
        assert!(!status.success(), "{args:?} started");
        wait_until(&format!("error naming {expected}"), || logs.lock().unwrap().contains(expected));
    }
}
