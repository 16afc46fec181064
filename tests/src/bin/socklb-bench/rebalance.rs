//! The rebalancing part of `cargo xtask bench balance`: scale-ups with `socklb.io/rebalance`
//! at the agent's default settings, each run five times, with real clients that count every
//! failed or cut request and retry nothing. Per run: seconds from the scale-up until the pods'
//! own connection counts have a spread of at most one, connections closed by rebalancing, and
//! failed requests (and, for streams, streams cut).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::Value;
use socklb_tests::{
    agent::ctl_json,
    manifests::{ServiceSpec, pod_ips},
    real_clients::{GrpcChannels, GrpcPod},
    testbed::Testbed,
};

const RUNS: usize = 5;
const EVEN_WITHIN: Duration = Duration::from_secs(60);

/// One run's figures.
struct Outcome {
    seconds_to_even: f64,
    closed: u64,
    failed: u64,
    /// Streams cut (the streaming scenario).
    cut: u64,
}

/// Runs every scenario `RUNS` times; the markdown section.
pub fn runs() -> Result<String> {
    let mut out = format!(
        "## Rebalancing after a scale-up, {RUNS} runs each (agent defaults)\n\n\
         Seconds from the scale-up until the pods' own connection counts have a spread of at most one \
         (busiest minus idlest), connections rebalancing closed, and requests that failed (never retried).\n\n\
         | scenario | run | seconds to even | connections closed | failed requests | streams cut |\n|---|---|---|---|---|---|\n"
    );
    type Scenario = (&'static str, fn(u8) -> Result<Outcome>);
    let scenarios: [Scenario; 3] = [
        (
            "pool of 40 keep-alive connections, 4 -> 8 pods, a request every second on each",
            pool,
        ),
        (
            "gRPC C-core (grpc.aio), 12 channels, 4 -> 8 pods, a unary call every second on each",
            grpc,
        ),
        (
            "8 event streams + 2 pipelining + 12 keep-alive connections, 2 -> 4 pods, quiet 20 ms",
            streams,
        ),
    ];
    for (n, (title, scenario)) in scenarios.into_iter().enumerate() {
        println!("\n== rebalancing: {title}");
        for run in 0..RUNS {
            let o = scenario(70 + 5 * n as u8)?;
            println!(
                "   run {}: even after {:.1} s, {} closed, {} failed, {} cut",
                run + 1,
                o.seconds_to_even,
                o.closed,
                o.failed,
                o.cut
            );
            let _ = writeln!(
                out,
                "| {title} | {} | {:.1} | {} | {} | {} |",
                run + 1,
                o.seconds_to_even,
                o.closed,
                o.failed,
                o.cut
            );
        }
    }
    Ok(out)
}

/// Waits until `open()` is even over `total` connections; seconds since `since`.
fn until_even(since: Instant, total: u64, open: impl Fn() -> Vec<u64>) -> Result<f64> {
    loop {
        let o = open();
        let spread = o.iter().max().unwrap_or(&0) - o.iter().min().unwrap_or(&0);
        if o.iter().sum::<u64>() == total && spread <= 1 {
            return Ok(since.elapsed().as_secs_f64());
        }
        if since.elapsed() > EVEN_WITHIN {
            bail!("not even {EVEN_WITHIN:?} after the scale-up: {o:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn closed(bed: &Testbed) -> Result<u64> {
    let rows: Vec<BTreeMap<String, Value>> =
        ctl_json(&bed.agent().pin_path, &["rebalance", "list"])?;
    Ok(rows.iter().filter_map(|r| r["closed"].as_u64()).sum())
}

/// Scales `spec` of `bed` up to `ips` (their servers already running).
fn scale(bed: &Testbed, spec: &mut ServiceSpec, ips: &[Ipv4Addr]) -> Result<Instant> {
    spec.set_pods(ips);
    bed.write_service(spec)?;
    bed.agent().wait_backends("demo/web", ips)?;
    Ok(Instant::now())
}

fn pool(subnet: u8) -> Result<Outcome> {
    let (mut bed, mut spec) = Testbed::serving("bpool", subnet, 4, |s| s.rebalance = true, &[])?;
    let mut clients = vec![bed.client()?, bed.client()?];
    for c in &mut clients {
        c.open(spec.target(), 20)?;
        c.pace(1)?;
    }
    let ips = pod_ips(subnet, 8);
    bed.add_pods(&ips[4..], 8080)?;
    let at = scale(&bed, &mut spec, &ips)?;
    let seconds_to_even = until_even(at, 40, || {
        ips.iter().map(|ip| bed.pod_at(*ip).open()).collect()
    })?;
    thread::sleep(Duration::from_secs(2));
    let mut failed = 0;
    for c in &mut clients {
        failed += c.stop_pacing()?.failed;
    }
    Ok(Outcome {
        seconds_to_even,
        closed: closed(&bed)?,
        failed,
        cut: 0,
    })
}

fn grpc(subnet: u8) -> Result<Outcome> {
    const PORT: u16 = 50051;
    let mut bed = Testbed::new("bgrpc")?;
    let ips = pod_ips(subnet, 8);
    let _pods: Vec<GrpcPod> = ips
        .iter()
        .map(|ip| GrpcPod::start(&bed.netns, &ip.to_string(), SocketAddr::from((*ip, PORT))))
        .collect::<Result<_>>()?;
    let mut spec = ServiceSpec::new(
        "web",
        Ipv4Addr::new(10, 96, subnet, 10),
        80,
        PORT,
        &ips[..4],
    );
    spec.rebalance = true;
    bed.write_service(&spec)?;
    bed.start_agent(&[])?;
    let clients: Vec<GrpcChannels> = (0..12)
        .map(|_| GrpcChannels::start(&bed.netns, bed.cgroup.path(), spec.target(), 1, 1000))
        .collect::<Result<_>>()?;
    let served = || -> Vec<u64> {
        let mut per: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for ipv6 in [false, true] {
            for (local, _) in bed.netns.established(ipv6).unwrap_or_default() {
                if let Ok(a) = local.parse::<SocketAddr>()
                    && a.port() == PORT
                {
                    let ip = match a.ip() {
                        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                        v4 => v4,
                    };
                    *per.entry(ip).or_default() += 1;
                }
            }
        }
        ips.iter()
            .map(|ip| per.get(&IpAddr::V4(*ip)).copied().unwrap_or(0))
            .collect()
    };
    let started = Instant::now();
    while served().iter().sum::<u64>() < 12 {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the gRPC channels did not connect: {:?}", served());
        }
        thread::sleep(Duration::from_millis(50));
    }
    let at = scale(&bed, &mut spec, &ips)?;
    let seconds_to_even = until_even(at, 12, served)?;
    thread::sleep(Duration::from_secs(2));
    let mut failed = 0;
    for c in clients {
        failed += c.finish()?.failed;
    }
    Ok(Outcome {
        seconds_to_even,
        closed: closed(&bed)?,
        failed,
        cut: 0,
    })
}

fn streams(subnet: u8) -> Result<Outcome> {
    // Quiet 20 ms, shorter than the gaps between events: the stream rules keep them open.
    let (mut bed, mut spec) = Testbed::serving(
        "bstream",
        subnet,
        2,
        |s| {
            s.rebalance = true;
            s.rebalance_quiet = Some("20ms");
        },
        &[],
    )?;
    let mut streams = bed.client()?;
    streams.streams(spec.target(), 8)?;
    let mut pipelined = bed.client()?;
    pipelined.open_one_by_one(spec.target(), 4)?;
    pipelined.pace_pipelined(50, 3)?;
    let mut idle = bed.client()?;
    idle.open_one_by_one(spec.target(), 12)?;
    idle.pace(1)?;
    let ips = pod_ips(subnet, 4);
    bed.add_pods(&ips[2..], 8080)?;
    let at = scale(&bed, &mut spec, &ips)?;
    let seconds_to_even = until_even(at, 24, || {
        ips.iter().map(|ip| bed.pod_at(*ip).open()).collect()
    })?;
    thread::sleep(Duration::from_secs(2));
    let (_, cut) = streams.stop_streams()?;
    let failed = pipelined.stop_pacing()?.failed + idle.stop_pacing()?.failed;
    Ok(Outcome {
        seconds_to_even,
        closed: closed(&bed)?,
        failed,
        cut,
    })
}
