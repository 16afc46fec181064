//! bpffs at /sys/fs/bpf while the test bed uses it. An agent mounts bpffs itself where none
//! is mounted (as on a fresh node) and leaves it mounted; a test must leave the machine as it
//! found it. So the first user in this process (an agent, a container, a test bed) mounts it
//! if the machine has none, and the last one unmounts it again if this process mounted it and
//! nothing but the kernel's own iterators (`maps.debug`, `progs.debug`, which come with every
//! mount) is pinned there. One mount per process, taken under a lock, so that agents started
//! in parallel never stack two mounts (the second would hide the first agent's pins).

use std::{fs, path::Path, process::Command, sync::Mutex};

use anyhow::{Result, bail};

const PATH: &str = "/sys/fs/bpf";

/// (users, whether this process mounted bpffs).
static STATE: Mutex<(usize, bool)> = Mutex::new((0, false));

/// A use of bpffs; the last one dropped unmounts what `hold` mounted.
pub struct Held(());

pub fn hold() -> Result<Held> {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    if state.0 == 0 && !mounted()? {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", PATH])
            .status()?;
        if !status.success() {
            bail!("mounting bpffs at {PATH} failed ({status})");
        }
        state.1 = true;
    }
    state.0 += 1;
    Ok(Held(()))
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        if state.0 > 0 || !state.1 {
            return;
        }
        let left: Vec<String> = fs::read_dir(PATH)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.ends_with(".debug"))
            .collect();
        if !left.is_empty() {
            eprintln!("leaving bpffs mounted at {PATH}: still pinned there: {left:?}");
            return;
        }
        if Command::new("umount")
            .arg(PATH)
            .status()
            .is_ok_and(|s| s.success())
        {
            state.1 = false;
        } else {
            eprintln!("could not unmount bpffs at {PATH}");
        }
    }
}

fn mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts.lines().any(|l| {
        let mut fields = l.split_whitespace().skip(1);
        fields
            .next()
            .is_some_and(|p| Path::new(p) == Path::new(PATH))
            && fields.next() == Some("bpf")
    }))
}
