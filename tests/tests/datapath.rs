//! The data path on the real kernel: connect-time rewriting, what the application sees, and
//! what socklb must leave alone.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde_json::json;
use socklb_tests::{
    client::{Client, per_pod},
    manifests::{ServiceSpec, pod_ips},
    pod::Pod,
    require_privileges,
    testbed::Testbed,
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
