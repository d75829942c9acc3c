//! Access control: publish and subscribe tokens on every endpoint, SIGHUP reload, origins and
//! CORS, and connection floods that must not lock real clients out.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Client, HttpResponse, PATIENCE, Server, TempDir, post_head_read, run_to_exit, signal, spawn_command,
    spawn_raw, wait_until,
};
use tungstenite::protocol::frame::coding::CloseCode;

const TABLET_1: &str = "t1-Zq8xR2vW9mK4pL7s";
const TABLET_2: &str = "t2-Hc3nB6yT1gF5dJ0a";
const TABLET_3: &str = "t3-Pw4eU8iO2qA6sD9f";
const PUBLISHER: &str = "pub-Xk2Lm9Nq4Rs7Tv1W";
const PUBLISHER_2: &str = "pub2-Yb5Cd8Ef1Gh4Ij7K";

/// A server with both token files in its temporary directory.
fn secured(extra: &[&str]) -> Server {
    let dir = TempDir::new();
    let subscribe = dir.path().join("subscribe.tokens");
    let publish = dir.path().join("publish.tokens");
    std::fs::write(&subscribe, format!("# tablets\ntablet-1 {TABLET_1}\ntablet-2 {TABLET_2}\n")).unwrap();
    std::fs::write(&publish, format!("dispatch {PUBLISHER}\n{PUBLISHER_2}\n")).unwrap();
    let (subscribe, publish) = (subscribe.to_str().unwrap().to_owned(), publish.to_str().unwrap().to_owned());
    let args = [&["--subscribe-token-file", &subscribe, "--publish-token-file", &publish], extra].concat();
    Server::start_in(dir, &args)
}

fn post_with(server: &Server, authorization: Option<&str>, body: &str) -> HttpResponse {
    let auth = authorization.map(|value| format!("Authorization: {value}\r\n")).unwrap_or_default();
    server.http(
        format!(
            "POST /emergencias HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn get_with(server: &Server, path: &str, headers: &str) -> HttpResponse {
    server.http(format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n").as_bytes())
}

fn assert_no_token_logged(server: &Server) {
    let logs = server.logs();
    for token in [TABLET_1, TABLET_2, TABLET_3, PUBLISHER, PUBLISHER_2] {
        assert!(!logs.contains(token), "a token reached the logs:\n{logs}");
    }
}

#[test]
fn publishing_over_http_needs_a_publish_token() {
    let server = secured(&[]);
    let mut tablet = server.ws(&format!("/ws/emergencias?token={TABLET_1}"));
    tablet.recv_json();

    let missing = post_with(&server, None, "{}");
    assert_eq!((missing.status, missing.error().as_str()), (401, "missing token"));
    assert_eq!(missing.header("www-authenticate").as_deref(), Some("Bearer"));
    let wrong = post_with(&server, Some("Bearer pub-Xk2Lm9Nq4Rs7Tv1X"), "{}");
    assert_eq!((wrong.status, wrong.error().as_str()), (401, "invalid token"));
    let not_bearer = post_with(&server, Some(&format!("Basic {PUBLISHER}")), "{}");
    assert_eq!(not_bearer.status, 401);
    // A subscribe token does not let anyone publish.
    assert_eq!(post_with(&server, Some(&format!("Bearer {TABLET_1}")), "{}").status, 401);
    assert_eq!(server.last_seq(), 0, "a refused publish was broadcast");

    let first = post_with(&server, Some(&format!("Bearer {PUBLISHER}")), r#"{"n":1}"#);
    assert_eq!(first.status, 202);
    let second = post_with(&server, Some(&format!("bearer {PUBLISHER_2}")), r#"{"n":2}"#);
    assert_eq!(second.status, 202);
    // The tablet got exactly the two accepted emergencies, nothing refused.
    assert_eq!(tablet.recv_emergency(1)["data"]["n"], 1);
    assert_eq!(tablet.recv_emergency(2)["data"]["n"], 2);

    // The Unix socket is guarded by file permissions, not tokens.
    assert_eq!(server.unix().publish("{}"), 3);
    server.wait_for_log("refused publish from 127.0.0.1");
    assert_no_token_logged(&server);
}

#[test]
fn listening_and_polling_need_a_subscribe_token() {
    let server = secured(&[]);
    let addr = server.addr;
    assert_eq!(Client::refusal_status(addr, "/ws/emergencias", &[]), 401);
    assert_eq!(Client::refusal_status(addr, "/ws/emergencias?token=t1-wrong-wrong-wrong", &[]), 401);
    assert_eq!(Client::refusal_status(addr, &format!("/ws/emergencias?token={PUBLISHER}"), &[]), 401);
    assert_eq!(server.clients(), 0);

    let mut by_query = server.ws(&format!("/ws/emergencias?since=0&token={TABLET_1}"));
    assert_eq!(by_query.recv_json()["type"], "connection");
    let bearer = format!("Bearer {TABLET_2}");
    let mut by_header = Client::try_connect(addr, "/ws/emergencias", &[("Authorization", &bearer)]).unwrap();
    assert_eq!(by_header.recv_json()["type"], "connection");

    let seq = server.unix().publish(r#"{"a":1}"#);
    by_query.recv_emergency(seq);
    by_header.recv_emergency(seq);

    assert_eq!(server.get("/emergencias").status, 401);
    assert_eq!(get_with(&server, "/emergencias?token=nope-nope-nope-nope", "").status, 401);
    let polled = get_with(&server, &format!("/emergencias?token={TABLET_1}"), "");
    assert_eq!(polled.json().as_array().unwrap().len(), 1);
    assert_eq!(
        get_with(&server, "/emergencias", &format!("Authorization: Bearer {TABLET_2}\r\n")).status,
        200
    );

    // Each tablet's identity shows in /healthz and in the logs.
    let health = server.health();
    let mut names: Vec<&str> =
        health["client_list"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["tablet-1", "tablet-2"]);
    server.wait_for_log("(tablet-2) connected from");
    assert_no_token_logged(&server);
}

#[test]
fn a_token_with_url_escapes_works_in_the_query() {
    let dir = TempDir::new();
    let file = dir.path().join("subscribe.tokens");
    std::fs::write(&file, "tablet a+b/c=d%e-long-enough\n").unwrap();
    let server = Server::start_in(dir, &["--subscribe-token-file", file.to_str().unwrap()]);
    let mut client = server.ws("/ws/emergencias?token=a%2Bb%2Fc%3Dd%25e-long-enough");
    assert_eq!(client.recv_json()["type"], "connection");
}

#[test]
fn sighup_reload_revokes_one_tablet_and_keeps_the_rest() {
    // The tablet added later must get only live emergencies: none stays open to be resent.
    let server = secured(&["--max-open", "0"]);
    let mut kept = server.ws(&format!("/ws/emergencias?token={TABLET_1}"));
    kept.recv_json();
    let mut revoked = server.ws(&format!("/ws/emergencias?token={TABLET_2}"));
    revoked.recv_json();

    let file = server.dir.path().join("subscribe.tokens");
    std::fs::write(&file, format!("tablet-1 {TABLET_1}\ntablet-3 {TABLET_3}\n")).unwrap();
    signal(server.pid(), "HUP");

    let close = revoked.recv_close().expect("a close frame");
    assert_eq!((close.code, close.reason.as_str()), (CloseCode::Policy, "token revoked"));
    server.wait_for_log("1 clients revoked");
    let seq = server.unix().publish("{}");
    kept.recv_emergency(seq);
    assert_eq!(server.clients(), 1);
    assert_eq!(Client::refusal_status(server.addr, &format!("/ws/emergencias?token={TABLET_2}"), &[]), 401);
    let mut added = server.ws(&format!("/ws/emergencias?token={TABLET_3}"));
    assert_eq!(added.recv_json()["type"], "connection");

    // A broken file on reload keeps the tokens in force and says why.
    std::fs::write(&file, "one two three\n").unwrap();
    signal(server.pid(), "HUP");
    server.wait_for_log("reload failed, keeping the current tokens");
    let seq = server.unix().publish("{}");
    kept.recv_emergency(seq);
    added.recv_emergency(seq);
    assert_no_token_logged(&server);
}

#[test]
fn a_token_on_two_lines_stops_the_start_naming_the_file_and_both_lines() {
    let dir = TempDir::new();
    let file = dir.path().join("subscribe.tokens");
    std::fs::write(&file, format!("tablet-1 {TABLET_1}\ntablet-2 {TABLET_2}\n\ntablet-4 {TABLET_1}\n"))
        .unwrap();
    let path = file.to_str().unwrap();
    let run = run_to_exit(&["--in-memory", "--listen", "127.0.0.1:0", "--subscribe-token-file", path]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let expected = format!("{path}: line 4 (tablet-4) has the same token as line 1 (tablet-1)");
    assert!(run.stderr.contains(&expected), "{}", run.stderr);
    assert!(!run.stderr.contains(TABLET_1), "a token reached the logs:\n{}", run.stderr);
}

#[test]
fn a_reload_with_a_token_on_two_lines_keeps_the_old_tokens() {
    let server = secured(&[]);
    let file = server.dir.path().join("subscribe.tokens");
    std::fs::write(&file, format!("tablet-1 {TABLET_1}\ntablet-3 {TABLET_1}\n")).unwrap();
    signal(server.pid(), "HUP");
    server.wait_for_log("line 2 (tablet-3) has the same token as line 1 (tablet-1)");
    assert!(server.logs().contains("reload failed, keeping the current tokens"), "{}", server.logs());
    let mut still_valid = server.ws(&format!("/ws/emergencias?token={TABLET_2}"));
    assert_eq!(still_valid.recv_json()["type"], "connection");
    assert_no_token_logged(&server);
}

#[test]
fn a_token_file_anyone_can_read_is_warned_about_at_start_and_on_reload() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let file = dir.path().join("subscribe.tokens");
    std::fs::write(&file, format!("tablet-1 {TABLET_1}\n")).unwrap();
    let set_mode = |mode| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    set_mode(0o644);
    let path = file.to_str().unwrap().to_owned();
    let server = Server::start_in(dir, &["--subscribe-token-file", &path]);
    let warning = format!("token file {path} can be read by any user on this machine (mode 644)");
    server.wait_for_log(&warning);
    let line = server.logs().lines().find(|line| line.contains(&warning)).unwrap().to_owned();
    assert!(line.contains(" WARN ") && line.contains(&format!("chmod 600 {path}")), "{line}");

    set_mode(0o600);
    signal(server.pid(), "HUP");
    server.wait_for_log("reloaded token files");
    set_mode(0o604);
    signal(server.pid(), "HUP");
    wait_until("a second reload", || server.logs().matches("reloaded token files").count() == 2);
    assert_eq!(server.logs().matches("can be read by any user").count(), 2, "{}", server.logs());
}

#[test]
fn foreign_origins_are_refused_and_listed_ones_get_cors() {
    let console = "https://console.site";
    let server = secured(&["--allowed-origin", console]);
    let token = format!("/ws/emergencias?token={TABLET_1}");
    assert_eq!(Client::refusal_status(server.addr, &token, &[("Origin", "https://evil.example")]), 403);
    let mut listed = Client::try_connect(server.addr, &token, &[("Origin", console)]).unwrap();
    assert_eq!(listed.recv_json()["type"], "connection");
    // Tools that send no Origin (apps, curl) are not browsers and are not refused for it.
    server.ws(&token).recv_json();

    let preflight = server.http(
        format!(
            "OPTIONS /emergencias HTTP/1.1\r\nOrigin: {console}\r\nAccess-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization, content-type\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin").as_deref(), Some(console));
    let allowed_headers = preflight.header("access-control-allow-headers").unwrap();
    assert!(allowed_headers.contains("Authorization"), "{allowed_headers}");
    assert!(allowed_headers.contains("Idempotency-Key"), "a console may retry safely: {allowed_headers}");
    let foreign = server.http(b"OPTIONS /emergencias HTTP/1.1\r\nOrigin: https://evil.example\r\n\r\n");
    assert_eq!(foreign.status, 403);
    assert_eq!(foreign.header("access-control-allow-origin"), None);

    let origin = format!("Origin: {console}\r\n");
    let health = get_with(&server, "/healthz", &origin);
    assert_eq!(health.header("access-control-allow-origin").as_deref(), Some(console));
    let publish = server.http(
        format!("POST /emergencias HTTP/1.1\r\n{origin}Authorization: Bearer {PUBLISHER}\r\nContent-Length: 2\r\n\r\n{{}}")
            .as_bytes(),
    );
    assert_eq!(
        (publish.status, publish.header("access-control-allow-origin").as_deref()),
        (202, Some(console))
    );
    // A console of another origin polls the roster with its token in a header: a preflight.
    let roster = server.http(
        format!(
            "OPTIONS /tablets HTTP/1.1\r\nOrigin: {console}\r\nAccess-Control-Request-Method: GET\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(
        (roster.status, roster.header("access-control-allow-origin").as_deref()),
        (204, Some(console))
    );
    assert_eq!(roster.header("access-control-allow-methods").as_deref(), Some("GET"));
    let evil = get_with(&server, "/healthz", "Origin: https://evil.example\r\n");
    assert_eq!(evil.header("access-control-allow-origin"), None);
}

#[test]
fn an_origin_given_with_a_trailing_slash_matches_what_browsers_send() {
    let server = secured(&["--allowed-origin", "HTTPS://Console.Site/"]);
    let token = format!("/ws/emergencias?token={TABLET_1}");
    let mut listed = Client::try_connect(server.addr, &token, &[("Origin", "https://console.site")]).unwrap();
    assert_eq!(listed.recv_json()["type"], "connection");

    assert_eq!(Client::refusal_status(server.addr, &token, &[("Origin", "https://evil.example")]), 403);
    server.wait_for_log(r#"origin "https://evil.example" not in --allowed-origin ["https://console.site"]"#);

    let preflight = |origin: &str| {
        server.http(format!("OPTIONS /emergencias HTTP/1.1\r\nOrigin: {origin}\r\n\r\n").as_bytes())
    };
    let listed = preflight("https://console.site");
    assert_eq!(listed.status, 204);
    assert_eq!(listed.header("access-control-allow-origin").as_deref(), Some("https://console.site"));
    assert_eq!(preflight("https://other.example").status, 403);
    server.wait_for_log("refused CORS preflight");
    let logs = server.logs();
    let refusal = logs.lines().find(|line| line.contains("refused CORS preflight")).unwrap();
    let expected = r#"origin "https://other.example" not in --allowed-origin ["https://console.site"]"#;
    assert!(refusal.contains(expected), "{refusal}");
}

#[test]
fn an_origin_with_a_path_is_refused_at_start() {
    let run = run_to_exit(&[
        "--in-memory",
        "--listen",
        "127.0.0.1:0",
        "--allowed-origin",
        "https://console.site/tablets",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--allowed-origin") && run.stderr.contains("path"), "{}", run.stderr);
}

#[test]
fn a_wildcard_origin_cannot_be_combined_with_tokens() {
    let dir = TempDir::new();
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{TABLET_1}\n")).unwrap();
    let (mut child, logs) = spawn_raw(&[
        "--listen",
        "127.0.0.1:0",
        "--subscribe-token-file",
        file.to_str().unwrap(),
        "--allowed-origin",
        "*",
    ]);
    assert!(!child.wait().unwrap().success());
    wait_until("the error", || logs.lock().unwrap().contains("cannot be combined with token files"));
}

#[test]
fn a_flood_of_idle_connections_does_not_lock_out_real_clients() {
    let server = Server::start(&["--max-http-connections", "16"]);
    let mut flood = Vec::new();
    for n in 0..300 {
        if let Ok(mut stream) = TcpStream::connect(server.addr) {
            // Half of them trickle a partial head, half send nothing at all.
            if n % 2 == 0 {
                let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ");
            }
            flood.push(stream);
        }
    }
    let (mut client, _) = server.subscribe();
    let response = server.post(r#"{"during":"flood"}"#);
    assert_eq!(response.status, 202);
    client.recv_emergency(1);
    server.wait_for_log("closed the connection idle longest");
    drop(flood);
}

/// Reads the server's CPU time (user + system) in clock ticks from /proc.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    let dir = TempDir::new();
    let socket = dir.path().join("resq.sock");
    let binary = env!("CARGO_BIN_EXE_resq-push");
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!(
        "ulimit -n 32 && exec {binary} --listen 127.0.0.1:0 --unix-socket {} --header-timeout 30 --in-memory",
        socket.display()
    ));
    let (mut child, logs) = spawn_command(command);
    wait_until("the server to listen", || logs.lock().unwrap().contains("listening on "));
    let text = logs.lock().unwrap().clone();
    let addr: std::net::SocketAddr =
        text.split("listening on ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();

    // More idle connections than descriptors: the server runs out and accept fails.
    let flood: Vec<TcpStream> = (0..60).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    wait_until("accept to fail", || logs.lock().unwrap().contains("accept failed"));
    let before = cpu_ticks(child.id());
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(child.id()) - before;
    // A spinning accept loop would burn the whole second (about 100 ticks).
    assert!(used < 30, "{used} ticks of CPU in {:?} while out of descriptors", started.elapsed());

    drop(flood);
    let mut client = Client::connect(addr, "/ws/emergencias");
    assert_eq!(client.recv_json()["type"], "connection");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Sends a request that is answered with an error while the server still expects more of it,
/// reads the answer and the end of the server's side: the server is then lingering, discarding
/// what the client still sends so that it reads the answer rather than a reset.
fn lingering(server: &Server, request: &[u8], status: u16) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    assert_eq!(HttpResponse::read(&mut reader).status, status);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    stream
}

/// `GET /healthz` on a new connection kept open: the status, or what went wrong reading it.
fn health_kept_open(server: &Server) -> (Result<u16, std::io::Error>, TcpStream) {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut status_line = String::new();
    let read = BufReader::new(stream.try_clone().unwrap()).read_line(&mut status_line);
    let status = read.map(|_| status_line.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0));
    (status, stream)
}

#[test]
fn connections_lingering_after_an_error_make_room_for_real_clients() {
    const LINGER: Duration = Duration::from_secs(2);
    let server = Server::start(&["--max-http-connections", "3"]);
    // One per path that answers and lingers: a request whose body is left unread, a malformed
    // head, and a refused WebSocket upgrade. Each client stays, as a slow or hostile one would.
    let mut lingerers = vec![
        lingering(&server, b"POST /nope HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", 404),
        lingering(&server, b"\x16\x03\x01garbage\r\n\r\n", 400),
        lingering(&server, b"GET /ws/emergencias HTTP/1.1\r\nHost: t\r\n\r\n", 426),
    ];
    // Every slot is taken by one of them; real clients still get in, one eviction each, and the
    // evicted connection stops lingering at once rather than at the end of its linger: timed
    // from the request that evicts it, since setting them all up may be slow on a busy machine.
    let mut kept = Vec::new();
    for n in 0..lingerers.len() {
        let asked = Instant::now();
        let (status, stream) = health_kept_open(&server);
        assert_eq!(status.as_ref().ok(), Some(&200), "request {n} during the linger: {status:?}");
        kept.push(stream);
        wait_until("the evicted connection to be closed", || {
            let closed = lingerers.iter_mut().position(|stream| stream.write_all(b"x").is_err());
            closed.map(|index| lingerers.remove(index)).is_some()
        });
        let lingered = asked.elapsed();
        assert!(lingered < LINGER / 2, "request {n}: the connection it evicted lingered {lingered:?} more");
    }
}

#[test]
fn a_preflight_answer_carries_no_content_headers() {
    let console = "https://console.site";
    let server = Server::start(&["--allowed-origin", console]);
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let preflight = format!(
        "OPTIONS /emergencias HTTP/1.1\r\nHost: t\r\nOrigin: {console}\r\nAccess-Control-Request-Method: POST\r\n\r\n\
         GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    );
    (&stream).write_all(preflight.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(reader.read_line(&mut head).unwrap() > 0, "closed in the head: {head:?}");
    }
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("\r\ncontent-length:") && !lower.contains("\r\ncontent-type:"), "{head}");
    assert!(lower.contains(&format!("\r\naccess-control-allow-origin: {console}\r\n")), "{head}");
    // Nothing follows the head: the next response starts right after it.
    assert_eq!(HttpResponse::read(&mut reader).status, 200);
}

/// A connection that is busy: its request head was read (the `100 Continue` says so) and the
/// server waits for a body that does not come (on a server with no `--min-body-rate`).
fn busy_connection(server: &Server) -> TcpStream {
    post_head_read(server, 2)
}

#[test]
fn a_client_refused_for_busy_slots_reads_the_503_not_a_reset() {
    let server = Server::start(&["--max-http-connections", "2", "--min-body-rate", "0"]);
    let _busy = [busy_connection(&server), busy_connection(&server)];
    for attempt in 0..10 {
        let mut stream = TcpStream::connect(server.addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let body = format!(r#"{{"attempt":{attempt},"pad":"{}"}}"#, "p".repeat(2000));
        let request =
            format!("POST /emergencias HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(read.is_ok(), "attempt {attempt}: {read:?} after reading {text:?}");
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "attempt {attempt}: {text}");
        assert!(text.ends_with(r#"{"ok":false,"error":"server busy: too many connections"}"#), "{text}");
    }
}
