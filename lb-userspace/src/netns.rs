//! Network namespaces by cookie. The programs and the socket iterator name a socket's network
//! namespace by its cookie (`bpf_get_netns_cookie`); to act on the socket (sock_diag,
//! SOCK_DESTROY, its owner's file descriptors) the agent needs the namespace itself and the
//! processes in it, which it finds by walking a cgroup tree.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use anyhow::{Context as _, Result};

/// A network namespace and the processes of the cgroup tree that live in it.
pub struct Namespace {
    pub file: fs::File,
    pub pids: Vec<u32>,
}

/// Cookies of the namespaces seen so far, by (device, inode) of their nsfs file: a cookie is
/// found by making a socket inside, so each namespace costs that once.
#[derive(Default)]
pub struct Cookies {
    known: HashMap<(u64, u64), u64>,
}

impl Cookies {
    /// The cookie of the namespace `ns` (an open /proc/PID/ns/net).
    pub fn of(&mut self, ns: &fs::File) -> Result<u64> {
        let meta = ns.metadata()?;
        let key = (meta.dev(), meta.ino());
        if let Some(c) = self.known.get(&key) {
            return Ok(*c);
        }
        let cookie = netns_cookie(ns)?;
        self.known.insert(key, cookie);
        Ok(cookie)
    }

    /// The namespaces of the processes in `cgroup` and below, by cookie. Processes and
    /// cgroups that go away during the walk are skipped, not errors.
    pub fn under(&mut self, cgroup: &Path) -> Result<BTreeMap<u64, Namespace>> {
        let mut by_inode: BTreeMap<(u64, u64), Namespace> = BTreeMap::new();
        let mut dirs = vec![cgroup.to_path_buf()];
        let mut first = true;
        while let Some(dir) = dirs.pop() {
            let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
                Ok(p) => p,
                // The root must be there; a child may be removed while we walk.
                Err(e) if first => {
                    return Err(e)
                        .with_context(|| format!("reading {}/cgroup.procs", dir.display()));
                }
                Err(_) => continue,
            };
            first = false;
            for pid in procs.lines().filter_map(|l| l.parse::<u32>().ok()) {
                let Ok(ns) = fs::File::open(format!("/proc/{pid}/ns/net")) else {
                    continue; // exited
                };
                let Ok(meta) = ns.metadata() else { continue };
                by_inode
                    .entry((meta.dev(), meta.ino()))
                    .or_insert(Namespace {
                        file: ns,
                        pids: Vec::new(),
                    })
                    .pids
                    .push(pid);
            }
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(entry.path());
                }
            }
        }
        let mut out = BTreeMap::new();
        for ns in by_inode.into_values() {
            if let Ok(cookie) = self.of(&ns.file) {
                out.insert(cookie, ns);
            }
        }
        Ok(out)
    }
}

/// SO_NETNS_COOKIE of a socket made inside `netns` (on a thread that entered it): the same
/// value `bpf_get_netns_cookie` gives the programs.
pub fn netns_cookie(netns: &fs::File) -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    in_netns(netns, || {
        // SAFETY: a socket on this thread and a getsockopt into our own buffer.
        unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut cookie = 0u64;
            let mut len = size_of::<u64>() as libc::socklen_t;
            let rc = libc::getsockopt(
                s,
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            );
            libc::close(s);
            if rc != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(cookie)
        }
    })
}

/// Runs `f` on a short-lived thread that entered `netns` (setns affects only that thread).
pub fn in_netns<T: Send>(netns: &fs::File, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let netns = netns.try_clone()?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: setns on this thread only; the thread ends right after `f`.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("entering the network namespace");
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}
