//! Who is on the other end of a Unix-socket connection: the kernel's record of the process that
//! connected (`SO_PEERCRED`), for the log line of each emergency it publishes. std's
//! `UnixStream::peer_cred` is not stable yet, so this asks the kernel directly.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};

/// The user and process that connected, as the kernel recorded them at `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    pub uid: u32,
    pub pid: i32,
}

impl PeerCredentials {
    /// The credentials of the peer of `socket`; `None` if the kernel does not say.
    pub fn of(socket: &impl AsRawFd) -> Option<PeerCredentials> {
        peer_credentials(socket.as_raw_fd())
    }

    /// `uid U pid P` of the peer of `socket`, as its log lines name it.
    pub fn describe(socket: &impl AsRawFd) -> Box<str> {
        match PeerCredentials::of(socket) {
            Some(credentials) => credentials.to_string().into(),
            None => "an unknown process".into(),
        }
    }
}

impl fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} pid {}", self.uid, self.pid)
    }
}

fn peer_credentials(fd: RawFd) -> Option<PeerCredentials> {
    let mut credentials = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let expected = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let mut length = expected;
    // SAFETY: `credentials` and `length` are live locals the kernel writes at most `length`
    // bytes into; `fd` is borrowed from a socket that stays open for the call.
    let status = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &raw mut length,
        )
    };
    (status == 0 && length == expected)
        .then_some(PeerCredentials { uid: credentials.uid, pid: credentials.pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_names_this_process() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let credentials = PeerCredentials::of(&ours).unwrap();
        assert_eq!(credentials.pid, std::process::id() as i32);
        // SAFETY: getuid has no preconditions and cannot fail.
        assert_eq!(credentials.uid, unsafe { libc::getuid() });
    }
}
