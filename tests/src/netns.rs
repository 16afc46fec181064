//! Network namespaces made for one test and deleted with it. They have a loopback interface
//! with IPv4 and IPv6 on, and no default route in either family: pods and VIPs are addresses
//! inside (IPv6 ones from the ULA range fd00::/8), nothing routes out.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};

pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = crate::unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let file = File::open(format!("/run/netns/{name}"))?;
        let ns = Netns { name, file };
        // IPv6 on (the host's default may have it off); the sysctls under /proc/sys/net are
        // those of the namespace of the thread that writes them.
        ns.run(|| {
            for conf in ["all", "default", "lo"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "0")?;
            }
            Ok(())
        })?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Adds `ip` as a local address (a "pod" lives there). IPv6 ones skip duplicate address
    /// detection so they are usable at once.
    pub fn add_address(&self, ip: impl Into<IpAddr>) -> Result<()> {
        match ip.into() {
            IpAddr::V4(ip) => self.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]),
            IpAddr::V6(ip) => self.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/128"),
                "dev",
                "lo",
                "nodad",
            ]),
        }
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all).map(drop)
    }

    /// A command that runs inside the namespace (nsenter keeps the host's /sys, unlike
    /// `ip netns exec`, so the cgroup mount stays visible).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// Runs `program args` inside the namespace, feeding `stdin`.
    pub fn run_with_input(&self, program: &str, args: &[&str], stdin: &str) -> Result<Output> {
        use std::io::Write as _;
        let mut child = self
            .command(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Moves the calling thread into the namespace (sockets it creates belong there).
    pub fn enter_current_thread(&self) -> Result<()> {
        // SAFETY: setns affects only the calling thread.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(())
    }

    /// Runs `f` on a short-lived thread inside the namespace, so sockets it creates live
    /// there (the calling thread stays where it is).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let fd = self.fd().try_clone_to_owned()?;
        std::thread::spawn(move || -> Result<T> {
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            Ok(f()?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    }

    /// The established TCP connections of one socket family in the namespace, as `ss` lists
    /// them: (local, peer). An AF_INET6 socket talking to an IPv4 peer shows `::ffff:` addresses
    /// and only in the IPv6 list.
    pub fn established(&self, ipv6: bool) -> Result<Vec<(String, String)>> {
        let family = if ipv6 { "-6" } else { "-4" };
        let out = self
            .command("ss")
            .args(["-Htn", family, "state", "established"])
            .output()?;
        if !out.status.success() {
            bail!("ss: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut fields = l.split_whitespace().rev();
                let peer = fields.next()?.to_owned();
                Some((fields.next()?.to_owned(), peer))
            })
            .collect())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// The processes in the network namespace `name`.
pub(crate) fn pids(name: &str) -> Vec<i32> {
    let listed = run("ip", &["netns", "pids", name]).unwrap_or_default();
    listed
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Runs `program` to completion; its standard output, or an error with its standard error.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
