//! Project tasks: `cargo xtask setup | build | image | test | demo | bench`.
//!
//! Every task but `setup` runs the set-up first, so the two README commands work on a fresh
//! machine. The set-up is idempotent and takes well under a second once done.

mod image;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "socklb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned toolchains, bpf-linker and the Debian packages the tests use.
    Setup,
    /// Build what the agent image holds: static (musl) socklb-agent and socklbctl, into
    /// target/<arch>-unknown-linux-musl/release; needs only the toolchains and musl-tools (used
    /// by deploy/Dockerfile's build stage).
    Build,
    /// Build the agent image offline with podman: those binaries on an empty base, tagged as
    /// deploy/daemonset.yaml names it.
    Image,
    /// Lint, build and run every test (unit and privileged end-to-end tests).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// The kube-proxy chain vs socklb random vs socklb least-conn, side by side.
    Demo,
    /// Benchmarks, each against a baseline measured in the same run: `balance` (real clients
    /// and servers, per-pod load), `connect` (the cost of a connect), `nodes` (several agents),
    /// `control-plane` (sync, memory and change latency at 1k, 10k and 50k Services), `rebalance-scan` (what a
    /// rebalancing round costs with 10k and 100k sockets).
    Bench {
        #[arg(value_parser = ["balance", "connect", "nodes", "control-plane", "rebalance-scan"])]
        which: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    let packages = !matches!(cli.task, Task::Build);
    let tools = setup::run(&root, packages)?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build => image::build_binaries(&tools),
        Task::Image => image::build(&tools, &root).map(drop),
        Task::Test { filter } => test(&tools, &root, filter.as_deref()),
        Task::Demo => {
            cargo(&tools, &["build", "--release", "--bins"])?;
            step(
                "demo",
                Command::new(root.join("target/release/socklb-demo")),
            )
        }
        Task::Bench { which } => {
            setup::ensure_bench_packages()?;
            cargo(&tools, &["build", "--release", "--bins"])?;
            let mut bench = Command::new(root.join("target/release/socklb-bench"));
            bench
                .arg(&which)
                .env("SOCKLB_RESULTS", root.join("results"));
            step(&format!("bench {which}"), bench)
        }
    }
}

fn test(tools: &setup::Tools, root: &Path, filter: Option<&str>) -> Result<()> {
    let start = Instant::now();
    cargo(tools, &["fmt", "--all", "--check"])?;
    cargo(tools, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
    setup::clippy_bpf(tools)?;
    // The end-to-end tests run the agent, socklbctl and socklb-client binaries, and the image.
    cargo(tools, &["build", "--bins"])?;
    image::build(tools, root)?;
    let mut args = vec!["test", "--no-fail-fast"];
    if let Some(f) = filter {
        args.extend(["--", f]);
    }
    cargo(tools, &args)?;
    println!("xtask: all tests passed in {:.0?}", start.elapsed());
    Ok(())
}

/// Runs cargo on the pinned toolchain with bpf-linker on PATH (lb-userspace's build script
/// builds the BPF object).
fn cargo(tools: &setup::Tools, args: &[&str]) -> Result<()> {
    let mut c = tools.cargo();
    c.args(args);
    step(&format!("cargo {}", args.join(" ")), c)
}

fn step(what: &str, mut command: Command) -> Result<()> {
    println!("xtask: {what}");
    let status = command
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}
