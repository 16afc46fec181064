//! `cargo xtask bench balance`: real clients against real servers, the kube-proxy chain and
//! socklb side by side, scenario by scenario. The servers' own counters are the measure.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socklb_tests::{
    client::place,
    kube_proxy::{self, ChainService},
    manifests::ServiceSpec,
    pod::Pod,
    servers::{H2C_PORT, HTTP_PORT, Kind, Load, REDIS_PORT, ServerPod},
    testbed::Testbed,
};

use crate::chart::{self, Panel};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SAMPLE: Duration = Duration::from_millis(500);
/// Rebalancing at the agent's defaults.
const REBALANCE_ARGS: [&str; 0] = [];

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Balancer {
    KubeProxy,
    Random,
    LeastConn,
    Rebalance,
}

impl Balancer {
    const ALL: [Balancer; 4] = [
        Balancer::KubeProxy,
        Balancer::Random,
        Balancer::LeastConn,
        Balancer::Rebalance,
    ];

    fn label(self) -> &'static str {
        match self {
            Balancer::KubeProxy => "kube-proxy (iptables)",
            Balancer::Random => "socklb random",
            Balancer::LeastConn => "socklb least-conn",
            Balancer::Rebalance => "socklb least-conn + rebalance (quiet 20 ms)",
        }
    }
}

#[derive(Clone, Copy)]
enum Workload {
    /// `clients` wrk processes with `connections` each, `rate` requests/s per connection.
    Wrk {
        clients: usize,
        connections: usize,
        rate: u32,
    },
    /// h2load: one connection per client, `streams` concurrent streams, `rate` requests/s per
    /// client, `requests` in all.
    H2load {
        clients: usize,
        streams: usize,
        rate: u32,
        requests: u64,
    },
    /// redis-benchmark with a pool of `connections`, `requests` GETs in all, as fast as it can.
    RedisBenchmark { connections: usize, requests: u64 },
}

struct Scenario {
    file: &'static str,
    title: &'static str,
    kind: Kind,
    target_port: u16,
    pods: u8,
    /// Scale-up: to how many pods, after how long.
    scale_to: Option<(u8, Duration)>,
    /// How long the load runs (wrk; h2load and redis-benchmark run until their requests are
    /// done).
    duration: Duration,
    load: Workload,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            file: "few-clients-many-pods",
            title: "Few clients, many pods: 2 wrk clients x 8 keep-alive connections, 5 nginx pods",
            kind: Kind::Nginx,
            target_port: HTTP_PORT,
            pods: 5,
            scale_to: None,
            duration: Duration::from_secs(8),
            load: Workload::Wrk {
                clients: 2,
                connections: 8,
                rate: 100,
            },
        },
        Scenario {
            file: "scale-up",
            title: "Scale-up 3 -> 6 under steady long-lived load: wrk, 24 keep-alive connections (10 requests/s each), nginx pods",
            kind: Kind::Nginx,
            target_port: HTTP_PORT,
            pods: 3,
            scale_to: Some((6, Duration::from_secs(4))),
            duration: Duration::from_secs(20),
            load: Workload::Wrk {
                clients: 1,
                connections: 24,
                rate: 10,
            },
        },
        Scenario {
            file: "http2",
            title: "HTTP/2: h2load, 8 clients (one connection each, 8 streams), 4 nginx pods (h2c)",
            kind: Kind::Nginx,
            target_port: H2C_PORT,
            pods: 4,
            scale_to: None,
            duration: Duration::from_secs(8),
            load: Workload::H2load {
                clients: 8,
                streams: 8,
                rate: 200,
                requests: 12_800,
            },
        },
        Scenario {
            file: "redis-pool",
            title: "Connection pool: redis-benchmark, 12 pooled connections, 4 redis-server pods",
            kind: Kind::Redis,
            target_port: REDIS_PORT,
            pods: 4,
            scale_to: None,
            duration: Duration::from_secs(8),
            load: Workload::RedisBenchmark {
                connections: 12,
                requests: 300_000,
            },
        },
    ]
}

/// One balancer's run of one scenario.
struct Run {
    balancer: Balancer,
    /// Seconds since the start -> load of each pod (by address).
    samples: Vec<(f64, BTreeMap<IpAddr, Load>)>,
    /// The last sample taken while the load was still running.
    last_loaded: usize,
    /// From when the measured window starts (after the scale-up, or after a warm-up).
    window_start: f64,
    scaled_at: Option<f64>,
    failed: u64,
    /// Connections the client saw reset (and reopened) while it ran.
    resets: u64,
}

pub fn run(results: &Path) -> Result<()> {
    fs::create_dir_all(results)?;
    let mut headline = String::from(
        "| scenario | balancer | connections per pod | max/mean (requests) | CV | balanced after scale-up | failed requests |\n|---|---|---|---|---|---|---|\n",
    );
    for scenario in scenarios() {
        println!("\n== {}", scenario.title);
        let mut runs = Vec::new();
        for balancer in Balancer::ALL {
            print!("   {:<32}", balancer.label());
            let run = run_one(&scenario, balancer)
                .with_context(|| format!("{} / {}", scenario.file, balancer.label()))?;
            println!("done");
            runs.push(run);
        }
        let table = table(&scenario, &runs);
        print!("\n{table}");
        for r in &runs {
            let m = metrics(r);
            let _ = writeln!(
                headline,
                "| {} | {} | {} | {:.2} | {:.2} | {} | {} |",
                scenario.file,
                r.balancer.label(),
                m.connections,
                m.max_over_mean,
                m.cv,
                m.balanced_after,
                r.failed
            );
        }
        fs::write(
            results.join(format!("{}.md", scenario.file)),
            format!("# {}\n\n{table}", scenario.title),
        )?;
        let panels: Vec<Panel> = runs.iter().map(panel).collect();
        chart::write(
            &results.join(format!("{}.svg", scenario.file)),
            scenario.title,
            &panels,
        )?;
    }
    let rebalancing = crate::rebalance::runs()?;
    fs::write(
        results.join("README.md"),
        format!("# Balance benchmark\n\n{headline}\n{rebalancing}"),
    )?;
    println!("\nresults written to {}", results.display());
    Ok(())
}

fn run_one(s: &Scenario, balancer: Balancer) -> Result<Run> {
    let mut bed = Testbed::new("bench")?;
    let all_ips: Vec<Ipv4Addr> = (1..=s.scale_to.map_or(s.pods, |(n, _)| n))
        .map(|i| Ipv4Addr::new(10, 244, 0, i))
        .collect();
    let mut servers: Vec<ServerPod> = all_ips[..s.pods as usize]
        .iter()
        .map(|ip| ServerPod::start(&bed.netns, s.kind, *ip))
        .collect::<Result<_>>()?;
    let service_port = if s.kind == Kind::Redis {
        REDIS_PORT
    } else {
        80
    };
    let mut spec = ServiceSpec::new(
        "bench",
        VIP,
        service_port,
        s.target_port,
        &all_ips[..s.pods as usize],
    );
    spec.algorithm = Some(match balancer {
        Balancer::Random => "random",
        _ => "least-conn",
    });
    spec.rebalance = balancer == Balancer::Rebalance;
    if spec.rebalance {
        // wrk sends one request at a time per connection, in the scale-up a request every
        // 100 ms: never quiet for the default 500 ms. A short quiet time is safe for such
        // sequential clients.
        spec.rebalance_quiet = Some("20ms");
    }
    let chain = |ips: &[Ipv4Addr]| ChainService {
        port_name: "demo/bench:main".into(),
        vip: VIP.into(),
        port: service_port,
        protocol: "tcp",
        endpoints: ips.iter().map(|ip| (*ip, s.target_port).into()).collect(),
    };
    match balancer {
        Balancer::KubeProxy => {
            kube_proxy::install(&bed.netns, &[chain(&all_ips[..s.pods as usize])])?
        }
        _ => {
            bed.write_service(&spec)?;
            bed.start_agent(&REBALANCE_ARGS)?;
        }
    }
    let in_cgroup = balancer != Balancer::KubeProxy;
    let target = SocketAddrV4::new(VIP, service_port);

    let start = Instant::now();
    let mut clients = start_load(&bed, in_cgroup, s, target)?;
    let mut samples = Vec::new();
    let mut last_loaded = 0;
    let mut scaled_at = None;
    let end = start + s.duration;
    let mut running = true;
    while running {
        thread::sleep(SAMPLE);
        // wrk runs for its set time; h2load and redis-benchmark until their requests are done.
        let now = Instant::now();
        running = clients.iter_mut().any(|c| match c.timed {
            true => now < end,
            false => c.child.try_wait().ok().flatten().is_none(),
        });
        let t = start.elapsed().as_secs_f64();
        let mut loads = BTreeMap::new();
        for server in &servers {
            loads.insert(server.ip, server.load(&bed.netns)?);
        }
        // The last sample under load: clients still running and their connections open (h2load
        // closes its connections a moment before it exits).
        let open = loads.values().any(|l| l.connections > 0);
        samples.push((t, loads));
        if running && open {
            last_loaded = samples.len() - 1;
        }
        if let Some((n, at)) = s.scale_to
            && scaled_at.is_none()
            && start.elapsed() >= at
        {
            for ip in &all_ips[s.pods as usize..n as usize] {
                servers.push(ServerPod::start(&bed.netns, s.kind, *ip)?);
            }
            match balancer {
                Balancer::KubeProxy => {
                    bed.netns.run_with_input(
                        "iptables-restore",
                        &[],
                        &kube_proxy::rules(&[chain(&all_ips)], false),
                    )?;
                }
                _ => {
                    spec.set_pods(&all_ips);
                    bed.write_service(&spec)?;
                    bed.agent().wait_backends("demo/bench", &all_ips)?;
                }
            }
            scaled_at = Some(start.elapsed().as_secs_f64());
        }
        if Instant::now() > end + Duration::from_secs(60) {
            bail!("the load did not finish within a minute of its time");
        }
    }
    let (mut failed, mut resets) = (0, 0);
    for c in clients {
        let (f, r) = c.finish()?;
        failed += f;
        resets += r;
    }
    Ok(Run {
        balancer,
        samples,
        last_loaded,
        window_start: scaled_at.unwrap_or(1.0),
        scaled_at,
        failed,
        resets,
    })
}

/// A load generator process and how to read its verdict.
struct Client {
    child: Child,
    kind: &'static str,
    /// Runs for a set time (wrk) rather than a set number of requests.
    timed: bool,
}

/// wrk paced per connection: `delay()` waits between a response and the next request. Each
/// thread stops sending after its share of the requests, so that nothing is in flight when wrk
/// stops and every request sent must have been answered. `done()` prints the counts.
const WRK_SCRIPT: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0; received = 0; budget = tonumber(args[1]); pause = tonumber(args[2]) end
function delay() if sent >= budget then return 3600000 end return pause end
function request() sent = sent + 1; return wrk.format() end
function response(status, headers, body) received = received + 1 end
function done(summary, latency, requests)
  local s, r = 0, 0
  for _, t in ipairs(threads) do s = s + t:get("sent"); r = r + t:get("received") end
  local e = summary.errors
  io.write(string.format("SOCKLB sent=%d received=%d status=%d timeout=%d read=%d write=%d connect=%d\n",
    s, r, e.status, e.timeout, e.read, e.write, e.connect))
end
"#;

fn start_load(
    bed: &Testbed,
    in_cgroup: bool,
    s: &Scenario,
    target: SocketAddrV4,
) -> Result<Vec<Client>> {
    let cgroup = in_cgroup.then_some(bed.cgroup.path());
    let spawn = |mut c: Command, kind: &'static str, timed: bool| -> Result<Client> {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        place(&mut c, &bed.netns, cgroup)?;
        Ok(Client {
            child: c.spawn().with_context(|| format!("starting {kind}"))?,
            kind,
            timed,
        })
    };
    match s.load {
        Workload::Wrk {
            clients,
            connections,
            rate,
        } => {
            let script = bed.manifests.path().join("pace.lua");
            fs::write(&script, WRK_SCRIPT)?;
            let threads = 2.min(connections);
            // Requests per thread: its connections at `rate` for the whole run.
            let budget = (connections / threads) as u64 * u64::from(rate) * s.duration.as_secs();
            (0..clients)
                .map(|_| {
                    let mut c = Command::new("wrk");
                    c.args([&format!("-t{threads}"), &format!("-c{connections}")])
                        .arg(format!("-d{}s", s.duration.as_secs() + 2))
                        .arg("-s")
                        .arg(&script)
                        .arg(format!("http://{target}/"))
                        .args(["--", &budget.to_string(), &(1000 / rate).to_string()]);
                    spawn(c, "wrk", true)
                })
                .collect()
        }
        Workload::H2load {
            clients,
            streams,
            rate,
            requests,
        } => {
            let mut c = Command::new("h2load");
            c.args(["-c", &clients.to_string(), "-m", &streams.to_string()])
                .args(["--rps", &rate.to_string(), "-n", &requests.to_string()])
                .arg(format!("http://{target}/"));
            Ok(vec![spawn(c, "h2load", false)?])
        }
        Workload::RedisBenchmark {
            connections,
            requests,
        } => {
            let mut c = Command::new("redis-benchmark");
            c.args([
                "-h",
                &target.ip().to_string(),
                "-p",
                &target.port().to_string(),
            ])
            .args(["-c", &connections.to_string(), "-n", &requests.to_string()])
            .args(["-t", "get", "-q"]);
            Ok(vec![spawn(c, "redis-benchmark", false)?])
        }
    }
}

impl Client {
    /// Waits for the client and returns (failed requests, connections reset under it).
    fn finish(self) -> Result<(u64, u64)> {
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let field = |line: &str, name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        match self.kind {
            "wrk" => {
                let line = text
                    .lines()
                    .find(|l| l.starts_with("SOCKLB "))
                    .with_context(|| format!("wrk printed no counts:\n{text}"))?;
                // wrk calls request() once more than it sends: to check the script
                // (script_verify_request on thread 0).
                let lost = field(line, "sent").saturating_sub(field(line, "received") + 1);
                Ok((
                    lost + field(line, "status") + field(line, "timeout"),
                    field(line, "read") + field(line, "write"),
                ))
            }
            "h2load" => {
                // "requests: 12800 total, 12800 started, 12800 done, 12800 succeeded, 0 failed, 0 errored, 0 timeout"
                let line = text
                    .lines()
                    .find(|l| l.starts_with("requests:"))
                    .with_context(|| format!("h2load printed no summary:\n{text}"))?;
                let count = |what: &str| -> u64 {
                    line.split(',')
                        .find(|p| p.trim().ends_with(what))
                        .and_then(|p| p.split_whitespace().next()?.parse().ok())
                        .unwrap_or(0)
                };
                let total = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                Ok((total.saturating_sub(count("succeeded")), count("errored")))
            }
            _ => {
                if !out.status.success() || text.contains("Error") {
                    bail!("redis-benchmark failed: {text}");
                }
                Ok((0, 0))
            }
        }
    }
}

struct Metrics {
    connections: String,
    requests: String,
    max_over_mean: f64,
    cv: f64,
    balanced_after: String,
}

fn metrics(r: &Run) -> Metrics {
    let last = &r.samples.last().expect("samples").1;
    let loaded = &r.samples[r.last_loaded].1;
    let first = r
        .samples
        .iter()
        .find(|(t, _)| *t >= r.window_start)
        .map_or(last, |(_, l)| l);
    let requests: Vec<f64> = last
        .iter()
        .map(|(ip, l)| (l.requests - first.get(ip).map_or(0, |f| f.requests)) as f64)
        .collect();
    let n = requests.len() as f64;
    let mean = requests.iter().sum::<f64>() / n;
    let sd = (requests.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let max = requests.iter().copied().fold(0.0, f64::max);
    // Balanced: the busiest pod has at most one connection more than the idlest; from when on
    // it stays so.
    let balanced = |l: &BTreeMap<IpAddr, Load>| {
        let c: Vec<u64> = l.values().map(|x| x.connections).collect();
        c.iter().max().unwrap_or(&0) - c.iter().min().unwrap_or(&0) <= 1
    };
    let balanced_after = match r.scaled_at {
        None => "-".to_owned(),
        Some(at) => {
            let after: Vec<&(f64, BTreeMap<IpAddr, Load>)> =
                r.samples.iter().filter(|(t, _)| *t > at).collect();
            let since = after
                .iter()
                .rposition(|(_, l)| !balanced(l))
                .map_or(0, |i| i + 1);
            match after.get(since) {
                Some((t, _)) => format!("{:.1} s", t - at),
                None => "never".to_owned(),
            }
        }
    };
    Metrics {
        connections: loaded
            .values()
            .map(|l| l.connections.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        requests: requests
            .iter()
            .map(|x| short(*x))
            .collect::<Vec<_>>()
            .join("/"),
        max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        cv: if mean > 0.0 { sd / mean } else { 0.0 },
        balanced_after,
    }
}

fn short(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.0}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn table(s: &Scenario, runs: &[Run]) -> String {
    let window = if s.scale_to.is_some() {
        "after the scale-up"
    } else {
        "after a 1 s warm-up"
    };
    let mut t = format!(
        "Per pod, from the servers' own counters: open connections at the end of the load, and requests served {window}. \
         CV is the coefficient of variation of requests per pod (0 is even).\n\n\
         | balancer | connections per pod | requests per pod | max/mean | CV | balanced after scale-up | failed requests | connections reset |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for r in runs {
        let m = metrics(r);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} |",
            r.balancer.label(),
            m.connections,
            m.requests,
            m.max_over_mean,
            m.cv,
            m.balanced_after,
            r.failed,
            r.resets
        );
    }
    t
}

fn panel(r: &Run) -> Panel {
    let pods: Vec<IpAddr> = r
        .samples
        .last()
        .map(|(_, l)| l.keys().copied().collect())
        .unwrap_or_default();
    let series = pods
        .iter()
        .map(|ip| {
            let points = r
                .samples
                .windows(2)
                .filter_map(|w| {
                    let (t0, a) = &w[0];
                    let (t1, b) = &w[1];
                    let req = b.get(ip)?.requests - a.get(ip).map_or(0, |l| l.requests);
                    Some((*t1, req as f64 / (t1 - t0)))
                })
                .collect();
            (Pod::name_for(*ip).replacen("pod-", "pod ", 1), points)
        })
        .collect();
    Panel {
        title: r.balancer.label().to_owned(),
        series,
        marker: r.scaled_at,
    }
}
