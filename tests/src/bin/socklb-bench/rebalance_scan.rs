//! `cargo xtask bench rebalance-scan`: what one rebalancing round costs the agent with 10,000
//! and 100,000 assigned sockets spread over 20 and 200 network namespaces (pods).
//!
//! Each "pod" is a network namespace of its own with a client process in the balanced cgroup
//! holding its share of idle TCP connections to a Service over 4 backends (listeners in the
//! same namespace that never accept: the connections complete in the kernel and stay). The
//! Service then scales to 8 backends, which makes it uneven, and the agent's rebalancing
//! rounds run: the agent logs each round's time (socket iterator, namespace walk, sock_diag
//! queries of a sample of the busy backends' sockets, closures). Baselines in the same run:
//! the iterator alone, and a sock_diag dump of every namespace (what finding the sockets cost
//! before the iterator: every socket of every namespace).

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_userspace::{datapath::Tools, netns::Cookies, sockdiag};
use socklb_tests::{
    agent::Agent,
    cgroup::Cgroup,
    client::Client,
    manifests::{ManifestDir, ServiceSpec},
    netns::Netns,
};

const BACKENDS: u8 = 4;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// One pod: its namespace, its listeners, its client.
struct PodNs {
    _client: Client,
    _listeners: Vec<TcpListener>,
    _netns: Netns,
}

pub fn run(results: &Path) -> Result<()> {
    fs::create_dir_all(results)?;
    let mut out = String::from(
        "# Rebalancing round cost\n\n\
         Assigned sockets (idle TCP connections) in N network namespaces, one client process each; one \
         Service goes from 4 to 8 backends so rebalancing has work. A round: list the assigned sockets with \
         the BPF iterator, find the namespaces under the cgroup, list a sample of the busy backends' sockets \
         with the iterator and look at each with one sock_diag query, close what the plan asks for. Baselines in \
         the same run: the iterator listing every socket, and sock_diag dumps of every namespace (the previous \
         way of finding the sockets).\n\n\
         | assigned sockets | namespaces | iterator, every socket | dump of every namespace | first round | next rounds (median) |\n|---|---|---|---|---|---|\n",
    );
    for (sockets, namespaces) in [(10_000usize, 20usize), (100_000, 200)] {
        println!("\n== {sockets} sockets over {namespaces} namespaces");
        let row = one(sockets, namespaces)?;
        out += &row;
        print!("{row}");
    }
    fs::write(results.join("README.md"), &out)?;
    println!("\n{out}\nresults written to {}", results.display());
    Ok(())
}

fn one(sockets: usize, namespaces: usize) -> Result<String> {
    let cgroup = Cgroup::new("scan")?;
    let manifests = ManifestDir::new("scan")?;
    let pods: Vec<Ipv4Addr> = (1..=2 * BACKENDS)
        .map(|i| Ipv4Addr::new(10, 244, 0, i))
        .collect();
    let mut spec = ServiceSpec::new("web", VIP, 80, 8080, &pods[..BACKENDS as usize]);
    spec.rebalance = true;
    manifests.write("web.yaml", &spec.yaml())?;
    let agent = Agent::start(&manifests, &cgroup, &[])?;

    let per_ns = sockets / namespaces;
    let mut pods_ns = Vec::new();
    let t = Instant::now();
    for _ in 0..namespaces {
        let netns = Netns::new("scan")?;
        let mut listeners = Vec::new();
        for ip in &pods {
            netns.add_address(*ip)?;
            let addr = SocketAddr::from((*ip, 8080));
            listeners.push(netns.run(move || TcpListener::bind(addr))?);
        }
        let mut client = Client::spawn(&netns, Some(cgroup.path()))?;
        let held = client.hold(SocketAddr::from((VIP, 80)), per_ns)?;
        anyhow::ensure!(held as usize == per_ns, "held {held} of {per_ns}");
        pods_ns.push(PodNs {
            _client: client,
            _listeners: listeners,
            _netns: netns,
        });
    }
    println!(
        "   {sockets} connections held in {namespaces} namespaces ({:.1?})",
        t.elapsed()
    );

    // Baselines.
    let tools = Tools::open(&agent.pin_path)?;
    let t = Instant::now();
    let listed = tools.sockets.list()?.len();
    let iterator = t.elapsed();
    anyhow::ensure!(
        listed == sockets,
        "the iterator listed {listed} of {sockets}"
    );
    let mut cookies = Cookies::default();
    let t = Instant::now();
    let found = cookies.under(cgroup.path())?;
    let mut dumped = 0;
    for ns in found.values() {
        dumped += sockdiag::in_netns(&ns.file, |s| s.sockets(lb_common::IPPROTO_TCP))?.len();
    }
    let dump_all = t.elapsed();
    println!(
        "   iterator {iterator:.1?} ({listed} sockets); every namespace dumped {dump_all:.1?} ({dumped} sockets)"
    );

    // The scale-up, and the rounds it sets off.
    let rounds_before = agent.log().matches("rebalance round took").count();
    spec.set_pods(&pods);
    manifests.write("web.yaml", &spec.yaml())?;
    agent.wait_backends("demo/web", &pods)?;
    let started = Instant::now();
    while agent.log().matches("rebalance round took").count() < rounds_before + 4 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "fewer than 4 rebalancing rounds in 2 minutes:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rounds: Vec<f64> = agent
        .log()
        .lines()
        .filter_map(|l| {
            l.split("rebalance round took ")
                .nth(1)?
                .split(" ms")
                .next()?
                .parse()
                .ok()
        })
        .skip(rounds_before)
        .collect();
    let mut next: Vec<f64> = rounds[1..].to_vec();
    next.sort_by(f64::total_cmp);
    let mut row = String::new();
    let _ = writeln!(
        row,
        "| {sockets} | {namespaces} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
        iterator.as_secs_f64() * 1e3,
        dump_all.as_secs_f64() * 1e3,
        rounds[0],
        next[next.len() / 2]
    );
    drop(agent);
    drop(pods_ns);
    Ok(row)
}
