//! The embedded console and client module over real HTTP: types, caching, the page's policy.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;

use common::{HttpResponse, Server};

#[test]
fn the_console_and_the_client_module_are_served_with_their_type_tag_and_policy() {
    let server = Server::start(&["--in-memory"]);
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("cache-control").as_deref(), Some("no-cache"));
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"), "{policy}");
    assert!(page.body.contains("/console.js"), "{}", page.body);
    for (path, kind) in [
        ("/resq-client.js", "text/javascript; charset=utf-8"),
        ("/console.js", "text/javascript; charset=utf-8"),
        ("/console.css", "text/css; charset=utf-8"),
    ] {
        let asset = server.get(path);
        assert_eq!((asset.status, asset.header("content-type").as_deref()), (200, Some(kind)), "{path}");
        let etag = asset.header("etag").unwrap();
        let again = server.http(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!((again.status, again.body.as_str()), (304, ""), "{path}");
        assert_eq!(again.header("etag").as_deref(), Some(etag.as_str()));
    }
    // HEAD: the headers of GET (its length included), no body.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.write_all(b"HEAD /resq-client.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let head = HttpResponse::read_head(&mut reader);
    assert!(head.starts_with("HTTP/1.1 200 ") && head.contains("ETag: "), "{head}");
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"", "a body after HEAD");
    let post = server.http(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!((post.status, post.header("allow").as_deref()), (405, Some("GET, HEAD")));
}
