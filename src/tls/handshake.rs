//! The TLS handshake of a connection to the TLS listener, under the request deadline
//! (`--header-timeout`): a client that stalls in the middle of it is closed like one that stalls
//! in the middle of a request head. A client that speaks plain HTTP to the TLS port is told
//! apart by its first byte, so that it can be answered in plain text instead of left hanging.

use std::time::Instant;

use smol::net::TcpStream;

use crate::runtime::deadline::{self, TimedOut};
use crate::tls::HandshakeError;
use crate::tls::transport::Transport;

/// What a handshake needs: the certificate in force when the connection came.
pub type Acceptor = futures_rustls::TlsAcceptor;

/// What rustls may hold of a client's encrypted output, beyond what its socket takes: the
/// socket's own send buffer (`--client-send-buffer`) is the queue, this is what a write that met
/// a full socket leaves encrypted.
pub const TLS_SEND_BUFFER_BYTES: usize = 32 * 1024;
/// The first byte of every TLS connection: a handshake record (RFC 8446, 5.1).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs the server side of the handshake on `stream` by `deadline`.
pub async fn accept(
    acceptor: Acceptor,
    stream: TcpStream,
    deadline: Instant,
) -> Result<Transport, HandshakeError> {
    let mut first = [0u8; 1];
    match deadline::before(deadline, stream.peek(&mut first)).await {
        Err(TimedOut) => return Err(HandshakeError::TimedOut),
        Ok(Ok(0)) => return Err(HandshakeError::Closed),
        Ok(Err(error)) => return Err(HandshakeError::Failed(error)),
        Ok(Ok(_)) if first[0] != TLS_HANDSHAKE_RECORD => return Err(HandshakeError::NotTls(stream)),
        Ok(Ok(_)) => {}
    }
    let handshake = acceptor.accept_with(stream, |connection| {
        connection.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
    });
    match deadline::before(deadline, handshake).await {
        Ok(Ok(tls)) => Ok(Transport::Tls(Box::new(tls))),
        Ok(Err(error)) => Err(HandshakeError::Failed(error)),
        Err(TimedOut) => Err(HandshakeError::TimedOut),
    }
}
