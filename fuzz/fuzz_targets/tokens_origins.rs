//! What an operator hands the server: a token file (`auth::parse_tokens`, as `TokenSet::load`
//! reads it), and flags: each line of the input as `--allowed-origin` (`config::parse_origin`),
//! `--listen` (`parse_listen`) and `--trusted-proxy` (`parse_trusted_proxy`), and the input split
//! at NUL bytes as a whole command line (`CommandLine::parse`).
//!
//! Checks, besides not panicking: a token set holds one entry per token line, every token at
//! least 16 visible ASCII characters and unique, found by `holder` under its own name and not with
//! a byte more; an origin, an address and a block, once parsed, parse again to themselves; a
//! block contains the address it was written with; a command line to serve has passed
//! `Config::validate`.

#![no_main]

use std::collections::HashSet;
use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use resq_push::fuzz_api::{CommandLine, TokenSet, parse_listen, parse_origin, parse_trusted_proxy};

/// Lines of one input tried as flags, at most.
const MAX_LINES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_tokens(&text);
    for line in text.lines().take(MAX_LINES) {
        check_flags(line);
    }
    let args: Vec<&str> = text.split('\0').take(MAX_LINES).collect();
    if let CommandLine::Serve(config) = CommandLine::parse(&args) {
        assert!(config.validate().is_ok());
    }
});

fn check_tokens(text: &str) {
    let Ok(set) = TokenSet::from_text(text) else { return };
    let token_lines = text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#'));
    assert_eq!(set.token_count(), token_lines.count());
    let mut seen = HashSet::new();
    for (name, token) in set.entries() {
        assert!(token.len() >= 16 && token.iter().all(u8::is_ascii_graphic), "token {token:?}");
        assert!(!name.is_empty() && !name.contains(char::is_whitespace), "name {name:?}");
        assert!(seen.insert(token), "a token on two lines was taken");
        let token = std::str::from_utf8(token).unwrap();
        assert_eq!(set.holder(token).as_deref(), Some(name));
        let longer = format!("{token}x");
        if set.entries().all(|(_, other)| other != longer.as_bytes()) {
            assert_eq!(set.holder(&longer), None);
        }
    }
}

fn check_flags(line: &str) {
    if let Ok(origin) = parse_origin(line) {
        assert_eq!(parse_origin(&origin).as_ref(), Ok(&origin), "{line:?} parsed to {origin:?}");
        if origin != "*" {
            let (scheme, host) = origin.split_once("://").unwrap();
            assert!(!scheme.is_empty() && !host.is_empty() && !host.contains(['/', '?', '#', '@']));
            assert_eq!(origin, origin.to_ascii_lowercase());
        }
    }
    if let Ok(address) = parse_listen(line) {
        assert_eq!(parse_listen(&address.to_string()), Ok(address), "{line:?}");
    }
    if let Ok(block) = parse_trusted_proxy(line) {
        assert_eq!(parse_trusted_proxy(&block.to_string()), Ok(block), "{line:?} parsed to {block}");
        let written = line.split_once('/').map_or(line, |(address, _)| address);
        let address: IpAddr = written.trim().parse().unwrap();
        assert!(block.contains(address), "{block} does not contain {address}");
    }
}
