//! Closing a connection so that its peer reads our last answer rather than a reset.
//!
//! A socket closed with input it has not read is reset by the kernel (TCP sends RST; a Unix
//! socket's peer gets ECONNRESET, or EPIPE on its next write), and the peer may lose the answer
//! waiting for it. So a connection that ends with an answer ends its writing side, then reads and
//! drops what the peer still sends, within a budget of time and bytes: `Linger::close`. The one
//! mechanism for an HTTP error response (`http::conn`) and for a connection refused at its cap,
//! over TCP or the Unix socket (`Refusals`).

use std::cell::Cell;
use std::net::Shutdown;
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::net::TcpStream;
use smol::net::unix::UnixStream;
use smol::{LocalExecutor, future};

use crate::runtime::deadline;

/// Refused connections that may linger at once after their answer; beyond that a refusal
/// closes at once, so that a flood costs at most this many small tasks (per listener).
pub const MAX_LINGERING_REFUSALS: usize = 16;
/// How long, and how much, a refused connection is read: a request or a burst of lines at the
/// default limits fits.
pub const REFUSAL_LINGER: Linger = Linger { time: Duration::from_secs(1), bytes: 128 * 1024 };
/// The buffer a lingering refusal reads into.
const REFUSAL_SCRATCH_BYTES: usize = 4096;

/// The budget of a closing connection: at most `time`, and at most `bytes` read.
#[derive(Clone, Copy, Debug)]
pub struct Linger {
    pub time: Duration,
    pub bytes: usize,
}

/// A stream whose writing side can be ended alone.
pub trait HalfClose {
    fn end_writing(&mut self);
}

impl HalfClose for TcpStream {
    fn end_writing(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl HalfClose for UnixStream {
    fn end_writing(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Linger {
    /// Ends the writing side of `stream` (the peer reads the end of our answer), then reads and
    /// drops what the peer still sends, into `scratch`, until it closes or the budget is spent.
    pub async fn close<S: AsyncRead + HalfClose + Unpin>(self, stream: &mut S, scratch: &mut [u8]) {
        stream.end_writing();
        let until = Instant::now() + self.time;
        let mut discarded = 0;
        while discarded < self.bytes {
            match deadline::before(until, stream.read(scratch)).await {
                Ok(Ok(read)) if read > 0 => discarded += read,
                _ => break,
            }
        }
    }
}

/// The refused connections of one listener that linger after their answer.
#[derive(Default)]
pub struct Refusals {
    lingering: Rc<Cell<usize>>,
}

impl Refusals {
    /// Answers a connection refused at its cap with `answer` if its socket takes it at once (a
    /// fresh socket's buffer is empty), then lets it linger (`REFUSAL_LINGER`) in a task of its
    /// own, unless `MAX_LINGERING_REFUSALS` already do: then it is closed at once.
    pub async fn refuse<S>(&self, executor: &LocalExecutor<'static>, mut stream: S, answer: &[u8])
    where
        S: AsyncRead + AsyncWrite + HalfClose + Unpin + 'static,
    {
        let written = future::poll_once(stream.write(answer)).await;
        if !matches!(written, Some(Ok(n)) if n == answer.len())
            || self.lingering.get() >= MAX_LINGERING_REFUSALS
        {
            return;
        }
        // Counted now, not when the task first runs: more connections may be refused before.
        self.lingering.set(self.lingering.get() + 1);
        let lingering = Rc::clone(&self.lingering);
        let linger = async move {
            let mut scratch = vec![0; REFUSAL_SCRATCH_BYTES];
            REFUSAL_LINGER.close(&mut stream, &mut scratch).await;
            lingering.set(lingering.get() - 1);
        };
        executor.spawn(linger).detach();
    }
}
