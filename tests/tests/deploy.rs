//! deploy/: every manifest parses strictly into its Kubernetes type, and they fit together:
//! the ClusterRole grants exactly what the agent watches, the DaemonSet runs as the bound
//! ServiceAccount, probes the agent's health endpoints, and mounts what it needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_userspace::kube_watch::{GOT, WATCHED};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Deserialises `v`, failing on any field the type does not know (a typo would otherwise be
/// silently ignored by the API server's client-side decoding).
fn strict<T: DeserializeOwned>(v: Value, file: &str) -> T {
    let mut unknown = Vec::new();
    let t = serde_ignored::deserialize(v, |p| unknown.push(p.to_string()))
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(unknown.is_empty(), "{file}: unknown fields {unknown:?}");
    t
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    daemonsets: Vec<DaemonSet>,
}

fn load() -> (Objects, BTreeSet<String>) {
    let mut o = Objects::default();
    let mut files = BTreeSet::new();
    for entry in fs::read_dir(deploy_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        files.insert(name.clone());
        let text = fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            match v["kind"].as_str().unwrap_or_default() {
                "Namespace" => o.namespaces.push(strict(v, &name)),
                "ServiceAccount" => o.accounts.push(strict(v, &name)),
                "ClusterRole" => o.roles.push(strict(v, &name)),
                "ClusterRoleBinding" => o.bindings.push(strict(v, &name)),
                "DaemonSet" => o.daemonsets.push(strict(v, &name)),
                other => panic!("{name}: unexpected kind {other:?}"),
            }
        }
    }
    (o, files)
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_watches() {
    let (o, _) = load();
    assert_eq!(o.roles.len(), 1);
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in o.roles[0].rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted
                    .entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    let verbs = |v: &[&str]| v.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
    let mut wanted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (g, r) in WATCHED {
        wanted.insert((g.into(), r.into()), verbs(&["get", "list", "watch"]));
    }
    for (g, r) in GOT {
        wanted.insert((g.into(), r.into()), verbs(&["get"]));
    }
    assert_eq!(granted, wanted);
}

#[test]
fn the_daemonset_runs_as_the_bound_account_and_probes_the_agent() {
    let (o, _) = load();
    let ds = &o.daemonsets[0];
    let namespace = ds.metadata.namespace.clone().unwrap();
    assert!(
        o.namespaces
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(namespace.as_str()))
    );
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let account = pod.service_account_name.clone().unwrap();
    assert!(
        o.accounts
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(account.as_str())
                && a.metadata.namespace.as_deref() == Some(namespace.as_str()))
    );
    let binding = &o.bindings[0];
    assert_eq!(
        binding.role_ref.name,
        o.roles[0].metadata.name.clone().unwrap()
    );
    assert!(
        binding
            .subjects
            .iter()
            .flatten()
            .any(|s| s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(namespace.as_str()))
    );

    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    let status = args
        .iter()
        .find_map(|a| a.strip_prefix("--status-address="))
        .expect("status address");
    let port: i32 = status.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        c.ports
            .iter()
            .flatten()
            .any(|p| p.container_port == port && p.name.as_deref() == Some("status"))
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let env = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        env.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let mounts: BTreeSet<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains("/sys/fs/bpf") && mounts.contains("/sys/fs/cgroup"),
        "{mounts:?}"
    );
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.drop.clone().unwrap(), ["ALL"]);
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("memory")
    );
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let (_, files) = load();
    let k: Value = serde_norway::from_str(
        &fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn the_daemonset_arguments_are_the_agents() {
    // The agent's own parser accepts them (its --help lists each flag used).
    let (o, _) = load();
    let pod = o.daemonsets[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let help = std::process::Command::new(socklb_tests::bin("socklb-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in pod.containers[0].args.iter().flatten() {
        let flag = arg.split('=').next().unwrap();
        assert!(help.contains(flag), "{flag} is not a socklb-agent flag");
    }
}
