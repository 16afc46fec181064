//! Whether the privileged tests can run: root, cgroup v2, and the tools they use. Outside CI a
//! missing piece skips the test with a message; in CI (`CI=true`) it fails it, so a
//! misconfigured runner can never pass by skipping.

use std::{path::Path, process::Command};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

/// True if the test can go on.
pub fn check(test: &str) -> bool {
    check_also(test, Vec::new())
}

/// Like `check`, with more that the test needs (`missing`: what is not there).
pub fn check_also(test: &str, more: Vec<String>) -> bool {
    let mut missing = missing();
    missing.extend(more);
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: privileged test cannot run in CI: {why}");
    }
    eprintln!("SKIPPED {test}: {why} (run as root after `cargo xtask setup`)");
    false
}

fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not running as root".to_owned());
    }
    if !Path::new(CGROUP_ROOT).join("cgroup.procs").exists() {
        missing.push(format!("no cgroup v2 hierarchy at {CGROUP_ROOT}"));
    }
    missing.extend(missing_tools(&[
        "ip",
        "ss",
        "nsenter",
        "iptables-restore",
        "ip6tables-restore",
        "java",
    ]));
    if !Path::new("/usr/lib/python3/dist-packages/grpc/__init__.py").exists() {
        missing.push("python3-grpcio not installed".to_owned());
    }
    missing
}

/// "<tool> not installed" for each of `tools` not on PATH.
pub fn missing_tools(tools: &[&str]) -> Vec<String> {
    tools
        .iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|tool| format!("{tool} not installed"))
        .collect()
}

/// Returns from the calling test if it cannot run here (and fails it in CI).
#[macro_export]
macro_rules! require_privileges {
    () => {
        if !$crate::privileges::check(module_path!()) {
            return;
        }
    };
}
