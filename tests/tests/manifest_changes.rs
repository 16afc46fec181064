//! The agent over time: manifest edits, bad input, and restarts with connections open.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use socklb_tests::{
    agent::ctl_json,
    bin,
    client::per_pod,
    manifests::{ServiceSpec, pod_ips},
    require_privileges,
    testbed::Testbed,
    wait_for,
};

#[test]
fn a_removed_backend_gets_no_new_connections_and_keeps_its_open_ones() {
    require_privileges!();
    let mut bed = Testbed::new("rm").unwrap();
    let pods = pod_ips(8, 3);
    bed.add_pods(&pods, 8080).unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 8, 10), 80);
    let mut spec = ServiceSpec::new("web", *vip.ip(), 80, 8080, &pods);
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();

    let mut old = bed.client().unwrap();
    assert_eq!(
        per_pod(&old.open_one_by_one(vip, 9).unwrap())
            .values()
            .copied()
            .collect::<Vec<_>>(),
        [3, 3, 3]
    );

    spec.set_pods(&pods[..2]);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &spec.pods).unwrap();
    let draining = bed.agent().backends().unwrap();
    let gone = draining.iter().find(|b| b.ip == "10.244.8.3").unwrap();
    assert_eq!((gone.state.as_str(), gone.connections), ("draining", 3));

    let mut new = bed.client().unwrap();
    let spread = per_pod(&new.open(vip, 12).unwrap());
    assert!(!spread.contains_key("pod-3"), "{spread:?}");
    // The removed pod's connections still work.
    let served = old.requests(2).unwrap();
    assert_eq!(served.get("pod-3"), Some(&6), "{served:?}");

    // Once its last connection closes, the agent forgets it.
    old.close_all().unwrap();
    wait_for(
        "the drained backend to be forgotten",
        Duration::from_secs(5),
        || Ok((!bed.agent().backends()?.iter().any(|b| b.ip == "10.244.8.3")).then_some(())),
    )
    .unwrap();
}

#[test]
fn bad_manifests_are_reported_by_name_and_leave_the_programmed_state() {
    require_privileges!();
    let mut bed = Testbed::new("bad").unwrap();
    let pods = pod_ips(9, 2);
    bed.add_pods(&pods, 8080).unwrap();
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 9, 10), 80);
    let spec = ServiceSpec::new("web", *vip.ip(), 80, 8080, &pods);
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let programmed = bed.agent().backends().unwrap();
    let good = spec.yaml();

    let cases: Vec<(String, &str)> = vec![
        (
            "kind: Service\n  metadata: : broken".into(),
            "web.yaml: invalid YAML",
        ),
        (
            good.replace("clusterIP:", "clusterIPs2: [x]\n  clusterIP:"),
            "web.yaml: Service demo/web: unknown field(s): spec.clusterIPs2",
        ),
        (
            good.replace("kind: EndpointSlice", "kind: Endpointslice"),
            "web.yaml: Endpointslice demo/web-1: unknown kind",
        ),
        (
            too_many_backends(&good),
            "web.yaml: Service demo/web: port \"main\" (10.96.9.10:80/TCP) has 8193 backends, more than the 8192",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        bed.manifests.write("web.yaml", text).unwrap();
        bed.agent()
            .wait_log(expected, 1)
            .unwrap_or_else(|e| panic!("case {i}: {e}\n{}", bed.agent().log()));
        assert_eq!(
            bed.agent().backends().unwrap(),
            programmed,
            "case {i} changed the maps"
        );
        // And the Service still works.
        let mut c = bed.client().unwrap();
        assert!(c.open(vip, 2).unwrap().iter().all(|o| o.ok), "case {i}");
    }
    bed.manifests.write("web.yaml", &good).unwrap();

    // Other files that would take what web holds, or that cannot be read: each is reported by
    // name, and web keeps its address and backends.
    let intruder = ServiceSpec::new("intruder", *vip.ip(), 80, 8080, &pods[..1]).yaml();
    let copy = good.replace("clusterIP: 10.96.9.10", "clusterIP: 10.96.9.99");
    let dir = bed.manifests.path().to_path_buf();
    type Make = Box<dyn Fn()>;
    let others: Vec<(&str, Make, &str)> = vec![
        (
            "aaa.yaml",
            Box::new({
                let (dir, intruder) = (dir.clone(), intruder.clone());
                move || std::fs::write(dir.join("aaa.yaml"), &intruder).unwrap()
            }),
            "aaa.yaml: Service demo/intruder: 10.96.9.10:80/TCP is already used by Service demo/web",
        ),
        (
            "00-copy.yaml",
            Box::new({
                let (dir, copy) = (dir.clone(), copy.clone());
                move || std::fs::write(dir.join("00-copy.yaml"), &copy).unwrap()
            }),
            "00-copy.yaml: Service demo/web: also defined in",
        ),
        (
            "loop.yaml",
            Box::new({
                let dir = dir.clone();
                move || std::os::unix::fs::symlink("loop.yaml", dir.join("loop.yaml")).unwrap()
            }),
            "loop.yaml: cannot read",
        ),
        (
            "big.yaml",
            Box::new({
                let dir = dir.clone();
                // Sparse: 40 MB that take no disk, and that the agent must not read.
                move || {
                    std::fs::File::create(dir.join("big.yaml"))
                        .and_then(|f| f.set_len(40 << 20))
                        .unwrap()
                }
            }),
            "big.yaml: cannot read: more than the 16777216 bytes",
        ),
    ];
    for (file, make, expected) in &others {
        make();
        bed.agent()
            .wait_log(expected, 1)
            .unwrap_or_else(|e| panic!("{file}: {e}\n{}", bed.agent().log()));
        assert_eq!(
            bed.agent().backends().unwrap(),
            programmed,
            "{file} changed the maps"
        );
        let mut c = bed.client().unwrap();
        let o = c.open(vip, 2).unwrap();
        assert!(o.iter().all(|o| o.ok), "{file}: {o:?}");
        std::fs::remove_file(dir.join(file)).unwrap();
    }

    // Fixed: the edit applies.
    bed.manifests
        .write("web.yaml", &good.replace("10.96.9.10", "10.96.9.11"))
        .unwrap();
    wait_for(
        "the fixed manifest to apply",
        Duration::from_secs(5),
        || {
            let services: Vec<serde_json::Value> =
                ctl_json(&bed.agent().pin_path, &["service", "list"])?;
            Ok(
                (services.len() == 1 && services[0]["frontend"] == "10.96.9.11:80/TCP")
                    .then_some(()),
            )
        },
    )
    .unwrap();
}

fn too_many_backends(good: &str) -> String {
    let endpoints: String = (0..8193)
        .map(|i| format!("- addresses: [\"10.245.{}.{}\"]\n", i / 256, i % 256))
        .collect();
    let cut = good.find("endpoints:").unwrap();
    format!("{}endpoints:\n{endpoints}", &good[..cut])
}

#[test]
fn the_agent_refuses_a_missing_cgroup_with_a_clear_error() {
    require_privileges!();
    let bed = Testbed::new("nocg").unwrap();
    let out = Command::new(bin("socklb-agent"))
        .args(["--manifests"])
        .arg(bed.manifests.path())
        .args([
            "--cgroup",
            "/sys/fs/cgroup/unified/no-such-cgroup",
            "--pin-path",
        ])
        .arg(format!("/sys/fs/bpf/{}", socklb_tests::unique("nocg")))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cgroup /sys/fs/cgroup/unified/no-such-cgroup cannot be opened"),
        "{stderr}"
    );
}

#[test]
fn restarting_the_agent_keeps_open_and_new_connections_balanced() {
    require_privileges!();
    let (mut bed, spec) = Testbed::serving("rst", 10, 3, |_| {}, &[]).unwrap();
    let vip = spec.target();

    let mut c = bed.client().unwrap();
    assert!(c.open_one_by_one(vip, 12).unwrap().iter().all(|o| o.ok));

    // Agent stopped: pinned programs keep balancing and counting.
    bed.agent.as_mut().unwrap().stop().unwrap();
    assert_eq!(c.requests(1).unwrap().values().sum::<u64>(), 12);
    let spread = per_pod(&c.open_one_by_one(vip, 6).unwrap());
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "still least-conn"
    );

    // Tamper with one count while no agent runs; the restarted agent checks the counts against
    // the live sockets and repairs it.
    let id = {
        let mut maps = lb_userspace::datapath::Maps::open_pinned(&bed.agent().pin_path).unwrap();
        let id = maps.backends.keys().next().unwrap().unwrap();
        maps.counts.set(id, &100, 0).unwrap();
        id
    };
    bed.agent.as_mut().unwrap().restart().unwrap();
    // The check runs on the agent's background thread, right after the start.
    bed.agent()
        .wait_log("checked against 18 live sockets", 1)
        .unwrap_or_else(|e| panic!("{e}: {}", bed.agent().log()));
    let log = bed.agent().log();
    assert!(log.contains("connect4: Adopted"), "{log}");
    bed.agent()
        .wait_log(
            &format!("backend {id}: count was 100, 6 live sockets found; corrected"),
            1,
        )
        .unwrap_or_else(|e| panic!("{e}: {log}"));
    bed.settle_at(18).unwrap();

    // After the restart: old connections work, new ones are balanced.
    assert_eq!(c.requests(1).unwrap().values().sum::<u64>(), 18);
    let spread = per_pod(&c.open_one_by_one(vip, 3).unwrap());
    assert_eq!(spread.values().copied().collect::<Vec<_>>(), [1, 1, 1]);
    c.close_all().unwrap();
    bed.settle_at(0).unwrap();
}

#[test]
fn an_upgrade_over_maps_of_an_older_layout_replaces_them_and_keeps_connections_working() {
    require_privileges!();
    let (mut bed, spec) = Testbed::serving("upg", 11, 3, |_| {}, &[]).unwrap();
    let vip = spec.target();
    let mut c = bed.client().unwrap();
    assert!(c.open_one_by_one(vip, 3).unwrap().iter().all(|o| o.ok));

    // What an older build left: no LAYOUT file, and a map whose value has another size (the
    // rebalancing record before it had an error count).
    bed.agent.as_mut().unwrap().stop().unwrap();
    let pin = bed.agent().pin_path.clone();
    std::fs::remove_file(pin.join("LAYOUT")).unwrap();
    std::fs::remove_file(pin.join("REBALANCE_STATS")).unwrap();
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin.join("REBALANCE_STATS"))
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "32",
            "entries",
            "65536",
            "name",
            "REBALANCE_STATS",
            "flags",
            "1",
        ])
        .status()
        .unwrap();
    assert!(made.success());

    bed.agent.as_mut().unwrap().restart().unwrap();
    let log = bed.agent().log();
    assert!(
        log.contains("layout unknown (older)") && log.contains("replacing them"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_link(pin.join("LAYOUT")).unwrap(),
        std::path::Path::new(&lb_common::LAYOUT_VERSION.to_string())
    );
    // Connections made before keep working; new ones are balanced (the old ones no longer
    // count, so three new ones spread over the three pods).
    assert_eq!(c.requests(1).unwrap().values().sum::<u64>(), 3);
    let spread = per_pod(&c.open_one_by_one(vip, 3).unwrap());
    assert_eq!(spread.values().copied().collect::<Vec<_>>(), [1, 1, 1]);
    assert_eq!(bed.counted_total().unwrap(), 3);
}
