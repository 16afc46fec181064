//! Every kind of client socket on the real kernel: `AF_INET` to an IPv4 ClusterIP, a dual-mode
//! `AF_INET6` socket to `::ffff:ClusterIP` (what Java, .NET and gRPC C-core open by default),
//! and `AF_INET6` to an IPv6 ClusterIP; dual-stack Services; a real JVM.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use socklb_tests::{
    agent::ctl_json,
    client::least_loaded_each_time,
    manifests::{ServiceSpec, pod_ips, pod_ips6, vip6},
    real_clients::JvmPool,
    require_privileges,
    testbed::Testbed,
    wait_for,
};

const ENETUNREACH: i32 = 101;

/// A dual-stack Service `demo/web` (10.96.<subnet>.10 and fd00:96:<subnet>::10, port 80) over
/// three IPv4 and three IPv6 pods, and a running agent.
fn dual_stack(
    prefix: &str,
    subnet: u8,
    configure: impl FnOnce(&mut ServiceSpec),
) -> (Testbed, ServiceSpec) {
    dual_stack_of(prefix, subnet, 3, false, configure)
}

/// `dual_stack` with `n` pods of each family; for `udp`, UDP pods and Service `demo/dns`
/// (port 53 to 5353).
fn dual_stack_of(
    prefix: &str,
    subnet: u8,
    n: u8,
    udp: bool,
    configure: impl FnOnce(&mut ServiceSpec),
) -> (Testbed, ServiceSpec) {
    let mut bed = Testbed::new(prefix).unwrap();
    let (v4, v6) = (pod_ips(subnet, n), pod_ips6(subnet, n));
    let (name, port, target) = if udp {
        ("dns", 53, 5353)
    } else {
        ("web", 80, 8080)
    };
    if udp {
        bed.add_udp_pods(&v4, target).unwrap();
        bed.add_udp_pods(&v6, target).unwrap();
    } else {
        bed.add_pods(&v4, target).unwrap();
        bed.add_pods(&v6, target).unwrap();
    }
    let mut pods: Vec<IpAddr> = v4.iter().map(|ip| (*ip).into()).collect();
    pods.extend(v6.iter().map(|ip| IpAddr::from(*ip)));
    let mut spec = ServiceSpec::new(
        name,
        std::net::Ipv4Addr::new(10, 96, subnet, 10),
        port,
        target,
        &pods,
    );
    spec.vip2 = Some(vip6(subnet).into());
    if udp {
        spec.protocol = "UDP";
    }
    configure(&mut spec);
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    (bed, spec)
}

/// The three ways of reaching the Service, with the peer address each kind of socket must
/// see (getpeername) and the family of the pods it must reach.
fn kinds(spec: &ServiceSpec) -> [(&'static str, SocketAddr, bool); 3] {
    let v6 = SocketAddr::new(spec.vip2.unwrap(), spec.port);
    [
        ("AF_INET", spec.target(), false),
        ("AF_INET6 to ::ffff:VIP", spec.mapped_target(), false),
        ("AF_INET6 to the IPv6 VIP", v6, true),
    ]
}

/// Accepted connections per pod of one family.
fn accepted(bed: &Testbed, ipv6: bool) -> BTreeMap<String, u64> {
    bed.pods
        .iter()
        .filter(|p| p.addr.is_ipv6() == ipv6)
        .map(|p| (p.name.clone(), p.accepted()))
        .collect()
}

#[test]
fn least_conn_balances_ipv4_v4_mapped_and_ipv6_clients_alike() {
    require_privileges!();
    let (bed, spec) = dual_stack("fam", 40, |_| {});
    for (kind, target, ipv6) in kinds(&spec) {
        let before = accepted(&bed, ipv6);
        let other_before = accepted(&bed, !ipv6);
        // Two client processes open 15 long-lived connections each, all at the same moment.
        let opened: Vec<_> = (0..2)
            .map(|_| {
                let mut c = bed.client().unwrap();
                thread::spawn(move || {
                    let o = c.open(target, 15).unwrap();
                    (c, o)
                })
            })
            .collect();
        let mut clients = Vec::new();
        for h in opened {
            let (c, outcomes) = h.join().unwrap();
            for o in &outcomes {
                assert!(o.ok, "{kind}: {o:?}");
                // getpeername shows the Service address, in the socket's own notation.
                assert_eq!(
                    o.peer.as_deref(),
                    Some(target.to_string().as_str()),
                    "{kind}"
                );
            }
            clients.push(c);
        }
        // Only the pods of the VIP's family got them, within one of the mean (10) each.
        let after = accepted(&bed, ipv6);
        for (pod, n) in &after {
            let added = n - before[pod];
            assert!(
                (9..=11).contains(&added),
                "{kind}: {pod} got {added}: {after:?}"
            );
        }
        assert_eq!(
            accepted(&bed, !ipv6),
            other_before,
            "{kind}: the other family's pods"
        );
        // The maps count what the pods hold, pod by pod, and drain to zero on close.
        bed.settle_at(30).unwrap();
        drop(clients);
        bed.settle_at(0).unwrap();
    }
}

#[test]
fn ipv4_and_v4_mapped_clients_share_one_count_per_backend() {
    require_privileges!();
    let (bed, spec) = dual_stack("mix", 41, |_| {});
    let mut v4 = bed.client().unwrap();
    let mut mapped = bed.client().unwrap();
    // Alternating one by one, so least-conn's choice is exact: each connect must see the
    // other kind's connections in the counts, and go to a pod with the fewest of both kinds
    // (with a count per kind, a v4-mapped connect would often pick a pod the AF_INET ones
    // already loaded).
    let mut order = Vec::new();
    for _ in 0..6 {
        order.extend(v4.open(spec.target(), 1).unwrap());
        order.extend(mapped.open(spec.mapped_target(), 1).unwrap());
    }
    let names: Vec<String> = (1..=3).map(|i| format!("pod-{i}")).collect();
    least_loaded_each_time(&names, &order).unwrap();
    let open: Vec<u64> = bed
        .pods
        .iter()
        .filter(|p| p.addr.is_ipv4())
        .map(|p| p.open())
        .collect();
    assert_eq!(
        open,
        [4, 4, 4],
        "12 connections from both kinds of socket, spread evenly"
    );
    // One backend entry per pod, counting both kinds of socket: what the pod itself holds.
    let backends = bed.agent().backends().unwrap();
    for pod in bed.pods.iter().filter(|p| p.addr.is_ipv4()) {
        let rows: Vec<u64> = backends
            .iter()
            .filter(|b| b.ip == pod.addr.ip().to_string())
            .map(|b| b.connections)
            .collect();
        assert_eq!(rows, [pod.open()], "{}: {backends:?}", pod.name);
    }
    // Even under a burst from both kinds at once.
    let burst: Vec<_> = [spec.target(), spec.mapped_target()]
        .into_iter()
        .map(|target| {
            let mut c = bed.client().unwrap();
            thread::spawn(move || {
                let o = c.open(target, 12).unwrap();
                assert!(o.iter().all(|o| o.ok));
                c
            })
        })
        .collect();
    let burst: Vec<_> = burst.into_iter().map(|h| h.join().unwrap()).collect();
    bed.settle_at(36).unwrap();
    let open: Vec<u64> = bed
        .pods
        .iter()
        .filter(|p| p.addr.is_ipv4())
        .map(|p| p.open())
        .collect();
    assert!(open.iter().all(|n| (11..=13).contains(n)), "{open:?}");
    drop((v4, mapped, burst));
    bed.settle_at(0).unwrap();
}

#[test]
fn a_jvm_with_default_settings_is_balanced_through_a_v4_mapped_socket() {
    require_privileges!();
    let (bed, spec) = dual_stack("jvm", 42, |_| {});
    let url = format!("http://{}/", spec.target());
    let (mut jvm, first) = JvmPool::start(&bed.netns, bed.cgroup.path(), &url, 24).unwrap();
    assert_eq!(first.failed, 0, "{first:?}");
    // The JVM's connections are AF_INET6 sockets talking to ::ffff:pod (so connect6 placed
    // them): no AF_INET socket talks to a pod (those listed are the pods' own ends).
    let six = bed.netns.established(true).unwrap();
    let to_pods = six
        .iter()
        .filter(|(_, peer)| peer.starts_with("[::ffff:10.244.42."))
        .count();
    assert_eq!(to_pods, 24, "{six:?}");
    assert!(
        !bed.netns
            .established(false)
            .unwrap()
            .iter()
            .any(|(_, peer)| peer.starts_with("10.244.42.") && peer.ends_with(":8080")),
        "the JVM used AF_INET sockets"
    );
    // Balanced by the pods' own count. The pool opens its 24 connections as one concurrent
    // burst, and on two CPUs two connects may read the same counts at the same moment, so a
    // spread of two is possible; random choice would rarely come that close.
    let open: Vec<u64> = bed
        .pods
        .iter()
        .filter(|p| p.addr.is_ipv4())
        .map(|p| p.open())
        .collect();
    assert_eq!(open.iter().sum::<u64>(), 24);
    let spread = open.iter().max().unwrap() - open.iter().min().unwrap();
    assert!(spread <= 2, "{open:?}");
    bed.settle_at(24).unwrap();
    // The pool reuses its connections: more rounds, no new connection, nothing fails.
    let accepted_before: u64 = bed.pods.iter().map(|p| p.accepted()).sum();
    for _ in 0..3 {
        let round = jvm.round().unwrap();
        assert_eq!(round.failed, 0, "{round:?}");
        assert_eq!(round.pods.values().sum::<u64>(), 24);
    }
    assert_eq!(
        bed.pods.iter().map(|p| p.accepted()).sum::<u64>(),
        accepted_before
    );
    jvm.finish().unwrap();
    bed.settle_at(0).unwrap();
}

#[test]
fn a_v6only_socket_to_a_v4_mapped_vip_fails_as_the_kernel_says() {
    require_privileges!();
    let (bed, spec) = dual_stack("v6o", 43, |_| {});
    let mut c = bed.client().unwrap();
    let one = json!({"cmd": "open", "target": spec.mapped_target().to_string(), "count": 1, "v6only": true});
    for _ in 0..3 {
        let o = c.open_with(one.clone()).unwrap().remove(0);
        assert_eq!(o.errno, Some(ENETUNREACH), "{o:?}");
    }
    assert_eq!(bed.pods.iter().map(|p| p.accepted()).sum::<u64>(), 0);
    // The client keeps the three failed sockets open: socklb must not have assigned them a
    // backend (they can never reach one), so nothing counts and no connect is recorded.
    assert_eq!(
        bed.counted_total().unwrap(),
        0,
        "failed V6ONLY sockets counted"
    );
    let services: Vec<BTreeMap<String, Value>> =
        ctl_json(&bed.agent().pin_path, &["service", "list"]).unwrap();
    assert!(
        services.iter().all(|s| s["connects"] == 0),
        "connects recorded for V6ONLY sockets: {services:?}"
    );
    // A dual-mode socket of the same client to the same address is balanced.
    let o = c
        .open_with(json!({"cmd": "open", "target": spec.mapped_target().to_string(), "count": 1}))
        .unwrap()
        .remove(0);
    assert!(o.ok, "{o:?}");
    assert_eq!(bed.counted_total().unwrap(), 1);
}

#[test]
fn udp_over_ipv6_sockets_connected_and_unconnected_answers_come_from_the_vip() {
    require_privileges!();
    let (bed, spec) = dual_stack_of("udp6", 44, 3, true, |s| s.algorithm = Some("random"));
    let mut client = bed.client().unwrap();

    for (kind, target, ipv6) in kinds(&spec) {
        let pod_prefix = if ipv6 { "pod6-" } else { "pod-" };
        // Connected UDP: connect6 (or connect4) places it, recvmsg and getpeername show the VIP.
        let one = json!({"cmd": "open", "target": target.to_string(), "count": 6, "proto": "udp"});
        for o in client.open_with(one).unwrap() {
            assert!(o.ok, "{kind}: {o:?}");
            assert_eq!(
                o.from.as_deref(),
                Some(target.to_string().as_str()),
                "{kind}: recvmsg"
            );
            assert_eq!(
                o.peer.as_deref(),
                Some(target.to_string().as_str()),
                "{kind}: getpeername"
            );
            assert!(o.pod.unwrap().starts_with(pod_prefix), "{kind}");
        }
        client.close_all().unwrap();
        // Unconnected, DNS style: for `::ffff:VIP` the kernel runs sendmsg4 on the AF_INET6
        // socket, then recvmsg6 sees `::ffff:pod`; both must agree.
        let sockets = client.sendto(target, 30, 3).unwrap();
        let mut used = std::collections::BTreeSet::new();
        for (answered_by, from) in &sockets {
            assert!(
                from.iter().all(|f| *f == target.to_string()),
                "{kind}: answers from {from:?}"
            );
            assert!(
                answered_by.iter().all(|p| *p == answered_by[0]),
                "{kind}: one socket, one pod"
            );
            assert!(
                answered_by[0].starts_with(pod_prefix),
                "{kind}: {answered_by:?}"
            );
            used.insert(answered_by[0].clone());
        }
        assert_eq!(
            used.len(),
            3,
            "{kind}: 30 sockets over the 3 pods: {used:?}"
        );
    }
    assert_eq!(bed.counted_total().unwrap(), 0);
}

#[test]
fn connected_udp_ipv6_sockets_to_a_removed_pod_are_closed_in_both_families() {
    require_privileges!();
    const ECONNABORTED: i32 = 103;
    const EDESTADDRREQ: i32 = 89;
    let (bed, mut spec) = dual_stack_of("udp6gone", 46, 2, true, |_| {});
    let mut client = bed.client().unwrap();
    // AF_INET6 sockets only: two to `::ffff:VIP` (one per IPv4 pod, least-conn) and two to
    // the IPv6 VIP (one per IPv6 pod).
    let [_, (_, mapped, _), (_, six, _)] = kinds(&spec);
    for target in [mapped, mapped, six, six] {
        let one = json!({"cmd": "open", "target": target.to_string(), "count": 1, "proto": "udp"});
        assert!(client.open_with(one).unwrap()[0].ok);
    }
    assert_eq!(bed.counted_total().unwrap(), 4);

    // pod-1 and pod6-1 leave the Service: the agent destroys the AF_INET6 sockets connected
    // to `::ffff:pod-1` and to pod6-1, and only those.
    spec.set_pods(&[
        IpAddr::from(pod_ips(46, 2)[1]),
        IpAddr::from(pod_ips6(46, 2)[1]),
    ]);
    bed.write_service(&spec).unwrap();
    let r = wait_for(
        "the two sockets of the removed pods to be closed",
        Duration::from_secs(10),
        || {
            let r = client.try_requests(1)?;
            Ok((r.errors == 2).then_some(r))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.agent().log()));
    assert!(
        r.errnos
            .iter()
            .all(|e| *e == Some(ECONNABORTED) || *e == Some(EDESTADDRREQ)),
        "{r:?}"
    );
    assert_eq!(r.pods.get("pod-2"), Some(&1), "{r:?}");
    assert_eq!(r.pods.get("pod6-2"), Some(&1), "{r:?}");
}

#[test]
fn rebalancing_closes_v4_mapped_and_ipv6_sockets() {
    require_privileges!();
    let mut bed = Testbed::new("rb6").unwrap();
    let (v4, v6) = (pod_ips(45, 4), pod_ips6(45, 4));
    bed.add_pods(&v4, 8080).unwrap();
    bed.add_pods(&v6, 8080).unwrap();
    let mut spec = ServiceSpec::new(
        "web",
        std::net::Ipv4Addr::new(10, 96, 45, 10),
        80,
        8080,
        &[v4[0], v4[1]],
    );
    spec.pods.extend([IpAddr::from(v6[0]), v6[1].into()]);
    spec.vip2 = Some(vip6(45).into());
    spec.rebalance = true;
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();

    // 16 connections of each kind of AF_INET6 socket while there are two pods per family, a
    // request every second on each.
    let targets = [
        spec.mapped_target(),
        SocketAddr::new(spec.vip2.unwrap(), 80),
    ];
    let mut clients = Vec::new();
    for target in targets {
        let mut c = bed.client().unwrap();
        assert!(c.open(target, 16).unwrap().iter().all(|o| o.ok));
        c.pace(1).unwrap();
        clients.push(c);
    }
    // Scale both families to four pods: the rebalancer must find and close AF_INET6 sockets of
    // both kinds (sock_diag in the IPv6 family) until each family is even.
    let mut all: Vec<IpAddr> = v4.iter().map(|ip| (*ip).into()).collect();
    all.extend(v6.iter().map(|ip| IpAddr::from(*ip)));
    spec.pods = all;
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/web", &spec.pods).unwrap();
    let open = |bed: &Testbed, ipv6: bool| -> Vec<u64> {
        bed.pods
            .iter()
            .filter(|p| p.addr.is_ipv6() == ipv6)
            .map(|p| p.open())
            .collect()
    };
    for ipv6 in [false, true] {
        wait_for("both families even", Duration::from_secs(30), || {
            let o = open(&bed, ipv6);
            Ok((o.iter().sum::<u64>() == 16 && o.iter().all(|n| *n == 4)).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", open(&bed, ipv6), bed.agent().log()));
    }
    for c in &mut clients {
        let paced = c.stop_pacing().unwrap();
        assert!(paced.reconnects > 0 && paced.failed == 0, "{paced:?}");
    }
}
