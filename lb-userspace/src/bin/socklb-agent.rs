//! socklb-agent: programs the socket-level load balancer from Service and EndpointSlice
//! manifests in a directory, and keeps it in step with the directory.
use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_common::Algorithm;
use lb_userspace::{agent, cluster::algorithm_names, datapath, rebalance};

#[derive(Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory of Service and EndpointSlice YAML (watched for changes).
    #[arg(long, required = true)]
    manifests: Option<PathBuf>,
    /// cgroup v2 directory whose processes' connections are balanced.
    #[arg(long, required = true)]
    cgroup: Option<PathBuf>,
    #[arg(long, default_value = datapath::DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Algorithm for Services without a socklb.io/algorithm annotation.
    #[arg(long, default_value = "least-conn", value_parser = algorithm)]
    default_algorithm: Algorithm,
    /// Seconds between rebalancing rounds (Services with socklb.io/rebalance: "true").
    #[arg(long, default_value_t = 10.0)]
    rebalance_interval: f64,
    /// How far (fraction of the mean) a backend may be off before connections are closed.
    #[arg(long, default_value_t = 0.1)]
    rebalance_threshold: f64,
    /// The most of a Service's connections closed per round (fraction; at least one).
    #[arg(long, default_value_t = 0.05)]
    rebalance_max_share: f64,
}

#[derive(Subcommand)]
enum Command {
    /// Detach the programs and remove the pinned maps and links.
    Cleanup {
        #[arg(long, default_value = datapath::DEFAULT_PIN_PATH)]
        pin_path: PathBuf,
    },
}

fn algorithm(s: &str) -> Result<Algorithm, String> {
    Algorithm::from_name(s)
        .ok_or_else(|| format!("unknown algorithm {s:?} ({})", algorithm_names()))
}

fn main() -> Result<()> {
    lb_userspace::init_logging();
    let cli = Cli::parse();
    if let Some(Command::Cleanup { pin_path }) = cli.command {
        let removed = datapath::uninstall(&pin_path)?;
        log::info!(
            "removed {} pinned objects under {}",
            removed.len(),
            pin_path.display()
        );
        return Ok(());
    }
    let config = agent::Config {
        manifests: cli.manifests.expect("required"),
        cgroup: cli.cgroup.expect("required"),
        pin_path: cli.pin_path,
        default_algorithm: cli.default_algorithm,
        rebalance: rebalance::Policy {
            interval: Duration::from_secs_f64(cli.rebalance_interval.max(0.1)),
            threshold: cli.rebalance_threshold.max(0.0),
            max_share: cli.rebalance_max_share.clamp(0.0, 1.0),
        },
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(agent::run(config))
}
