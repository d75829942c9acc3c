//! The Unix-socket ingest path: local apps write one JSON object per line and read one reply line
//! per input line, `{"ok":true,"seq":N,...}` or `{"ok":false,"error":"..."}`, in order.
//!
//! Access is guarded by the socket file's permissions (mode 0660: owner and group). A stale file
//! left by a killed instance is replaced; a socket a live instance still answers on is not.

use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use async_channel::Sender;
use log::{debug, info, warn};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::unix::{UnixListener, UnixStream};
use smol::{LocalExecutor, future};

use crate::deadline;
use crate::ingest::{self, Rejection};
use crate::protocol::{PublishReply, Source, error_json};
use crate::server::{self, Shared, WarningThrottle};
use crate::slots::{ConnectionSlots, SlotGuard, UNIX_CONNECTIONS};

/// Mode of the socket file: publishers must be the service's user or in its group.
const SOCKET_MODE: u32 = 0o660;

/// A bound Unix socket; dropping it removes the socket file if it is still ours.
pub struct BoundUnixSocket {
    path: PathBuf,
    listener: StdUnixListener,
    /// (device, inode) of the file we created, so we never remove a successor's socket.
    identity: (u64, u64),
}

/// Binds `path`, replacing a stale socket file but never a live one or a non-socket file.
pub fn bind(path: &Path) -> io::Result<BoundUnixSocket> {
    let shown = path.display();
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => match StdUnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{shown} is in use by a running server; stop it or choose another --unix-socket"),
                ));
            }
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                info!("removing stale socket {shown} left by an earlier run");
                fs::remove_file(path)?;
            }
            Err(error) => return Err(io::Error::new(error.kind(), format!("{shown}: {error}"))),
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{shown} exists and is not a socket; refusing to replace it"),
            ));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io::Error::new(error.kind(), format!("{shown}: {error}"))),
    }
    let listener = bind_with_mode(path, SOCKET_MODE)
        .map_err(|error| io::Error::new(error.kind(), format!("cannot bind {shown}: {error}")))?;
    let metadata = fs::metadata(path)?;
    Ok(BoundUnixSocket { path: path.to_owned(), listener, identity: (metadata.dev(), metadata.ino()) })
}

/// Binds inside a fresh private (0700) directory beside `path`, sets `mode`, then renames the
/// socket into place: nobody can connect before the mode is set, whatever the umask.
fn bind_with_mode(path: &Path, mode: u32) -> io::Result<StdUnixListener> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private_dir = parent.join(format!(".resq-push-bind-{}", std::process::id()));
    let _ = fs::remove_dir_all(&private_dir);
    fs::DirBuilder::new().mode(0o700).create(&private_dir)?;
    let staged = private_dir.join("socket");
    let bound = StdUnixListener::bind(&staged)
        .and_then(|listener| fs::set_permissions(&staged, Permissions::from_mode(mode)).map(|()| listener))
        .and_then(|listener| fs::rename(&staged, path).map(|()| listener));
    let _ = fs::remove_dir_all(&private_dir);
    bound
}

impl BoundUnixSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An async listener on the same socket.
    pub fn listener(&self) -> io::Result<UnixListener> {
        UnixListener::try_from(self.listener.try_clone()?)
    }
}

impl Drop for BoundUnixSocket {
    fn drop(&mut self) {
        let still_ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.identity);
        if still_ours && fs::remove_file(&self.path).is_ok() {
            debug!("removed socket {}", self.path.display());
        }
    }
}

/// Accepts publisher connections until the future is dropped; with no listener, waits forever.
pub async fn accept(
    executor: &LocalExecutor<'static>,
    shared: &Rc<Shared>,
    listener: Option<UnixListener>,
    task_token: Sender<()>,
) {
    let Some(listener) = listener else { return future::pending().await };
    let slots = ConnectionSlots::new(shared.config.max_unix_connections, UNIX_CONNECTIONS);
    let errors = WarningThrottle::default();
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let Some(slot) = slots.admit(&shared.metrics) else {
                    let line = format!("{}\n", error_json("server busy: too many publisher connections"));
                    // One non-blocking attempt; no task is spawned for a refused connection.
                    let _ = future::poll_once(stream.write_all(line.as_bytes())).await;
                    continue;
                };
                server::spawn_connection(
                    executor,
                    &task_token,
                    serve_publisher(Rc::clone(shared), stream, slot),
                );
            }
            Err(error) => server::back_off_after_accept_error("Unix socket", error, &errors).await,
        }
    }
}

/// Splits a byte stream into lines of at most `max_line` bytes, remembering a partial line
/// between reads. A longer line is discarded up to its newline and reported once, as too large.
struct LineSplitter {
    partial: Vec<u8>,
    max_line: usize,
    discarding: bool,
}

/// One input line, or the marker of a line that was too long.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Complete(&'a [u8]),
    TooLong,
}

impl LineSplitter {
    fn new(max_line: usize) -> Self {
        LineSplitter { partial: Vec::new(), max_line, discarding: false }
    }

    /// Feeds `bytes`; calls `on_line` for every line they complete, in order.
    fn feed(&mut self, mut bytes: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            let segment = &bytes[..newline];
            bytes = &bytes[newline + 1..];
            if std::mem::take(&mut self.discarding) || self.partial.len() + segment.len() > self.max_line {
                on_line(Line::TooLong);
            } else if self.partial.is_empty() {
                on_line(Line::Complete(strip_cr(segment)));
            } else {
                self.partial.extend_from_slice(segment);
                on_line(Line::Complete(strip_cr(&self.partial)));
            }
            self.partial.clear();
        }
        if self.discarding || self.partial.len() + bytes.len() > self.max_line {
            self.discarding = true;
            self.partial.clear();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// At end of input: the last line if it had no newline.
    fn finish(&mut self, on_line: impl FnMut(Line<'_>)) {
        if self.discarding || !self.partial.is_empty() {
            self.feed(b"\n", on_line);
        }
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Serves one publisher connection until it closes, the server stops, or it is evicted (idle
/// while every slot is taken). Then a partial line is dropped unanswered: it was never a
/// complete submission.
async fn serve_publisher(shared: Rc<Shared>, mut stream: UnixStream, slot: SlotGuard) {
    let max_line = shared.config.max_body_bytes;
    let mut splitter = LineSplitter::new(max_line);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        slot.set_idle(true);
        let stopped_or_evicted = async {
            future::or(shared.stopping(), slot.evicted()).await;
            None
        };
        let read = future::or(async { Some(stream.read(&mut chunk).await) }, stopped_or_evicted).await;
        slot.set_idle(false);
        let mut lines: Vec<Result<Vec<u8>, Rejection>> = Vec::new();
        let collect = |line: Line<'_>| {
            lines.push(match line {
                Line::Complete(bytes) => Ok(bytes.to_vec()),
                Line::TooLong => Err(Rejection::TooLarge { limit: max_line }),
            })
        };
        let at_end = match read {
            None => return,
            Some(Ok(0)) | Some(Err(_)) => {
                splitter.finish(collect);
                true
            }
            Some(Ok(n)) => {
                splitter.feed(&chunk[..n], collect);
                false
            }
        };
        let replies = publish_lines(&shared, lines).await;
        if !replies.is_empty()
            && !matches!(
                deadline::within(shared.config.write_timeout, stream.write_all(replies.as_bytes())).await,
                Ok(Ok(()))
            )
        {
            warn!("closed a Unix-socket publisher that stopped reading its replies");
            return;
        }
        if at_end {
            return;
        }
    }
}

/// Stages every line (waiting for room in `FanOut`, so the sessions a burst wakes get to write,
/// yielding after each `Config::publish_burst` lines), then
/// waits for each outcome in order: a burst on one connection is committed together. Returns
/// one reply line per input line.
async fn publish_lines(shared: &Shared, lines: Vec<Result<Vec<u8>, Rejection>>) -> String {
    let mut staged = Vec::with_capacity(lines.len());
    for (index, line) in lines.into_iter().enumerate() {
        ingest::wait_for_room(shared).await;
        staged.push(line.and_then(|bytes| ingest::stage(shared, &bytes, Source::Unix)));
        if (index + 1) % shared.config.publish_burst() == 0 {
            future::yield_now().await;
        }
    }
    let mut replies = String::new();
    let mut rejected = 0;
    let mut first_rejection = None;
    for staged in staged {
        let outcome = match staged {
            Ok(staged) => ingest::settle(shared, staged, Source::Unix).await,
            Err(rejection) => Err(rejection),
        };
        let reply = match outcome {
            Ok(receipt) => {
                PublishReply::accepted(shared.hub.borrow().stream_id(), receipt.seq, receipt.queued_to)
            }
            Err(rejection) => {
                rejected += 1;
                shared.metrics.count("resq_push_unix_rejections_total", rejection.label());
                let message = rejection.to_string();
                first_rejection.get_or_insert_with(|| message.clone());
                error_json(&message)
            }
        };
        replies.push_str(&reply);
        replies.push('\n');
    }
    if let Some(first) = first_rejection {
        warn!("rejected {rejected} line(s) on the Unix socket: {first}");
    }
    replies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(splitter: &mut LineSplitter, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        splitter.feed(bytes, |line| {
            lines.push(match line {
                Line::Complete(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Line::TooLong => "<too long>".to_owned(),
            })
        });
        lines
    }

    #[test]
    fn lines_split_across_reads_and_joined_in_one() {
        let mut splitter = LineSplitter::new(8);
        assert_eq!(split(&mut splitter, b"{\"a\"").len(), 0);
        assert_eq!(split(&mut splitter, b":1}\r\n{}\n\n{"), ["{\"a\":1}", "{}", ""]);
        assert_eq!(split(&mut splitter, b"}\n"), ["{}"]);
    }

    #[test]
    fn a_long_line_is_reported_once_and_the_next_line_works() {
        let mut splitter = LineSplitter::new(4);
        assert_eq!(split(&mut splitter, b"123456"), Vec::<String>::new());
        assert_eq!(split(&mut splitter, b"789"), Vec::<String>::new());
        assert_eq!(split(&mut splitter, b"0\n{}\n12345\n"), ["<too long>", "{}", "<too long>"]);
        assert!(splitter.partial.is_empty());
    }

    #[test]
    fn the_last_line_without_newline_counts_at_end() {
        let mut splitter = LineSplitter::new(8);
        split(&mut splitter, b"{}\n{\"b\":2}");
        let mut last = Vec::new();
        splitter.finish(|line| last.push(matches!(line, Line::Complete(b"{\"b\":2}"))));
        assert_eq!(last, [true]);
    }
}
