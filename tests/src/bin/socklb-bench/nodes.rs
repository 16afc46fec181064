//! `cargo xtask bench nodes`: how uneven the cluster-wide per-pod connection count gets when
//! several nodes each balance only their own connections. Each "node" is an agent with its own
//! cgroup and pin path over the same Services and pods. Every trial, each node opens a random
//! number of connections one by one; the spread is the busiest pod minus the idlest, counted
//! by the pods. For the same connection counts, the table also gives the spread a fixed
//! tie-break order (lowest slot first) would produce, computed exactly.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::Result;
use socklb_tests::{agent::Agent, cgroup::Cgroup, client::Client, testbed::Testbed, wait_for};

const NODES: usize = 3;
const PODS: usize = 4;
const TRIALS: usize = 100;

pub fn run(results: &Path) -> Result<()> {
    fs::create_dir_all(results)?;
    let (bed, spec) = Testbed::serving("nodes", 17, PODS as u8, |_| {}, &[])?;
    let cgroups: Vec<Cgroup> = (1..NODES)
        .map(|_| Cgroup::new("node"))
        .collect::<Result<_>>()?;
    let _agents: Vec<Agent> = cgroups
        .iter()
        .map(|cg| Agent::start(&bed.manifests, cg, &[]))
        .collect::<Result<_>>()?;
    let mut clients: Vec<Client> = std::iter::once(&bed.cgroup)
        .chain(&cgroups)
        .map(|cg| Client::spawn(&bed.netns, Some(cg.path())))
        .collect::<Result<_>>()?;

    let mut seed = 0x5eed_u64;
    let (mut measured, mut fixed) = (vec![0usize; NODES + 1], vec![0usize; NODES + 1]);
    for _ in 0..TRIALS {
        let mut per_node = Vec::new();
        for c in &mut clients {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = (seed >> 33) as usize % 9 + 1;
            for _ in 0..k {
                anyhow::ensure!(c.open(spec.target(), 1)?[0].ok, "connect failed");
            }
            per_node.push(k);
        }
        let open: Vec<u64> = bed.open().into_iter().map(|(_, n)| n).collect();
        let spread = (open.iter().max().unwrap() - open.iter().min().unwrap()) as usize;
        measured[spread.min(NODES)] += 1;
        fixed[fixed_order_spread(&per_node)] += 1;
        for c in &mut clients {
            c.close_all()?;
        }
        wait_for("pods to drain", Duration::from_secs(5), || {
            Ok(bed.open().iter().all(|(_, n)| *n == 0).then_some(()))
        })?;
    }

    let mean = |h: &[usize]| {
        h.iter().enumerate().map(|(s, n)| s * n).sum::<usize>() as f64 / TRIALS as f64
    };
    let mut out = format!(
        "# Several nodes\n\n{NODES} agents (nodes), {PODS} pods, {TRIALS} trials; in each, every node opens 1 to 9 \
         connections one by one. Spread = busiest pod minus idlest, cluster-wide.\n\n\
         | spread | trials, socklb (random tie-breaks, measured) | trials, fixed tie-break order (computed) |\n|---|---|---|\n"
    );
    for s in 0..=NODES {
        let _ = writeln!(out, "| {s} | {} | {} |", measured[s], fixed[s]);
    }
    let _ = writeln!(
        out,
        "| mean | {:.2} | {:.2} |",
        mean(&measured),
        mean(&fixed)
    );
    let _ = write!(
        out,
        "\nBound: each node keeps its own pods within one connection of each other, so the cluster-wide spread \
         is at most the number of nodes ({NODES} here). Random tie-breaks spread the nodes' remainders over \
         different pods, so the spread stays below the bound most of the time; a fixed order would stack them on the same pods.\n"
    );
    print!("{out}");
    fs::write(results.join("README.md"), out)?;
    Ok(())
}

/// The cluster spread if every node broke ties by the lowest slot: node i's k connections go
/// k / PODS to every pod and one more to each of the first k % PODS pods.
fn fixed_order_spread(per_node: &[usize]) -> usize {
    let mut pods = [0usize; PODS];
    for k in per_node {
        for (j, p) in pods.iter_mut().enumerate() {
            *p += k / PODS + usize::from(j < k % PODS);
        }
    }
    pods.iter().max().unwrap() - pods.iter().min().unwrap()
}
