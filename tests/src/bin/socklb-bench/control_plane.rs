//! `cargo xtask bench control-plane`: how fast the agent follows the cluster. Against the API
//! server double: the first full sync of 10,000 Services x 10 endpoints (time to programmed,
//! and the agent's peak memory), and the latency from one EndpointSlice change to the BPF map
//! holding it, over many changes. For comparison in the same run: iptables-restore of
//! kube-proxy's rules for the same Services, in a test namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

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
    reconcile::{backend_addr, map_key},
};
use socklb_tests::{
    agent::Agent,
    apiserver::ApiServer,
    cgroup::Cgroup,
    kube_proxy::{self, ChainService},
    manifests::ManifestDir,
    netns::Netns,
};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;
const CHANGES: usize = 200;

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

pub fn run(results: &Path) -> Result<()> {
    fs::create_dir_all(results)?;
    let api = ApiServer::start()?;
    let mut ns = Namespace::default();
    ns.metadata.name = Some("bench".into());
    api.apply(&ns)?;
    let t = Instant::now();
    for i in 0..SERVICES {
        let eps: Vec<Ipv4Addr> = (0..ENDPOINTS).map(|k| endpoint(i, k)).collect();
        let (s, e) = objects(i, &eps);
        api.apply(&s)?;
        api.apply(&e)?;
    }
    println!(
        "created {SERVICES} Services x {ENDPOINTS} endpoints in the API server double in {:.1?}",
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
    let rss_after_sync = peak_rss_kib(pid)?;
    println!("first full sync programmed in {sync:.2?}");

    // One EndpointSlice change at a time: the 10th endpoint of a Service moves to a new
    // address; measured until the agent's maps point a slot at it.
    let maps = Maps::open_pinned(&agent.pin_path)?;
    let mut latencies = Vec::with_capacity(CHANGES);
    for c in 0..CHANGES {
        let i = (c as u32 * 37) % SERVICES;
        let moved = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + c as u32);
        let mut eps: Vec<Ipv4Addr> = (0..ENDPOINTS - 1).map(|k| endpoint(i, k)).collect();
        eps.push(moved);
        let (_, slice) = objects(i, &eps);
        let key = map_key(&FrontendKey {
            ip: vip(i).into(),
            port: 80,
            protocol: Protocol::Tcp,
        });
        let t = Instant::now();
        api.apply(&slice)?;
        loop {
            if programmed(&maps, &key, SocketAddrV4::new(moved, 8080)) {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("change {c} not programmed after 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let peak = peak_rss_kib(pid)?;
    drop(agent);

    // kube-proxy's rules for the same Services, restored in a namespace of their own.
    let netns = Netns::new("cpkp")?;
    let chain: Vec<ChainService> = (0..SERVICES)
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
    let rules = kube_proxy::rules(&chain, false);
    let t = Instant::now();
    kube_proxy::install(&netns, &chain)?;
    let restore = t.elapsed();

    let mut out = format!(
        "# Control plane\n\n{SERVICES} Services x {ENDPOINTS} endpoints, agent in Kubernetes mode against the API server double.\n\n"
    );
    let _ = writeln!(out, "| measure | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| first full sync, start to programmed (load and attach programs, list, program) | {sync:.2?} |"
    );
    let _ = writeln!(
        out,
        "| agent peak RSS after the sync | {} MiB |",
        rss_after_sync / 1024
    );
    let _ = writeln!(
        out,
        "| agent peak RSS after {CHANGES} changes | {} MiB |",
        peak / 1024
    );
    let _ = writeln!(
        out,
        "| EndpointSlice change to map updated, p50 | {:.1?} |",
        pct(0.50)
    );
    let _ = writeln!(
        out,
        "| EndpointSlice change to map updated, p99 | {:.1?} |",
        pct(0.99)
    );
    let _ = writeln!(
        out,
        "| EndpointSlice change to map updated, max | {:.1?} |",
        latencies.last().copied().unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "| kube-proxy: iptables-restore of the same Services ({} lines) | {restore:.2?} |",
        rules.lines().count()
    );
    let _ = writeln!(
        out,
        "\nThe change latency is measured from the write in the API server double to the map entry the BPF \
         program reads (polled every 200 µs): the watch event, the agent's reconcile and its map writes."
    );
    print!("\n{out}");
    fs::write(results.join("README.md"), out)?;
    println!("\nresults written to {}", results.display());
    Ok(())
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

/// VmHWM of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")
}
