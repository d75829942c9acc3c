//! Access control: publish and subscribe tokens, and the Origin allowlist.
//!
//! A token file holds one token per line, optionally named (`tablet-3 <token>`); blank lines and
//! `#` comments are skipped. The name is the holder's identity in logs and `/healthz`. Tokens are
//! compared in constant time and never logged. Files are read at start and again on SIGHUP.
//!
//! A token on two lines is refused: whichever line matched, the logs, `/healthz` and a
//! revocation would name the wrong holder. A name on two lines is allowed: one tablet may hold
//! two tokens, its old and its new one while they are rolled over. A file any user may read or
//! change is loaded, with a warning.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use log::warn;

/// Shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The tokens from one file.
#[derive(Clone)]
pub struct TokenSet {
    path: PathBuf,
    entries: Vec<TokenEntry>,
}

#[derive(Clone)]
struct TokenEntry {
    name: Rc<str>,
    token: Box<[u8]>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet").field("path", &self.path).field("entries", &self.entries).finish()
    }
}

impl fmt::Debug for TokenEntry {
    /// The name only: a token must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl TokenSet {
    /// Reads and parses a token file; the error says which file and line is wrong.
    /// Warns when the file is open to every user.
    pub fn load(path: &Path) -> Result<TokenSet, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let entries = parse_tokens(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(warning) =
            std::fs::metadata(path).ok().and_then(|m| mode_warning(path, m.permissions().mode()))
        {
            warn!("{warning}");
        }
        Ok(TokenSet { path: path.to_owned(), entries })
    }

    /// Re-reads the file this set came from.
    pub fn reload(&self) -> Result<TokenSet, String> {
        TokenSet::load(&self.path)
    }

    /// The name of the holder of `presented`, if it is one of the tokens. Every entry is compared
    /// in full, so the time taken does not depend on which one matches or where it differs.
    pub fn holder(&self, presented: &str) -> Option<Rc<str>> {
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(&entry.token, presented.as_bytes()) {
                found = Some(Rc::clone(&entry.name));
            }
        }
        found
    }

    /// The holders' names, each once, in file order: the roster of expected tablets.
    pub fn names(&self) -> Vec<Rc<str>> {
        let mut seen: HashSet<&str> = HashSet::with_capacity(self.entries.len());
        let unseen = self.entries.iter().filter(|entry| seen.insert(&entry.name));
        unseen.map(|entry| Rc::clone(&entry.name)).collect()
    }

    pub fn token_count(&self) -> usize {
        self.entries.len()
    }
}

/// For the fuzz targets (`fuzz_api`): a token file's text parsed as `load` parses it, and what
/// it holds.
#[cfg(feature = "fuzzing")]
impl TokenSet {
    pub fn from_text(text: &str) -> Result<TokenSet, String> {
        Ok(TokenSet { path: PathBuf::new(), entries: parse_tokens(text)? })
    }

    /// Each entry's name and token, in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|entry| (&*entry.name, &*entry.token))
    }
}

/// What is wrong with a token file's mode, if any user on the machine may read or change it.
/// Group access is not warned about: who is in the group is the site's choice. The fix offered is
/// 0600, not 0640, because the package puts publisher apps in the service's group, and they
/// should not read the tablets' tokens.
fn mode_warning(path: &Path, mode: u32) -> Option<String> {
    let exposure = match (mode & 0o004 != 0, mode & 0o002 != 0) {
        (true, true) => "read and changed",
        (true, false) => "read",
        (false, true) => "changed",
        (false, false) => return None,
    };
    let path = path.display();
    Some(format!(
        "token file {path} can be {exposure} by any user on this machine (mode {:o}): \
         chmod 600 {path}, owned by the service user",
        mode & 0o777
    ))
}

fn parse_tokens(text: &str) -> Result<Vec<TokenEntry>, String> {
    let mut entries = Vec::new();
    // Each token's first line and name, to name both lines of a duplicate.
    let mut first_seen: HashMap<&str, (usize, Rc<str>)> = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, token) = match words[..] {
            [token] => (format!("token-{line_number}"), token),
            [name, token] => (name.to_owned(), token),
            _ => return Err(format!("line {line_number}: expected `TOKEN` or `NAME TOKEN`")),
        };
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!("line {line_number}: token shorter than {MIN_TOKEN_LEN} characters"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("line {line_number}: token must be printable ASCII"));
        }
        let name: Rc<str> = name.into();
        if let Some((first_line, first_name)) = first_seen.get(token) {
            return Err(format!(
                "line {line_number} ({name}) has the same token as line {first_line} ({first_name}): \
                 give every holder a token of its own"
            ));
        }
        first_seen.insert(token, (line_number, Rc::clone(&name)));
        entries.push(TokenEntry { name, token: token.as_bytes().into() });
    }
    if entries.is_empty() {
        return Err("no tokens: everyone would be refused".to_owned());
    }
    Ok(entries)
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Who may do what. Owned by `App` and replaced as a whole on SIGHUP.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// When set, `POST /emergencias` needs one of these as a Bearer token.
    pub publish: Option<TokenSet>,
    /// When set, the WebSocket handshake and polling need one of these.
    pub subscribe: Option<TokenSet>,
    /// Browser origins allowed to open WebSockets and to call the HTTP API cross-origin.
    pub allowed_origins: Vec<String>,
}

/// Who a subscriber is: the name and token it connected with.
#[derive(Clone)]
pub struct Identity {
    pub name: Rc<str>,
    /// Kept to re-check the client after a reload; never logged or shown.
    pub token: Box<str>,
}

impl fmt::Debug for Identity {
    /// The name only: a token must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No token is configured for this action.
    Open,
    /// A valid token; its holder's name.
    Holder(Rc<str>),
    Missing,
    Invalid,
}

impl Access {
    /// Loads the token files named in the configuration.
    pub fn load(
        publish_file: Option<&Path>,
        subscribe_file: Option<&Path>,
        allowed_origins: &[String],
    ) -> Result<Access, String> {
        Ok(Access {
            publish: publish_file.map(TokenSet::load).transpose()?,
            subscribe: subscribe_file.map(TokenSet::load).transpose()?,
            allowed_origins: allowed_origins.to_vec(),
        })
    }

    /// Re-reads both token files; on any error the caller keeps the current access.
    pub fn reload(&self) -> Result<Access, String> {
        Ok(Access {
            publish: self.publish.as_ref().map(TokenSet::reload).transpose()?,
            subscribe: self.subscribe.as_ref().map(TokenSet::reload).transpose()?,
            allowed_origins: self.allowed_origins.clone(),
        })
    }

    pub fn check(tokens: Option<&TokenSet>, presented: Option<&str>) -> Verdict {
        match (tokens, presented) {
            (None, _) => Verdict::Open,
            (Some(_), None) => Verdict::Missing,
            (Some(tokens), Some(presented)) => {
                tokens.holder(presented).map_or(Verdict::Invalid, Verdict::Holder)
            }
        }
    }

    /// Whether a browser page from `origin` may use this server. Without an allowlist, any.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins.is_empty()
            || self
                .allowed_origins
                .iter()
                .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if any.
    pub fn cors_origin(&self, origin: Option<&str>) -> Option<String> {
        let origin = origin?;
        if self.allowed_origins.iter().any(|allowed| allowed == "*") {
            Some("*".to_owned())
        } else {
            self.allowed_origins
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(origin))
                .then(|| origin.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_unnamed_tokens() {
        let entries =
            parse_tokens("# tablets\n\ntablet-3  abcdefghijklmnop\nqrstuvwxyz0123456789\n").unwrap();
        let set = TokenSet { path: PathBuf::new(), entries };
        assert_eq!(set.holder("abcdefghijklmnop").as_deref(), Some("tablet-3"));
        assert_eq!(set.holder("qrstuvwxyz0123456789").as_deref(), Some("token-4"));
        assert_eq!(set.holder("abcdefghijklmnoq"), None);
        assert_eq!(set.holder(""), None);
        assert!(!format!("{set:?}").contains("abcdefghijklmnop"));
    }

    #[test]
    fn bad_files_name_the_line() {
        assert!(parse_tokens("a b c\n").unwrap_err().contains("line 1"));
        assert!(parse_tokens("\nname short\n").unwrap_err().contains("line 2: token shorter"));
        assert!(parse_tokens("# only comments\n").unwrap_err().contains("no tokens"));
    }

    #[test]
    fn a_token_on_two_lines_is_refused_naming_both() {
        let twice =
            "tablet-1 abcdefghijklmnop\n# spare\ntablet-2 qrstuvwxyz012345\ntablet-3 abcdefghijklmnop\n";
        let error = parse_tokens(twice).unwrap_err();
        assert!(error.starts_with("line 4 (tablet-3) has the same token as line 1 (tablet-1)"), "{error}");
        assert!(!error.contains("abcdefghijklmnop"), "{error}");
        let unnamed = parse_tokens("abcdefghijklmnop\nabcdefghijklmnop\n").unwrap_err();
        assert!(unnamed.contains("line 2 (token-2) has the same token as line 1 (token-1)"), "{unnamed}");
    }

    #[test]
    fn one_name_may_hold_two_tokens() {
        let entries = parse_tokens("tablet-1 abcdefghijklmnop\ntablet-1 qrstuvwxyz012345\n").unwrap();
        let set = TokenSet { path: PathBuf::new(), entries };
        assert_eq!(set.holder("abcdefghijklmnop").as_deref(), Some("tablet-1"));
        assert_eq!(set.holder("qrstuvwxyz012345").as_deref(), Some("tablet-1"));
    }

    #[test]
    fn a_file_open_to_every_user_is_warned_about() {
        let path = Path::new("/etc/resq-push/subscribe.tokens");
        let warning = mode_warning(path, 0o100644).unwrap();
        assert!(warning.contains("/etc/resq-push/subscribe.tokens can be read by any user"), "{warning}");
        assert!(
            warning.contains("(mode 644)") && warning.contains("chmod 600 /etc/resq-push/subscribe.tokens")
        );
        assert!(mode_warning(path, 0o602).unwrap().contains("can be changed by any user"));
        assert!(mode_warning(path, 0o666).unwrap().contains("can be read and changed by any user"));
        assert_eq!(mode_warning(path, 0o600), None);
        assert_eq!(mode_warning(path, 0o640), None);
    }

    #[test]
    fn constant_time_eq_compares_fully() {
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"sane"));
        assert!(!constant_time_eq(b"same", b"same!"));
    }

    #[test]
    fn origins_and_cors() {
        let access = Access { allowed_origins: vec!["https://console.site".into()], ..Access::default() };
        assert!(access.origin_allowed("https://console.site"));
        assert!(!access.origin_allowed("https://evil.example"));
        assert_eq!(access.cors_origin(Some("https://console.site")).as_deref(), Some("https://console.site"));
        assert_eq!(access.cors_origin(Some("https://evil.example")), None);
        assert!(Access::default().origin_allowed("https://anything"));
        assert_eq!(Access::default().cors_origin(Some("https://anything")), None);
    }
}
