//! Runs `socklb-agent` for a test, and reads `socklbctl -j`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::{cgroup::Cgroup, manifests::ManifestDir, wait_for};

/// A running agent; dropping it stops the agent and removes everything it pinned.
pub struct Agent {
    child: Option<Child>,
    pub pin_path: PathBuf,
    log: PathBuf,
    manifests: PathBuf,
    cgroup: PathBuf,
    extra: Vec<String>,
}

/// A row of `socklbctl -j backend list`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct BackendRow {
    pub service: String,
    pub ip: String,
    pub port: u16,
    pub state: String,
    pub connections: u64,
}

impl Agent {
    /// Starts an agent on `manifests` for `cgroup` with its own pin path, and waits until it
    /// has programmed the directory.
    pub fn start(manifests: &ManifestDir, cgroup: &Cgroup, extra: &[&str]) -> Result<Agent> {
        let name = crate::unique("agent");
        let mut agent = Agent {
            child: None,
            pin_path: PathBuf::from("/sys/fs/bpf").join(&name),
            log: std::env::temp_dir().join(format!("{name}.log")),
            manifests: manifests.path().to_owned(),
            cgroup: cgroup.path().to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        agent.launch()?;
        Ok(agent)
    }

    fn launch(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(crate::bin("socklb-agent"))
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(["--status-address", "127.0.0.1:0"])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting socklb-agent")?;
        self.child = Some(child);
        let starts = self.log().matches("synced:").count();
        wait_for("the agent to sync", Duration::from_secs(20), || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("socklb-agent exited with {status}:\n{}", self.log());
            }
            Ok((self.log().matches("synced:").count() > starts).then_some(()))
        })
    }

    /// Stops the agent with SIGTERM (its pinned state stays) and waits for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait()?;
            if !status.success() {
                bail!("socklb-agent exited with {status}:\n{}", self.log());
            }
        }
        Ok(())
    }

    /// Stops and starts again on the same pin path.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `count` lines containing `text`.
    pub fn wait_log(&self, text: &str, count: usize) -> Result<()> {
        wait_for(
            &format!("{count}x {text:?} in the agent log"),
            Duration::from_secs(10),
            || Ok((self.log().matches(text).count() >= count).then_some(())),
        )
    }

    pub fn backends(&self) -> Result<Vec<BackendRow>> {
        ctl_json(&self.pin_path, &["backend", "list"])
    }

    /// Waits until the active backends of `service` are exactly `ips` (as the maps say).
    pub fn wait_backends(&self, service: &str, ips: &[std::net::Ipv4Addr]) -> Result<()> {
        let mut want: Vec<String> = ips.iter().map(ToString::to_string).collect();
        want.sort();
        wait_for(
            &format!("{service} backends {want:?}"),
            Duration::from_secs(10),
            || {
                let mut got: Vec<String> = self
                    .backends()?
                    .into_iter()
                    .filter(|b| b.service == service && b.state == "active")
                    .map(|b| b.ip)
                    .collect();
                got.sort();
                Ok((got == want).then_some(()))
            },
        )
    }
}

/// Runs `socklbctl -j ARGS` on `pin_path` and parses its output.
pub fn ctl_json<T: for<'de> Deserialize<'de>>(pin_path: &Path, args: &[&str]) -> Result<T> {
    let out = Command::new(crate::bin("socklbctl"))
        .arg("--pin-path")
        .arg(pin_path)
        .arg("-j")
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "socklbctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(crate::bin("socklb-agent"))
            .arg("cleanup")
            .arg("--pin-path")
            .arg(&self.pin_path)
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_file(&self.log);
    }
}
