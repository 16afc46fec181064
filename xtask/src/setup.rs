//! The set-up: the pinned toolchains (userspace here, the BPF nightly in
//! lb-ebpf/rust-toolchain.toml), bpf-linker built against that nightly's own LLVM, and the
//! Debian packages the tests and the demo use.
//!
//! The userspace toolchain is not pinned with a rust-toolchain.toml at the root: with rustup's
//! auto-install off (RUSTUP_AUTO_INSTALL=0) that would stop `cargo xtask` before it could
//! install anything. Instead xtask builds with whatever toolchain is the default, installs the
//! pinned one, runs every cargo step with it, and pins the checkout to it with a rustup
//! directory override so plain `cargo` commands there use it too.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The userspace toolchain (aya 0.16 needs rustc 1.98 or later).
pub const USERSPACE_TOOLCHAIN: &str = "1.99.1";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: what provides the commands (or, for a path, the file) the tests and the
/// demo use.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iproute2", "ss"),
    ("util-linux", "nsenter"),
    ("iptables", "iptables-restore"),
    ("iptables", "ip6tables-restore"),
    ("bpftool", "bpftool"),
    // A real JVM client: dual-mode IPv6 sockets by default.
    ("openjdk-17-jdk-headless", "java"),
    // Real gRPC clients and servers (C-core), for Debian's /usr/bin/python3.
    (
        "python3-grpcio",
        "/usr/lib/python3/dist-packages/grpc/__init__.py",
    ),
    // The agent image: built and run as the DaemonSet runs it (runc: crun refuses this
    // machine's hybrid cgroup layout).
    ("podman", "podman"),
    ("runc", "runc"),
];

/// What building the image's static binaries needs (the C parts of ring, for musl).
const BUILD_PACKAGES: &[(&str, &str)] = &[("musl-tools", "musl-gcc")];

/// What the benchmarks run as clients and servers.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("nginx-light", "nginx"),
    ("redis-server", "redis-server"),
    ("redis-tools", "redis-benchmark"),
    ("wrk", "wrk"),
    ("nghttp2-client", "h2load"),
];

/// Where the set-up put things.
pub struct Tools {
    pub nightly: String,
    bpf_linker_dir: PathBuf,
}

impl Tools {
    /// PATH with our bpf-linker first, so no other bpf-linker (for another LLVM) is used.
    pub fn path_env(&self) -> String {
        let path = std::env::var("PATH").unwrap_or_default();
        format!("{}:{path}", self.bpf_linker_dir.join("bin").display())
    }

    /// `cargo` on the pinned userspace toolchain with bpf-linker on PATH. (The rustup proxy,
    /// not $CARGO, which points at the toolchain xtask itself was built with.)
    pub fn cargo(&self) -> Command {
        let mut c = Command::new("cargo");
        c.env("RUSTUP_TOOLCHAIN", USERSPACE_TOOLCHAIN)
            .env("PATH", self.path_env());
        c
    }
}

/// `packages`: also the Debian packages (not needed just to build).
pub fn run(root: &Path, packages: bool) -> Result<Tools> {
    let nightly = pinned_nightly(root)?;
    ensure_toolchain(USERSPACE_TOOLCHAIN, &["clippy", "rustfmt"])?;
    ensure_target(USERSPACE_TOOLCHAIN, &crate::image::target())?;
    ensure_override(root)?;
    ensure_toolchain(&nightly, &["rust-src", "clippy"])?;
    let bpf_linker_dir = ensure_bpf_linker(&nightly)?;
    link_bpf_linker(&bpf_linker_dir)?;
    ensure_packages(BUILD_PACKAGES)?;
    if packages {
        ensure_packages(PACKAGES)?;
    }
    Ok(Tools {
        nightly,
        bpf_linker_dir,
    })
}

fn pinned_nightly(root: &Path) -> Result<String> {
    let file = root.join("lb-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&file)?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|v| v.trim_matches('"').to_owned())
        .with_context(|| format!("no channel in {}", file.display()))
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_toolchain(toolchain: &str, components: &[&str]) -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", toolchain, "--installed"],
    )
    .unwrap_or_default();
    let has = |c: &str| installed.lines().any(|l| l.starts_with(c));
    if components.iter().all(|c| has(c)) {
        return Ok(());
    }
    println!(
        "setup: installing Rust {toolchain} with {}",
        components.join(", ")
    );
    output(
        "rustup",
        &["toolchain", "install", toolchain, "--profile", "minimal"],
    )?;
    let mut args = vec!["component", "add", "--toolchain", toolchain];
    args.extend(components);
    output("rustup", &args)?;
    Ok(())
}

fn ensure_target(toolchain: &str, target: &str) -> Result<()> {
    let installed = output(
        "rustup",
        &["target", "list", "--toolchain", toolchain, "--installed"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    println!("setup: adding the {target} target to Rust {toolchain}");
    output(
        "rustup",
        &["target", "add", "--toolchain", toolchain, target],
    )?;
    Ok(())
}

/// Puts our bpf-linker where `cargo install bpf-linker` would (~/.cargo/bin, on rustup users'
/// PATH), so that plain `cargo build` and `cargo test` work in the checkout as aya users
/// expect. A bpf-linker already there that is not ours is left alone (it may serve other
/// projects' LLVM); `cargo xtask` puts ours first on PATH anyway.
fn link_bpf_linker(dir: &Path) -> Result<()> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let link = home.join("bin/bpf-linker");
    let ours = dir.join("bin/bpf-linker");
    let cache = dir.parent().unwrap_or(dir);
    match fs::read_link(&link) {
        Ok(target) if target == ours => return Ok(()),
        Ok(target) if target.starts_with(cache) => fs::remove_file(&link)?, // for another nightly
        _ if fs::symlink_metadata(&link).is_ok() => {
            println!(
                "setup: {} is another bpf-linker; plain cargo will use it (cargo xtask uses {})",
                link.display(),
                ours.display()
            );
            return Ok(());
        }
        _ => {}
    }
    fs::create_dir_all(home.join("bin"))?;
    std::os::unix::fs::symlink(&ours, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    println!("setup: linked {} -> {}", link.display(), ours.display());
    Ok(())
}

/// Makes plain `cargo` in this checkout use the pinned toolchain.
fn ensure_override(root: &Path) -> Result<()> {
    let root = root.to_string_lossy();
    let overrides = output("rustup", &["override", "list"]).unwrap_or_default();
    let pinned = overrides.lines().any(|l| {
        let mut fields = l.split_whitespace();
        fields.next() == Some(&*root)
            && fields
                .next()
                .is_some_and(|t| t.starts_with(&format!("{USERSPACE_TOOLCHAIN}-")))
    });
    if !pinned {
        println!("setup: pinning this checkout to Rust {USERSPACE_TOOLCHAIN} (rustup override)");
        output(
            "rustup",
            &["override", "set", "--path", &root, USERSPACE_TOOLCHAIN],
        )?;
    }
    Ok(())
}

/// bpf-linker must use the same LLVM as the nightly that compiles the BPF crate. No Debian
/// package has that LLVM, but the nightly ships it as a shared library: a prefix directory with
/// symlinks to it is what bpf-linker's build needs (its rpath keeps pointing there).
fn ensure_bpf_linker(nightly: &str) -> Result<PathBuf> {
    let home = std::env::var("HOME").context("HOME is not set")?;
    let dir = Path::new(&home)
        .join(".cache/socklb")
        .join(format!("bpf-linker-{BPF_LINKER_VERSION}-{nightly}"));
    let linker = dir.join("bin/bpf-linker");
    if Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(dir);
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {nightly}'s LLVM (about a minute)"
    );
    let toolchain = format!("+{nightly}");
    let sysroot = output("rustc", &[&toolchain, "--print", "sysroot"])?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let version = output("rustc", &[&toolchain, "-vV"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV printed no LLVM version")?
        .to_owned();
    let prefix = dir.join("llvm");
    fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link)?;
    }
    let status = Command::new("cargo")
        .env("RUSTUP_TOOLCHAIN", USERSPACE_TOOLCHAIN)
        .args(["install", "--root"])
        .arg(&dir)
        .args([
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !status.success() {
        bail!("building bpf-linker failed");
    }
    Ok(dir)
}

pub fn ensure_bench_packages() -> Result<()> {
    ensure_packages(BENCH_PACKAGES)
}

fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(_, command)| !has_command(command))
        .map(|(package, _)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "Debian packages missing: {} (run as root to install them)",
            missing.join(" ")
        );
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    output("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn has_command(command: &str) -> bool {
    if command.starts_with('/') {
        return Path::new(command).exists();
    }
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|dir| Path::new(dir).join(command).exists())
}

/// Lints the BPF crate for its own target (the host clippy run cannot build it).
pub fn clippy_bpf(tools: &Tools) -> Result<()> {
    println!("xtask: clippy on lb-ebpf (bpfel-unknown-none)");
    let arch = format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH);
    let status = Command::new("cargo")
        .env_remove("RUSTUP_TOOLCHAIN")
        .arg(format!("+{}", tools.nightly))
        .args([
            "clippy",
            "--package",
            "lb-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args([
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/bpf-clippy",
            "--",
            "-D",
            "warnings",
        ])
        .env("PATH", tools.path_env())
        .env("CARGO_ENCODED_RUSTFLAGS", arch)
        .status()?;
    if !status.success() {
        bail!("clippy on lb-ebpf failed");
    }
    Ok(())
}
