//! socklb-demo (`cargo xtask demo`): the long-lived connection problem and what socklb does
//! about it, measured on this machine in one run.
//!
//! For each balancer (the kube-proxy iptables chain, socklb `random`, socklb `least-conn`):
//! three pods serve HTTP; a client holds 12 keep-alive connections to the Service and sends
//! 20 requests per second on each, like a pool of steady callers; the Service scales up to
//! six pods; a second client opens 12 more connections. The fourth row, socklb `least-conn`
//! with rebalancing, scales up with only the first client's connections open: they even out
//! over the six pods with no new client at all. The pods count what they serve, and the table
//! shows per pod the open connections and the requests served in each phase.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socklb_tests::{
    agent::ctl_json,
    client::Client,
    kube_proxy::{self, ChainService},
    manifests::{ServiceSpec, pod_ips},
    privileges,
    testbed::Testbed,
};

const PHASE: Duration = Duration::from_secs(4);
const CONNECTIONS: usize = 12;
/// Requests per second on each connection.
const RATE: u64 = 20;
/// With rebalancing: a connection is only closed once it has been quiet for the default quiet
/// time (500 ms), so these connections are used once a second.
const REBALANCE_RATE: u64 = 1;
/// The longest the rebalancing row waits for its connections to even out.
const EVEN_WITHIN: Duration = Duration::from_secs(30);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

#[derive(Clone, Copy)]
enum Balancer {
    KubeProxy,
    Socklb(&'static str),
    /// least-conn with `socklb.io/rebalance: "true"`, and no second client.
    Rebalance,
}

impl Balancer {
    fn label(self) -> String {
        match self {
            Balancer::KubeProxy => "kube-proxy (iptables)".into(),
            Balancer::Socklb(a) => format!("socklb {a}"),
            Balancer::Rebalance => "socklb lc + rebalance".into(),
        }
    }
}

/// Per pod: (open connections at the end of the phase, requests served during it).
type Phase = BTreeMap<String, (u64, u64)>;

struct Run {
    balancer: Balancer,
    before: Phase,
    after: Phase,
    failed_requests: u64,
    /// Rebalancing: how long after the scale-up the connections were even, and how many it
    /// closed.
    evened: Option<(Duration, u64)>,
}

fn main() -> Result<()> {
    if !privileges::check("socklb-demo") {
        bail!("the demo needs root, cgroup v2 and iproute2/iptables (cargo xtask setup)");
    }
    println!(
        "socklb demo: a client holds {CONNECTIONS} keep-alive connections to a Service with 3 pods and\n\
         sends {RATE} requests/s on each; the Service scales up to 6 pods, and a second client opens\n\
         {CONNECTIONS} more connections (with rebalancing: no second client, {REBALANCE_RATE} request/s on\n\
         each connection, and socklb evens out the first client's at its default settings). Each\n\
         phase lasts {PHASE:?}; the pods count what they serve.\n"
    );
    let start = Instant::now();
    let mut runs = Vec::new();
    for balancer in [
        Balancer::KubeProxy,
        Balancer::Socklb("random"),
        Balancer::Socklb("least-conn"),
        Balancer::Rebalance,
    ] {
        print!("  running {:<22}", balancer.label());
        let run = run(balancer).with_context(|| balancer.label())?;
        println!("done");
        runs.push(run);
    }
    println!();
    print_table(&runs);
    println!("\n(finished in {:.1?})", start.elapsed());
    Ok(())
}

fn run(balancer: Balancer) -> Result<Run> {
    let mut bed = Testbed::new("demo")?;
    let ips = pod_ips(0, 6);
    bed.add_pods(&ips[..3], 8080)?;
    let mut spec = ServiceSpec::new("web", VIP, 80, 8080, &ips[..3]);
    match balancer {
        Balancer::KubeProxy => kube_proxy::install(&bed.netns, &[chain(&ips[..3])])?,
        Balancer::Socklb(algorithm) => {
            spec.algorithm = Some(algorithm);
            bed.write_service(&spec)?;
            bed.start_agent(&[])?;
        }
        Balancer::Rebalance => {
            spec.rebalance = true;
            bed.write_service(&spec)?;
            bed.start_agent(&[])?;
        }
    }
    let target = SocketAddrV4::new(VIP, 80);

    // Phase 1: the first client's connections, 3 pods.
    let mut first = client(&bed, balancer)?;
    let rate = match balancer {
        Balancer::Rebalance => REBALANCE_RATE,
        _ => RATE,
    };
    connect(&mut first, target, rate)?;
    let start = snapshot(&bed);
    thread::sleep(PHASE);
    let at_scale_up = snapshot(&bed);

    // Scale up to 6 pods, then the second client connects.
    bed.add_pods(&ips[3..], 8080)?;
    match balancer {
        Balancer::KubeProxy => {
            // kube-proxy rewrites the chain; established connections keep their conntrack entry.
            bed.netns.run_with_input(
                "iptables-restore",
                &[],
                &kube_proxy::rules(&[chain(&ips)], false),
            )?;
        }
        Balancer::Socklb(_) | Balancer::Rebalance => {
            spec.set_pods(&ips);
            bed.write_service(&spec)?;
            bed.agent().wait_backends("demo/web", &ips)?;
        }
    }
    let scaled_at = Instant::now();
    let (mut second, evened) = match balancer {
        Balancer::Rebalance => (None, Some(wait_even(&bed, scaled_at)?)),
        _ => {
            let mut second = client(&bed, balancer)?;
            connect(&mut second, target, rate)?;
            (Some(second), None)
        }
    };
    let after_start = snapshot(&bed);
    thread::sleep(PHASE);
    let end = snapshot(&bed);
    let mut failed_requests = first.stop_pacing()?.failed;
    if let Some(second) = &mut second {
        failed_requests += second.stop_pacing()?.failed;
    }

    Ok(Run {
        balancer,
        before: phase(&start, &at_scale_up),
        after: phase(&after_start, &end),
        failed_requests,
        evened,
    })
}

/// Waits until the pods' open connections are even (spread at most one); how long that took
/// since `since`, and how many connections rebalancing closed.
fn wait_even(bed: &Testbed, since: Instant) -> Result<(Duration, u64)> {
    loop {
        let open: Vec<u64> = bed.pods.iter().map(|p| p.open()).collect();
        let spread = open.iter().max().unwrap_or(&0) - open.iter().min().unwrap_or(&0);
        if open.iter().sum::<u64>() == CONNECTIONS as u64 && spread <= 1 {
            let listed: Vec<serde_json::Value> =
                ctl_json(&bed.agent().pin_path, &["rebalance", "list"])?;
            let closed = listed
                .first()
                .and_then(|r| r["closed"].as_u64())
                .unwrap_or(0);
            return Ok((since.elapsed(), closed));
        }
        if since.elapsed() > EVEN_WITHIN {
            bail!("not even {EVEN_WITHIN:?} after the scale-up: {open:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A client process: in socklb's cgroup for socklb, anywhere in the namespace for kube-proxy
/// (its chain acts on the whole namespace).
fn client(bed: &Testbed, balancer: Balancer) -> Result<Client> {
    match balancer {
        Balancer::KubeProxy => Client::spawn(&bed.netns, None),
        Balancer::Socklb(_) | Balancer::Rebalance => bed.client(),
    }
}

/// Opens the client's keep-alive connections and starts its steady requests.
fn connect(client: &mut Client, target: SocketAddrV4, rate: u64) -> Result<()> {
    let outcomes = client.open(target, CONNECTIONS)?;
    if let Some(failed) = outcomes.iter().find(|o| !o.ok) {
        bail!("a connect failed: {failed:?}");
    }
    client.pace(rate)
}

/// Open connections at the end of a phase, and requests served during it, per pod.
fn phase(from: &BTreeMap<String, (u64, u64)>, to: &BTreeMap<String, (u64, u64)>) -> Phase {
    to.iter()
        .map(|(pod, (open, requests))| {
            let earlier = from.get(pod).map_or(0, |(_, r)| *r);
            (pod.clone(), (*open, requests - earlier))
        })
        .collect()
}

fn chain(pods: &[Ipv4Addr]) -> ChainService {
    ChainService {
        port_name: "demo/web:main".into(),
        vip: VIP.into(),
        port: 80,
        protocol: "tcp",
        endpoints: pods.iter().map(|ip| (*ip, 8080).into()).collect(),
    }
}

fn snapshot(bed: &Testbed) -> BTreeMap<String, (u64, u64)> {
    bed.pods
        .iter()
        .map(|p| (p.name.clone(), (p.open(), p.requests())))
        .collect()
}

fn max_over_mean(values: &[u64]) -> f64 {
    let mean = values.iter().sum::<u64>() as f64 / values.len() as f64;
    if mean == 0.0 {
        return 0.0;
    }
    *values.iter().max().unwrap() as f64 / mean
}

fn print_table(runs: &[Run]) {
    let pods: Vec<String> = (1..=6).map(|i| format!("pod-{i}")).collect();
    println!("Open connections / requests served per pod (from the pods' own counters).");
    println!("max/mean: busiest pod over the average pod, 1.00 is perfectly even.\n");
    print!("{:<22} {:<7}", "balancer", "phase");
    for p in &pods {
        print!(" {p:>11}");
    }
    println!("  {:>10}  {:>10}", "conns max/", "reqs max/");
    print!("{:<22} {:<7}", "", "");
    for _ in &pods {
        print!(" {:>11}", "");
    }
    println!("  {:>10}  {:>10}", "mean", "mean");
    for run in runs {
        for (phase, counts) in [("before", &run.before), ("after", &run.after)] {
            let label = if phase == "before" {
                run.balancer.label()
            } else {
                String::new()
            };
            print!("{label:<22} {phase:<7}");
            for p in &pods {
                match counts.get(p) {
                    Some((open, requests)) => {
                        print!(" {:>11}", format!("{open}/{}", short(*requests)))
                    }
                    None => print!(" {:>11}", "-"),
                }
            }
            let opens: Vec<u64> = counts.values().map(|(o, _)| *o).collect();
            let requests: Vec<u64> = counts.values().map(|(_, r)| *r).collect();
            println!(
                "  {:>10.2}  {:>10.2}",
                max_over_mean(&opens),
                max_over_mean(&requests)
            );
        }
    }
    let failed: u64 = runs.iter().map(|r| r.failed_requests).sum();
    println!("\nfailed requests: {failed}");
    for run in runs {
        if let Some((took, closed)) = run.evened {
            println!(
                "{}: the first client's {CONNECTIONS} connections were even {took:.1?} after the \
                 scale-up, {closed} of them closed while idle and reopened by the client",
                run.balancer.label()
            );
        }
    }
}

fn short(n: u64) -> String {
    if n >= 10_000 {
        format!("{:.0}k", n as f64 / 1000.0)
    } else {
        n.to_string()
    }
}
