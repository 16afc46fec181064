//! The agent image, built offline: static (musl) `socklb-agent` and `socklbctl` on an empty
//! base, tagged with the name `deploy/daemonset.yaml` runs. `deploy/Dockerfile` builds the same
//! contents where registries are reachable; the image here is made from its last stage, with
//! the binaries this checkout built instead of the ones its build stage would.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, setup, step};

/// What the image holds, and where the build puts it.
pub const BINARIES: [&str; 2] = ["socklb-agent", "socklbctl"];

/// The musl target for this machine's architecture.
pub fn target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// Builds the static binaries (what `cargo xtask build` and the Dockerfile's build stage do).
pub fn build_binaries(tools: &setup::Tools) -> Result<()> {
    let target = target();
    let mut args = vec!["build", "--release", "--target", &target];
    for b in BINARIES {
        args.extend(["--bin", b]);
    }
    cargo(tools, &args)
}

/// Builds the binaries and the image; returns the image's name.
pub fn build(tools: &setup::Tools, root: &Path) -> Result<String> {
    build_binaries(tools)?;
    let name = image_name(&root.join("deploy/daemonset.yaml"))?;
    let context = root.join("target/image");
    let _ = fs::remove_dir_all(&context);
    fs::create_dir_all(&context)?;
    let built = root.join("target").join(target()).join("release");
    for b in BINARIES {
        fs::copy(built.join(b), context.join(b))
            .with_context(|| format!("copying {b} into the image context"))?;
    }
    let dockerfile = fs::read_to_string(root.join("deploy/Dockerfile"))?;
    fs::write(context.join("Containerfile"), last_stage(&dockerfile)?)?;
    let mut podman = Command::new("podman");
    podman
        .args(["build", "--quiet", "--tag", &name])
        .arg(&context);
    step(&format!("podman build {name}"), podman)?;
    let size = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", &name])
        .output()?;
    let bytes: u64 = String::from_utf8_lossy(&size.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    println!(
        "xtask: image {name}: {:.1} MiB ({})",
        bytes as f64 / (1024.0 * 1024.0),
        BINARIES.join(", ")
    );
    Ok(name)
}

/// The `image:` of the DaemonSet's container.
fn image_name(daemonset: &Path) -> Result<String> {
    let text = fs::read_to_string(daemonset)?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("image:"))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no image: in {}", daemonset.display()))
}

/// The Dockerfile's last stage, its `COPY --from=<stage> <binaries> <dir>` taking the binaries
/// from the build context instead.
fn last_stage(dockerfile: &str) -> Result<String> {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .context("no FROM in deploy/Dockerfile")?;
    let mut out = String::new();
    let mut copied = false;
    for line in &lines[from..] {
        if let Some(rest) = line.strip_prefix("COPY --from=") {
            let dest = rest
                .split_whitespace()
                .last()
                .context("a COPY without a destination")?;
            out.push_str(&format!("COPY {} {dest}\n", BINARIES.join(" ")));
            copied = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !copied {
        bail!("deploy/Dockerfile's last stage copies no binaries from the build stage");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offline_image_is_the_dockerfiles_last_stage() {
        let dockerfile = "FROM debian AS build\nRUN make\n\nFROM scratch\nCOPY --from=build /src/a /src/b /usr/local/bin/\nENTRYPOINT [\"/usr/local/bin/socklb-agent\"]\n";
        assert_eq!(
            last_stage(dockerfile).unwrap(),
            "FROM scratch\nCOPY socklb-agent socklbctl /usr/local/bin/\nENTRYPOINT [\"/usr/local/bin/socklb-agent\"]\n"
        );
        assert!(last_stage("FROM scratch\n").is_err());
    }
}
