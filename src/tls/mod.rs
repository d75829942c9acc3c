//! TLS as a transport layer under HTTP and WebSocket: the certificate and key (loaded at start,
//! reloaded on SIGHUP), the handshake of a connection to the TLS listener, and `Transport`, the
//! byte stream (plain TCP or TLS) that `http` and `ws` read and write without knowing which.
//!
//! rustls with the `ring` provider, TLS 1.2 and 1.3; no OpenSSL at run time.

pub mod certificate;
pub mod handshake;
pub mod transport;
