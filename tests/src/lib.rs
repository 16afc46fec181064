//! socklb's test bed: the real pieces the privileged tests, the demo and the benchmarks run on.
//!
//! Everything lives in network namespaces that a test creates and deletes, with no default
//! route, so a connect socklb does not rewrite fails locally (ENETUNREACH) instead of leaving
//! the machine. Service VIPs and pod addresses exist only inside them.
//!
//! - `netns`, `cgroup`: RAII network namespaces and cgroup v2 directories.
//! - `pod`: "pods", real TCP/UDP servers in a namespace that answer with their name and count
//!   what they see.
//! - `client`: drives `socklb-client` processes that run inside the cgroup and namespace.
//! - `agent`: runs `socklb-agent` on a manifest directory, and reads `socklbctl -j`.
//! - `hostile`: another tool's sock_ops program that turns socklb's TCP callbacks off.
//! - `kube_proxy`: the kube-proxy iptables chain for the same Services, as the baseline.
//! - `manifests`: Service and EndpointSlice YAML for a set of pods.
//! - `servers`: nginx and redis-server as pods, for the benchmarks.
//! - `real_clients`: real client stacks (a JVM) driven by the tests.
//! - `testbed`: all of the above for one test, removed when dropped.
//! - `apiserver`, `kubebed`: an API server double and a one-node cluster, for Kubernetes mode.
//! - `leftovers`: removes what killed test-bed processes left behind.

pub mod agent;
pub mod apiserver;
pub mod bpffs;
pub mod cgroup;
pub mod client;
pub mod container;
pub mod hostile;
pub mod kube_proxy;
pub mod kubebed;
mod leftovers;
pub mod manifests;
pub mod netns;
pub mod pod;
pub mod privileges;
pub mod real_clients;
pub mod servers;
pub mod testbed;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// A name unique to this process and call, short enough for netns and chain names. The first
/// call removes what processes that died without cleaning up left behind (`leftovers`).
pub fn unique(prefix: &str) -> String {
    leftovers::reap_once();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "sl{}-{}-{}",
        prefix,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A binary of this workspace, built next to the running one (`cargo xtask test` and
/// `cargo xtask demo` build them all first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "{name} not found next to {}; build the workspace binaries first (cargo build --workspace --bins, which `cargo xtask test` does)",
        exe.display()
    );
}

/// Polls `f` until it returns Some, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
