//! What stands in for `certificate` and `handshake` in a build without the cargo feature `tls`:
//! the same names, with types that cannot be made, so that the callers need no `cfg` of their own.
//! `Config::validate` refuses `--tls-listen` in such a build, so none of this is ever reached.

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Instant;

use smol::net::TcpStream;

use crate::tls::HandshakeError;
use crate::tls::transport::Transport;

/// Why `--tls-listen` cannot be served.
pub const NO_TLS: &str =
    "this resq-push was built without TLS (the cargo feature tls): --tls-listen is not available";

#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate that cannot exist in this build.
pub struct ServerCertificate(Infallible);

/// A handshake that cannot exist in this build.
pub type Acceptor = Infallible;

impl ServerCertificate {
    pub fn load(_files: CertificateFiles) -> Result<ServerCertificate, String> {
        Err(NO_TLS.into())
    }

    pub fn reload(&self) -> Result<(), String> {
        match self.0 {}
    }

    pub fn acceptor(&self) -> Acceptor {
        match self.0 {}
    }

    pub fn describe(&self) -> String {
        match self.0 {}
    }
}

pub async fn accept(
    acceptor: Acceptor,
    _stream: TcpStream,
    _deadline: Instant,
) -> Result<Transport, HandshakeError> {
    match acceptor {}
}
