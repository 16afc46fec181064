//! `cargo xtask bench control-plane`: how fast the agent follows the cluster, at 1,000, 10,000
//! and 50,000 Services x 10 endpoints. Against the API server double: the first full sync (time
//! to programmed, and the agent's memory), the latency from one EndpointSlice change to the BPF
//! map holding it, memory after many changes, and a change made during an API server outage.
//! For comparison in the same run: iptables-restore of kube-proxy's rules for the same
//! Services, in a test namespace. Prints each goal beside its figure; writes a chart.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use crate::chart;
use anyhow::{Context as _, Result, bail};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::SlotKey;
use lb_userspace::{
    cluster::{FrontendKey, Protocol},
    datapath::Maps,
    programmed::{backend_addr, map_key},
};
use socklb_tests::{
    agent::Agent,
    apiserver::ApiServer,
    cgroup::Cgroup,
    kube_proxy::{self, ChainService},
    manifests::ManifestDir,
    netns::Netns,
};

const ENDPOINTS: u32 = 10;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 16)) + i)
}

fn endpoint(i: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + k)
}

fn objects(i: u32, endpoints: &[Ipv4Addr]) -> (Service, EndpointSlice) {
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some("bench".into()),
        ..ObjectMeta::default()
    };
    let service = Service {
        metadata: meta(format!("svc-{i}")),
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(i).to_string()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_owned(),
                format!("svc-{i}"),
            )])),
            ..meta(format!("svc-{i}-1"))
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..EndpointPort::default()
        }]),
        endpoints: endpoints
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            })
            .collect(),
    };
    (service, slice)
}

/// Cluster sizes measured, in Services (each with `ENDPOINTS` endpoints). SOCKLB_BENCH_SIZES
/// (e.g. "10000") measures those instead, for a quick look.
const SIZES: [u32; 3] = [1_000, 10_000, 50_000];
/// Changes whose latency is measured, one at a time.
const TIMED_CHANGES: usize = 300;
/// Changes after which the agent's current RSS is compared with after the sync.
const CHANGES: usize = 10_000;
/// How long the API server is down in the outage measurement.
const OUTAGE: Duration = Duration::from_secs(5);

/// What one cluster size gave.
struct Measured {
    services: u32,
    sync: Duration,
    rss_sync_kib: u64,
    rss_changes_kib: u64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    after_outage: Duration,
    restore: Duration,
    restore_lines: usize,
    /// The agent's own `socklb_change_seconds` over the timed changes: rounds, and those
    /// within 5 ms.
    in_agent: (f64, f64),
    /// One /metrics scrape: how long, and how many samples.
    scrape: Duration,
    samples: usize,
}

pub fn run(results: &Path) -> Result<()> {
    fs::create_dir_all(results)?;
    let sizes: Vec<u32> = match std::env::var("SOCKLB_BENCH_SIZES") {
        Ok(list) => (list.split(','))
            .map(|n| n.trim().parse().context("SOCKLB_BENCH_SIZES"))
            .collect::<Result<_>>()?,
        Err(_) => SIZES.to_vec(),
    };
    let mut measured = Vec::new();
    for services in sizes {
        println!("\n== {services} Services x {ENDPOINTS} endpoints");
        measured.push(measure(services)?);
    }
    let out = report(&measured);
    print!("\n{out}");
    fs::write(results.join("README.md"), out)?;
    chart(&results.join("control-plane.svg"), &measured)?;
    println!("\nresults written to {}", results.display());
    Ok(())
}

fn measure(services: u32) -> Result<Measured> {
    let mut api = ApiServer::start()?;
    let mut ns = Namespace::default();
    ns.metadata.name = Some("bench".into());
    api.apply(&ns)?;
    let t = Instant::now();
    for i in 0..services {
        let eps: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|k| endpoint(i, k)).collect();
        let (s, e) = objects(i, &eps);
        api.apply(&s)?;
        api.apply(&e)?;
    }
    println!(
        "created the objects in the API server double in {:.1?}",
        t.elapsed()
    );

    let files = ManifestDir::new("cp")?;
    let kubeconfig = files.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let root = Cgroup::new("cp")?;
    let t = Instant::now();
    let agent = Agent::kubernetes(&kubeconfig, "node-1", root.path(), &[])?;
    let sync = t.elapsed();
    let pid = agent.pid().context("agent pid")?;
    let rss_sync_kib = rss_kib(pid)?;
    println!("first full sync programmed in {sync:.2?}");

    // One EndpointSlice change at a time: the 10th endpoint of a Service moves to a new
    // address; measured until the agent's maps point a slot at it. Then the rest of the
    // changes without waiting for each, and the last one waited for.
    let maps = Maps::open_pinned(&agent.pin_path)?;
    let change = |c: usize| -> (EndpointSlice, lb_common::ServiceKey, SocketAddrV4) {
        let i = (c as u32 * 37) % services;
        let moved = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + c as u32);
        let mut eps: Vec<Ipv4Addr> = (0..ENDPOINTS - 1).map(|k| endpoint(i, k)).collect();
        eps.push(moved);
        let (_, slice) = objects(i, &eps);
        let key = map_key(&FrontendKey {
            ip: vip(i).into(),
            port: 80,
            protocol: Protocol::Tcp,
        });
        (slice, key, SocketAddrV4::new(moved, 8080))
    };
    let wait = |key: &lb_common::ServiceKey, backend: SocketAddrV4, what: &str| -> Result<()> {
        let t = Instant::now();
        while !programmed(&maps, key, backend) {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{what} not programmed after 60 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    };
    // The agent's own histogram, read around the timed changes.
    let histogram = || -> Result<(f64, f64)> {
        let metrics = agent.metrics()?;
        let sample = |name: &str| -> f64 {
            let line = metrics.lines().find(|l| l.starts_with(name));
            line.and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0.0)
        };
        Ok((
            sample("socklb_change_seconds_count"),
            sample("socklb_change_seconds_bucket{le=\"0.005\"}"),
        ))
    };
    let before = histogram()?;
    let mut latencies = Vec::with_capacity(TIMED_CHANGES);
    for c in 0..TIMED_CHANGES {
        let (slice, key, backend) = change(c);
        let t = Instant::now();
        api.apply(&slice)?;
        wait(&key, backend, &format!("change {c}"))?;
        latencies.push(t.elapsed());
    }
    let after = histogram()?;
    let in_agent = (after.0 - before.0, after.1 - before.1);
    for c in TIMED_CHANGES..CHANGES {
        api.apply(&change(c).0)?;
    }
    let (_, key, backend) = change(CHANGES - 1);
    wait(&key, backend, "the last change")?;
    let rss_changes_kib = rss_kib(pid)?;
    latencies.sort();
    let t = Instant::now();
    let metrics = agent.metrics()?;
    let scrape = t.elapsed();
    let samples = metrics.lines().filter(|l| !l.starts_with('#')).count();
    println!(
        "a /metrics scrape: {scrape:.2?}, {samples} samples; in the agent {} of {} rounds of the \
         timed changes took a change to the maps within 5 ms",
        in_agent.1, in_agent.0
    );
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];

    // An outage: a change made while the API server is down, timed from its return (the
    // agent resyncs fully only every 60 s, so the watches have to bring it).
    let (slice, key, backend) = change(CHANGES);
    api.stop();
    std::thread::sleep(OUTAGE);
    api.apply(&slice)?;
    api.resume()?;
    let t = Instant::now();
    wait(&key, backend, "the change made during the outage")?;
    let after_outage = t.elapsed();
    drop(agent);

    // kube-proxy's rules for the same Services, restored in a namespace of their own.
    let netns = Netns::new("cpkp")?;
    let chain: Vec<ChainService> = (0..services)
        .map(|i| ChainService {
            port_name: format!("bench/svc-{i}:http"),
            vip: vip(i).into(),
            port: 80,
            protocol: "tcp",
            endpoints: (0..ENDPOINTS)
                .map(|k| (endpoint(i, k), 8080).into())
                .collect(),
        })
        .collect();
    let restore_lines = kube_proxy::rules(&chain, false).lines().count();
    let t = Instant::now();
    kube_proxy::install(&netns, &chain)?;
    let restore = t.elapsed();
    println!("kube-proxy's iptables-restore: {restore:.2?}");
    Ok(Measured {
        services,
        sync,
        rss_sync_kib,
        rss_changes_kib,
        p50: pct(0.50),
        p99: pct(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        after_outage,
        restore,
        restore_lines,
        in_agent,
        scrape,
        samples,
    })
}

/// Whether a slot of the frontend points at `backend`.
fn programmed(maps: &Maps, key: &lb_common::ServiceKey, backend: SocketAddrV4) -> bool {
    let Ok(service) = maps.services.get(key, 0) else {
        return false;
    };
    (0..service.count).any(|index| {
        maps.slots
            .get(
                &SlotKey {
                    service_id: service.id,
                    index,
                },
                0,
            )
            .ok()
            .and_then(|id| maps.backends.get(&id, 0).ok())
            .is_some_and(|b| backend_addr(&b) == backend.into())
    })
}

/// The current resident memory (VmRSS) of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The table, each figure beside its goal.
fn report(measured: &[Measured]) -> String {
    let mut out = format!(
        "# Control plane\n\n`cargo xtask bench control-plane`: the agent in Kubernetes mode against the API server \
         double, Services of {ENDPOINTS} endpoints each. Change latency: from the write in the double to the map \
         entry the BPF program reads (polled every 200 µs), one change at a time, {TIMED_CHANGES} changes. RSS is \
         the current resident memory (VmRSS), after the sync and after {CHANGES} changes. Outage: a change made \
         during a {}-s outage of the double, timed from its return. kube-proxy: `iptables-restore` of its rules for \
         the same Services, in a test namespace, in the same run. In the agent: its `socklb_change_seconds` \
         histogram (watch event to the last map write of the round) over the timed changes, the share of rounds within 5 ms. Scrape: one \
         `/metrics` read after the changes, and its samples.\n\n",
        OUTAGE.as_secs()
    );
    let _ = writeln!(
        out,
        "| Services | first sync | kube-proxy restore | RSS after sync | RSS after {CHANGES} changes | change p50 | change p99 | change max | in the agent ≤ 5 ms | change made in an outage, after the return | /metrics scrape |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for m in measured {
        let _ = writeln!(
            out,
            "| {} | {:.2?} | {:.1?} ({} lines) | {:.0} MiB | {:.0} MiB | {:.1?} | {:.1?} | {:.1?} | {:.1}% of {} rounds | {:.2?} | {:.0?} ({} samples) |",
            m.services,
            m.sync,
            m.restore,
            m.restore_lines,
            mib(m.rss_sync_kib),
            mib(m.rss_changes_kib),
            m.p50,
            m.p99,
            m.max,
            m.in_agent.1 / m.in_agent.0.max(1.0) * 100.0,
            m.in_agent.0,
            m.after_outage,
            m.scrape,
            m.samples
        );
    }
    let at = |n: u32| measured.iter().find(|m| m.services == n);
    let _ = writeln!(out, "\n| Goal | Measured | Met? |\n|---|---|---|");
    let mut goal = |text: &str, value: String, met: bool| {
        let _ = writeln!(
            out,
            "| {text} | {value} | {} |",
            if met { "yes" } else { "no" }
        );
    };
    for m in [at(10_000), at(50_000)].into_iter().flatten() {
        goal(
            &format!("change p99 ≤ 5 ms at {} Services", m.services),
            format!("{:.1?}", m.p99),
            m.p99 <= Duration::from_millis(5),
        );
    }
    if let Some(m) = at(10_000) {
        goal(
            "RSS after the sync ≤ 64 MiB at 10,000 Services",
            format!("{:.0} MiB", mib(m.rss_sync_kib)),
            m.rss_sync_kib <= 64 * 1024,
        );
    }
    if let Some(m) = at(50_000) {
        goal(
            "RSS after the sync ≤ 256 MiB at 50,000 Services",
            format!("{:.0} MiB", mib(m.rss_sync_kib)),
            m.rss_sync_kib <= 256 * 1024,
        );
        goal(
            "first sync ≤ 5 s at 50,000 Services",
            format!("{:.2?}", m.sync),
            m.sync <= Duration::from_secs(5),
        );
    }
    for m in measured {
        let growth = mib(m.rss_changes_kib) / mib(m.rss_sync_kib).max(1.0);
        goal(
            &format!(
                "RSS after {CHANGES} changes within 10% of after the sync, {} Services",
                m.services
            ),
            format!("{:+.0}%", (growth - 1.0) * 100.0),
            growth <= 1.10,
        );
    }
    let worst = measured
        .iter()
        .map(|m| m.after_outage)
        .max()
        .unwrap_or_default();
    goal(
        "a change made during an outage programmed ≤ 2 s after the return",
        format!("{worst:.2?} (worst size)"),
        worst <= Duration::from_secs(2),
    );
    out
}

/// Sync time, RSS and change p99 against the number of Services, as an SVG.
fn chart(path: &Path, measured: &[Measured]) -> Result<()> {
    let points = |f: &dyn Fn(&Measured) -> f64| -> Vec<(f64, f64)> {
        measured
            .iter()
            .map(|m| (f64::from(m.services), f(m)))
            .collect()
    };
    chart::scaling(
        path,
        "socklb control plane vs cluster size (Services of 10 endpoints)",
        &[
            (
                "first full sync (s)",
                vec![
                    ("socklb", points(&|m| m.sync.as_secs_f64())),
                    (
                        "kube-proxy iptables-restore",
                        points(&|m| m.restore.as_secs_f64()),
                    ),
                ],
            ),
            (
                "agent RSS (MiB)",
                vec![
                    ("after the sync", points(&|m| mib(m.rss_sync_kib))),
                    ("after the changes", points(&|m| mib(m.rss_changes_kib))),
                ],
            ),
            (
                "one EndpointSlice change to the map (ms)",
                vec![
                    ("p99", points(&|m| m.p99.as_secs_f64() * 1e3)),
                    ("p50", points(&|m| m.p50.as_secs_f64() * 1e3)),
                ],
            ),
        ],
    )
}
