//! The Unix-socket ingest transport: local apps write one JSON object per line and read one reply
//! line per input line, `{"ok":true,"seq":N,...}` or `{"ok":false,"error":"..."}`, in order.
//! This file binds the socket and accepts; `lines` splits input, `publisher` serves one connection,
//! `peer` says which user and process connected.
//!
//! Access is guarded by the socket file's permissions (mode 0660: owner and group). A stale file
//! left by a killed instance is replaced; a socket a live instance still answers on is not.

pub mod lines;
mod peer;
mod publisher;

use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use log::{debug, info};
use smol::net::unix::UnixListener;
use smol::{LocalExecutor, future};

use crate::app::App;
use crate::protocol::error_json;
use crate::runtime::linger::Refusals;
use crate::runtime::slots::{ConnectionSlots, UNIX_CONNECTIONS};
use crate::runtime::tasks::{TaskTokens, back_off_after_accept_error};
use crate::support::logger::WarningThrottle;
use crate::unix::peer::PeerCredentials;

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
    check_directory(path)?;
    let listener = bind_with_mode(path, SOCKET_MODE)
        .map_err(|error| io::Error::new(error.kind(), format!("cannot bind {shown}: {error}")))?;
    let metadata = fs::metadata(path)?;
    Ok(BoundUnixSocket { path: path.to_owned(), listener, identity: (metadata.dev(), metadata.ino()) })
}

/// The directory `path` goes in.
fn directory_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Fails, saying how to fix it, if the socket's directory is missing. The server does not create
/// it: its owner and mode decide who may publish, which is the operator's choice (the package's
/// systemd unit makes `/run/resq-push` for the service, 0750).
fn check_directory(path: &Path) -> io::Result<()> {
    let (shown, directory) = (path.display(), directory_of(path));
    match fs::metadata(directory) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("cannot bind {shown}: {} is not a directory", directory.display()),
        )),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "cannot bind {shown}: its directory {dir} does not exist; create it for the service \
                 user (install -d -m 0750 {dir}) or choose another --unix-socket",
                dir = directory.display()
            ),
        )),
        Err(error) => Err(io::Error::new(error.kind(), format!("cannot bind {shown}: {error}"))),
    }
}

/// Binds inside a fresh private (0700) directory beside `path`, sets `mode`, then renames the
/// socket into place: nobody can connect before the mode is set, whatever the umask.
fn bind_with_mode(path: &Path, mode: u32) -> io::Result<StdUnixListener> {
    let parent = directory_of(path);
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
    app: &Rc<App>,
    listener: Option<UnixListener>,
    tasks: TaskTokens,
) {
    let Some(listener) = listener else { return future::pending().await };
    let slots = ConnectionSlots::new(app.config.max_unix_connections, UNIX_CONNECTIONS);
    let errors = WarningThrottle::default();
    let refusals = Refusals::default();
    let busy = format!("{}\n", error_json("server busy: too many publisher connections"));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Some(slot) = slots.admit(&app.metrics) else {
                    // It may have written lines already: it reads the line, not a reset.
                    refusals.refuse(executor, stream, busy.as_bytes()).await;
                    continue;
                };
                let sender = PeerCredentials::describe(&stream);
                tasks.spawn(executor, publisher::serve(Rc::clone(app), stream, slot, sender));
            }
            Err(error) => back_off_after_accept_error("Unix socket", error, &errors).await,
        }
    }
}
