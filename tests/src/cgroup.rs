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

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn adopt(&self, pid: u32) -> Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving {pid} into {}", self.path.display()))
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
        remove(&self.path);
    }
}

/// Ends every process in `path` and below (cgroup.kill, 5.14+) and removes the directories,
/// deepest first.
pub(crate) fn remove(path: &Path) {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let mut dirs = vec![path.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        for e in fs::read_dir(&dirs[i]).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
        i += 1;
    }
    for dir in dirs.iter().rev() {
        for _ in 0..100 {
            if fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    if path.exists() {
        eprintln!("warning: could not remove {}", path.display());
    }
}

/// An open `cgroup.procs` of `cgroup`, so a forked child can join with a single write.
pub fn procs_file(cgroup: &Path) -> Result<OwnedFd> {
    Ok(fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))?
        .into())
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
