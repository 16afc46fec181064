//! The data path on the real kernel: connect-time rewriting, what the application sees, and
//! what socklb must leave alone.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use serde_json::json;
use socklb_tests::{
    client::{Client, per_pod},
    manifests::{ServiceSpec, pod_ips},
    pod::Pod,
    require_privileges,
    testbed::Testbed,
    wait_for,
};

const ECONNREFUSED: i32 = 111;
const ENETUNREACH: i32 = 101;

#[test]
fn a_connect_to_the_vip_reaches_a_pod_and_the_app_sees_the_vip() {
    require_privileges!();
    let mut bed = Testbed::new("dp").unwrap();
    let pods = pod_ips(1, 3);
    bed.add_pods(&pods, 8080).unwrap();
    let vip = Ipv4Addr::new(10, 96, 1, 10);
    bed.write_service(&ServiceSpec::new("web", vip, 80, 8080, &pods))
        .unwrap();
    bed.write_service(&ServiceSpec::new(
        "empty",
        Ipv4Addr::new(10, 96, 1, 11),
        80,
        8080,
        &[] as &[Ipv4Addr],
    ))
    .unwrap();
    bed.start_agent(&[]).unwrap();
    let mut client = bed.client().unwrap();

    // Through the VIP: every connect lands on a pod, a request and its answer flow, and
    // getpeername reports the Service address, not the pod's.
    let outcomes = client.open(SocketAddrV4::new(vip, 80), 6).unwrap();
    for o in &outcomes {
        assert!(o.ok, "{o:?}");
        assert!(o.pod.as_deref().unwrap().starts_with("pod-"), "{o:?}");
        assert_eq!(o.peer.as_deref(), Some("10.96.1.10:80"));
    }
    let served = client.requests(3).unwrap();
    assert_eq!(served.values().sum::<u64>(), 18);

    // Other destinations are untouched: a pod directly (not counted), and a VIP port that is
    // not a Service (not rewritten, so it has nowhere to go in this namespace).
    let direct = client.open(SocketAddrV4::new(pods[0], 8080), 1).unwrap();
    assert_eq!(direct[0].peer.as_deref(), Some("10.244.1.1:8080"));
    assert_eq!(direct[0].pod.as_deref(), Some("pod-1"));
    let not_a_port = client.open(SocketAddrV4::new(vip, 81), 1).unwrap();
    assert_eq!(
        not_a_port[0].errno,
        Some(ENETUNREACH),
        "{:?}",
        not_a_port[0]
    );
    assert_eq!(
        bed.counted_total().unwrap(),
        6,
        "only connections made through the VIP count"
    );

    // A Service without backends refuses at once, as kube-proxy's REJECT rule does.
    let refused = client
        .open(SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 11), 80), 3)
        .unwrap();
    for o in &refused {
        assert_eq!(o.errno, Some(ECONNREFUSED), "{o:?}");
    }

    // A client outside the cgroup is not socklb's: its VIP connect is not rewritten.
    let mut outsider = Client::spawn(&bed.netns, None).unwrap();
    let o = outsider.open(SocketAddrV4::new(vip, 80), 1).unwrap();
    assert_eq!(o[0].errno, Some(ENETUNREACH), "{:?}", o[0]);
}

#[test]
fn udp_connect_is_balanced_and_answers_come_from_the_vip() {
    require_privileges!();
    let mut bed = Testbed::new("udp").unwrap();
    let pods = pod_ips(2, 3);
    for ip in &pods {
        bed.netns.add_address(*ip).unwrap();
        let name = format!("dns-{}", ip.octets()[3]);
        bed.pods
            .push(Pod::udp(&bed.netns, &name, SocketAddrV4::new(*ip, 5353)).unwrap());
    }
    let vip = Ipv4Addr::new(10, 96, 2, 10);
    let mut spec = ServiceSpec::new("dns", vip, 53, 5353, &pods);
    spec.protocol = "UDP";
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();

    let mut client = bed.client().unwrap();
    // One by one, so that least-conn's split is exact.
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let one = json!({"cmd": "open", "target": "10.96.2.10:53", "count": 1, "proto": "udp"});
        outcomes.extend(client.open_with(one).unwrap());
    }
    for o in &outcomes {
        assert!(o.ok, "{o:?}");
        assert_eq!(
            o.from.as_deref(),
            Some("10.96.2.10:53"),
            "recvmsg shows the VIP"
        );
        assert_eq!(
            o.peer.as_deref(),
            Some("10.96.2.10:53"),
            "getpeername shows the VIP"
        );
    }
    // Connected UDP sockets count as connections (least-conn spreads them) until closed.
    let spread = per_pod(&outcomes);
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{spread:?}"
    );
    assert_eq!(bed.counted_total().unwrap(), 6);
    assert_eq!(client.requests(2).unwrap().values().sum::<u64>(), 12);
    client.close_all().unwrap();
    assert_eq!(
        bed.counted_total().unwrap(),
        0,
        "closing a UDP socket uncounts it"
    );
}

#[test]
fn unconnected_udp_is_balanced_per_socket_and_answers_come_from_the_vip() {
    require_privileges!();
    let mut bed = Testbed::new("dns").unwrap();
    let pods = pod_ips(18, 3);
    for ip in &pods {
        bed.netns.add_address(*ip).unwrap();
        let name = format!("dns-{}", ip.octets()[3]);
        bed.pods
            .push(Pod::udp(&bed.netns, &name, SocketAddrV4::new(*ip, 5353)).unwrap());
    }
    let vip = Ipv4Addr::new(10, 96, 18, 10);
    let mut spec = ServiceSpec::new("dns", vip, 53, 5353, &pods);
    spec.protocol = "UDP";
    spec.algorithm = Some("random");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();

    // DNS style: sendto/recvfrom on unconnected sockets.
    let mut client = bed.client().unwrap();
    let sockets = client.sendto(SocketAddrV4::new(vip, 53), 30, 4).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for (answered_by, from) in &sockets {
        assert!(
            from.iter().all(|f| f == "10.96.18.10:53"),
            "answers must come from the VIP: {from:?}"
        );
        assert!(
            answered_by.iter().all(|p| *p == answered_by[0]),
            "one socket, one backend: {answered_by:?}"
        );
        used.insert(answered_by[0].clone());
    }
    assert_eq!(used.len(), 3, "30 sockets spread over the pods: {used:?}");
    assert_eq!(
        bed.counted_total().unwrap(),
        0,
        "datagrams are not connections"
    );
}

/// A DNS-like UDP Service `demo/dns` (53 -> 5353) over `pods` of subnet 10.244.<subnet>.
fn udp_service(
    bed: &mut Testbed,
    subnet: u8,
    pods: &[Ipv4Addr],
    algorithm: &'static str,
) -> ServiceSpec {
    bed.add_udp_pods(pods, 5353).unwrap();
    let mut spec = ServiceSpec::new("dns", Ipv4Addr::new(10, 96, subnet, 10), 53, 5353, pods);
    spec.protocol = "UDP";
    spec.algorithm = Some(algorithm);
    spec
}

#[test]
fn a_disconnected_udp_socket_stops_counting_when_it_sends_unconnected() {
    require_privileges!();
    let mut bed = Testbed::new("udpdis").unwrap();
    let ips = pod_ips(57, 2);
    let spec = udp_service(&mut bed, 57, &ips, "least-conn");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let mut client = bed.client().unwrap();
    let one = json!({"cmd": "open", "target": "10.96.57.10:53", "count": 1, "proto": "udp"});
    for _ in 0..4 {
        assert!(client.open_with(one.clone()).unwrap()[0].ok);
    }
    assert_eq!(bed.counted_total().unwrap(), 4);
    // connect(AF_UNSPEC) runs no hook: the sockets still count until they next send, which
    // they now do unconnected (sendto), and sendmsg sees them disconnected.
    assert_eq!(client.disconnect().unwrap(), 4);
    let asked = client.dgram_ask(2).unwrap();
    for d in &asked {
        assert_eq!(d.unanswered, 0, "{d:?}");
        assert!(d.from.iter().all(|f| f == "10.96.57.10:53"), "{d:?}");
    }
    assert_eq!(
        bed.counted_total().unwrap(),
        0,
        "disconnected sockets still counted"
    );
}

#[test]
fn unconnected_udp_never_follows_a_reused_backend_id_to_a_removed_pod() {
    require_privileges!();
    let mut bed = Testbed::new("reuse").unwrap();
    let ips = pod_ips(54, 3);
    let mut spec = udp_service(&mut bed, 54, &ips[..2], "random");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let mut client = bed.client().unwrap();
    client.dgram_open(spec.target(), 20).unwrap();
    let first = client.dgram_ask(1).unwrap();
    let on_pod1: Vec<usize> = (0..first.len())
        .filter(|i| first[*i].pods == ["pod-1"])
        .collect();
    assert!(!on_pod1.is_empty(), "{first:?}");

    // pod-1 stops and leaves the Service; pod-3 joins and gets pod-1's backend id (the lowest
    // free one), once pod-1's entry is forgotten.
    let gone = bed.pods.iter().position(|p| p.name == "pod-1").unwrap();
    drop(bed.pods.remove(gone));
    spec.set_pods(&ips[1..2]);
    bed.write_service(&spec).unwrap();
    wait_for("pod-1 to be forgotten", Duration::from_secs(10), || {
        Ok((bed.agent().backends()?.len() == 1).then_some(()))
    })
    .unwrap();
    bed.add_udp_pods(&ips[2..], 5353).unwrap();
    spec.set_pods(&ips[1..]);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/dns", &ips[1..]).unwrap();

    // The sockets that talked to pod-1 must be answered now, by one live pod each, from the
    // VIP: a reused id must not send them to pod-1's address.
    let again = client.dgram_ask(5).unwrap();
    for i in on_pod1 {
        let d = &again[i];
        assert_eq!(
            d.unanswered, 0,
            "socket {i} still sends to the removed pod: {d:?}"
        );
        assert!(
            d.pods.iter().all(|p| *p == d.pods[0]),
            "socket {i} does not stick: {d:?}"
        );
        assert!(d.from.iter().all(|f| f == "10.96.54.10:53"), "{d:?}");
    }
}

#[test]
fn unconnected_udp_sticks_to_its_new_pod_after_its_pod_left() {
    require_privileges!();
    let mut bed = Testbed::new("stick").unwrap();
    let ips = pod_ips(55, 4);
    let mut spec = udp_service(&mut bed, 55, &ips, "random");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let mut client = bed.client().unwrap();
    client.dgram_open(spec.target(), 30).unwrap();
    let first = client.dgram_ask(1).unwrap();
    // pod-1 leaves (it keeps running, so nothing would go unanswered): each socket that used
    // it picks a new pod once and keeps it.
    spec.set_pods(&ips[1..]);
    bed.write_service(&spec).unwrap();
    bed.agent().wait_backends("demo/dns", &ips[1..]).unwrap();
    let again = client.dgram_ask(8).unwrap();
    for (i, (before, after)) in first.iter().zip(&again).enumerate() {
        assert!(
            after.pods.iter().all(|p| *p == after.pods[0]),
            "socket {i}: {after:?}"
        );
        assert_ne!(after.pods[0], "pod-1", "socket {i}");
        if before.pods[0] != "pod-1" {
            assert_eq!(
                after.pods[0], before.pods[0],
                "socket {i} moved without cause"
            );
        }
    }
}

#[test]
fn connected_udp_sockets_to_a_removed_pod_are_closed_and_reconnect_elsewhere() {
    require_privileges!();
    const ECONNABORTED: i32 = 103;
    const EDESTADDRREQ: i32 = 89;
    let mut bed = Testbed::new("udpgone").unwrap();
    let ips = pod_ips(56, 2);
    let mut spec = udp_service(&mut bed, 56, &ips, "least-conn");
    bed.write_service(&spec).unwrap();
    bed.start_agent(&[]).unwrap();
    let mut client = bed.client().unwrap();
    let one = json!({"cmd": "open", "target": "10.96.56.10:53", "count": 1, "proto": "udp"});
    for _ in 0..6 {
        assert!(client.open_with(one.clone()).unwrap()[0].ok);
    }
    assert_eq!(
        bed.counted().unwrap(),
        [("pod-1".into(), 3), ("pod-2".into(), 3)]
    );

    // pod-1 leaves the Service (still running): its connected sockets would keep sending to
    // it. The agent closes them (SOCK_DESTROY also disconnects a UDP socket): the application's
    // next call fails (ECONNABORTED, or EDESTADDRREQ for a send) and it can connect again.
    spec.set_pods(&ips[1..]);
    bed.write_service(&spec).unwrap();
    let r = wait_for(
        "pod-1's sockets to be closed",
        Duration::from_secs(10),
        || {
            let r = client.try_requests(1)?;
            Ok((r.errors == 3).then_some(r))
        },
    )
    .unwrap();
    assert!(
        r.errnos
            .iter()
            .all(|e| *e == Some(ECONNABORTED) || *e == Some(EDESTADDRREQ)),
        "{r:?}"
    );
    assert_eq!(r.pods.get("pod-2"), Some(&3));
    client.close_all().unwrap();
    let again: Vec<_> = (0..3)
        .map(|_| client.open_with(one.clone()).unwrap().remove(0))
        .collect();
    assert!(
        again
            .iter()
            .all(|o| o.ok && o.pod.as_deref() == Some("pod-2")),
        "{again:?}"
    );
    wait_for("the 3 new sockets counted", Duration::from_secs(5), || {
        let counted = bed.counted()?;
        let on_pod2 = counted.iter().find(|(p, _)| p == "pod-2").map(|(_, n)| *n);
        Ok((bed.counted_total()? == 3 && on_pod2 == Some(3)).then_some(()))
    })
    .unwrap();
}
