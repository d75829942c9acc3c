//! TLS as a transport layer under HTTP and WebSocket: the certificate and key (loaded at start,
//! reloaded on SIGHUP), the handshake of a connection to the TLS listener, and `Transport`, the
//! byte stream (plain TCP or TLS) that `http` and `ws` read and write without knowing which.
//!
//! rustls with the `ring` provider, TLS 1.2 and 1.3; no OpenSSL at run time. Built with the cargo
//! feature `tls` (on by default); without it, `without_tls` stands in for `certificate` and
//! `handshake` with the same names, whose types cannot be made, and `--tls-listen` is refused at start.

use std::io;

use smol::net::TcpStream;

#[cfg(feature = "tls")]
mod certificate;
#[cfg(feature = "tls")]
mod handshake;
pub mod transport;
#[cfg(not(feature = "tls"))]
mod without_tls;

#[cfg(feature = "tls")]
pub use certificate::{CertificateFiles, ServerCertificate};
#[cfg(feature = "tls")]
pub use handshake::{Acceptor, accept};
#[cfg(not(feature = "tls"))]
pub use without_tls::{Acceptor, CertificateFiles, ServerCertificate, accept};

/// Why a connection to the TLS listener did not become a TLS `Transport`.
#[derive(Debug)]
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub enum HandshakeError {
    /// The client closed before its first byte.
    Closed,
    /// Its first byte is not TLS: most likely `http://` to the TLS port. Nothing has been
    /// read, so the request is still there to be answered in plain text.
    NotTls(TcpStream),
    /// The handshake was not done by the deadline.
    TimedOut,
    /// The handshake failed (rustls's alert, or the connection's error).
    Failed(io::Error),
}
