//! Active rebalancing after a scale-up, judged by the pods' own counts.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use serde_json::Value;
use socklb_tests::{
    agent::ctl_json,
    manifests::{ServiceSpec, pod_ips},
    require_privileges,
    testbed::Testbed,
    wait_for,
};

/// Rebalance every half second, within 10% of the mean, closing at most 10% per round.
const AGENT_ARGS: [&str; 6] = [
    "--rebalance-interval",
    "0.5",
    "--rebalance-threshold",
    "0.1",
    "--rebalance-max-share",
    "0.1",
];

#[test]
fn a_scale_up_is_evened_out_within_bounded_rounds_and_only_where_asked() {
    require_privileges!();
    let (mut bed, mut web) =
        Testbed::serving("rb", 14, 3, |s| s.rebalance = true, &AGENT_ARGS).unwrap();

    // A second Service, not opted in, with the same imbalance to come.
    let other_pods = pod_ips(15, 4);
    bed.add_pods(&other_pods[..2], 8080).unwrap();
    let mut other = ServiceSpec::new(
        "other",
        Ipv4Addr::new(10, 96, 15, 10),
        80,
        8080,
        &other_pods[..2],
    );
    bed.write_service(&other).unwrap();
    bed.agent()
        .wait_backends("demo/other", &other.pods)
        .unwrap();

    // 60 long-lived connections to web (two clients) and 20 to other, each with steady
    // requests, before the scale-up: 20 per pod.
    let mut clients: Vec<_> = (0..2).map(|_| bed.client().unwrap()).collect();
    for c in &mut clients {
        assert!(c.open(web.target(), 30).unwrap().iter().all(|o| o.ok));
        c.pace(50).unwrap();
    }
    let mut bystander = bed.client().unwrap();
    assert!(
        bystander
            .open(other.target(), 20)
            .unwrap()
            .iter()
            .all(|o| o.ok)
    );
    bystander.pace(50).unwrap();

    // Scale both up.
    let new_web = pod_ips(14, 6)[3..].to_vec();
    bed.add_pods(&new_web, 8080).unwrap();
    web.set_pods(&pod_ips(14, 6));
    bed.write_service(&web).unwrap();
    bed.add_pods(&other_pods[2..], 8080).unwrap();
    other.set_pods(&other_pods);
    bed.write_service(&other).unwrap();
    bed.agent().wait_backends("demo/web", &web.pods).unwrap();
    bed.agent()
        .wait_backends("demo/other", &other.pods)
        .unwrap();
    let other_accepted: Vec<u64> = other_pods
        .iter()
        .map(|ip| bed.pod_at(*ip).accepted())
        .collect();

    // Every web pod ends within one of the mean (10), by the pods' own count, within a bounded
    // number of rounds (about 5 are needed at 6 closures a round; 30 s is 60 rounds).
    let open =
        |bed: &Testbed| -> Vec<u64> { web.pods.iter().map(|ip| bed.pod_at(*ip).open()).collect() };
    wait_for(
        "web pods within one of the mean",
        Duration::from_secs(30),
        || {
            let o = open(&bed);
            Ok(
                (o.iter().sum::<u64>() == 60 && o.iter().all(|n| (9..=11).contains(n)))
                    .then_some(o),
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", open(&bed), bed.agent().log()));

    // No round closed more than its bound (10% of 60).
    let rebalance: Vec<BTreeMap<String, Value>> =
        ctl_json(&bed.agent().pin_path, &["rebalance", "list"]).unwrap();
    assert_eq!(rebalance.len(), 1, "only web opted in: {rebalance:?}");
    let closed = rebalance[0]["closed"].as_u64().unwrap();
    let largest = rebalance[0]["largest_round"].as_u64().unwrap();
    assert!(closed >= 30, "{rebalance:?}");
    assert!(largest <= 6, "a round closed {largest}, bound is 6");
    for line in bed
        .agent()
        .log()
        .lines()
        .filter(|l| l.contains("rebalance demo/web"))
    {
        let n: u64 = line
            .split("closed ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(n <= 6, "{line}");
    }

    // Every closed connection was reopened by its client, and no request was lost; the
    // bystander was never touched.
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
