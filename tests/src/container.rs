//! The agent as the DaemonSet runs it: the container of `deploy/daemonset.yaml` (image,
//! command and arguments, environment, capabilities, read-only root, seccomp, privilege
//! escalation, host network and PID namespaces, volume mounts, ports, probes, grace period,
//! memory limit) read from the file (a field the test cannot translate stops it) and run with podman on this machine, so that what is tested is what a
//! cluster would run.
//!
//! What a node provides is supplied by the test bed: the node name (the `spec.nodeName` field
//! reference), the host directories behind `hostPath` volumes (`host_paths` maps a node path
//! to the test's own, e.g. its cgroup root for `/sys/fs/cgroup`), and the API server
//! credentials, which in a cluster come from the service account and here are a kubeconfig
//! for the API server double (`KUBECONFIG` and one more read-only mount). podman runs with
//! runc (crun refuses this machine's hybrid cgroup layout) and with the process's own hard
//! limits as ulimits (podman's defaults exceed them here), processes capped at the kernel's
//! pid_max (runc is refused more).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container as K8sContainer, Probe},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::wait_for;

/// The DaemonSet's pod, as podman flags.
#[derive(Clone, Debug)]
pub struct PodmanSpec {
    pub image: String,
    pub entrypoint: Option<Vec<String>>,
    pub args: Vec<String>,
    flags: Vec<String>,
    /// The container port the probes use.
    pub status_port: u16,
    pub liveness_path: String,
    pub readiness_path: String,
    pub grace_seconds: i64,
}

/// The DaemonSet manifest of the repository.
pub fn daemonset_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml")
}

impl PodmanSpec {
    /// Reads the DaemonSet's only container. `host_paths`: node path -> this machine's path
    /// for `hostPath` volumes (others are used as they are).
    pub fn from_daemonset(
        path: &Path,
        node: &str,
        host_paths: &BTreeMap<&str, PathBuf>,
    ) -> Result<PodmanSpec> {
        let text = fs::read_to_string(path)?;
        let ds: DaemonSet =
            serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let pod = ds
            .spec
            .and_then(|s| s.template.spec)
            .context("DaemonSet without a pod spec")?;
        let [c]: [K8sContainer; 1] = pod
            .containers
            .try_into()
            .map_err(|_| anyhow::anyhow!("expected exactly one container"))?;
        // What the test cannot translate stops it rather than being silently left out.
        if pod.init_containers.is_some_and(|c| !c.is_empty()) {
            bail!("initContainers are not run by the test");
        }
        if pod
            .security_context
            .is_some_and(|s| s != Default::default())
        {
            bail!("a pod-level securityContext is not translated by the test");
        }
        let mut flags = Vec::new();
        if pod.host_network == Some(true) {
            flags.push("--network=host".into());
        }
        if pod.host_pid == Some(true) {
            flags.push("--pid=host".into());
        }
        for e in c.env.unwrap_or_default() {
            let value = match (e.value, e.value_from) {
                (Some(v), None) => v,
                (None, Some(from)) => match from.field_ref.map(|f| f.field_path) {
                    Some(p) if p == "spec.nodeName" => node.to_owned(),
                    other => bail!("env {}: unsupported valueFrom {other:?}", e.name),
                },
                _ => bail!("env {}: neither a value nor a node field", e.name),
            };
            flags.push(format!("--env={}={value}", e.name));
        }
        let limits = c.resources.and_then(|r| r.limits).unwrap_or_default();
        for (resource, quantity) in limits {
            match resource.as_str() {
                "memory" => flags.push(format!("--memory={}", bytes(&quantity.0)?)),
                "cpu" => {} // a share of CPU time: nothing the test checks
                other => bail!("resource limit {other} not translated by the test"),
            }
        }
        let sc = c.security_context.unwrap_or_default();
        if sc.run_as_user.is_some() || sc.run_as_group.is_some() {
            bail!("runAsUser/runAsGroup not translated by the test");
        }
        if sc.privileged == Some(true) {
            flags.push("--privileged".into());
        }
        if sc.allow_privilege_escalation == Some(false) {
            flags.push("--security-opt=no-new-privileges".into());
        }
        if sc.read_only_root_filesystem == Some(true) {
            // As a kubelet does it: no tmpfs mounts added on top.
            flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        let caps = sc.capabilities.unwrap_or_default();
        for cap in caps.drop.unwrap_or_default() {
            flags.push(format!("--cap-drop={cap}"));
        }
        for cap in caps.add.unwrap_or_default() {
            flags.push(format!("--cap-add={cap}"));
        }
        match sc.seccomp_profile.map(|p| p.type_) {
            Some(t) if t == "Unconfined" => flags.push("--security-opt=seccomp=unconfined".into()),
            Some(t) if t == "RuntimeDefault" => {}
            // A kubelet's default (without --seccomp-default) is Unconfined.
            None => flags.push("--security-opt=seccomp=unconfined".into()),
            Some(other) => bail!("seccomp profile {other} not supported by the test"),
        }
        let volumes: BTreeMap<String, String> = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| Some((v.name, v.host_path?.path)))
            .collect();
        for m in c.volume_mounts.unwrap_or_default() {
            let node_path = volumes
                .get(&m.name)
                .with_context(|| format!("volume {} is not a hostPath", m.name))?;
            let host = host_paths
                .get(node_path.as_str())
                .cloned()
                .unwrap_or_else(|| PathBuf::from(node_path));
            let mut options = Vec::new();
            if m.read_only == Some(true) {
                options.push("ro");
            }
            match m.mount_propagation.as_deref() {
                Some("HostToContainer") => options.push("rslave"),
                Some("Bidirectional") => options.push("rshared"),
                _ => {}
            }
            let mut volume = format!("--volume={}:{}", host.display(), m.mount_path);
            if !options.is_empty() {
                volume = format!("{volume}:{}", options.join(","));
            }
            flags.push(volume);
        }
        let ports: BTreeMap<String, u16> = c
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| Some((p.name?, p.container_port as u16)))
            .collect();
        let http = |probe: Option<Probe>, which: &str| -> Result<(String, u16)> {
            let get = probe
                .and_then(|p| p.http_get)
                .with_context(|| format!("no {which} httpGet probe"))?;
            let port = match get.port {
                IntOrString::Int(n) => n as u16,
                IntOrString::String(name) => *ports
                    .get(&name)
                    .with_context(|| format!("{which} probe port {name} is not declared"))?,
            };
            Ok((get.path.unwrap_or_else(|| "/".into()), port))
        };
        let (liveness_path, status_port) = http(c.liveness_probe, "liveness")?;
        let (readiness_path, readiness_port) = http(c.readiness_probe, "readiness")?;
        if readiness_port != status_port {
            bail!("the probes look at two ports");
        }
        Ok(PodmanSpec {
            image: c.image.context("no image")?,
            entrypoint: c.command,
            args: c.args.unwrap_or_default(),
            flags,
            status_port,
            liveness_path,
            readiness_path,
            grace_seconds: pod.termination_grace_period_seconds.unwrap_or(30),
        })
    }
}

/// What keeps the image test from running here, if anything: podman, runc, the image.
pub fn missing(image: &str) -> Vec<String> {
    let mut missing = crate::privileges::missing_tools(&["podman", "runc"]);
    if missing.is_empty() && !podman(&["image", "exists", image]).is_ok_and(|o| o.status.success())
    {
        missing.push(format!("image {image} not built (cargo xtask image)"));
    }
    missing
}

fn podman(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
}

/// A Kubernetes memory quantity ("512Mi", "1G", "1000000") in bytes.
fn bytes(quantity: &str) -> Result<u64> {
    let digits = quantity.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit: u64 = match &quantity[digits.len()..] {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => bail!("memory quantity {quantity}: unit {other} not translated by the test"),
    };
    Ok(digits.parse::<u64>().context(quantity.to_owned())? * unit)
}

/// Hard limits of this process, as podman ulimit flags (podman's defaults exceed them here).
fn ulimits() -> Vec<String> {
    let hard = |resource| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we own.
        unsafe { libc::getrlimit(resource, &mut limit) };
        limit.rlim_max
    };
    let pid_max: u64 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32_768);
    let nofile = hard(libc::RLIMIT_NOFILE);
    let nproc = hard(libc::RLIMIT_NPROC).min(pid_max);
    vec![
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ]
}

/// A container, removed (forcibly) when dropped, with the cgroups podman made for it: they
/// live under a parent named like the container (podman's default parent, `libpod_parent`,
/// would stay behind in every hierarchy).
pub struct Container {
    pub name: String,
    grace_seconds: i64,
    _bpffs: crate::bpffs::Held,
}

impl Container {
    /// Starts `spec` detached, with `extra` flags (the bed's credentials) and, if given, other
    /// arguments than the DaemonSet's.
    pub fn start(
        spec: &PodmanSpec,
        name: &str,
        extra: &[String],
        args: Option<&[String]>,
    ) -> Result<Container> {
        reap_stale_containers();
        let _bpffs = crate::bpffs::hold()?;
        let _ = podman(&["rm", "--force", "--ignore", name]);
        let mut run: Vec<String> = vec![
            "run".into(),
            "--detach".into(),
            "--pull=never".into(),
            format!("--name={name}"),
            format!("--cgroup-parent=/{name}"),
        ];
        run.extend(spec.flags.iter().cloned());
        run.extend(ulimits());
        run.extend(extra.iter().cloned());
        if let Some(entrypoint) = &spec.entrypoint {
            run.push(format!(
                "--entrypoint={}",
                serde_json::to_string(entrypoint)?
            ));
        }
        run.push(spec.image.clone());
        run.extend(args.unwrap_or(&spec.args).iter().cloned());
        let args: Vec<&str> = run.iter().map(String::as_str).collect();
        let out = podman(&args)?;
        if !out.status.success() {
            let _ = podman(&["rm", "--force", "--ignore", name]);
            bail!(
                "podman run: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Container {
            name: name.to_owned(),
            grace_seconds: spec.grace_seconds,
            _bpffs,
        })
    }

    pub fn logs(&self) -> String {
        podman(&["logs", &self.name])
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    /// Runs a command in the container; its stdout.
    pub fn exec(&self, command: &[&str]) -> Result<String> {
        let mut args = vec!["exec", self.name.as_str()];
        args.extend(command);
        let out = podman(&args)?;
        if !out.status.success() {
            bail!(
                "podman exec {}: {}",
                command.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops it as the kubelet does (SIGTERM, then SIGKILL after the grace period); its exit
    /// code.
    pub fn stop(&self) -> Result<i64> {
        let grace = self.grace_seconds.to_string();
        let out = podman(&["stop", "--time", &grace, &self.name])?;
        if !out.status.success() {
            bail!(
                "podman stop: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.exit_code()
    }

    /// Waits for it to exit by itself (at most `within`); its exit code.
    pub fn wait_exit(&self, within: Duration) -> Result<i64> {
        wait_for("the container to exit", within, || {
            let out = podman(&["inspect", "--format", "{{.State.Running}}", &self.name])?;
            Ok((String::from_utf8_lossy(&out.stdout).trim() == "false").then_some(()))
        })?;
        self.exit_code()
    }

    fn exit_code(&self) -> Result<i64> {
        let out = podman(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.name]);
        remove_cgroup_parent(&self.name);
    }
}

/// Removes the cgroup parent `name` in every hierarchy (v2 and, on a hybrid machine, v1).
fn remove_cgroup_parent(name: &str) {
    for hierarchy in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = hierarchy.path().join(name);
        if dir.exists() {
            crate::cgroup::remove(&dir);
        }
    }
}

/// Removes, once per process, the containers (and their cgroups) of test processes that
/// died without cleaning up (named by `crate::unique`, so they carry their owner's pid).
fn reap_stale_containers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(out) = podman(&["ps", "--all", "--format", "{{.Names}}"]) else {
            return;
        };
        let names = String::from_utf8_lossy(&out.stdout);
        for name in names.lines().filter(|n| crate::leftovers::is_stale(n)) {
            let _ = podman(&["rm", "--force", "--time", "0", name]);
            remove_cgroup_parent(name);
        }
    });
}
