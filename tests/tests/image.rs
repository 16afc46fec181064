//! The agent image run exactly as deploy/daemonset.yaml runs it (see `socklb_tests::container`),
//! in Kubernetes mode against the API server double and the one-node test bed: it balances a
//! pod of a labelled namespace, answers the probes, serves socklbctl inside the container,
//! survives a rolling update (SIGTERM, then the next container adopts the pins) without
//! breaking open connections, and `socklb-agent cleanup` in a container removes everything.

use std::{collections::BTreeMap, fs, path::PathBuf, time::Duration};

use serde_json::Value;
use socklb_tests::{
    agent::http_get,
    client::per_pod,
    container::{self, Container, PodmanSpec},
    kubebed::{KubeBed, NODE},
    manifests::{ServiceSpec, pod_ips},
    privileges, require_privileges, unique, wait_for,
};

/// A directory of its own on the host's bpffs, standing for the node's /sys/fs/bpf; removed
/// with everything pinned in it.
struct BpffsDir(PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn metric(base: &str, name: &str) -> Option<f64> {
    http_get(base, "/metrics")
        .ok()?
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `socklbctl -j backend list` inside the container: connections per backend IP of shop/web.
fn backends_in(c: &Container) -> BTreeMap<String, u64> {
    let out = c.exec(&["socklbctl", "-j", "backend", "list"]).unwrap();
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    rows.iter()
        .filter(|r| r["service"] == "shop/web")
        .map(|r| {
            (
                r["ip"].as_str().unwrap().to_owned(),
                r["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_image_runs_as_the_daemonset_says_and_survives_a_rolling_update() {
    require_privileges!();
    // Declared first, so dropped last: after the directory below is gone.
    let _mounted = socklb_tests::bpffs::hold().unwrap();
    let bpffs = BpffsDir(PathBuf::from("/sys/fs/bpf").join(unique("image")));
    fs::create_dir(&bpffs.0).unwrap();
    let mut bed = KubeBed::new("img").unwrap();
    let host_paths = BTreeMap::from([
        ("/sys/fs/bpf", bpffs.0.clone()),
        ("/sys/fs/cgroup", bed.cgroup_root.path().to_path_buf()),
    ]);
    let spec = PodmanSpec::from_daemonset(&container::daemonset_path(), NODE, &host_paths).unwrap();
    if !privileges::check_also(module_path!(), container::missing(&spec.image)) {
        return;
    }

    let pods = pod_ips(38, 3);
    bed.tcp_backends(&pods, 8080).unwrap();
    bed.namespace("shop", Some(true)).unwrap();
    let mut web = ServiceSpec::new(
        "web",
        std::net::Ipv4Addr::new(10, 96, 38, 10),
        80,
        8080,
        &pods,
    );
    web.namespace = "shop".into();
    bed.service(&web).unwrap();
    let dns_pods = pod_ips(39, 2);
    bed.udp_backends(&dns_pods, 5353).unwrap();
    let mut dns = ServiceSpec::new(
        "dns",
        std::net::Ipv4Addr::new(10, 96, 39, 10),
        53,
        5353,
        &dns_pods,
    );
    dns.namespace = "shop".into();
    dns.protocol = "UDP";
    bed.service(&dns).unwrap();
    bed.client_pod("shop", "a", false).unwrap();
    // The API server's address and credentials, as a cluster's service account would give
    // them.
    let kubeconfig = std::env::temp_dir().join(unique("kubeconfig"));
    bed.api.write_kubeconfig(&kubeconfig).unwrap();
    let credentials = [
        format!(
            "--volume={}:/etc/socklb-test/kubeconfig:ro",
            kubeconfig.display()
        ),
        "--env=KUBECONFIG=/etc/socklb-test/kubeconfig".to_owned(),
    ];
    let _remove_kubeconfig = scopeguard(kubeconfig.clone());

    let status = format!("http://127.0.0.1:{}", spec.status_port);
    let first = Container::start(&spec, &unique("agent1"), &credentials, None).unwrap();
    wait_for("the readiness probe", Duration::from_secs(30), || {
        Ok(http_get(&status, &spec.readiness_path).ok().map(drop))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", first.logs()));
    http_get(&status, &spec.liveness_path).unwrap();
    // The pod's network namespace is found through its processes: start one.
    let mut a = bed.client("a").unwrap();
    wait_for("pod a to be switched on", Duration::from_secs(10), || {
        Ok((metric(&status, "socklb_enabled_pods") == Some(1.0)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", first.logs()));

    // Balanced: least-conn, one at a time, over the three pods; socklbctl in the container
    // sees the same counts.
    let opened = a.open_one_by_one(web.target(), 6).unwrap();
    assert!(opened.iter().all(|o| o.ok), "{opened:?}");
    assert_eq!(
        per_pod(&opened).values().copied().collect::<Vec<_>>(),
        [2, 2, 2]
    );
    assert!(
        backends_in(&first).values().all(|n| *n == 2),
        "{:?}",
        backends_in(&first)
    );

    // A connected UDP socket to a pod that leaves its Service is closed (SOCK_DESTROY, in the
    // pod's network namespace): its next request fails, the other socket's does not.
    let mut udp = bed.client("a").unwrap();
    let one = serde_json::json!({"cmd": "open", "target": dns.target().to_string(), "count": 1, "proto": "udp"});
    for _ in 0..2 {
        assert!(udp.open_with(one.clone()).unwrap()[0].ok);
    }
    dns.set_pods(&dns_pods[1..]);
    bed.service(&dns).unwrap();
    wait_for(
        "the socket to the removed pod to be closed",
        Duration::from_secs(10),
        || {
            let r = udp.try_requests(1)?;
            Ok((r.errors == 1).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", first.logs()));
    drop(udp);

    // Rolling update: SIGTERM leaves programs and maps pinned; connections keep working and
    // new ones are still balanced while no agent runs.
    assert_eq!(first.stop().unwrap(), 0, "{}", first.logs());
    let pins = bpffs.0.join("socklb");
    assert!(pins.join("links/connect4").exists() && pins.join("CONN_COUNTS").exists());
    assert_eq!(a.requests(1).unwrap().values().sum::<u64>(), 6);
    let more = a.open_one_by_one(web.target(), 3).unwrap();
    assert_eq!(
        per_pod(&more).values().copied().collect::<Vec<_>>(),
        [1, 1, 1]
    );

    // The next version's container adopts them.
    let second = Container::start(&spec, &unique("agent2"), &credentials, None).unwrap();
    wait_for(
        "the second container to be ready",
        Duration::from_secs(30),
        || Ok(http_get(&status, &spec.readiness_path).ok().map(drop)),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", second.logs()));
    let log = second.logs();
    assert!(log.contains("connect4: Adopted"), "{log}");
    assert_eq!(a.requests(1).unwrap().values().sum::<u64>(), 9);
    let last = a.open_one_by_one(web.target(), 3).unwrap();
    assert_eq!(
        per_pod(&last).values().copied().collect::<Vec<_>>(),
        [1, 1, 1]
    );
    assert!(
        backends_in(&second).values().all(|n| *n == 4),
        "{:?}",
        backends_in(&second)
    );
    assert_eq!(second.stop().unwrap(), 0, "{}", second.logs());

    // `socklb-agent cleanup` in a container of the same spec removes every pin; the
    // connections made stay up.
    let pin_path = spec
        .args
        .iter()
        .find(|a| a.starts_with("--pin-path="))
        .cloned()
        .unwrap_or_else(|| "--pin-path=/sys/fs/bpf/socklb".into());
    let before = attached(bed.cgroup_root.path());
    assert!(
        before.contains("connect4"),
        "bpftool sees no program: {before}"
    );
    let cleanup = Container::start(
        &spec,
        &unique("cleanup"),
        &credentials,
        Some(&["cleanup".to_owned(), pin_path]),
    )
    .unwrap();
    assert_eq!(
        cleanup.wait_exit(Duration::from_secs(30)).unwrap(),
        0,
        "{}",
        cleanup.logs()
    );
    assert!(
        !pins.exists(),
        "{:?}",
        fs::read_dir(&bpffs.0).map(|d| d.count())
    );
    assert_eq!(a.requests(1).unwrap().values().sum::<u64>(), 12);
    // And nothing is left attached to the cgroup (the pod's connects fall back to the test
    // bed's kube-proxy rules).
    let left = attached(bed.cgroup_root.path());
    assert!(!left.contains("connect4"), "{left}");
}

/// The programs attached to a cgroup, as bpftool lists them.
fn attached(cgroup: &std::path::Path) -> String {
    let out = std::process::Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Removes a file when dropped.
fn scopeguard(path: PathBuf) -> impl Drop {
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    Remove(path)
}
