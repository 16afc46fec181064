//! Builds the BPF object (lb-ebpf) with its pinned nightly and embeds it in the binaries.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    let pin = include_str!("../lb-ebpf/rust-toolchain.toml");
    let nightly = pin
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"'))
        .context("no channel in lb-ebpf/rust-toolchain.toml")?;
    println!("cargo:rerun-if-changed={root}/rust-toolchain.toml");
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(nightly),
    )
}
