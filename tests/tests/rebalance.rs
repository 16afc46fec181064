//! Active rebalancing after a scale-up, at the agent's default settings, judged by the pods'
//! own counts. Every client counts each failed or cut request as failed and retries nothing;
//! "even" means a spread of at most one (busiest pod minus idlest).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use socklb_tests::{
    agent::ctl_json,
    client::Client,
    manifests::{ServiceSpec, pod_ips},
    netns::Netns,
    real_clients::{GrpcChannels, GrpcPod},
    require_privileges,
    testbed::Testbed,
    wait_for,
};

/// /metrics has a connection series for each backend of the Service that rebalances (`web`,
/// counting its `conns` connections) and none for the other Service's; the map fill and the
/// backends by state, from the agent's mirror; and the change-to-map histogram.
fn metrics_show_the_rebalanced_backends_only(
    bed: &Testbed,
    web: &[Ipv4Addr],
    conns: usize,
    backends: usize,
) {
    let series = |m: &str, service: &str| -> Vec<(String, f64)> {
        let prefix = format!("socklb_backend_connections{{service=\"demo/{service}\"");
        (m.lines().filter(|l| l.starts_with(&prefix)))
            .map(|l| {
                let backend = l.split("backend=\"").nth(1).unwrap_or("");
                let backend = backend.split(':').next().unwrap_or("").to_owned();
                (backend, l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect()
    };
    wait_for(
        "/metrics to count web's connections",
        Duration::from_secs(10),
        || {
            let m = bed.agent().metrics()?;
            let web_series = series(&m, "web");
            let total: f64 = web_series.iter().map(|(_, n)| n).sum();
            Ok((web_series.len() == web.len() && total == conns as f64).then_some(m))
        },
    )
    .map(|m| {
        let mut seen: Vec<String> = series(&m, "web").into_iter().map(|(b, _)| b).collect();
        seen.sort();
        let mut want: Vec<String> = web.iter().map(|ip| ip.to_string()).collect();
        want.sort();
        assert_eq!(seen, want, "one series per backend of web");
        assert!(series(&m, "other").is_empty(), "no series for other:\n{m}");
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.agent().metrics().unwrap_or_default()));
    let agent = bed.agent();
    let metric = |name: &str| agent.metric(name).unwrap();
    assert_eq!(metric("socklb_map_entries{map=\"SERVICES\"}"), Some(2.0));
    assert_eq!(
        metric("socklb_backends{state=\"active\"}"),
        Some(backends as f64)
    );
    assert!(metric("socklb_change_seconds_count").is_some_and(|n| n >= 1.0));
}

fn spread(counts: &[u64]) -> u64 {
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

/// Waits (at most `within`) until the pods at `ips` hold `total` open connections between
/// them with a spread of at most one, as `open` reports them. Returns how long it took.
fn evens_out(
    what: &str,
    ips: &[Ipv4Addr],
    total: u64,
    within: Duration,
    open: impl Fn(&[Ipv4Addr]) -> Vec<u64>,
    log: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    wait_for(what, within, || {
        let o = open(ips);
        Ok((o.iter().sum::<u64>() == total && spread(&o) <= 1).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", open(ips), log()));
    let took = start.elapsed();
    println!("{what}: even after {took:.1?}");
    took
}

/// `conns` pooled connections from two clients (a request every second on each) over
/// `before` pods, then `after` pods; a second Service, not opted in, sees the same scale-up.
/// With `large`, answers are 16 KB over a 1500-byte MTU: many segments per request, as real
/// HTTP answers are (the test namespace's loopback otherwise has a 64 KB MTU).
fn pool_scale_up(prefix: &str, subnet: u8, conns: usize, before: u8, after: u8, large: bool) {
    let (mut bed, mut web) =
        Testbed::serving(prefix, subnet, before, |s| s.rebalance = true, &[]).unwrap();
    if large {
        bed.netns.ip(&["link", "set", "lo", "mtu", "1500"]).unwrap();
    }
    let other_pods = pod_ips(subnet + 1, 4);
    bed.add_pods(&other_pods[..2], 8080).unwrap();
    let mut other = ServiceSpec::new(
        "other",
        Ipv4Addr::new(10, 96, subnet + 1, 10),
        80,
        8080,
        &other_pods[..2],
    );
    bed.write_service(&other).unwrap();
    bed.agent()
        .wait_backends("demo/other", &other.pods)
        .unwrap();

    let mut clients: Vec<_> = (0..2).map(|_| bed.client().unwrap()).collect();
    for c in &mut clients {
        if large {
            c.answers(16_000).unwrap();
        }
        assert!(
            c.open(web.target(), conns / 2)
                .unwrap()
                .iter()
                .all(|o| o.ok)
        );
        c.pace(1).unwrap();
    }
    let mut bystander = bed.client().unwrap();
    assert!(
        bystander
            .open(other.target(), 20)
            .unwrap()
            .iter()
            .all(|o| o.ok)
    );
    bystander.pace(1).unwrap();

    let all = pod_ips(subnet, after);
    bed.add_pods(&all[before as usize..], 8080).unwrap();
    web.set_pods(&all);
    bed.write_service(&web).unwrap();
    bed.add_pods(&other_pods[2..], 8080).unwrap();
    other.set_pods(&other_pods);
    bed.write_service(&other).unwrap();
    bed.agent().wait_backends("demo/web", &all).unwrap();
    let other_accepted: Vec<u64> = other_pods
        .iter()
        .map(|ip| bed.pod_at(*ip).accepted())
        .collect();

    let open =
        |ips: &[Ipv4Addr]| -> Vec<u64> { ips.iter().map(|ip| bed.pod_at(*ip).open()).collect() };
    evens_out(
        &format!("{conns} connections over {before} -> {after} pods"),
        &all,
        conns as u64,
        Duration::from_secs(30),
        open,
        || bed.agent().log(),
    );

    metrics_show_the_rebalanced_backends_only(&bed, &all, conns, other_pods.len() + after as usize);

    // Within the budget: at most 10% of the Service's connections per round.
    let rebalance: Vec<BTreeMap<String, Value>> =
        ctl_json(&bed.agent().pin_path, &["rebalance", "list"]).unwrap();
    assert_eq!(rebalance.len(), 1, "only web opted in: {rebalance:?}");
    let closed = rebalance[0]["closed"].as_u64().unwrap();
    let largest = rebalance[0]["largest_round"].as_u64().unwrap();
    assert!(
        largest <= (conns as u64 / 10).max(1),
        "a round closed {largest}"
    );

    // Every closed connection was taken as a normal close: reopened, and no request failed.
    let mut reconnects = 0;
    for c in &mut clients {
        let paced = c.stop_pacing().unwrap();
        assert_eq!(paced.failed, 0, "{paced:?}");
        reconnects += paced.reconnects;
    }
    assert!(
        reconnects >= closed,
        "{reconnects} reconnects for {closed} closures"
    );
    let paced = bystander.stop_pacing().unwrap();
    assert_eq!((paced.reconnects, paced.failed), (0, 0), "{paced:?}");
    let now: Vec<u64> = other_pods
        .iter()
        .map(|ip| bed.pod_at(*ip).accepted())
        .collect();
    assert_eq!(
        now, other_accepted,
        "the Service without the annotation lost connections"
    );
    assert!(!bed.agent().log().contains("rebalance demo/other"));
}

#[test]
fn a_pool_of_40_with_16_kb_answers_over_4_then_8_pods_is_even_within_30_s_and_no_request_fails() {
    require_privileges!();
    pool_scale_up("rb40", 60, 40, 4, 8, true);
}

#[test]
fn a_pool_of_60_over_3_then_6_pods_is_even_within_30_s_and_no_request_fails() {
    require_privileges!();
    pool_scale_up("rb60", 62, 60, 3, 6, false);
}

/// Two pods behind an opted-in Service with a quiet time of 20 ms, shorter than the streams'
/// gaps between events (50-100 ms): what keeps the streams open is that they receive without
/// asking (rules 3 and 4), not that they are busy. And a client holding 8 event streams (an
/// event every 50-100 ms), 4 on each pod.
fn streams_over_two_pods(prefix: &str, subnet: u8) -> (Testbed, ServiceSpec, Client) {
    let (bed, web) = Testbed::serving(
        prefix,
        subnet,
        2,
        |s| {
            s.rebalance = true;
            s.rebalance_quiet = Some("20ms");
        },
        &[],
    )
    .unwrap();
    let mut streams = bed.client().unwrap();
    streams.streams(web.target(), 8).unwrap();
    wait_for("the streams to be placed", Duration::from_secs(5), || {
        Ok((bed.counted_total()? == 8).then_some(()))
    })
    .unwrap();
    (bed, web, streams)
}

/// Stops the streams of `streams_over_two_pods`: none was cut, none moved to the new pods.
fn streams_stayed(streams: &mut Client, bed: &Testbed) {
    let (events, cut) = streams.stop_streams().unwrap();
    assert_eq!(
        cut,
        0,
        "a stream was cut: {events:?}\n{}",
        bed.agent().log()
    );
    assert!(
        !events.contains_key("pod-3") && !events.contains_key("pod-4"),
        "a stream moved: {events:?}"
    );
}

#[test]
fn streams_and_pipelined_requests_are_never_cut_while_idle_connections_move() {
    require_privileges!();
    // Per pod, beside the streams: 2 connections pipelining 3 requests every 20 ms, 6
    // keep-alive connections with a request every second.
    let (mut bed, mut web, mut streams) = streams_over_two_pods("rbs", 64);
    let mut pipelined = bed.client().unwrap();
    assert!(
        pipelined
            .open_one_by_one(web.target(), 4)
            .unwrap()
            .iter()
            .all(|o| o.ok)
    );
    pipelined.pace_pipelined(50, 3).unwrap();
    let mut idle = bed.client().unwrap();
    assert!(
        idle.open_one_by_one(web.target(), 12)
            .unwrap()
            .iter()
            .all(|o| o.ok)
    );
    idle.pace(1).unwrap();
    let ips = pod_ips(64, 4);
    assert_eq!(
        (bed.pod_at(ips[0]).open(), bed.pod_at(ips[1]).open()),
        (12, 12),
        "least-conn placed them one by one"
    );

    bed.add_pods(&ips[2..], 8080).unwrap();
    web.set_pods(&ips);
    bed.write_service(&web).unwrap();
    bed.agent().wait_backends("demo/web", &ips).unwrap();
    let open =
        |ips: &[Ipv4Addr]| -> Vec<u64> { ips.iter().map(|ip| bed.pod_at(*ip).open()).collect() };
    evens_out(
        "24 connections over 2 -> 4 pods",
        &ips,
        24,
        Duration::from_secs(30),
        open,
        || bed.agent().log(),
    );
    // Let rebalancing run on a while after evening out, streams still flowing.
    thread::sleep(Duration::from_secs(3));

    streams_stayed(&mut streams, &bed);
    let paced = pipelined.stop_pacing().unwrap();
    assert_eq!(
        paced.failed,
        0,
        "pipelined requests: {paced:?}\n{}",
        bed.agent().log()
    );
    let paced = idle.stop_pacing().unwrap();
    assert_eq!(paced.failed, 0, "keep-alive requests: {paced:?}");
    assert!(paced.reconnects >= 6, "idle connections moved: {paced:?}");
}

#[test]
fn when_only_streams_are_over_their_share_none_is_cut() {
    require_privileges!();
    // Per pod, beside the 4 streams: 2 keep-alive connections (a request a second). After
    // 2 -> 4 pods each old pod is 4 over its share but has only 2 connections that may move:
    // the streams are the only candidates left, and only the stream rules (an event long after
    // the request, data without asking) keep them.
    let (mut bed, mut web, mut streams) = streams_over_two_pods("rbo", 65);
    let mut idle = bed.client().unwrap();
    assert!(
        idle.open_one_by_one(web.target(), 4)
            .unwrap()
            .iter()
            .all(|o| o.ok)
    );
    idle.pace(1).unwrap();
    let ips = pod_ips(65, 4);
    bed.add_pods(&ips[2..], 8080).unwrap();
    web.set_pods(&ips);
    bed.write_service(&web).unwrap();
    bed.agent().wait_backends("demo/web", &ips).unwrap();
    wait_for(
        "the keep-alive connections to move",
        Duration::from_secs(30),
        || Ok((bed.pod_at(ips[2]).open() + bed.pod_at(ips[3]).open() == 4).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", bed.agent().log()));
    // Rounds go on wanting 2 more off each old pod, and find only streams.
    thread::sleep(Duration::from_secs(6));

    streams_stayed(&mut streams, &bed);
    let paced = idle.stop_pacing().unwrap();
    assert_eq!(paced.failed, 0, "keep-alive requests: {paced:?}");
    assert!(paced.reconnects >= 4, "{paced:?}");
    let log = bed.agent().log();
    assert!(
        log.contains("receiving a stream") || log.contains("receiving without asking"),
        "the streams were never considered: {log}"
    );
}

/// Established server-side connections per pod address on `port` (the pods' kernel view;
/// gRPC's servers listen on dual-mode sockets, so their IPv4 connections are `::ffff:` ones).
fn served(netns: &Netns, port: u16) -> BTreeMap<IpAddr, u64> {
    let mut out = BTreeMap::new();
    for ipv6 in [false, true] {
        for (local, _) in netns.established(ipv6).unwrap() {
            if let Ok(addr) = local.parse::<SocketAddr>()
                && addr.port() == port
            {
                let ip = match addr.ip() {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    v4 => v4,
                };
                *out.entry(ip).or_default() += 1;
            }
        }
    }
    out
}

#[test]
fn grpc_channels_even_out_with_no_failed_call() {
    require_privileges!();
    const GRPC: u16 = 50051;
    let mut bed = Testbed::new("rbg").unwrap();
    // Two Services: "web" with 12 channels over 4 then 8 pods, each channel making a unary
    // call every 100 ms, so never quiet for the default 500 ms: the Service sets a quiet time
    // of 20 ms, right for sequential calls; and "few" with 3 channels over 2 then 4 pods
    // (fewer channels than pods), a call every second, at the default settings.
    let (web_ips, few_ips) = (pod_ips(66, 8), pod_ips(67, 4));
    let _pods: Vec<GrpcPod> = web_ips
        .iter()
        .chain(&few_ips)
        .map(|ip| {
            let name = format!("{}-{}", ip.octets()[2], ip.octets()[3]);
            GrpcPod::start(&bed.netns, &name, SocketAddr::from((*ip, GRPC))).unwrap()
        })
        .collect();
    let mut web = ServiceSpec::new(
        "web",
        Ipv4Addr::new(10, 96, 66, 10),
        80,
        GRPC,
        &web_ips[..4],
    );
    let mut few = ServiceSpec::new(
        "few",
        Ipv4Addr::new(10, 96, 67, 10),
        80,
        GRPC,
        &few_ips[..2],
    );
    web.rebalance = true;
    web.rebalance_quiet = Some("20ms");
    few.rebalance = true;
    bed.write_service(&web).unwrap();
    bed.write_service(&few).unwrap();
    bed.start_agent(&[]).unwrap();
    bed.agent().wait_backends("demo/few", &few.pods).unwrap();

    // Long-lived channels, one per client process (a process's channels to one target share
    // a connection).
    let clients: Vec<GrpcChannels> = std::iter::repeat_n((web.target(), 100), 12)
        .chain(std::iter::repeat_n((few.target(), 1000), 3))
        .map(|(target, every_ms)| {
            GrpcChannels::start(&bed.netns, bed.cgroup.path(), target, 1, every_ms).unwrap()
        })
        .collect();
    let count = |ips: &[Ipv4Addr]| -> Vec<u64> {
        let s = served(&bed.netns, GRPC);
        ips.iter()
            .map(|ip| s.get(&IpAddr::V4(*ip)).copied().unwrap_or(0))
            .collect()
    };
    wait_for("every channel connected", Duration::from_secs(10), || {
        Ok(
            (count(&web_ips).iter().sum::<u64>() == 12 && count(&few_ips).iter().sum::<u64>() == 3)
                .then_some(()),
        )
    })
    .unwrap();

    web.set_pods(&web_ips);
    few.set_pods(&few_ips);
    bed.write_service(&web).unwrap();
    bed.write_service(&few).unwrap();
    bed.agent().wait_backends("demo/web", &web_ips).unwrap();
    bed.agent().wait_backends("demo/few", &few_ips).unwrap();
    evens_out(
        "12 channels over 4 -> 8 pods",
        &web_ips,
        12,
        Duration::from_secs(30),
        count,
        || bed.agent().log(),
    );
    evens_out(
        "3 channels over 2 -> 4 pods",
        &few_ips,
        3,
        Duration::from_secs(30),
        count,
        || bed.agent().log(),
    );

    for c in clients {
        let calls = c.finish().unwrap();
        assert!(calls.calls > 5, "{calls:?}");
        assert_eq!(calls.failed, 0, "{calls:?}\n{}", bed.agent().log());
    }
}
