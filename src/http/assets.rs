//! The operators' console (`/`, with `/console.css` and `/console.js`) and the reference client
//! module (`/resq-client.js`): files in `src/http/assets/`, embedded in the binary, so a site
//! needs nothing else (dispatch LANs often have no internet; no build step, no CDN).
//!
//! Each answer carries an `ETag` (the SHA-1 of the file, computed once) with `Cache-Control:
//! no-cache`: a tablet revalidates on every load and gets `304` while the file is the same, and
//! the new file as soon as the server is upgraded. The console's page gets a strict
//! `Content-Security-Policy`: its own scripts, styles and connections only, nothing inline.

use std::sync::LazyLock;

use sha1::{Digest, Sha1};

use crate::http::conn::{Caching, Request, Response};
use crate::http::status::Status;

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const JAVASCRIPT: &str = "text/javascript; charset=utf-8";

const ASSETS: [Asset; 4] = [
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_str!("assets/console.html") },
    Asset {
        path: "/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("assets/console.css"),
    },
    Asset { path: "/console.js", content_type: JAVASCRIPT, body: include_str!("assets/console.js") },
    Asset { path: "/resq-client.js", content_type: JAVASCRIPT, body: include_str!("assets/resq-client.js") },
];

/// What the console may load and connect to: only this server (`'self'` covers its `ws:`/`wss:`
/// in current browsers), the `data:` favicon, no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Each asset's `ETag`, in `ASSETS` order: a quoted prefix of its SHA-1.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let tag = |asset: &Asset| {
        let digest = Sha1::digest(asset.body.as_bytes());
        format!("\"{}\"", data_encoding::HEXLOWER.encode(&digest[..10]))
    };
    ASSETS.iter().map(tag).collect()
});

/// The answer for `path` if it names an embedded file: the file (`GET`, `HEAD`: the caller drops
/// the body), `304` when the request's `If-None-Match` has its tag, `405` for other methods.
pub fn respond(path: &str, method: &str, request: &Request) -> Option<Response> {
    let index = ASSETS.iter().position(|asset| asset.path == path)?;
    if method != "GET" {
        return Some(
            Response::json(
                Status::METHOD_NOT_ALLOWED,
                crate::protocol::error_json("method not allowed; use GET or HEAD"),
            )
            .with_header("Allow", "GET, HEAD"),
        );
    }
    let (asset, etag) = (&ASSETS[index], ETAGS[index].as_str());
    let fresh = request.headers("if-none-match").flat_map(|value| value.split(',')).any(|tag| {
        let tag = tag.trim();
        tag == "*" || tag.trim_start_matches("W/") == etag
    });
    let response = if fresh {
        Response::json(Status::NOT_MODIFIED, String::new())
    } else {
        Response { content_type: asset.content_type, ..Response::json(Status::OK, asset.body.to_owned()) }
    };
    let response = response
        .with_caching(Caching::Revalidate)
        .with_header("ETag", etag)
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header("Referrer-Policy", "no-referrer");
    Some(match asset.path {
        "/" => response.with_header("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        _ => response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, headers: &[(&str, &str)]) -> Response {
        respond(path, "GET", &Request::with_headers(headers)).unwrap()
    }

    #[test]
    fn each_file_has_its_type_tag_and_cache_rule() {
        let page = get("/", &[]);
        assert_eq!(page.status, Status::OK);
        assert!(page.content_type.starts_with("text/html"));
        assert!(page.body.contains("<script type=\"module\" src=\"/console.js\">"));
        let module = get("/resq-client.js", &[]);
        assert_eq!(module.content_type, JAVASCRIPT);
        assert!(module.body.contains("export class ResqClient"));
        let header = |response: &Response, name: &str| {
            response.headers.iter().find(|(n, _)| *n == name).map(|(_, value)| value.clone())
        };
        assert_eq!(page.caching, Caching::Revalidate);
        assert_ne!(header(&page, "ETag"), header(&module, "ETag"));
        assert_eq!(header(&page, "Content-Security-Policy").as_deref(), Some(CONTENT_SECURITY_POLICY));
        assert_eq!(header(&module, "Content-Security-Policy"), None);
    }

    #[test]
    fn a_known_tag_gets_304_and_other_methods_405() {
        let etag = ETAGS[3].clone();
        let again = get("/resq-client.js", &[("if-none-match", &format!("\"x\", W/{etag}"))]);
        assert_eq!(again.status, Status::NOT_MODIFIED);
        assert!(again.headers.iter().any(|(name, value)| *name == "ETag" && *value == etag));
        assert_eq!(get("/resq-client.js", &[("if-none-match", "\"other\"")]).status, Status::OK);
        let post = respond("/", "POST", &Request::with_headers(&[])).unwrap();
        assert_eq!(post.status, Status::METHOD_NOT_ALLOWED);
        assert!(post.headers.iter().any(|(name, value)| *name == "Allow" && *value == "GET, HEAD"));
        assert!(respond("/nothing.js", "GET", &Request::with_headers(&[])).is_none());
    }

    #[test]
    fn no_inline_code_the_policy_would_block() {
        let page = ASSETS[0].body;
        assert!(!page.contains("<script>") && !page.contains("style="), "inline code in console.html");
        let handler = page.split(" on").skip(1).find(|rest| {
            let name_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            name_len > 0 && rest.as_bytes().get(name_len) == Some(&b'=')
        });
        assert_eq!(handler, None, "an inline event handler in console.html");
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "console.html loads something from elsewhere"
        );
    }
}
