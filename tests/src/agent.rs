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
    /// Everything but the pin path and status address.
    args: Vec<std::ffi::OsString>,
    _bpffs: crate::bpffs::Held,
}

/// A row of `socklbctl -j backend list`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct BackendRow {
    pub service: String,
    pub ip: String,
    pub port: u16,
    pub state: String,
    pub connections: u64,
    /// Time left in its slow start (None: not ramping).
    pub slow_start_left_ms: Option<u64>,
}

impl Agent {
    /// Starts an agent on `manifests` for `cgroup` with its own pin path, and waits until it
    /// has programmed the directory.
    pub fn start(manifests: &ManifestDir, cgroup: &Cgroup, extra: &[&str]) -> Result<Agent> {
        let mut args = vec![
            "--manifests".into(),
            manifests.path().into(),
            "--cgroup".into(),
            cgroup.path().into(),
        ];
        args.extend(extra.iter().map(Into::into));
        Agent::with_args(args)
    }

    /// Starts an agent in Kubernetes mode: the API server behind `kubeconfig`, node `node`,
    /// pods under `cgroup_root`.
    pub fn kubernetes(
        kubeconfig: &Path,
        node: &str,
        cgroup_root: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut args = vec![
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--node-name".into(),
            node.into(),
            "--cgroup".into(),
            cgroup_root.into(),
        ];
        args.extend(extra.iter().map(Into::into));
        Agent::with_args(args)
    }

    fn with_args(args: Vec<std::ffi::OsString>) -> Result<Agent> {
        let name = crate::unique("agent");
        let mut agent = Agent {
            child: None,
            pin_path: PathBuf::from("/sys/fs/bpf").join(&name),
            log: std::env::temp_dir().join(format!("{name}.log")),
            args,
            _bpffs: crate::bpffs::hold()?,
        };
        agent.launch()?;
        Ok(agent)
    }

    /// The agent's health and metrics address, from its log.
    pub fn status_url(&self) -> Option<String> {
        let log = self.log();
        let at = log.rfind("health and metrics on http://")?;
        let rest = &log[at + "health and metrics on ".len()..];
        Some(
            rest.split_whitespace()
                .next()?
                .trim_end_matches('/')
                .to_owned(),
        )
    }

    fn launch(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(crate::bin("socklb-agent"))
            .args(&self.args)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(["--status-address", "127.0.0.1:0"])
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

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's /metrics page.
    pub fn metrics(&self) -> Result<String> {
        http_get(
            &self.status_url().context("no status address in the log")?,
            "/metrics",
        )
    }

    /// One value from /metrics: the sample whose name and labels start with `prefix`.
    pub fn metric(&self, prefix: &str) -> Result<Option<f64>> {
        Ok(self
            .metrics()?
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok()))
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
    pub fn wait_backends<A: Into<std::net::IpAddr> + Copy>(
        &self,
        service: &str,
        ips: &[A],
    ) -> Result<()> {
        let mut want: Vec<String> = ips.iter().map(|ip| (*ip).into().to_string()).collect();
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

/// A GET over HTTP/1.0 on loopback; the body if the status is 200.
pub fn http_get(base: &str, path: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
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
