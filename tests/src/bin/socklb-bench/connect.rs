//! `cargo xtask bench connect`: what a connect costs through socklb, straight to the pod, and
//! through the kube-proxy chain, with 1, 1,000 and 10,000 Services programmed (rules and map
//! entries for all of them, the measured Service in the middle of kube-proxy's list). Each
//! measurement is connect + HTTP/1.0 request + first byte of the answer from a real nginx,
//! one connection after the other, by one client process.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result};
use serde_json::Value;
use socklb_tests::{
    agent::ctl_json,
    client::{Client, Latency},
    kube_proxy::{self, ChainService},
    manifests::ServiceSpec,
    servers::{HTTP_PORT, Kind, ServerPod},
    testbed::Testbed,
};

const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const CONNECTS: usize = 3_000;
/// Rounds per path, taken in turn; the table shows the median round.
const ROUNDS: usize = 3;
const WARM_UP: usize = 500;

/// N Services with two (unreachable) endpoints each, except the one in the middle, which
/// leads to the nginx pod. Returns them and the measured one's address.
fn services(n: u32) -> (Vec<ServiceSpec>, SocketAddrV4) {
    let target = n / 2;
    let specs: Vec<ServiceSpec> = (0..n)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 16)) + i);
            let pods = if i == target {
                vec![POD]
            } else {
                (0..2)
                    .map(|k| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + 2 * i + k))
                    .collect()
            };
            let mut s = ServiceSpec::new(&format!("svc-{i}"), vip, 80, HTTP_PORT, &pods);
            s.namespace = "bench".into();
            s
        })
        .collect();
    let addr = specs[target as usize].target();
    (specs, addr)
}

struct Row {
    services: u32,
    path: &'static str,
    latency: Latency,
}

pub fn run(results: &Path) -> Result<()> {
    fs::create_dir_all(results)?;
    let mut rows = Vec::new();
    let mut notes = String::new();
    let mut bpf = String::new();
    for n in [1u32, 1_000, 10_000] {
        println!("\n== {n} Services");
        let (specs, vip) = services(n);
        let pod = SocketAddrV4::new(POD, HTTP_PORT);

        // socklb: the programs on the client cgroup, every Service in the maps.
        let mut bed = Testbed::new("conn")?;
        let _pod = ServerPod::start(&bed.netns, Kind::Nginx, POD)?;
        let yaml: Vec<String> = specs.iter().map(ServiceSpec::yaml).collect();
        bed.manifests
            .write("services.yaml", &yaml.join("\n---\n"))?;
        let t = Instant::now();
        bed.start_agent(&[])?;
        let programmed = t.elapsed();
        let _ = writeln!(
            notes,
            "- {n} Services: the agent loaded, attached and programmed them in {programmed:.2?}"
        );

        // Straight to the pod: a client outside the cgroup, no balancer at all.
        let mut direct = Client::spawn(&bed.netns, None)?;
        let mut through = bed.client()?;
        direct.latency(pod, WARM_UP)?;
        through.latency(vip, WARM_UP)?;
        let before = bpf_stats(&bed)?;
        let (mut straight, mut balanced) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            straight.push(direct.latency(pod, CONNECTS)?);
            balanced.push(with_bpf_stats(|| through.latency(vip, CONNECTS))?);
        }
        let after = bpf_stats(&bed)?;
        rows.push(Row {
            services: n,
            path: "direct to the pod",
            latency: median(&straight),
        });
        rows.push(Row {
            services: n,
            path: "socklb",
            latency: median(&balanced),
        });
        println!("   direct and socklb done");
        let _ = write!(bpf, "| {n} |");
        for name in ["connect4", "sock_ops", "sock_release"] {
            let (cnt, ns) = (
                after[name].0 - before[name].0,
                after[name].1 - before[name].1,
            );
            let _ = write!(
                bpf,
                " {:.0} ns ({cnt} runs) |",
                ns as f64 / cnt.max(1) as f64
            );
        }
        bpf.push('\n');
        drop((direct, through));
        drop(bed);

        // kube-proxy: the same Services as iptables rules, in a namespace of their own.
        let bed = Testbed::new("connkp")?;
        let _pod = ServerPod::start(&bed.netns, Kind::Nginx, POD)?;
        let chain: Vec<ChainService> = specs
            .iter()
            .map(|s| ChainService {
                port_name: format!("bench/{}:main", s.name),
                vip: s.vip,
                port: s.port,
                protocol: "tcp",
                endpoints: s
                    .pods
                    .iter()
                    .map(|ip| SocketAddrV4::new(*ip, HTTP_PORT))
                    .collect(),
            })
            .collect();
        let t = Instant::now();
        kube_proxy::install(&bed.netns, &chain)?;
        let _ = writeln!(
            notes,
            "- {n} Services: iptables-restore of kube-proxy's rules took {:.2?}",
            t.elapsed()
        );
        let mut client = Client::spawn(&bed.netns, None)?;
        client.latency(vip, WARM_UP)?;
        let rounds: Vec<Latency> = (0..ROUNDS)
            .map(|_| client.latency(vip, CONNECTS))
            .collect::<Result<_>>()?;
        rows.push(Row {
            services: n,
            path: "kube-proxy (iptables)",
            latency: median(&rounds),
        });
        println!("   kube-proxy done");
    }

    let mut out = format!(
        "# Connect cost\n\nConnect + first byte of the answer (HTTP/1.0 to nginx), {CONNECTS} connections one after another \
         per round, {ROUNDS} rounds per path taken in turn (the table shows the round with the median p50), after \
         {WARM_UP} to warm up. Ratios are against going straight to the pod in the same namespace.\n\n\
         | Services | path | p50 (µs) | p99 (µs) | connections/s | p50 vs direct | connections/s vs direct |\n|---|---|---|---|---|---|---|\n"
    );
    for chunk in rows.chunks(3) {
        let direct = chunk[0].latency;
        for r in chunk {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
                r.services,
                r.path,
                r.latency.p50_us,
                r.latency.p99_us,
                r.latency.per_second,
                r.latency.p50_us / direct.p50_us,
                r.latency.per_second / direct.per_second
            );
        }
    }
    let _ = write!(
        out,
        "\nThe BPF programs' own run time per call (kernel.bpf_stats_enabled during the socklb rounds only):\n\n\
         | Services | connect4 | sock_ops | sock_release |\n|---|---|---|---|\n{bpf}\n{notes}"
    );
    print!("\n{out}");
    fs::write(results.join("README.md"), out)?;
    println!("\nresults written to {}", results.display());
    Ok(())
}

/// Runs `f` with kernel.bpf_stats_enabled on (it costs a little on every program run, so it is
/// off for the other paths), restoring what was there.
fn with_bpf_stats<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    const KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = fs::read_to_string(KNOB).unwrap_or_else(|_| "0".into());
    fs::write(KNOB, "1").context("enabling kernel.bpf_stats_enabled")?;
    let result = f();
    fs::write(KNOB, was.trim())?;
    result
}

/// The round with the median p50.
fn median(rounds: &[Latency]) -> Latency {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| a.p50_us.total_cmp(&b.p50_us));
    sorted[sorted.len() / 2]
}

/// (run count, run time in ns) per attached program, from `socklbctl -j prog show`.
fn bpf_stats(bed: &Testbed) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let rows: Vec<Value> = ctl_json(&bed.agent().pin_path, &["prog", "show"])?;
    Ok(rows
        .iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap_or("?").to_owned();
            (
                name,
                (
                    r["run_cnt"].as_u64().unwrap_or(0),
                    r["run_time_ns"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect())
}
