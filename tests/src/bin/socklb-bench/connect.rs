//! `cargo xtask bench connect`: what a connect costs through socklb, straight to the pod, and
//! through the kube-proxy chain, with 1, 1,000 and 10,000 dual-stack Services programmed (rules
//! and map entries for all of them, the measured Service in the middle of kube-proxy's list).
//! Each measurement is connect + HTTP/1.0 request + first byte of the answer from a real nginx,
//! one connection after the other, by one client process, for three kinds of client socket:
//! `AF_INET` to the IPv4 ClusterIP; `AF_INET6` to `::ffff:ClusterIP` (what Java, .NET and gRPC
//! C-core do, through `connect6`); and `AF_INET6` to the IPv6 ClusterIP. The kube-proxy
//! baseline is iptables for the first two and ip6tables for the third, in kube-proxy's shape.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
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
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);
const CONNECTS: usize = 3_000;
/// Rounds per path, taken in turn; the table shows the median round.
const ROUNDS: usize = 3;
const WARM_UP: usize = 500;

/// The kinds of client socket measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    /// AF_INET to the IPv4 ClusterIP.
    V4,
    /// AF_INET6 (dual-mode) to `::ffff:ClusterIP`.
    V4Mapped,
    /// AF_INET6 to the IPv6 ClusterIP.
    V6,
}

impl Family {
    const ALL: [Family; 3] = [Family::V4, Family::V4Mapped, Family::V6];

    fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V4Mapped => "v4-mapped (AF_INET6 to ::ffff:VIP)",
            Family::V6 => "IPv6",
        }
    }

    /// (straight to the pod, through the Service) as this kind of socket names them.
    fn targets(self, spec: &ServiceSpec) -> (SocketAddr, SocketAddr) {
        match self {
            Family::V4 => (SocketAddr::from((POD, HTTP_PORT)), spec.target()),
            Family::V4Mapped => (
                SocketAddr::from((POD.to_ipv6_mapped(), HTTP_PORT)),
                spec.mapped_target(),
            ),
            Family::V6 => (
                SocketAddr::from((POD6, HTTP_PORT)),
                SocketAddr::new(spec.vip2.expect("dual-stack"), spec.port),
            ),
        }
    }

    /// The program that rewrites this kind of connect.
    fn hook(self) -> &'static str {
        match self {
            Family::V4 => "connect4",
            Family::V4Mapped | Family::V6 => "connect6",
        }
    }
}

/// N dual-stack Services with two (unreachable) endpoints per family each, except the one in
/// the middle, which leads to the nginx pods. Returns them and the measured one.
fn services(n: u32) -> (Vec<ServiceSpec>, ServiceSpec) {
    let target = n / 2;
    let specs: Vec<ServiceSpec> = (0..n)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 16)) + i);
            let vip6 = Ipv6Addr::from(
                u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 16)) + u128::from(i),
            );
            let pods: Vec<IpAddr> = if i == target {
                vec![POD.into(), POD6.into()]
            } else {
                (0..2)
                    .flat_map(|k| {
                        let v4 =
                            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + 2 * i + k);
                        let v6 = Ipv6Addr::from(
                            u128::from(Ipv6Addr::new(0xfd00, 0x245, 0, 0, 0, 0, 0, 0))
                                + u128::from(2 * i + k),
                        );
                        [IpAddr::from(v4), IpAddr::from(v6)]
                    })
                    .collect()
            };
            let mut s = ServiceSpec::new(&format!("svc-{i}"), vip, 80, HTTP_PORT, &pods);
            s.vip2 = Some(vip6.into());
            s.namespace = "bench".into();
            s
        })
        .collect();
    let measured = specs[target as usize].clone();
    (specs, measured)
}

/// (Services, family) -> [direct, socklb, direct, kube-proxy]: each balancer beside going
/// straight to the pod in its own namespace, rounds taken in turn.
type Table = BTreeMap<(u32, Family), [Option<Latency>; 4]>;

pub fn run(results: &Path) -> Result<()> {
    fs::create_dir_all(results)?;
    let mut table = Table::new();
    let mut notes = String::new();
    let mut bpf = String::new();
    // (Services, family) -> the connect hook's ns per call (to the Service, to no Service).
    let mut hooks: BTreeMap<(u32, Family), (f64, f64)> = BTreeMap::new();
    for n in [1u32, 1_000, 10_000] {
        println!("\n== {n} dual-stack Services");
        let (specs, measured) = services(n);

        // socklb: the programs on the client cgroup, every Service in the maps.
        let mut bed = Testbed::new("conn")?;
        let _pods = (
            ServerPod::start(&bed.netns, Kind::Nginx, POD)?,
            ServerPod::start(&bed.netns, Kind::Nginx, POD6)?,
        );
        let yaml: Vec<String> = specs.iter().map(ServiceSpec::yaml).collect();
        bed.manifests
            .write("services.yaml", &yaml.join("\n---\n"))?;
        let t = Instant::now();
        bed.start_agent(&[])?;
        let programmed = t.elapsed();
        let _ = writeln!(
            notes,
            "- {n} Services ({} frontends): the agent loaded, attached and programmed them in {programmed:.2?}",
            2 * n
        );

        // Straight to the pod: a client outside the cgroup, no balancer at all.
        let mut direct = Client::spawn(&bed.netns, None)?;
        let mut through = bed.client()?;
        for family in Family::ALL {
            let (pod, vip) = family.targets(&measured);
            direct.latency(pod, WARM_UP)?;
            through.latency(vip, WARM_UP)?;
            let before = bpf_stats(&bed)?;
            let (mut straight, mut balanced) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                straight.push(direct.latency(pod, CONNECTS)?);
                balanced.push(with_bpf_stats(|| through.latency(vip, CONNECTS))?);
            }
            let mid = bpf_stats(&bed)?;
            // The same client straight to the pod: the connect hook runs and finds no Service.
            with_bpf_stats(|| through.latency(pod, CONNECTS))?;
            let after = bpf_stats(&bed)?;
            let row = table.entry((n, family)).or_default();
            row[0] = Some(median(&straight));
            row[1] = Some(median(&balanced));
            let per_call = |from: &Stats, to: &Stats, name: &str| {
                let (cnt, ns) = (to[name].0 - from[name].0, to[name].1 - from[name].1);
                (ns as f64 / cnt.max(1) as f64, cnt)
            };
            let _ = write!(bpf, "| {n} | {} |", family.label());
            for name in [family.hook(), "sock_ops", "sock_release"] {
                let (ns, cnt) = per_call(&before, &mid, name);
                let _ = write!(bpf, " {name}: {ns:.0} ns ({cnt} runs) |");
            }
            let (pass_ns, cnt) = per_call(&mid, &after, family.hook());
            let _ = writeln!(bpf, " {}: {pass_ns:.0} ns ({cnt} runs) |", family.hook());
            hooks.insert(
                (n, family),
                (per_call(&before, &mid, family.hook()).0, pass_ns),
            );
            println!("   {}: direct and socklb done", family.label());
        }
        drop((direct, through));
        drop(bed);

        // kube-proxy: the same Services as iptables and ip6tables rules, in a namespace of
        // their own.
        let bed = Testbed::new("connkp")?;
        let _pods = (
            ServerPod::start(&bed.netns, Kind::Nginx, POD)?,
            ServerPod::start(&bed.netns, Kind::Nginx, POD6)?,
        );
        let chain: Vec<ChainService> = specs
            .iter()
            .flat_map(|s| {
                [Some(s.vip), s.vip2]
                    .into_iter()
                    .flatten()
                    .map(|vip| ChainService {
                        port_name: format!("bench/{}:main", s.name),
                        vip,
                        port: s.port,
                        protocol: "tcp",
                        endpoints: s
                            .pods
                            .iter()
                            .filter(|ip| ip.is_ipv4() == vip.is_ipv4())
                            .map(|ip| SocketAddr::new(*ip, HTTP_PORT))
                            .collect(),
                    })
            })
            .collect();
        let t = Instant::now();
        kube_proxy::install(&bed.netns, &chain)?;
        let _ = writeln!(
            notes,
            "- {n} Services: iptables-restore and ip6tables-restore of kube-proxy's rules took {:.2?}",
            t.elapsed()
        );
        let mut client = Client::spawn(&bed.netns, None)?;
        for family in Family::ALL {
            let (pod, vip) = family.targets(&measured);
            client.latency(pod, WARM_UP)?;
            client.latency(vip, WARM_UP)?;
            let (mut straight, mut chained) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                straight.push(client.latency(pod, CONNECTS)?);
                chained.push(client.latency(vip, CONNECTS)?);
            }
            let row = table.entry((n, family)).or_default();
            row[2] = Some(median(&straight));
            row[3] = Some(median(&chained));
        }
        println!("   kube-proxy done");
    }

    let mut out = format!(
        "# Connect cost\n\nConnect + first byte of the answer (HTTP/1.0 to nginx), {CONNECTS} connections one after another \
         per round, {ROUNDS} rounds per path taken in turn (the table shows the round with the median p50), after \
         {WARM_UP} to warm up. Ratios are against going straight to the pod with the same kind of socket in the same \
         namespace, measured in turn with the balancer's rounds: socklb's and kube-proxy's each have their own. Every Service is dual-stack (an IPv4 and an IPv6 ClusterIP); kube-proxy's baseline is iptables \
         for IPv4 and v4-mapped sockets and ip6tables for IPv6.\n\n\
         | Services | client socket | path | p50 (µs) | p99 (µs) | connections/s | p50 vs direct | connections/s vs direct |\n|---|---|---|---|---|---|---|---|\n"
    );
    for ((n, family), paths) in &table {
        let kube_proxy = match family {
            Family::V6 => "kube-proxy (ip6tables)",
            _ => "kube-proxy (iptables)",
        };
        let rows = [
            ("direct to the pod (socklb's namespace)", paths[0], paths[0]),
            ("socklb", paths[1], paths[0]),
            (
                "direct to the pod (kube-proxy's namespace)",
                paths[2],
                paths[2],
            ),
            (kube_proxy, paths[3], paths[2]),
        ];
        for (path, latency, direct) in rows {
            let (Some(l), Some(direct)) = (latency, direct) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {n} | {} | {path} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
                family.label(),
                l.p50_us,
                l.p99_us,
                l.per_second,
                l.p50_us / direct.p50_us,
                l.per_second / direct.per_second
            );
        }
    }
    let _ = write!(
        out,
        "\nThe BPF programs' own run time per call (kernel.bpf_stats_enabled during the socklb rounds only; \
         the last column is the same client connecting straight to the pod, which the hook passes):\n\n\
         | Services | client socket | connect hook | sock_ops | sock_release | connect hook, not a Service |\n\
         |---|---|---|---|---|---|\n{bpf}\n{notes}"
    );
    out.push_str(&goals(&table, &hooks));
    print!("\n{out}");
    fs::write(results.join("README.md"), out)?;
    println!("\nresults written to {}", results.display());
    Ok(())
}

/// The goals beside the figures: the connect hook's time per call to a least-conn
/// Service (the measured one has one backend per family) and to no Service, and connect +
/// first byte against going straight to the pod.
fn goals(table: &Table, hooks: &BTreeMap<(u32, Family), (f64, f64)>) -> String {
    let mark = |ok: bool| if ok { "met" } else { "missed" };
    let mut out = String::from(
        "\n## Goals\n\n| Services | client socket | hook per call, to a Service (goal ≤ 400 ns) | \
         hook per call, not a Service (goal ≤ 100 ns) | p50 vs direct (goal ≤ 1.03) |\n|---|---|---|---|---|\n",
    );
    for ((n, family), (to_service, pass)) in hooks {
        let ratio = table
            .get(&(*n, *family))
            .and_then(|p| Some(p[1]?.p50_us / p[0]?.p50_us))
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| {n} | {} | {to_service:.0} ns: {} | {pass:.0} ns: {} | {ratio:.2}: {} |",
            family.label(),
            mark(*to_service <= 400.0),
            mark(*pass <= 100.0),
            mark(ratio <= 1.03),
        );
    }
    out
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

/// (run count, run time in ns) per attached program.
type Stats = BTreeMap<String, (u64, u64)>;

/// `Stats` from `socklbctl -j prog show`.
fn bpf_stats(bed: &Testbed) -> Result<Stats> {
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
