//! Kubernetes mode end to end: the agent's production code against the API server double,
//! pods with their own network namespaces and kubelet-shaped cgroups, kube-proxy on the node.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use socklb_tests::{
    client::least_loaded_each_time,
    kubebed::{Condition, KUBELET_LAYOUTS, KubeBed, NODE},
    manifests::{ServiceSpec, pod_ips, pod_ips6, vip6},
    require_privileges, wait_for,
};

fn web(pods: &[Ipv4Addr]) -> ServiceSpec {
    let mut s = ServiceSpec::new("web", Ipv4Addr::new(10, 96, 30, 10), 80, 8080, pods);
    s.namespace = "shop".into();
    s
}

#[test]
fn only_pods_of_enabled_namespaces_are_balanced_and_the_switch_flips_live() {
    require_privileges!();
    let mut bed = KubeBed::new("k8s").unwrap();
    let pods = pod_ips(30, 3);
    bed.tcp_backends(&pods, 8080).unwrap();
    bed.namespace("shop", Some(true)).unwrap();
    bed.namespace("plain", None).unwrap();
    let spec = web(&pods);
    bed.service(&spec).unwrap();
    bed.client_pod("shop", "a", false).unwrap();
    bed.client_pod("shop", "opted-out", true).unwrap();
    bed.client_pod("plain", "c", false).unwrap();
    bed.start_agent(&[]).unwrap();
    bed.agent().wait_backends("shop/web", &pods).unwrap();

    // Pod a (enabled namespace): socklb balances and counts its connections, from as soon as
    // the pod has a process (its network namespace).
    let mut a = bed.client("a").unwrap();
    wait_for("pod a to be switched on", Duration::from_secs(5), || {
        Ok((bed.agent().metric("socklb_enabled_pods")? == Some(1.0)).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            bed.agent().metrics().unwrap_or_default(),
            bed.agent().log()
        )
    });
    let opened = a.open_one_by_one(spec.target(), 6).unwrap();
    assert!(
        opened
            .iter()
            .all(|o| o.ok && o.peer.as_deref() == Some("10.96.30.10:80")),
        "{opened:?}"
    );
    assert_eq!(bed.counted().unwrap(), 6);

    // The opted-out pod and the pod of the other namespace still reach the Service, through
    // kube-proxy's chain on the node: socklb does not count them.
    for pod in ["opted-out", "c"] {
        let mut c = bed.client(pod).unwrap();
        let o = c.open(spec.target(), 3).unwrap();
        assert!(o.iter().all(|o| o.ok), "{pod}: {o:?}");
        assert_eq!(
            bed.counted().unwrap(),
            6,
            "{pod} must go through kube-proxy"
        );
    }

    // Switch "plain" on: c's new connections are balanced, soon.
    bed.namespace("plain", Some(true)).unwrap();
    let mut c = bed.client("c").unwrap();
    wait_for(
        "plain's pods to be switched on",
        Duration::from_secs(5),
        || {
            let before = bed.counted()?;
            c.open(spec.target(), 1)?;
            Ok((bed.counted()? > before).then_some(()))
        },
    )
    .unwrap();

    // Switch "shop" off: a's open connections stay up and counted, new ones go to kube-proxy.
    bed.namespace("shop", Some(false)).unwrap();
    wait_for(
        "shop's pods to be switched off",
        Duration::from_secs(5),
        || {
            let before = bed.counted()?;
            a.open(spec.target(), 1)?;
            Ok((bed.counted()? == before).then_some(()))
        },
    )
    .unwrap();
    a.requests(1)
        .expect("every connection a holds still answers");
    assert!(
        bed.counted().unwrap() >= 6,
        "the switch never cuts open connections"
    );
}

/// A one-Service cluster with one switched-on pod `a`, and the agent running.
fn cluster(prefix: &str, subnet: u8) -> (KubeBed, ServiceSpec) {
    cluster_with(prefix, subnet, &[])
}

/// The same, the agent run with `args`.
fn cluster_with(prefix: &str, subnet: u8, args: &[&str]) -> (KubeBed, ServiceSpec) {
    let mut bed = KubeBed::new(prefix).unwrap();
    let pods = pod_ips(subnet, 3);
    bed.tcp_backends(&pods, 8080).unwrap();
    bed.namespace("shop", Some(true)).unwrap();
    let mut spec = web(&pods);
    spec.vip = Ipv4Addr::new(10, 96, subnet, 10).into();
    bed.service(&spec).unwrap();
    bed.client_pod("shop", "a", false).unwrap();
    bed.start_agent(args).unwrap();
    bed.agent().wait_backends("shop/web", &pods).unwrap();
    (bed, spec)
}

fn switched_on(bed: &KubeBed, pods: f64) {
    wait_for("pods to be switched on", Duration::from_secs(5), || {
        Ok((bed.agent().metric("socklb_enabled_pods")? == Some(pods)).then_some(()))
    })
    .unwrap_or_else(|e| {
        let now = bed.agent().metric("socklb_enabled_pods");
        panic!("{e}: {now:?} of {pods}\n{}", bed.agent().log())
    });
}

#[test]
fn terminating_endpoints_and_an_api_server_that_restarts_or_drops_watches() {
    require_privileges!();
    let (mut bed, spec) = cluster("k8st", 31);
    let mut a = bed.client("a").unwrap();
    switched_on(&bed, 1.0);
    let per_pod = |o: &[socklb_tests::client::Outcome]| socklb_tests::client::per_pod(o);
    assert_eq!(
        per_pod(&a.open_one_by_one(spec.target(), 6).unwrap()).len(),
        3
    );

    // pod-3 starts terminating: no new connections while others are ready; its open ones stay.
    let pods = spec.pods.clone();
    let state = |last: Condition| {
        vec![
            (pods[0], Condition::Ready),
            (pods[1], Condition::Ready),
            (pods[2], last),
        ]
    };
    bed.service_with(&spec, &state(Condition::Terminating))
        .unwrap();
    bed.agent().wait_backends("shop/web", &pods[..2]).unwrap();
    assert!(!per_pod(&a.open_one_by_one(spec.target(), 6).unwrap()).contains_key("pod-3"));
    assert_eq!(
        a.requests(1).unwrap().get("pod-3"),
        Some(&2),
        "its open connections still work"
    );

    // Nothing ready: serving-and-terminating endpoints take new connections (kube-proxy's rule).
    let all_terminating: Vec<_> = pods
        .iter()
        .map(|ip| (*ip, Condition::Terminating))
        .collect();
    bed.service_with(&spec, &all_terminating).unwrap();
    bed.agent().wait_backends("shop/web", &pods).unwrap();

    // The API server restarts with its history compacted: the watches get 410 Gone on
    // resuming, list again, and the agent follows the changes made meanwhile.
    bed.api.compact();
    bed.api.restart().unwrap();
    bed.service(&spec).unwrap();
    let fourth = pod_ips(31, 4)[3];
    bed.tcp_backends(&[fourth], 8080).unwrap();
    let mut four = spec.clone();
    four.pods.push(fourth.into());
    bed.service(&four).unwrap();
    bed.agent().wait_backends("shop/web", &four.pods).unwrap();
    let log = bed.agent().log();
    assert!(log.contains("watch of endpointslices: error returned by apiserver during watch: too old resource version"), "{log}");

    // Every watch dropped: they resume and the next change arrives too.
    bed.api.drop_watches();
    bed.service(&spec).unwrap();
    bed.agent().wait_backends("shop/web", &pods).unwrap();
    a.requests(1).expect("no connection was cut by any of this");
}

#[test]
fn a_change_made_while_the_api_server_is_down_arrives_when_it_returns() {
    require_privileges!();
    // No full resync during the test: only the watches can bring the change.
    let (mut bed, mut spec) = cluster_with("k8so", 34, &["--resync-interval", "3600"]);
    let mut a = bed.client("a").unwrap();
    switched_on(&bed, 1.0);
    a.open(spec.target(), 3).unwrap();

    bed.api.stop();
    std::thread::sleep(Duration::from_secs(5));
    let pods = spec.pods.clone();
    spec.pods.truncate(2);
    bed.service(&spec).unwrap();
    bed.api.compact(); // the watches resume with 410 Gone and list again
    bed.api.resume().unwrap();
    bed.agent().wait_backends("shop/web", &spec.pods).unwrap();
    spec.pods = pods;
    bed.service(&spec).unwrap();
    bed.agent().wait_backends("shop/web", &spec.pods).unwrap();
    a.requests(1).expect("no connection was cut by the outage");
}

#[test]
fn kube_proxys_endpoint_rules_topology_and_headless_slices_through_the_watch() {
    require_privileges!();
    let (bed, spec) = cluster("k8sz", 35);
    let mut a = bed.client("a").unwrap();
    switched_on(&bed, 1.0);
    let p: Vec<String> = spec.pods.iter().map(ToString::to_string).collect();
    let web = |distribution: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": spec.vip.to_string(), "trafficDistribution": distribution,
                     "ports": [{"name": "main", "port": spec.port, "targetPort": 8080}]},
        })
    };
    let slice = |name: &str, labels: serde_json::Value, port: &str, eps: serde_json::Value| {
        let mut l = serde_json::json!({"kubernetes.io/service-name": "web"});
        l.as_object_mut()
            .unwrap()
            .extend(labels.as_object().unwrap().clone());
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "labels": l},
            "addressType": "IPv4", "ports": [{"name": port, "port": 8080}], "endpoints": eps,
        })
    };
    // Zone hints as the EndpointSlice controller writes them for PreferSameZone; `serving`
    // left unset. `zone_a`: the state of zone-a's two pods, `b`: of zone-b's pod.
    let conditions = |state: &str| match state {
        "ready" => serde_json::json!({}),
        "terminating" => serde_json::json!({"ready": false, "terminating": true}),
        _ => serde_json::json!({"ready": false, "serving": false, "terminating": true}),
    };
    let eps = |zone_a: &str, b: &str, hints: bool| {
        let ep = |ip: &str, zone: &str, state: &str| {
            let mut e = serde_json::json!({"addresses": [ip], "zone": zone, "conditions": conditions(state)});
            if hints {
                e["hints"] = serde_json::json!({"forZones": [{"name": zone}]});
            }
            e
        };
        serde_json::json!([
            ep(&p[0], "zone-a", zone_a),
            ep(&p[1], "zone-a", zone_a),
            ep(&p[2], "zone-b", b)
        ])
    };
    let none = serde_json::json!({});
    bed.api.apply(&web("PreferSameZone")).unwrap();
    bed.api
        .apply(&slice(
            "web-1",
            none.clone(),
            "main",
            eps("ready", "ready", true),
        ))
        .unwrap();
    // A slice for another port name (a pod without the named port) and a headless-labelled
    // one: kube-proxy uses neither, and neither is an error.
    let stray = serde_json::json!([{"addresses": ["10.244.35.9"]}]);
    bed.api
        .apply(&slice("web-2", none.clone(), "other", stray.clone()))
        .unwrap();
    bed.api
        .apply(&slice(
            "web-3",
            serde_json::json!({"service.kubernetes.io/headless": ""}),
            "main",
            stray,
        ))
        .unwrap();
    bed.agent()
        .wait_backends("shop/web", &spec.pods[..2])
        .unwrap();
    let spread = socklb_tests::client::per_pod(&a.open(spec.target(), 6).unwrap());
    assert!(!spread.contains_key("pod-3"), "zone-b's pod: {spread:?}");

    // zone-a's pods terminate: not one ready endpoint for this zone, so every ready one.
    bed.api
        .apply(&slice(
            "web-1",
            none.clone(),
            "main",
            eps("terminating", "ready", true),
        ))
        .unwrap();
    bed.agent()
        .wait_backends("shop/web", &spec.pods[2..])
        .unwrap();
    let spread = socklb_tests::client::per_pod(&a.open(spec.target(), 3).unwrap());
    assert_eq!(spread.get("pod-3"), Some(&3), "{spread:?}");

    // Nothing ready anywhere: the serving and terminating ones, `serving` unset counting as
    // serving (zone-b's pod says serving: false).
    bed.api
        .apply(&slice(
            "web-1",
            none.clone(),
            "main",
            eps("terminating", "gone", true),
        ))
        .unwrap();
    bed.agent()
        .wait_backends("shop/web", &spec.pods[..2])
        .unwrap();

    // No hints (a controller that wrote none): every endpoint, as kube-proxy, even with
    // trafficDistribution set; then without it.
    bed.api
        .apply(&slice(
            "web-1",
            none.clone(),
            "main",
            eps("ready", "ready", false),
        ))
        .unwrap();
    bed.agent().wait_backends("shop/web", &spec.pods).unwrap();
    let mut plain = web("PreferSameZone");
    plain["spec"]
        .as_object_mut()
        .unwrap()
        .remove("trafficDistribution");
    bed.api.apply(&plain).unwrap();
    bed.api
        .apply(&slice("web-1", none, "main", eps("ready", "ready", true)))
        .unwrap();
    bed.agent()
        .wait_backends("shop/web", &spec.pods[..2])
        .unwrap();
    let log = bed.agent().log();
    assert!(log.contains("in zone zone-a"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    a.requests(1).expect("every open connection still answers");
}

#[test]
fn pods_in_every_kubelet_cgroup_layout_are_switched_on_and_a_missing_one_is_reported() {
    require_privileges!();
    let mut bed = KubeBed::new("k8sl").unwrap();
    let pods = pod_ips(36, 2);
    bed.tcp_backends(&pods, 8080).unwrap();
    bed.namespace("shop", Some(true)).unwrap();
    let mut spec = web(&pods);
    spec.vip = Ipv4Addr::new(10, 96, 36, 10).into();
    bed.service(&spec).unwrap();
    for layout in 0..KUBELET_LAYOUTS.len() {
        bed.client_pod_in("shop", &format!("l{layout}"), false, layout)
            .unwrap();
    }
    // A pod kubelet has not made a cgroup for (yet).
    bed.api
        .apply(&serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "starting", "namespace": "shop",
                         "uid": "5e0c1b2a-ffff-4c00-8000-000000000001"},
            "spec": {"nodeName": NODE, "containers": [{"name": "c"}]},
            "status": {"phase": "Pending"},
        }))
        .unwrap();
    bed.start_agent(&[]).unwrap();
    bed.agent().wait_backends("shop/web", &pods).unwrap();
    // A process in each pod, so its network namespace can be found.
    let mut clients: Vec<_> = (0..KUBELET_LAYOUTS.len())
        .map(|layout| bed.client(&format!("l{layout}")).unwrap())
        .collect();
    switched_on(&bed, 6.0);
    wait_for(
        "the missing pod in the metric",
        Duration::from_secs(5),
        || Ok((bed.agent().metric("socklb_pods_pending")? == Some(1.0)).then_some(())),
    )
    .unwrap();
    // socklbctl tells which pods are balanced and why the missing one is not.
    let addr = bed.agent().status_url().unwrap().replace("http://", "");
    let rows: Vec<serde_json::Value> = socklb_tests::agent::ctl_json(
        &bed.agent().pin_path,
        &["pod", "list", "--status-address", &addr],
    )
    .unwrap();
    let row = |name: &str| {
        let r = rows.iter().find(|r| r["pod"] == name).unwrap();
        (r["state"].as_str().unwrap(), r["why"].as_str().unwrap())
    };
    assert_eq!(rows.len(), 7, "{rows:?}");
    assert_eq!(row("l1"), ("on", ""));
    assert_eq!(
        row("starting"),
        ("waiting", "no cgroup found for it under kubelet's root yet")
    );
    for (layout, c) in clients.iter_mut().enumerate() {
        c.open(spec.target(), 2).unwrap();
        // Only connections socklb balanced are counted.
        assert_eq!(
            bed.counted().unwrap(),
            2 * (layout as u64 + 1),
            "layout {layout}"
        );
    }
}

#[test]
fn the_agent_restarts_with_connections_open() {
    require_privileges!();
    let (mut bed, spec) = cluster("k8sr", 32);
    let mut a = bed.client("a").unwrap();
    switched_on(&bed, 1.0);
    assert!(
        a.open_one_by_one(spec.target(), 9)
            .unwrap()
            .iter()
            .all(|o| o.ok)
    );
    let url = bed.agent().status_url().unwrap();
    assert_eq!(
        socklb_tests::agent::http_get(&url, "/readyz").unwrap(),
        "ready\n"
    );
    assert_eq!(
        socklb_tests::agent::http_get(&url, "/healthz").unwrap(),
        "ok\n"
    );

    bed.agent.as_mut().unwrap().restart().unwrap();
    bed.agent()
        .wait_log("checked against 9 live sockets", 1)
        .unwrap();
    let log = bed.agent().log();
    assert!(log.contains("connect4: Adopted"), "{log}");
    // The pod stayed switched on, its connections work and count, new ones are balanced.
    assert_eq!(a.requests(1).unwrap().values().sum::<u64>(), 9);
    assert_eq!(bed.counted().unwrap(), 9);
    let spread = socklb_tests::client::per_pod(&a.open_one_by_one(spec.target(), 3).unwrap());
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [1, 1, 1],
        "least-conn as before"
    );
    assert_eq!(bed.counted().unwrap(), 12);
}

#[test]
fn dns_over_unconnected_udp_through_a_vip() {
    require_privileges!();
    let mut bed = KubeBed::new("k8sd").unwrap();
    let pods = pod_ips(33, 2);
    bed.udp_backends(&pods, 5353).unwrap();
    bed.namespace("kube-system", None).unwrap();
    bed.namespace("shop", Some(true)).unwrap();
    let mut dns = ServiceSpec::new("kube-dns", Ipv4Addr::new(10, 96, 0, 10), 53, 5353, &pods);
    dns.namespace = "kube-system".into();
    dns.protocol = "UDP";
    bed.service(&dns).unwrap();
    bed.client_pod("shop", "a", false).unwrap();
    bed.start_agent(&[]).unwrap();
    bed.agent()
        .wait_backends("kube-system/kube-dns", &pods)
        .unwrap();
    let mut a = bed.client("a").unwrap();
    switched_on(&bed, 1.0);
    for (answered_by, from) in a.sendto(dns.target(), 10, 3).unwrap() {
        assert!(from.iter().all(|f| f == "10.96.0.10:53"), "{from:?}");
        assert!(answered_by.iter().all(|p| *p == answered_by[0]));
    }
    let balanced: f64 = bed
        .agent()
        .metric("socklb_service_connects_total{service=\"kube-system/kube-dns\"")
        .unwrap()
        .unwrap();
    assert_eq!(balanced, 30.0, "every datagram went through socklb");
}

#[test]
fn a_dual_stack_service_is_balanced_per_family_and_kube_proxy_keeps_the_rest() {
    require_privileges!();
    let mut bed = KubeBed::new("k8s6").unwrap();
    let (v4, v6) = (pod_ips(34, 2), pod_ips6(34, 2));
    bed.tcp_backends(&v4, 8080).unwrap();
    bed.tcp_backends(&v6, 8080).unwrap();
    bed.namespace("shop", Some(true)).unwrap();
    bed.namespace("plain", None).unwrap();
    let mut spec = web(&v4);
    spec.vip = Ipv4Addr::new(10, 96, 34, 10).into();
    spec.vip2 = Some(vip6(34).into());
    spec.pods.extend(v6.iter().map(|ip| IpAddr::from(*ip)));
    bed.service(&spec).unwrap();
    bed.client_pod("shop", "a", false).unwrap();
    bed.client_pod("plain", "c", false).unwrap();
    bed.start_agent(&[]).unwrap();
    bed.agent().wait_backends("shop/web", &spec.pods).unwrap();
    let mut a = bed.client("a").unwrap();
    switched_on(&bed, 1.0);

    let targets = [
        (spec.target(), "pod-"),
        (spec.mapped_target(), "pod-"),
        (SocketAddr::new(spec.vip2.unwrap(), 80), "pod6-"),
    ];
    // The switched-on pod: every kind of socket is balanced over its family's pods only, and
    // sees the ClusterIP it asked for. AF_INET and v4-mapped connects alternate, one at a
    // time: each must go to an IPv4 pod with the fewest of both kinds (one count per pod).
    let mut v4_order = Vec::new();
    for i in 0..8 {
        let (target, family) = targets[i % 2];
        let o = a.open(target, 1).unwrap().remove(0);
        assert!(o.ok, "{target}: {o:?}");
        assert_eq!(o.peer.as_deref(), Some(target.to_string().as_str()));
        assert!(o.pod.as_deref().unwrap().starts_with(family), "{o:?}");
        v4_order.push(o);
    }
    let v4_names = ["pod-1".to_string(), "pod-2".to_string()];
    least_loaded_each_time(&v4_names, &v4_order).unwrap();
    let (target, family) = targets[2];
    for o in a.open_one_by_one(target, 4).unwrap() {
        assert!(o.ok, "{target}: {o:?}");
        assert_eq!(o.peer.as_deref(), Some(target.to_string().as_str()));
        assert!(o.pod.as_deref().unwrap().starts_with(family), "{o:?}");
    }
    let spread: Vec<u64> = bed.backends.iter().map(|p| p.open()).collect();
    assert_eq!(spread, [4, 4, 2, 2]);
    // socklb's count per backend is what each pod holds, both kinds of socket together.
    let rows = bed.agent().backends().unwrap();
    for pod in &bed.backends {
        let counted: Vec<u64> = rows
            .iter()
            .filter(|b| b.ip == pod.addr.ip().to_string())
            .map(|b| b.connections)
            .collect();
        assert_eq!(counted, [pod.open()], "{}: {rows:?}", pod.name);
    }

    // A pod of another namespace reaches both ClusterIPs through kube-proxy (iptables and
    // ip6tables on the node), uncounted by socklb.
    let mut c = bed.client("c").unwrap();
    for (target, family) in targets {
        let o = c.open(target, 2).unwrap();
        assert!(
            o.iter()
                .all(|o| o.ok && o.pod.as_deref().unwrap().starts_with(family)),
            "{target}: {o:?}"
        );
    }
    assert_eq!(
        bed.counted().unwrap(),
        12,
        "kube-proxy's connections are not socklb's"
    );
}
