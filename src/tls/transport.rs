//! `Transport`: a client's byte stream, plain TCP or TLS over it, for `http` and `ws` to read and
//! write alike. Reads and writes go through rustls when it is TLS; what needs the socket itself
//! (its send buffer, its readiness) gets the TCP socket under it.

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

#[cfg(feature = "tls")]
use futures_rustls::server::TlsStream;
use smol::Async;
use smol::io::{AsyncRead, AsyncWrite};
use smol::net::TcpStream;

use crate::runtime::linger::HalfClose;

/// A client's connection, plain or encrypted.
pub enum Transport {
    /// The socket itself, read and written through `&Async`, which waits for readiness in the
    /// socket's own slots: `smol::net::TcpStream` would keep a readiness future for each
    /// direction, about 140 bytes in every plain client's session (BENCHMARKS.md, "Round 4").
    Plain(Arc<Async<std::net::TcpStream>>),
    /// Boxed: rustls's connection state is large, and a session's future holds its transport.
    #[cfg(feature = "tls")]
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    pub fn plain(stream: TcpStream) -> Transport {
        Transport::Plain(Arc::from(stream))
    }

    /// The TCP socket under it, for its options.
    pub fn tcp(&self) -> BorrowedFd<'_> {
        match self {
            Transport::Plain(socket) => socket.as_fd(),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => tls.get_ref().0.as_fd(),
        }
    }

    /// Whether it is encrypted, for log lines.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Transport::Plain(_))
    }

    /// The socket, shared, to wait for readiness on.
    pub fn socket(&self) -> Arc<Async<std::net::TcpStream>> {
        match self {
            Transport::Plain(socket) => Arc::clone(socket),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => Arc::from(tls.get_ref().0.clone()),
        }
    }

    /// Whether input waits above the socket, which will therefore not signal it: plaintext
    /// rustls has decrypted but nobody has read yet, or the peer's close_notify.
    pub fn has_buffered_input(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => !tls.get_ref().1.wants_read(),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(socket) => Pin::new(&mut &**socket).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(socket) => Pin::new(&mut &**socket).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    /// One `writev` in plain; under TLS, one rustls write: the slices become one record (up to
    /// TLS's 16 KiB), not one per slice.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(socket) => Pin::new(&mut &**socket).poll_write_vectored(cx, bufs),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    /// Under TLS, sends the records rustls still holds (a write may leave some when the socket
    /// is full); nothing to do in plain.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(socket) => Pin::new(&mut &**socket).poll_flush(cx),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            // As `smol::net::TcpStream` closes: the write side shut down.
            Transport::Plain(socket) => Poll::Ready(socket.get_ref().shutdown(Shutdown::Write)),
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}

impl HalfClose for Transport {
    /// Under TLS, a close_notify first, as far as the socket takes it now (it is the last
    /// thing written, and a peer that does not get it still sees the TCP end).
    fn end_writing(&mut self) {
        #[cfg(feature = "tls")]
        if let Transport::Tls(tls) = self {
            let (stream, connection) = tls.get_mut();
            connection.send_close_notify();
            let socket = Arc::<Async<std::net::TcpStream>>::from(stream.clone());
            let mut raw: &std::net::TcpStream = socket.get_ref();
            while connection.wants_write() {
                if !matches!(connection.write_tls(&mut raw as &mut dyn std::io::Write), Ok(n) if n > 0) {
                    break;
                }
            }
        }
        let _ = socket2::SockRef::from(&self.tcp()).shutdown(Shutdown::Write);
    }
}
