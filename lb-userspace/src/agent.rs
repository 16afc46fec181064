//! The agent in standalone mode: manifests in a directory -> cluster model -> reconciler ->
//! map writer -> BPF. It reconciles at start, whenever the directory changes, and every second
//! while backends are draining (to forget them once their last connection closed).

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use lb_common::{Algorithm, backend_state};
use log::{error, info, warn};
use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{Instant, sleep_until},
};

use crate::{
    cluster::{self, Desired},
    datapath::{self, LinkAction, Maps},
    manifest_dir::ManifestDir,
    rebalance,
    reconcile::{self, Programmed},
    recount, writer,
};

pub struct Config {
    pub manifests: PathBuf,
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub default_algorithm: Algorithm,
    pub rebalance: rebalance::Policy,
}

/// How long to wait after a change in the directory before reading it, so that an editor's
/// write-rename-chmod sequence is read once.
const SETTLE: Duration = Duration::from_millis(100);
/// Re-read the directory this often even without change events (belt and braces for
/// filesystems without inotify).
const RESYNC: Duration = Duration::from_secs(10);
const DRAIN_CHECK: Duration = Duration::from_secs(1);

pub async fn run(config: Config) -> Result<()> {
    let (mut maps, actions) = datapath::install(&config.pin_path, &config.cgroup)?;
    let adopted = actions.iter().any(|(_, a)| *a != LinkAction::Attached);
    let mut programmed = maps.read_programmed()?;
    if adopted {
        info!(
            "adopted pinned state at {}: {} service ports, {} backends",
            config.pin_path.display(),
            programmed.services.len(),
            programmed.backends.len()
        );
        match recount::verify(&mut maps, &config.cgroup) {
            Ok(r) => {
                info!(
                    "connection counts checked against {} live sockets in {} network namespaces",
                    r.sockets, r.namespaces
                );
                for (id, was, now) in &r.corrected {
                    warn!("backend {id}: count was {was}, {now} live sockets found; corrected");
                }
                for id in &r.unsettled {
                    warn!(
                        "backend {id}: count disagrees with the live sockets but kept changing; left as is"
                    );
                }
            }
            Err(e) => warn!("could not check connection counts against live sockets: {e:#}"),
        }
    }

    let (tx, mut changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&config.manifests, RecursiveMode::NonRecursive)?;

    let mut agent = Agent {
        dir: ManifestDir::new(&config.manifests),
        default_algorithm: config.default_algorithm,
        desired: reconcile::programmed_frontends(&programmed),
        last_errors: Vec::new(),
    };
    agent.reconcile(&mut maps, &mut programmed, true);
    info!(
        "synced: {} service ports programmed",
        programmed.services.len()
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut next_resync = Instant::now() + RESYNC;
    let mut next_rebalance = Instant::now() + config.rebalance.interval;
    loop {
        let draining = programmed
            .backends
            .values()
            .any(|b| b.state == backend_state::DRAINING);
        let wake = if draining {
            next_resync.min(Instant::now() + DRAIN_CHECK)
        } else {
            next_resync
        };
        let mut reload = tokio::select! {
            Some(()) = changes.recv() => {
                tokio::time::sleep(SETTLE).await;
                while changes.try_recv().is_ok() {}
                true
            }
            () = sleep_until(wake) => false,
            () = sleep_until(next_rebalance) => {
                next_rebalance = Instant::now() + config.rebalance.interval;
                rebalance_once(&mut maps, &programmed, &config);
                continue;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        if Instant::now() >= next_resync {
            next_resync = Instant::now() + RESYNC;
            reload = true;
        }
        agent.reconcile(&mut maps, &mut programmed, reload);
    }
    info!(
        "stopping; programs and maps stay pinned at {} so connections keep being balanced \
         (`socklb-agent cleanup` removes them)",
        config.pin_path.display()
    );
    Ok(())
}

/// One rebalancing interval; what it closed goes to the log (and REBALANCE_STATS).
fn rebalance_once(maps: &mut Maps, programmed: &Programmed, config: &Config) {
    match rebalance::run(maps, programmed, &config.cgroup, &config.rebalance) {
        Ok(rounds) => {
            for r in rounds {
                let closed: u64 = r.closed.values().sum();
                let per_pod: Vec<String> = r
                    .closed
                    .iter()
                    .map(|(pod, n)| format!("{pod}: {n}"))
                    .collect();
                info!(
                    "rebalance {}: closed {closed} of {} wanted (bound {}) [{}]",
                    r.service,
                    r.wanted,
                    r.budget,
                    per_pod.join(", ")
                );
            }
        }
        Err(e) => warn!("rebalancing failed: {e:#}"),
    }
}

struct Agent {
    dir: ManifestDir,
    default_algorithm: Algorithm,
    /// Last desired state: what a Service in error keeps.
    desired: Desired,
    /// Errors of the previous round, so each is logged once.
    last_errors: Vec<String>,
}

impl Agent {
    /// One round: re-read the directory if `reload` (else only forget drained backends),
    /// plan, write.
    fn reconcile(&mut self, maps: &mut Maps, programmed: &mut Programmed, reload: bool) {
        let (manifest_errors, service_errors) = if reload {
            let (state, manifest_errors) = self.dir.load();
            let (desired, service_errors) =
                cluster::desired(&state, self.default_algorithm, &self.desired);
            self.desired = desired;
            (manifest_errors, service_errors)
        } else {
            Default::default()
        };
        let desired = &self.desired;
        let plan = reconcile::plan(desired, programmed, &|id| maps.connections(id));
        let applied = writer::apply(&plan, maps, programmed);
        for change in &plan.changes {
            info!("{} ({} map writes)", change.what, change.ops.len());
        }

        if !reload && applied.errors.is_empty() {
            return; // keep the errors of the last full round for de-duplication
        }
        let errors: Vec<String> = manifest_errors
            .iter()
            .map(ToString::to_string)
            .chain(service_errors.iter().map(ToString::to_string))
            .chain(plan.errors.iter().cloned())
            .chain(applied.errors.iter().cloned())
            .collect();
        for e in errors.iter().filter(|e| !self.last_errors.contains(e)) {
            error!("{e}");
        }
        self.last_errors = errors;
    }
}
