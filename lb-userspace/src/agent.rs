//! The agent loop: source (a manifest directory, or the API server) -> cluster model ->
//! reconciler -> map writer -> BPF. It reconciles everything at start, after a re-list and
//! every `Config::resync` regardless; a change to one Service (or its EndpointSlices) redoes only
//! that Service, so its cost does not grow with the cluster. Every second while backends
//! are draining it forgets those whose last connection closed. In Kubernetes mode it also
//! keeps the per-pod switch (`pod_switch`) current. Work on sockets (the count check after a
//! restart, rebalancing, closing UDP sockets of backends that left) runs on the `background`
//! thread, from a snapshot this loop publishes after each round.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use lb_common::{Algorithm, IPPROTO_UDP, SlotKey, settings};
use log::{error, info, warn};
use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{Instant, sleep_until},
};

use crate::{
    background::{self, Published, Snapshot},
    bpf_sys::monotonic_ns,
    cluster::{self, ClusterState, Desired, ServiceRef},
    datapath::{self, LinkAction, Maps, Tools},
    kube_watch::{Changed, KubeCluster, Notice},
    manifest_dir::ManifestDir,
    pod_switch::{self, PodSwitch},
    programmed::{self, Programmed, frontend_key, name_str},
    rebalance, reconcile,
    status::{self, Status},
    writer,
};

/// Where the agent learns what to program.
pub enum Source {
    /// Service and EndpointSlice YAML in a directory; every process in the cgroup is balanced.
    Manifests(PathBuf),
    /// The API server (in-cluster config, or a kubeconfig file); pods of enabled namespaces
    /// under the cgroup root are balanced.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        node: String,
    },
}

pub struct Config {
    pub source: Source,
    /// Standalone: the cgroup whose processes are balanced. Kubernetes: kubelet's cgroup root.
    pub cgroup: PathBuf,
    pub pin_path: PathBuf,
    pub default_algorithm: Algorithm,
    /// Recompute everything this often even without change events.
    pub resync: Duration,
    pub rebalance: rebalance::Policy,
    /// Where /healthz, /readyz and /metrics are served, if anywhere.
    pub status_address: Option<SocketAddr>,
    /// A connection-count series for every backend in /metrics, not only for those of the
    /// Services that rebalance.
    pub metrics_per_backend: bool,
}

/// While backends drain: check this often whether their last connection closed.
const DRAIN_CHECK: Duration = Duration::from_secs(1);
/// While pods to switch on have no cgroup or process (so no network namespace) yet, look again
/// after this long, so a starting pod is balanced from about its first tenth of a second...
const POD_RETRY_FIRST: Duration = Duration::from_millis(100);
/// ...then, while the same pods stay missing, twice as long each time up to this (a pod in a
/// layout socklb does not know is not rescanned for every 100 ms forever). A change to a Pod
/// (kubelet reports its containers started) looks again at once.
const POD_RETRY_MAX: Duration = Duration::from_secs(5);

pub async fn run(config: Config) -> Result<()> {
    let status = Status::new(config.pin_path.clone(), config.metrics_per_backend);
    if let Some(addr) = config.status_address {
        status::start(addr, status.clone()).await?;
    }
    let kubernetes = matches!(config.source, Source::Kubernetes { .. });
    let flags = if kubernetes {
        settings::FILTER_BY_NETNS
    } else {
        0
    };
    let datapath::Installed {
        mut maps,
        tools,
        actions,
    } = datapath::install(&config.pin_path, &config.cgroup, flags)?;
    let mut programmed = maps.read_programmed()?;
    let adopted = actions.iter().any(|(_, a)| *a != LinkAction::Attached);
    if adopted {
        info!(
            "adopted pinned state at {}: {} service ports, {} backends",
            config.pin_path.display(),
            programmed.services().len(),
            programmed.backends().len()
        );
    }
    let published: Published = Arc::default();
    background::spawn(
        background::Config {
            pin_path: config.pin_path.clone(),
            cgroup: config.cgroup.clone(),
            policy: config.rebalance,
            recount: adopted,
        },
        Arc::clone(&published),
    )?;

    let (tx, mut changes) = mpsc::unbounded_channel();
    let (mut source, _watcher) = match &config.source {
        Source::Manifests(dir) => {
            let tx = tx.clone();
            let mut watcher =
                notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
                    if e.is_ok() {
                        let _ = tx.send((std::time::Instant::now(), Changed::Everything));
                    }
                })?;
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
            let mut pinned: BTreeMap<_, BTreeSet<_>> = BTreeMap::new();
            for f in programmed::programmed_frontends(&programmed)
                .frontends()
                .values()
            {
                pinned
                    .entry(f.service.clone())
                    .or_default()
                    .insert(f.key.ip);
            }
            let dir = ManifestDir::new(dir).preferring(pinned);
            (Loaded::Manifests(dir), Some(watcher))
        }
        Source::Kubernetes { kubeconfig, node } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let cluster = KubeCluster::start(client, node, tx.clone());
            cluster.wait_synced().await;
            info!(
                "watching the API server as node {node} in zone {}",
                cluster.zone().as_deref().unwrap_or("(none)")
            );
            let switch = PodSwitch::new(&config.cgroup, &maps)?;
            (Loaded::Kubernetes(cluster, switch), None)
        }
    };

    let mut agent = Agent {
        default_algorithm: config.default_algorithm,
        desired: programmed::programmed_frontends(&programmed),
        refused: BTreeSet::new(),
        last_errors: Vec::new(),
        status: status.clone(),
        pods_pending: Vec::new(),
        pod_retry: POD_RETRY_FIRST,
        pod_check: None,
        tools,
        published,
        default_quiet: config.rebalance.quiet,
        deferred: BTreeSet::new(),
        loaded_at: std::time::Instant::now(),
    };
    agent.reconcile(&mut source, &mut maps, &mut programmed, Work::everything());
    status.set_ready();
    info!(
        "synced: {} service ports programmed",
        programmed.services().len()
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut next_resync = Instant::now() + config.resync;
    // When the next round forgets drained backends (and deletes deferred slots).
    let mut next_forget: Option<Instant> = None;
    loop {
        status.beat();
        let draining = !agent.deferred.is_empty() || programmed.draining().next().is_some();
        let mut wake = next_resync;
        if draining {
            // Not pushed back by the changes that come meanwhile.
            wake = wake.min(*next_forget.get_or_insert_with(|| Instant::now() + DRAIN_CHECK));
        }
        if let Some(at) = agent.pod_check {
            wake = wake.min(at);
        }
        let mut work = tokio::select! {
            Some(first) = changes.recv() => {
                if let Some(settle) = source.settle() {
                    tokio::time::sleep(settle).await;
                }
                let mut work = Work::default();
                let queued = std::iter::from_fn(|| changes.try_recv().ok());
                for notice in std::iter::once(first).chain(queued) {
                    // Seen before the last full round read the state: that round took it in.
                    if notice.0 >= agent.loaded_at {
                        work.add(notice);
                    }
                }
                if work.seen.is_none() {
                    continue;
                }
                work
            }
            () = sleep_until(wake) => Work {
                pods: agent.pod_check.is_some_and(|at| at <= Instant::now()),
                forget: next_forget.is_some_and(|at| at <= Instant::now()),
                ..Work::default()
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        if Instant::now() >= next_resync {
            next_resync = Instant::now() + config.resync;
            work.everything = true;
        }
        if work.forget || work.everything {
            next_forget = None;
        }
        agent.reconcile(&mut source, &mut maps, &mut programmed, work);
    }
    info!(
        "stopping; programs and maps stay pinned at {} so connections keep being balanced \
         (`socklb-agent cleanup` removes them)",
        config.pin_path.display()
    );
    Ok(())
}

/// A Service's error as the round reports it.
fn service_error(e: &cluster::ServiceError) -> (&'static str, Option<ServiceRef>, String) {
    ("service", Some(e.service.clone()), e.to_string())
}

async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config or kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// The source, once set up.
enum Loaded {
    Manifests(ManifestDir),
    Kubernetes(KubeCluster, PodSwitch),
}

impl Loaded {
    /// How long to let a burst of changes arrive before a round.
    fn settle(&self) -> Option<Duration> {
        match self {
            // An editor's write-rename-chmod sequence is read once.
            Loaded::Manifests(_) => Some(Duration::from_millis(100)),
            // None: what queued up during the previous round is batched into the next one.
            Loaded::Kubernetes(..) => None,
        }
    }

    /// The part of the cluster state `services` need, where the source can give it.
    fn load_services(&self, services: &BTreeSet<ServiceRef>) -> Option<ClusterState> {
        match self {
            Loaded::Manifests(_) => None,
            Loaded::Kubernetes(cluster, _) => Some(cluster.state_of(services)),
        }
    }

    /// The cluster state, and what is wrong in it as (kind, message).
    fn load(&mut self) -> (ClusterState, Vec<(&'static str, String)>) {
        match self {
            Loaded::Manifests(dir) => {
                let (state, errors) = dir.load();
                (
                    state,
                    errors.iter().map(|e| ("manifest", e.to_string())).collect(),
                )
            }
            Loaded::Kubernetes(cluster, _) => (cluster.state(), Vec::new()),
        }
    }
}

/// What a reconcile round redoes.
#[derive(Default)]
struct Work {
    /// Re-read the whole source, plan every frontend, sync the pod switch.
    everything: bool,
    /// Re-read these Services.
    services: BTreeSet<ServiceRef>,
    /// Sync the pod switch.
    pods: bool,
    /// Forget drained backends whose last connection closed.
    forget: bool,
    /// When the oldest change this round takes in was seen.
    seen: Option<std::time::Instant>,
}

impl Work {
    fn everything() -> Work {
        Work {
            everything: true,
            ..Work::default()
        }
    }

    fn add(&mut self, (seen, changed): Notice) {
        self.seen = Some(self.seen.map_or(seen, |s| s.min(seen)));
        match changed {
            Changed::Everything => self.everything = true,
            Changed::Service(s) => drop(self.services.insert(s)),
            Changed::Pods => self.pods = true,
        }
    }
}

struct Agent {
    default_algorithm: Algorithm,
    /// Last desired state: what a Service in error keeps.
    desired: Desired,
    /// Services the last full round refused an address another Service holds: a change that
    /// lets go of an address is then a full round, as one of them may want it.
    refused: BTreeSet<ServiceRef>,
    /// The errors standing (by the Service they are about, if any), so each is logged once.
    last_errors: Vec<(Option<ServiceRef>, String)>,
    status: Arc<Status>,
    /// Pods to switch on whose network namespace was not found at the last look.
    pods_pending: Vec<(pod_switch::PodRef, &'static str)>,
    /// How long until the next look for them, and when that is.
    pod_retry: Duration,
    pod_check: Option<Instant>,
    tools: Tools,
    /// Where the background thread finds what to work on.
    published: Published,
    /// Rebalancing's quiet time for Services that do not set their own.
    default_quiet: Duration,
    /// Frontends whose slots past a lowered count the next round deletes.
    deferred: BTreeSet<cluster::FrontendKey>,
    /// When the last full round read the state: it took in every change seen before.
    loaded_at: std::time::Instant,
}

impl Agent {
    /// Tells the background thread what is programmed now: the opted-in Service ports with
    /// their active backends, and the draining backends of UDP Service ports.
    fn publish(&self, programmed: &Programmed) {
        let mut snapshot = Snapshot::default();
        for (key, service) in programmed.rebalanced() {
            let Some(frontend) = frontend_key(key).and_then(|k| self.desired.frontends().get(&k))
            else {
                continue;
            };
            if !frontend.rebalance {
                continue;
            }
            let backends: Vec<u32> = (0..service.count)
                .filter_map(|index| {
                    programmed.slots().get(&SlotKey {
                        service_id: service.id,
                        index,
                    })
                })
                .copied()
                .collect();
            let quiet = match service.rebalance_quiet_ms {
                0 => self.default_quiet,
                ms => Duration::from_millis(ms.into()),
            };
            let name = programmed
                .names()
                .get(&service.id)
                .map_or_else(String::new, |n| {
                    format!(
                        "{}/{} port {:?}",
                        name_str(&n.namespace),
                        name_str(&n.name),
                        name_str(&n.port_name)
                    )
                });
            let slow_start_ends_ns = match service.slow_start_ms {
                0 => 0,
                ms => backends
                    .iter()
                    .filter_map(|id| programmed.backends().get(id))
                    .map(|b| b.since_ns)
                    .filter(|since| *since != 0)
                    .max()
                    .map_or(0, |since| since + u64::from(ms) * 1_000_000),
            };
            snapshot.targets.push(rebalance::Target {
                service_id: service.id,
                name: format!("{name} ({})", frontend.key),
                backends,
                quiet,
                slow_start_ends_ns,
            });
        }
        snapshot.udp_gone = programmed
            .draining()
            .filter(|(_, b)| {
                (programmed.frontends_of(b.service_id)).any(|k| k.proto == IPPROTO_UDP)
            })
            .map(|(id, _)| id)
            .collect();
        if let Ok(mut published) = self.published.lock()
            && **published != snapshot
        {
            *published = Arc::new(snapshot);
        }
    }

    /// Applies the change to `services` alone, if that gives what a full round would.
    /// Returns the frontends that changed and the Services in error among `services`.
    fn update(
        &mut self,
        source: &Loaded,
        services: &BTreeSet<ServiceRef>,
    ) -> Option<cluster::Updated> {
        let state = source.load_services(services)?;
        let updated = cluster::update(
            &mut self.desired,
            &state,
            services,
            self.default_algorithm,
            &self.refused,
        )?;
        // Resolved without a clash: not refused any more.
        self.refused.retain(|s| !services.contains(s));
        Some(updated)
    }

    /// One round: re-read what `work` says (nothing: only forget drained backends), plan,
    /// write; in Kubernetes mode also the pod switch.
    fn reconcile(
        &mut self,
        source: &mut Loaded,
        maps: &mut Maps,
        programmed: &mut Programmed,
        mut work: Work,
    ) {
        let start = std::time::Instant::now();
        // (kind, the Service it is about, message)
        let mut errors: Vec<(&str, Option<ServiceRef>, String)> = Vec::new();
        let mut changed = BTreeSet::new();
        // This round's full state, for naming the files of a Service a map error is about.
        let mut full_state = None;
        if !work.everything && !work.services.is_empty() {
            match self.update(source, &work.services) {
                Some(updated) => {
                    changed = updated.changed;
                    errors.extend(updated.errors.iter().map(service_error));
                }
                None => work.everything = true,
            }
        }
        if work.everything {
            self.loaded_at = std::time::Instant::now();
            let (state, source_errors) = source.load();
            let (desired, service_errors) =
                cluster::desired(&state, self.default_algorithm, &self.desired);
            self.desired = desired;
            self.refused = service_errors
                .iter()
                .filter(|e| e.refused_address)
                .map(|e| e.service.clone())
                .collect();
            errors.extend(source_errors.into_iter().map(|(k, m)| (k, None, m)));
            errors.extend(service_errors.iter().map(service_error));
            full_state = Some(state);
        }
        // A drained backend is forgotten (and its id reused) only once its count is zero and
        // no live socket refers to it, which the socket iterator says for those candidates.
        // One socket of each is enough to know it is held. That look costs a syscall or more
        // per draining backend, so only full rounds and `forget` rounds take it, not every
        // change; None keeps every drained backend this round.
        let held: Option<BTreeSet<u32>> = match work.everything || work.forget {
            false => None,
            true => {
                let drained: BTreeMap<u32, u64> = programmed
                    .draining()
                    .filter(|(id, _)| maps.connections(*id) == 0)
                    .map(|(id, _)| (id, 1))
                    .collect();
                match drained.is_empty() {
                    true => Some(BTreeSet::new()),
                    false => match self.tools.sockets.of(&drained) {
                        Ok(list) => Some(list.iter().map(|r| r.state.backend_id).collect()),
                        Err(e) => {
                            warn!("listing assigned sockets: {e:#}; keeping drained backends");
                            None
                        }
                    },
                }
            }
        };
        let connections = |id| match &held {
            None => 1,
            Some(held) => match maps.connections(id) {
                0 => u64::from(held.contains(&id)),
                n => n,
            },
        };
        changed.append(&mut self.deferred);
        let plan = if work.everything {
            reconcile::plan(&self.desired, programmed, &connections, monotonic_ns())
        } else {
            let now = monotonic_ns();
            reconcile::plan_for(&self.desired, &changed, programmed, &connections, now)
        };
        let applied = writer::apply(&plan, maps, programmed);
        if let Some(seen) = work.seen {
            (self.status.change_seconds).observe(seen.elapsed().as_secs_f64());
        }
        self.deferred = plan.deferred.clone();
        for change in &plan.changes {
            info!("{} ({} map writes)", change.what, change.ops.len());
        }
        errors.extend(plan.errors.iter().map(|(service, message)| {
            let files = full_state
                .as_ref()
                .map(|s| s.files_of(service))
                .unwrap_or_default();
            let message = match files.is_empty() {
                true => message.clone(),
                false => format!("{}: {message}", files.join(", ")),
            };
            ("map", Some(service.clone()), message)
        }));
        errors.extend(applied.errors.iter().map(|e| ("map", None, e.clone())));

        if let (Loaded::Kubernetes(cluster, switch), true) =
            (&mut *source, work.everything || work.pods)
        {
            let decided = pod_switch::decide(&cluster.namespaces.state(), &cluster.pods.state());
            let pods: Vec<_> = decided
                .iter()
                .filter(|(_, off)| off.is_none())
                .map(|(p, _)| p.clone())
                .collect();
            match switch.sync(maps, &pods) {
                Ok(s) => {
                    if s.added + s.removed > 0 {
                        info!(
                            "pods switched on: {} (+{} -{})",
                            s.enabled, s.added, s.removed
                        );
                    }
                    self.pod_retry = match s.pending == self.pods_pending {
                        true => (self.pod_retry * 2).min(POD_RETRY_MAX),
                        false => POD_RETRY_FIRST,
                    };
                    self.pod_check =
                        (!s.pending.is_empty()).then(|| Instant::now() + self.pod_retry);
                    self.status.set_pods(&decided, &s.pending);
                    self.pods_pending = s.pending;
                }
                Err(e) => {
                    // Looked for again later, not at every turn of the loop.
                    self.pod_retry = (self.pod_retry * 2).min(POD_RETRY_MAX);
                    self.pod_check = Some(Instant::now() + self.pod_retry);
                    errors.push(("map", None, format!("switching pods: {e:#}")));
                }
            }
        }
        self.publish(programmed);
        self.status.set_programmed(programmed);
        self.status.reconciles.inc();
        self.status
            .reconcile_seconds
            .observe(start.elapsed().as_secs_f64());

        // An error is logged when it appears, not again while it stands. A full round sees
        // every error there is; a partial one those of the Services it redid, the others'
        // standing errors carry over.
        let standing = std::mem::take(&mut self.last_errors);
        let mut now: Vec<(Option<ServiceRef>, String)> = match work.everything {
            true => Vec::new(),
            false => standing
                .iter()
                .filter(|(s, _)| s.as_ref().is_none_or(|s| !work.services.contains(s)))
                .cloned()
                .collect(),
        };
        for (kind, service, message) in errors {
            let seen =
                |list: &[(Option<ServiceRef>, String)]| list.iter().any(|(_, m)| *m == message);
            if !seen(&standing) && !seen(&now) {
                error!("{message}");
                self.status.error(kind);
            }
            if !seen(&now) {
                now.push((service, message));
            }
        }
        self.last_errors = now;
    }
}
