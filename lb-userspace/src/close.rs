//! Closing a client's connection the way a client takes as normal: `shutdown(SHUT_RDWR)` on
//! the client's own socket, through a duplicate of its file descriptor (pidfd_getfd, which
//! needs CAP_SYS_PTRACE over the process).
//!
//! Why this and not SOCK_DESTROY (`ss -K`): a destroyed socket is aborted (ECONNABORTED, a
//! reset to the server) and a client that finds out on its next write fails that request.
//! `shutdown(SHUT_RDWR)` wakes a client waiting on the socket at once with end-of-stream (the
//! same thing it sees when a server closes an idle keep-alive connection), and sends a FIN so
//! the server frees its side; a request written after it fails locally, without reaching the
//! server. Measured with real clients (gRPC C-core, redis-py, the JDK's
//! HttpClient, wrk): see the README's rebalancing section.
//!
//! Just before the shutdown the socket is checked once more on the duplicate itself (its
//! identity by SO_COOKIE, its queues and tcp_info), so what was seen idle a moment ago is
//! still idle: the window in which a new request can slip in is the few microseconds between
//! that check and the shutdown (such a request may reach the server, and its answer is lost).

use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// How the socket was found at the last moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveState {
    pub tcp_state: u8,
    /// Bytes unread by the application and not yet acknowledged by the peer.
    pub recv_queue: u32,
    pub send_queue: u32,
    pub last_sent_ms: u32,
    pub last_received_ms: u32,
}

/// What became of one closure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Closed,
    /// The last-moment check found it busy (the reason); left open.
    Busy(&'static str),
    /// The socket is gone, or no process holds it any more.
    Gone,
}

/// The processes' socket file descriptors, by socket inode, for the processes of one network
/// namespace: built once per namespace and round.
pub struct Owners {
    by_inode: HashMap<u64, (u32, i32)>,
}

impl Owners {
    pub fn of(pids: &[u32]) -> Owners {
        let mut by_inode = HashMap::new();
        for pid in pids {
            let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue; // exited
            };
            for fd in fds.flatten() {
                let Ok(target) = fs::read_link(fd.path()) else {
                    continue;
                };
                let inode = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok());
                let fd_number = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
                if let (Some(inode), Some(fd_number)) = (inode, fd_number) {
                    by_inode.entry(inode).or_insert((*pid, fd_number));
                }
            }
        }
        Owners { by_inode }
    }

    /// Shuts down the socket with `inode` and `cookie` if `still_idle` agrees at the last
    /// moment.
    pub fn shut_down(
        &self,
        inode: u64,
        cookie: u64,
        still_idle: impl Fn(&LiveState) -> Result<(), &'static str>,
    ) -> io::Result<Outcome> {
        let Some(&(pid, fd)) = self.by_inode.get(&inode) else {
            return Ok(Outcome::Gone);
        };
        let socket = match duplicate(pid, fd) {
            Ok(s) => s,
            Err(e)
                if e.raw_os_error() == Some(libc::ESRCH)
                    || e.raw_os_error() == Some(libc::EBADF) =>
            {
                return Ok(Outcome::Gone);
            }
            Err(e) => return Err(e),
        };
        if socket_cookie(&socket)? != cookie {
            return Ok(Outcome::Gone); // the descriptor now holds another socket
        }
        if let Err(why) = still_idle(&live_state(&socket)?) {
            return Ok(Outcome::Busy(why));
        }
        // SAFETY: shutdown on a descriptor we own (our duplicate of the client's).
        if unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Outcome::Closed)
    }
}

/// A duplicate of process `pid`'s descriptor `fd` (pidfd_open + pidfd_getfd, Linux 5.6).
fn duplicate(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned descriptor is owned right away.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(dup as i32))
    }
}

fn socket_cookie(socket: &OwnedFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    getsockopt(socket, libc::SOL_SOCKET, libc::SO_COOKIE, &mut cookie)?;
    Ok(cookie)
}

fn live_state(socket: &OwnedFd) -> io::Result<LiveState> {
    // SAFETY: tcp_info is plain data; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt(socket, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    let queue = |request| -> io::Result<u32> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ / SIOCOUTQ write one int.
        if unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut n) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as u32)
    };
    Ok(LiveState {
        tcp_state: info.tcpi_state,
        recv_queue: queue(libc::FIONREAD)?,
        send_queue: queue(libc::TIOCOUTQ)?,
        last_sent_ms: info.tcpi_last_data_sent,
        last_received_ms: info.tcpi_last_data_recv,
    })
}

fn getsockopt<T>(socket: &OwnedFd, level: i32, name: i32, value: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *mut T).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
