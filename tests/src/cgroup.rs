//! cgroup v2 directories made for one test: the processes whose connections socklb balances.

use std::{
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::privileges::CGROUP_ROOT;

pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(prefix: &str) -> Result<Cgroup> {
        let path = Path::new(CGROUP_ROOT).join(crate::unique(prefix));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open `cgroup.procs`, so a forked child can join with a single write (see client).
    pub fn procs_file(&self) -> Result<OwnedFd> {
        Ok(fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))?
            .into())
    }

    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) ends every process left in it; then the directory can go.
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// Writes "0" (the writing process itself) to an open cgroup.procs: safe to call between fork
/// and exec, it neither allocates nor locks.
pub(crate) fn join_from_child(procs: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: plain write(2) of a static buffer to an fd the parent opened.
    if unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
