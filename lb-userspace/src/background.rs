//! The agent's work on sockets, on a thread of its own so that a long round never delays a
//! watch, a map update or a health probe: the count check after adopting pinned maps,
//! rebalancing, closing connected UDP sockets whose backend left, and reporting counts the
//! programs refused to take below zero. It reads what to do from a `Snapshot` the agent loop
//! publishes after each reconcile, and opens the pinned maps and its own socket iterator
//! itself, so that a long walk here never holds up the agent loop's own (forgetting drained
//! backends).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context as _, Result};
use log::{info, warn};

use crate::{
    datapath::{Maps, Tools},
    netns,
    rebalance::{Policy, Rebalancer, Target},
    recount, stale_udp,
};

/// What the agent loop last programmed that the background work acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Service ports opted in to rebalancing.
    pub targets: Vec<Target>,
    /// Draining backends of UDP Service ports: their connected sockets are closed.
    pub udp_gone: BTreeSet<u32>,
}

/// Where the agent loop puts the latest snapshot.
pub type Published = Arc<Mutex<Arc<Snapshot>>>;

pub struct Config {
    pub pin_path: PathBuf,
    /// Where the clients' processes (and so their network namespaces) are.
    pub cgroup: PathBuf,
    pub policy: Policy,
    /// Check the counts against the live sockets first (after adopting pinned maps).
    pub recount: bool,
}

/// Starts the thread; it runs until the process ends.
pub fn spawn(config: Config, snapshot: Published) -> Result<()> {
    let maps = Maps::open_pinned(&config.pin_path)?;
    let tools = Tools::open(&config.pin_path)?;
    thread::Builder::new()
        .name("socklb-sockets".into())
        .spawn(move || run(config, maps, &tools, &snapshot))
        .context("starting the background thread")?;
    Ok(())
}

fn run(config: Config, mut maps: Maps, tools: &Tools, snapshot: &Published) {
    if config.recount {
        check_counts(&maps, tools);
    }
    let mut rebalancer = Rebalancer::new(config.policy, config.cgroup.clone());
    let mut cookies = netns::Cookies::default();
    let mut underflows_seen: BTreeMap<u32, u64> = BTreeMap::new();
    loop {
        // Rounds a random 0.5 to 1.5 intervals apart: a client that sends every interval would
        // otherwise be looked at in the same phase of its cycle every round, and never be
        // seen quiet if that phase is just after its request.
        thread::sleep(config.policy.interval.mul_f64(0.5 + fastrand::f64()));
        let now = snapshot.lock().map(|s| Arc::clone(&s)).unwrap_or_default();

        for (id, n) in maps.underflows() {
            if underflows_seen.get(&id) != Some(&n) {
                warn!(
                    "backend {id}: its count would have gone below zero {n} time(s); the programs \
                     left it at zero (a count was lost somewhere: please report)"
                );
                underflows_seen.insert(id, n);
            }
        }

        if !now.targets.is_empty() {
            match rebalancer.round(&mut maps, &tools.sockets, &now.targets) {
                Ok(rounds) => {
                    for r in rounds {
                        let closed = r.total();
                        info!(
                            "rebalance {}: closed {closed} of {} wanted (budget {}); per backend \
                             {:?}; left open {:?}; errors {}",
                            r.service, r.wanted, r.budget, r.closed, r.left, r.errors
                        );
                    }
                }
                Err(e) => warn!("rebalancing failed: {e:#}"),
            }
            if let Some(c) = rebalancer.cost.take() {
                info!(
                    "rebalance round took {:.1} ms: {} assigned sockets listed, {} network \
                     namespaces found, {} entered, {} sockets looked at",
                    c.took.as_secs_f64() * 1e3,
                    c.listed,
                    c.namespaces,
                    c.entered,
                    c.looked
                );
            }
        }

        if !now.udp_gone.is_empty() {
            match stale_udp::close(&tools.sockets, &now.udp_gone, &mut cookies, &config.cgroup) {
                Ok(0) => {}
                Ok(n) => info!("closed {n} connected UDP socket(s) whose backend left its Service"),
                Err(e) => warn!("closing UDP sockets of backends that left: {e:#}"),
            }
        }
    }
}

/// After adopting pinned maps: check the counts against the live sockets.
fn check_counts(maps: &Maps, tools: &Tools) {
    match recount::verify(maps, tools) {
        Ok(r) => {
            info!(
                "connection counts checked against {} live sockets",
                r.sockets
            );
            for (id, was, now) in &r.corrected {
                warn!("backend {id}: count was {was}, {now} live sockets found; corrected");
            }
            for id in &r.unsettled {
                warn!(
                    "backend {id}: count disagrees with the live sockets, but the programs kept \
                     counting during every look, so it could not be checked; left as is"
                );
            }
        }
        Err(e) => warn!("could not check connection counts against live sockets: {e:#}"),
    }
}
