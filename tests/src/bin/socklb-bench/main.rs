//! socklb-bench (`cargo xtask bench balance|connect|nodes|control-plane|rebalance-scan`):
//! measurements, each against a baseline taken in the same run. Needs root, like the tests.

mod balance;
mod chart;
mod connect;
mod control_plane;
mod nodes;
mod rebalance;
mod rebalance_scan;

use std::path::PathBuf;

use anyhow::{Result, bail};
use socklb_tests::privileges;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !privileges::check("socklb-bench") {
        bail!("the benchmarks need root, cgroup v2 and iproute2/iptables (cargo xtask setup)");
    }
    let results =
        PathBuf::from(std::env::var("SOCKLB_RESULTS").unwrap_or_else(|_| "results".into()));
    match args.first().map(String::as_str) {
        Some("balance") => balance::run(&results.join("balance")),
        Some("connect") => connect::run(&results.join("connect")),
        Some("nodes") => nodes::run(&results.join("nodes")),
        Some("control-plane") => control_plane::run(&results.join("control-plane")),
        Some("rebalance-scan") => rebalance_scan::run(&results.join("rebalance-scan")),
        _ => bail!("usage: socklb-bench balance|connect|nodes|control-plane|rebalance-scan"),
    }
}
