//! socklb-agent: programs the socket-level load balancer.
//!
//! - Standalone: `--manifests DIR --cgroup CG` reads Service and EndpointSlice YAML from DIR
//!   (and follows its changes); every process in CG is balanced.
//! - Kubernetes (no `--manifests`): watches the API server (in-cluster, or `--kubeconfig`) as
//!   node `--node-name` (default $NODE_NAME); `--cgroup` is kubelet's cgroup root (default
//!   /sys/fs/cgroup) and pods of namespaces labelled socklb.io/enabled=true are balanced.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use lb_common::Algorithm;
use lb_userspace::{
    agent::{self, Source},
    cluster::algorithm_names,
    datapath, rebalance,
};

#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Standalone mode: directory of Service and EndpointSlice YAML (watched for changes).
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Standalone: the cgroup v2 directory whose processes are balanced. Kubernetes: kubelet's
    /// cgroup v2 root, where the programs attach and pods are found [default: /sys/fs/cgroup].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Kubernetes mode: a kubeconfig file instead of the in-cluster configuration.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: this node's name (pods are watched with spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    #[arg(long, default_value = datapath::DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// Algorithm for Services without a socklb.io/algorithm annotation.
    #[arg(long, default_value = "least-conn", value_parser = algorithm)]
    default_algorithm: Algorithm,
    /// Seconds between rebalancing rounds (Services with socklb.io/rebalance: "true").
    #[arg(long, default_value_t = 1.0)]
    rebalance_interval: f64,
    /// The most of a Service's connections closed per round (fraction; at least one).
    #[arg(long, default_value_t = 0.1)]
    rebalance_max_share: f64,
    /// The most connections rebalancing closes per second on this node, over all Services.
    #[arg(long, default_value_t = 100)]
    rebalance_max_per_second: u32,
    /// How long (ms) a connection must have been quiet in both directions to be closed, for
    /// Services without a socklb.io/rebalance-quiet annotation.
    #[arg(long, default_value_t = 500)]
    rebalance_quiet_ms: u64,
    /// Seconds between full resyncs, which recompute every Service from the watch caches (or
    /// re-read the manifest directory). Changes are applied as they arrive; this only repairs
    /// what an event could have missed.
    #[arg(long, default_value_t = 60.0)]
    resync_interval: f64,
    /// Where /healthz, /readyz and /metrics are served ("off" for nowhere).
    #[arg(long, default_value = "127.0.0.1:9967")]
    status_address: String,
    /// Export a connection count for every backend in /metrics. By default only the backends
    /// of Services that rebalance have one, so that a scrape of a large cluster stays cheap.
    #[arg(long)]
    metrics_per_backend: bool,
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
    let (source, cgroup) = match cli.manifests {
        Some(dir) => {
            let Some(cgroup) = cli.cgroup else {
                bail!("--manifests needs --cgroup: the cgroup whose processes are balanced");
            };
            (Source::Manifests(dir), cgroup)
        }
        None => {
            let Some(node) = cli.node_name else {
                bail!(
                    "Kubernetes mode needs --node-name (or NODE_NAME); standalone mode needs --manifests"
                );
            };
            let source = Source::Kubernetes {
                kubeconfig: cli.kubeconfig,
                node,
            };
            (
                source,
                cli.cgroup.unwrap_or_else(|| "/sys/fs/cgroup".into()),
            )
        }
    };
    let status_address = match cli.status_address.as_str() {
        "off" => None,
        addr => Some(
            addr.parse::<SocketAddr>()
                .map_err(|e| anyhow::anyhow!("--status-address {addr}: {e}"))?,
        ),
    };
    let config = agent::Config {
        source,
        cgroup,
        pin_path: cli.pin_path,
        default_algorithm: cli.default_algorithm,
        resync: Duration::from_secs_f64(cli.resync_interval.max(1.0)),
        rebalance: rebalance::Policy {
            interval: Duration::from_secs_f64(cli.rebalance_interval.max(0.1)),
            max_share: cli.rebalance_max_share.clamp(0.0, 1.0),
            max_per_second: cli.rebalance_max_per_second.max(1),
            quiet: Duration::from_millis(cli.rebalance_quiet_ms.max(1)),
            ..rebalance::Policy::default()
        },
        status_address,
        metrics_per_backend: cli.metrics_per_backend,
    };
    // Two workers: the agent loop's blocking map writes never hold up the health and metrics
    // endpoints (socket work has a thread of its own, see `background`).
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(agent::run(config))
}
