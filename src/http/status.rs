//! Every HTTP status this server sends, in one table: its code, its reason phrase, and its label
//! in `resq_push_http_responses_total`.

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

statuses! {
    CONTINUE = 100 "Continue",
    SWITCHING_PROTOCOLS = 101 "Switching Protocols",
    OK = 200 "OK",
    ACCEPTED = 202 "Accepted",
    NO_CONTENT = 204 "No Content",
    BAD_REQUEST = 400 "Bad Request",
    UNAUTHORIZED = 401 "Unauthorized",
    FORBIDDEN = 403 "Forbidden",
    NOT_FOUND = 404 "Not Found",
    METHOD_NOT_ALLOWED = 405 "Method Not Allowed",
    REQUEST_TIMEOUT = 408 "Request Timeout",
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
}
