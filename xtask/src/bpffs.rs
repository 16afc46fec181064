//! bpffs at /sys/fs/bpf for the length of a privileged run. Mounted first if the machine has
//! none, so the agents a test run starts in parallel do not race to mount it (two mounts
//! stacked would hide the first agent's pins), and unmounted afterwards if this run mounted it
//! and nothing is left pinned in it, so the machine is left as it was found.

use std::{fs, path::Path, process::Command};

use anyhow::{Result, bail};

const PATH: &str = "/sys/fs/bpf";

pub struct Bpffs {
    mounted_here: bool,
}

impl Bpffs {
    pub fn ensure() -> Result<Bpffs> {
        if mounted()? {
            return Ok(Bpffs {
                mounted_here: false,
            });
        }
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", PATH])
            .status()?;
        if !status.success() {
            bail!("mounting bpffs at {PATH} failed ({status})");
        }
        Ok(Bpffs { mounted_here: true })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if !self.mounted_here {
            return;
        }
        // The kernel's own iterators (maps.debug, progs.debug) appear with every mount.
        let left: Vec<String> = fs::read_dir(PATH)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.ends_with(".debug"))
            .collect();
        if !left.is_empty() {
            eprintln!("xtask: leaving bpffs mounted at {PATH}: still pinned there: {left:?}");
            return;
        }
        if !Command::new("umount")
            .arg(PATH)
            .status()
            .is_ok_and(|s| s.success())
        {
            eprintln!("xtask: could not unmount bpffs at {PATH}");
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
