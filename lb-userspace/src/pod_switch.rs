//! The per-namespace switch. Pods in namespaces labelled `socklb.io/enabled=true` are balanced
//! by socklb; a pod annotated `socklb.io/enabled: "false"` opts out (the per-pod opt-out
//! cilium#34225 asks for). Everyone else keeps going through kube-proxy.
//!
//! How: the programs are attached once, at the cgroup root, and balance only sockets whose
//! network namespace cookie is in `ENABLED_NETNS` (Kmesh's approach). One entry per pod, found
//! through the pod's cgroup (kubelet's cgroupfs or systemd layout) -> a process in it -> its
//! network namespace -> the namespace's cookie. Chosen over attaching per pod cgroup because it
//! needs no attach or detach as containers come and go, and a switch flip is one map write.
//! Flipping only affects new connections: open ones keep their socket state and counts.
//! hostNetwork pods share the node's namespace and are never switched on.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::{datapath::Maps, netns};

pub const ENABLED_LABEL: &str = "socklb.io/enabled";

/// A pod to switch on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

/// Every pod of the node, with why it is not balanced (None: it is to be switched on).
pub fn decide(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<Pod>],
) -> Vec<(PodRef, Option<&'static str>)> {
    let enabled: BTreeSet<&str> = namespaces
        .iter()
        .filter(|ns| {
            ns.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ENABLED_LABEL))
                .map(String::as_str)
                == Some("true")
        })
        .filter_map(|ns| ns.metadata.name.as_deref())
        .collect();
    let mut out: Vec<(PodRef, Option<&'static str>)> = pods
        .iter()
        .filter_map(|p| {
            let pod = PodRef {
                uid: p.metadata.uid.clone()?,
                namespace: p.metadata.namespace.clone()?,
                name: p.metadata.name.clone()?,
            };
            let opted_out = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ENABLED_LABEL))
                .is_some_and(|v| v == "false");
            let host_network = p.spec.as_ref().and_then(|s| s.host_network) == Some(true);
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            let off = if !enabled.contains(pod.namespace.as_str()) {
                Some("namespace not labelled socklb.io/enabled=true")
            } else if opted_out {
                Some("annotated socklb.io/enabled: \"false\"")
            } else if host_network {
                Some("hostNetwork: the node's network namespace")
            } else if matches!(phase, Some("Succeeded" | "Failed")) {
                Some("finished")
            } else {
                None
            };
            Some((pod, off))
        })
        .collect();
    out.sort();
    out
}

/// The pod cgroups under `root`, by pod UID, in all six of kubelet's layouts: with the
/// cgroupfs driver `kubepods/pod<uid>` (Guaranteed), `kubepods/burstable/pod<uid>` and
/// `kubepods/besteffort/pod<uid>`; with the systemd driver `kubepods.slice/
/// kubepods-pod<uid with _>.slice` and `kubepods.slice/kubepods-<qos>.slice/
/// kubepods-<qos>-pod<uid with _>.slice`. The containers below (containerd's
/// `cri-containerd-<id>.scope` or `<id>`, CRI-O's `crio-<id>.scope`) are not pods.
pub fn pod_cgroups(root: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(uid) = pod_uid(&name) {
                found.insert(uid, entry.path());
            } else if depth < 3 && (name.starts_with("kubepods") || is_qos_dir(depth, &name)) {
                dirs.push((entry.path(), depth + 1));
            }
        }
    }
    found
}

/// A cgroupfs driver's QoS class directory, right below `kubepods`.
fn is_qos_dir(depth: usize, name: &str) -> bool {
    depth == 1 && matches!(name, "besteffort" | "burstable")
}

/// The pod UID in a kubelet pod cgroup name, if it is one.
fn pod_uid(name: &str) -> Option<String> {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let at = name.rfind("pod")?;
    if at > 0 && !name[..at].ends_with('-') {
        return None;
    }
    let uid = name[at + 3..].replace('_', "-");
    let shape_ok = uid.len() == 36
        && uid.split('-').map(str::len).eq([8, 4, 4, 4, 12])
        && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    shape_ok.then_some(uid)
}

/// Keeps `ENABLED_NETNS` equal to the network namespaces of the pods to switch on.
pub struct PodSwitch {
    cgroup_root: PathBuf,
    cookies: netns::Cookies,
    own_netns: (u64, u64),
    /// What the map holds.
    enabled: BTreeSet<u64>,
}

/// The result of one sync.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub enabled: usize,
    pub added: usize,
    pub removed: usize,
    /// Pods to switch on whose network namespace could not be found yet, with why.
    pub pending: Vec<(PodRef, &'static str)>,
}

impl PodSwitch {
    pub fn new(cgroup_root: &Path, maps: &Maps) -> Result<PodSwitch> {
        let own = fs::metadata("/proc/self/ns/net")?;
        Ok(PodSwitch {
            cgroup_root: cgroup_root.to_owned(),
            cookies: netns::Cookies::default(),
            own_netns: (own.dev(), own.ino()),
            enabled: maps.enabled_netns.keys().collect::<Result<_, _>>()?,
        })
    }

    pub fn sync(&mut self, maps: &mut Maps, pods: &[PodRef]) -> Result<Synced> {
        let cgroups = pod_cgroups(&self.cgroup_root);
        let mut want = BTreeSet::new();
        let mut synced = Synced::default();
        for pod in pods {
            let found = match cgroups.get(&pod.uid) {
                Some(cgroup) => self.cookie_of(cgroup)?,
                None => Err("no cgroup found for it under kubelet's root yet"),
            };
            match found {
                Ok(cookie) => drop(want.insert(cookie)),
                Err(why) => synced.pending.push((pod.clone(), why)),
            }
        }
        for cookie in want.difference(&self.enabled) {
            maps.enabled_netns.insert(cookie, &1, 0)?;
            synced.added += 1;
        }
        for cookie in self.enabled.difference(&want) {
            maps.enabled_netns.remove(cookie)?;
            synced.removed += 1;
        }
        synced.enabled = want.len();
        self.enabled = want;
        Ok(synced)
    }

    /// The network namespace cookie of the first process in `cgroup` (or below), or why
    /// there is none to switch on.
    fn cookie_of(&mut self, cgroup: &Path) -> Result<Result<u64, &'static str>> {
        let Some(ns) = first_netns(cgroup) else {
            return Ok(Err("no process in its cgroup yet"));
        };
        let meta = ns.metadata()?;
        if (meta.dev(), meta.ino()) == self.own_netns {
            return Ok(Err("in the node's network namespace")); // never switched on
        }
        let cookie = self
            .cookies
            .of(&ns)
            .with_context(|| format!("netns cookie of {}", cgroup.display()))?;
        Ok(Ok(cookie))
    }
}

fn first_netns(cgroup: &Path) -> Option<fs::File> {
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            if let Ok(f) = fs::File::open(format!("/proc/{pid}/ns/net")) {
                return Some(f);
            }
        }
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;

    use super::*;

    fn namespace(name: &str, enabled: Option<&str>) -> Arc<Namespace> {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        if let Some(v) = enabled {
            ns.metadata.labels = Some(Map::from([(ENABLED_LABEL.to_owned(), v.to_owned())]));
        }
        Arc::new(ns)
    }

    fn pod(ns: &str, name: &str, f: impl FnOnce(&mut Pod)) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        f(&mut p);
        Arc::new(p)
    }

    #[test]
    fn enabled_namespaces_minus_opted_out_host_network_and_finished_pods() {
        let namespaces = [
            namespace("shop", Some("true")),
            namespace("off", Some("false")),
            namespace("plain", None),
        ];
        let pods = [
            pod("shop", "a", |_| {}),
            pod("shop", "opted-out", |p| {
                p.metadata.annotations =
                    Some(Map::from([(ENABLED_LABEL.to_owned(), "false".to_owned())]));
            }),
            pod("shop", "host", |p| {
                p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
                    host_network: Some(true),
                    ..Default::default()
                })
            }),
            pod("shop", "done", |p| {
                p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                    phase: Some("Succeeded".into()),
                    ..Default::default()
                })
            }),
            pod("off", "b", |_| {}),
            pod("plain", "c", |_| {}),
        ];
        let names: Vec<String> = decide(&namespaces, &pods)
            .into_iter()
            .filter(|(_, off)| off.is_none())
            .map(|(p, _)| p.name)
            .collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn pod_uids_are_read_from_both_kubelet_cgroup_layouts() {
        let uid = "0b3a9c1e-5f2d-4c7a-9e8b-1a2b3c4d5e6f";
        assert_eq!(pod_uid(&format!("pod{uid}")).as_deref(), Some(uid));
        let systemd = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
        assert_eq!(pod_uid(&systemd).as_deref(), Some(uid));
        assert_eq!(pod_uid("kubepods-burstable.slice"), None);
        assert_eq!(pod_uid("cri-containerd-abc.scope"), None);
        assert_eq!(pod_uid("notapod0b3a9c1e-5f2d-4c7a-9e8b-1a2b3c4d5e6f"), None);
    }

    #[test]
    fn pods_are_found_in_every_kubelet_layout_and_containers_are_not_pods() {
        let root = std::env::temp_dir().join(format!("socklb-layouts-{}", std::process::id()));
        let uid = |n: u8| format!("0b3a9c1e-5f2d-4c7a-9e8b-1a2b3c4d5e{n:02x}");
        let systemd = |n: u8| uid(n).replace('-', "_");
        let pods = [
            format!("kubepods/pod{}", uid(1)),
            format!("kubepods/burstable/pod{}", uid(2)),
            format!("kubepods/besteffort/pod{}", uid(3)),
            format!("kubepods.slice/kubepods-pod{}.slice", systemd(4)),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
                systemd(5)
            ),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                systemd(6)
            ),
        ];
        let containers = [
            "cri-containerd-4f6e0a.scope",
            "crio-4f6e0a.scope",
            "crio-conmon-4f6e0a.scope",
            "4f6e0a9b8c7d",
        ];
        for pod in &pods {
            for c in containers {
                fs::create_dir_all(root.join(pod).join(c)).unwrap();
            }
        }
        // Not kubelet's: never looked into.
        fs::create_dir_all(root.join(format!("system.slice/pod{}", uid(7)))).unwrap();
        let found = pod_cgroups(&root);
        let _ = fs::remove_dir_all(&root);
        let want: BTreeMap<String, PathBuf> = (1..=6)
            .map(|n| (uid(n), root.join(&pods[usize::from(n) - 1])))
            .collect();
        assert_eq!(found, want);
    }
}
