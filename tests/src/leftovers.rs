//! Removes what test-bed processes that died without cleaning up left behind. Drop handlers
//! clean up after a failed test or benchmark, but not after SIGKILL (a CI timeout, a machine
//! session that ends mid-run). Every object the test bed makes is named `sl<what>-<pid>-<n>`
//! (`crate::unique`), so one carrying the pid of a process that is gone is stale: its
//! processes are killed, and its pinned maps and links, network namespace, cgroup and temp
//! files removed. Runs once per process, before it makes its first object.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Once,
};

use crate::privileges::CGROUP_ROOT;

pub(crate) fn reap_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(reap);
}

fn reap() {
    let bpf = stale_in(Path::new("/sys/fs/bpf"));
    let netns = stale_in(Path::new("/run/netns"));
    // The test cgroups, and on a hybrid machine the v1 hierarchies too (podman makes a
    // container's cgroups in each).
    let mut cgroups = stale_in(Path::new(CGROUP_ROOT));
    for hierarchy in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        if hierarchy.path() != Path::new(CGROUP_ROOT) {
            cgroups.extend(stale_in(&hierarchy.path()));
        }
    }
    let temp = stale_in(&std::env::temp_dir());
    let names: Vec<String> = [&bpf, &netns, &cgroups, &temp]
        .into_iter()
        .flatten()
        .filter_map(|p| Some(p.file_name()?.to_str()?.split('.').next()?.to_owned()))
        .collect();
    if names.is_empty() {
        return;
    }
    eprintln!("removing leftovers of test-bed processes that are gone: {names:?}");
    kill_processes_naming(&names);
    for path in &netns {
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            for pid in crate::netns::pids(name) {
                // SAFETY: kill(2) with a pid read from the kernel; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = crate::netns::run("ip", &["netns", "del", name]);
        }
    }
    for path in &cgroups {
        crate::cgroup::remove(path);
    }
    // Unpinning a link detaches its program; unpinning a map frees it.
    for path in bpf.iter().chain(&temp) {
        let _ = fs::remove_dir_all(path).or_else(|_| fs::remove_file(path));
    }
}

/// Entries of `dir` named by `unique` for a process that no longer exists.
fn stale_in(dir: &Path) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).into_iter().flatten().flatten();
    entries
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_stale))
        .collect()
}

/// Whether `name` was made by `unique` in a process that no longer exists.
pub(crate) fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// The pid in `sl<what>-<pid>-<n>[.ext]`.
fn owner_pid(name: &str) -> Option<u32> {
    let stem = name.split('.').next()?;
    let mut parts = stem.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let what = parts.next()?;
    n.parse::<u32>().ok()?;
    what.starts_with("sl").then(|| pid.parse().ok())?
}

/// Kills every process whose command line mentions one of `names` (an orphaned agent using a
/// stale pin path, a server using a stale directory).
fn kill_processes_naming(names: &[String]) {
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if names.iter().any(|n| cmdline.contains(n.as_str())) {
            // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn names_of_the_test_bed_carry_their_owner() {
        assert_eq!(owner_pid("slagent-21987-2"), Some(21987));
        assert_eq!(owner_pid("slagent-21987-2.log"), Some(21987));
        assert_eq!(owner_pid("slsrv-7-0"), Some(7));
        assert_eq!(owner_pid("sl-7-0"), Some(7));
        assert_eq!(owner_pid("slack-files"), None);
        assert_eq!(owner_pid("other-7-0"), None);
        assert_eq!(owner_pid("maps.debug"), None);
    }
}
