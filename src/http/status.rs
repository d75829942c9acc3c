//! Every HTTP status this server sends, in one table: its code, its reason phrase, and its label
//! in `resq_push_http_responses_total`; and which statuses have no content.

/// One HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    pub reason: &'static str,
    /// The code as a static string, for the metric label.
    pub label: &'static str,
}

macro_rules! statuses {
    ($($name:ident = $code:literal $reason:literal,)*) => {
        impl Status {
            $(pub const $name: Status = Status { code: $code, reason: $reason, label: stringify!($code) };)*
        }

        #[cfg(test)]
        const ALL: &[Status] = &[$(Status::$name),*];
    };
}

impl Status {
    /// Informational (1xx): an interim answer, or the switch to another protocol.
    pub fn is_informational(self) -> bool {
        (100..200).contains(&self.code)
    }

    /// Whether a response with this status has content (RFC 9110 §6.4.1): not 1xx, 204 or 304.
    /// Without content it carries no `Content-Length` or `Content-Type` (§8.6, §15.3.5).
    pub fn has_content(self) -> bool {
        !self.is_informational() && self.code != 204 && self.code != 304
    }
}

statuses! {
    CONTINUE = 100 "Continue",
    SWITCHING_PROTOCOLS = 101 "Switching Protocols",
    OK = 200 "OK",
    ACCEPTED = 202 "Accepted",
    NO_CONTENT = 204 "No Content",
    NOT_MODIFIED = 304 "Not Modified",
    BAD_REQUEST = 400 "Bad Request",
    UNAUTHORIZED = 401 "Unauthorized",
    FORBIDDEN = 403 "Forbidden",
    NOT_FOUND = 404 "Not Found",
    METHOD_NOT_ALLOWED = 405 "Method Not Allowed",
    REQUEST_TIMEOUT = 408 "Request Timeout",
    CONFLICT = 409 "Conflict",
    LENGTH_REQUIRED = 411 "Length Required",
    CONTENT_TOO_LARGE = 413 "Content Too Large",
    EXPECTATION_FAILED = 417 "Expectation Failed",
    UPGRADE_REQUIRED = 426 "Upgrade Required",
    HEADER_FIELDS_TOO_LARGE = 431 "Request Header Fields Too Large",
    SERVICE_UNAVAILABLE = 503 "Service Unavailable",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_codes_and_codes_are_unique() {
        for (index, status) in ALL.iter().enumerate() {
            assert_eq!(status.label, status.code.to_string());
            assert!(ALL[..index].iter().all(|earlier| earlier.code != status.code), "{status:?}");
        }
    }

    #[test]
    fn informational_and_no_content_statuses_have_no_content() {
        let without: Vec<u16> = ALL.iter().filter(|status| !status.has_content()).map(|s| s.code).collect();
        assert_eq!(without, [100, 101, 204, 304]);
    }
}
