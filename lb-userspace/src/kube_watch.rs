//! Kubernetes mode's source of truth: kube-rs reflectors (list, then watch, re-list after a
//! `410 Gone` or a dropped connection) over Services, EndpointSlices and Namespaces in the
//! whole cluster, and the Pods of this node; and this node's zone, read with a `get` of its
//! Node at start and every minute after.
//!
//! Services and slices are watched with kube-proxy's label selector: other proxies' and
//! headless Services' slices never reach the cache. After an error a watch retries within a
//! second, and the backoff resets on the first answer. (kube-rs's default backoff, client-go's
//! numbers, doubles from 0.8 s to 30 s and counts the `410 Gone` after a reconnect as one more
//! error: it left the agent on stale state for 10–20 s after an API server came back.)

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, PodSpec, PodStatus, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc};

use crate::{
    cluster::{ClusterState, ServiceRef},
    manifest::SERVICE_NAME_LABEL,
    pod_switch::ENABLED_LABEL,
};

/// What the agent watches: (API group, resource). Its ClusterRole grants get, list and watch
/// on exactly these, and `get` on `GOT` (deploy/rbac.yaml; a test checks they agree).
pub const WATCHED: [(&str, &str); 4] = [
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "namespaces"),
    ("", "pods"),
];
/// What the agent only gets (no list, no watch): its own Node, for its zone.
pub const GOT: [(&str, &str); 1] = [("", "nodes")];

/// kube-proxy's selector for Services and EndpointSlices: not another proxy's, not headless.
const PROXIED: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// What the first sync waits for: the zone's first read and the four watches' first lists.
const SYNCED_PARTS: u32 = 5;
/// The Node label kube-proxy reads the zone from.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What a watch event touched, so the agent redoes only that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// A re-list (or the manifest directory): recompute everything.
    Everything,
    /// A Service, or one of its EndpointSlices.
    Service(ServiceRef),
    /// A Namespace or one of this node's Pods: the per-pod switch.
    Pods,
}

/// A change, and when the watch saw it (the start of `socklb_change_seconds`).
pub type Notice = (Instant, Changed);

/// Local copies of the watched objects, kept current by background tasks, holding only the
/// fields socklb reads (`prune_*`).
#[derive(Clone)]
pub struct KubeCluster {
    node: String,
    /// This node's zone, followed by `follow_zone`.
    zone: Arc<Mutex<Option<String>>>,
    /// A permit from `follow_zone` once it first tried to read the zone, and from each watch
    /// once its first list is in its store and in what it told the agent (`SYNCED_PARTS`).
    synced: Arc<Semaphore>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// The slices of each Service, so a change to one costs what that Service has.
    slice_index: Arc<Mutex<SliceIndex>>,
    pub namespaces: Store<Namespace>,
    pub pods: Store<Pod>,
}

impl KubeCluster {
    /// Starts the watches. `changed` learns what every change (and every re-list) touched,
    /// so the agent knows what to reconcile.
    pub fn start(
        client: Client,
        node: &str,
        changed: mpsc::UnboundedSender<Notice>,
    ) -> KubeCluster {
        let all = watcher::Config::default;
        let pods_here = all().fields(&format!("spec.nodeName={node}"));
        let slice_index = Arc::new(Mutex::new(SliceIndex::default()));
        let index = Arc::clone(&slice_index);
        let zone = Arc::new(Mutex::new(None));
        let synced = Arc::new(Semaphore::new(0));
        tokio::spawn(follow_zone(
            client.clone(),
            node.to_owned(),
            Arc::clone(&zone),
            Arc::clone(&synced),
            changed.clone(),
        ));
        KubeCluster {
            node: node.to_owned(),
            zone,
            services: reflect(
                Api::all(client.clone()),
                all().labels(PROXIED),
                prune_service,
                changed.clone(),
                &synced,
                |seen| match seen {
                    Seen::Changed(s) | Seen::Deleted(s) => {
                        vec![Changed::Service(service_ref(&s.metadata))]
                    }
                    Seen::Relisted(_) => Vec::new(),
                },
            ),
            slices: reflect(
                Api::all(client.clone()),
                all().labels(PROXIED),
                prune_slice,
                changed.clone(),
                &synced,
                move |seen| {
                    let mut index = index.lock().unwrap_or_else(PoisonError::into_inner);
                    match seen {
                        Seen::Changed(s) => index.insert(s),
                        Seen::Deleted(s) => index.remove(s),
                        Seen::Relisted(slices) => {
                            *index = SliceIndex::default();
                            for s in slices {
                                index.insert(&s);
                            }
                            Vec::new()
                        }
                    }
                    .into_iter()
                    .map(Changed::Service)
                    .collect()
                },
            ),
            slice_index,
            synced: Arc::clone(&synced),
            namespaces: reflect(
                Api::all(client.clone()),
                all(),
                prune_namespace,
                changed.clone(),
                &synced,
                |_| vec![Changed::Pods],
            ),
            pods: reflect(
                Api::all(client),
                pods_here,
                prune_pod,
                changed,
                &synced,
                |_| vec![Changed::Pods],
            ),
        }
    }

    /// Waits until every watch has finished its first list and the zone was read once.
    pub async fn wait_synced(&self) {
        // Never closed; an error would only mean no wait.
        let _ = self.synced.acquire_many(SYNCED_PARTS).await;
    }

    pub fn state(&self) -> ClusterState {
        ClusterState {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (service_ref(&s.metadata), Arc::clone(s)))
                .collect(),
            slices: self
                .slices
                .state()
                .iter()
                .map(|s| (service_ref(&s.metadata), Arc::clone(s)))
                .collect(),
            node: Some(self.node.clone()),
            zone: self.zone(),
            ..ClusterState::default()
        }
    }

    /// This node's zone, as last read.
    pub fn zone(&self) -> Option<String> {
        self.zone
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The part of the state `services` need: those Services and their EndpointSlices.
    pub fn state_of(&self, services: &BTreeSet<ServiceRef>) -> ClusterState {
        let index = self
            .slice_index
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slices = services.iter().flat_map(|r| {
            let names = index.by_service.get(r).into_iter().flatten();
            names.filter_map(|name| {
                let slice = self
                    .slices
                    .get(&ObjectRef::new(name).within(&r.namespace))?;
                Some((service_ref(&slice.metadata), slice))
            })
        });
        ClusterState {
            slices: slices.collect(),
            services: services
                .iter()
                .filter_map(|r| {
                    let object = ObjectRef::new(&r.name).within(&r.namespace);
                    Some((r.clone(), self.services.get(&object)?))
                })
                .collect(),
            node: Some(self.node.clone()),
            zone: self.zone(),
            ..ClusterState::default()
        }
    }
}

/// Which EndpointSlices belong to which Service (their `kubernetes.io/service-name` label).
#[derive(Default)]
struct SliceIndex {
    by_service: HashMap<ServiceRef, BTreeSet<String>>,
    /// Each slice's Service, by the slice's namespace and name.
    owner: HashMap<ServiceRef, ServiceRef>,
}

impl SliceIndex {
    /// Records a slice as it is now; returns the Services it touched (the one it left too).
    fn insert(&mut self, slice: &EndpointSlice) -> Vec<ServiceRef> {
        let mut touched = self.remove(slice);
        let meta = &slice.metadata;
        let service = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(service), Some(name)) = (service, &meta.name) {
            let owner = ServiceRef {
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: service.clone(),
            };
            let names = self.by_service.entry(owner.clone()).or_default();
            names.insert(name.clone());
            self.owner.insert(service_ref(meta), owner.clone());
            if !touched.contains(&owner) {
                touched.push(owner);
            }
        }
        touched
    }

    /// Forgets a slice; returns the Service it belonged to.
    fn remove(&mut self, slice: &EndpointSlice) -> Vec<ServiceRef> {
        let Some(owner) = self.owner.remove(&service_ref(&slice.metadata)) else {
            return Vec::new();
        };
        if let Some(names) = self.by_service.get_mut(&owner) {
            names.remove(slice.metadata.name.as_deref().unwrap_or_default());
            if names.is_empty() {
                self.by_service.remove(&owner);
            }
        }
        vec![owner]
    }
}

/// Fields no socklb code reads, dropped before an object reaches the cache (`managedFields`
/// and `kubectl apply`'s copy of the object are often most of its size).
fn prune_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = &mut meta.annotations {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    meta.owner_references = None;
    meta.finalizers = None;
}

fn prune_service(s: &mut Service) {
    prune_meta(&mut s.metadata);
    s.status = None;
}

fn prune_slice(s: &mut EndpointSlice) {
    prune_meta(&mut s.metadata);
    for e in &mut s.endpoints {
        e.target_ref = None;
        e.deprecated_topology = None;
        e.hostname = None;
    }
}

fn prune_namespace(n: &mut Namespace) {
    prune_meta(&mut n.metadata);
    n.metadata.annotations = None;
    n.spec = None;
    n.status = None;
}

/// A Pod keeps its names, uid, socklb's annotation, `hostNetwork` and phase.
fn prune_pod(p: &mut Pod) {
    prune_meta(&mut p.metadata);
    if let Some(a) = &mut p.metadata.annotations {
        a.retain(|k, _| k == ENABLED_LABEL);
    }
    p.metadata.labels = None;
    p.spec = p.spec.take().map(|s| PodSpec {
        host_network: s.host_network,
        ..PodSpec::default()
    });
    p.status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..PodStatus::default()
    });
}

/// This node's zone (None if the Node has no zone label).
async fn node_zone(client: Client, node: &str) -> kube::Result<Option<String>> {
    let node = Api::<Node>::all(client).get(node).await?;
    Ok(node.metadata.labels.and_then(|mut l| l.remove(ZONE_LABEL)))
}

/// Keeps `zone` equal to the Node's zone label: read at start (`read` is notified after the
/// first try), then every minute (a cloud controller may label the node after the agent
/// started), sooner after a failed read. Until a read succeeds the zone is unknown and hints
/// are not used; a later change makes the agent recompute everything.
async fn follow_zone(
    client: Client,
    node: String,
    zone: Arc<Mutex<Option<String>>>,
    read: Arc<Semaphore>,
    changed: mpsc::UnboundedSender<Notice>,
) {
    let mut retry = Duration::from_secs(1);
    let mut first = true;
    loop {
        let wait = match node_zone(client.clone(), &node).await {
            Ok(now) => {
                retry = Duration::from_secs(1);
                let mut current = zone.lock().unwrap_or_else(PoisonError::into_inner);
                if *current != now {
                    log::info!(
                        "node {node} is in zone {}",
                        now.as_deref().unwrap_or("(none)")
                    );
                    *current = now;
                    drop(current);
                    // The first sync is still to come and reads it.
                    if !first && changed.send((Instant::now(), Changed::Everything)).is_err() {
                        return; // the agent is gone
                    }
                }
                Duration::from_secs(60)
            }
            Err(e) => {
                log::warn!(
                    "reading Node {node} for its zone (topology hints unused meanwhile): {e}"
                );
                retry = (retry * 2).min(Duration::from_secs(30));
                retry
            }
        };
        if first {
            first = false;
            read.add_permits(1);
        }
        tokio::time::sleep(wait).await;
    }
}

/// Retry a failed watch after 0.1, 0.2, 0.4, then every 0.5 s, each plus up to as much again
/// at random (so agents do not retry in step), until it answers; the first answer resets it.
fn retry_soon() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(500))
        .with_jitter()
        .without_max_times()
        .into()
}

/// A namespaced object's namespace and name.
fn service_ref(meta: &ObjectMeta) -> ServiceRef {
    ServiceRef {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// What a watch saw, for the callback that says what it touched.
enum Seen<'a, K> {
    Changed(&'a K),
    Deleted(&'a K),
    /// A (re-)list has replaced the store's contents with these.
    Relisted(Vec<Arc<K>>),
}

/// A reflector for `api` running on its own task, caching objects cut down by `prune`;
/// returns its store. `touched` says what a change touches (nothing: nothing socklb uses); a
/// re-list touches everything.
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    prune: fn(&mut K),
    changed: mpsc::UnboundedSender<Notice>,
    synced: &Arc<Semaphore>,
    mut touched: impl FnMut(Seen<K>) -> Vec<Changed> + Send + 'static,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let watch = watcher(api, config).modify(prune);
    let stream = reflector::reflector(writer, watch).backoff(retry_soon());
    let reader = store.clone();
    let mut synced = Some(Arc::clone(synced));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let listed = matches!(event, Ok(watcher::Event::InitDone));
            let touched = match event {
                // The store takes a re-list in whole at its end.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(watcher::Event::InitDone) => {
                    touched(Seen::Relisted(reader.state()));
                    vec![Changed::Everything]
                }
                Ok(watcher::Event::Apply(o)) => touched(Seen::Changed(&o)),
                Ok(watcher::Event::Delete(o)) => touched(Seen::Deleted(&o)),
                Err(e) => {
                    log::warn!("watch of {}: {e}", K::plural(&Default::default()));
                    continue;
                }
            };
            let seen = Instant::now();
            for t in touched {
                if changed.send((seen, t)).is_err() {
                    return; // the agent is gone
                }
            }
            // After the index and the notice: the agent's first full round, which starts once
            // every part is synced, reads all of it (and skips the notices seen before it).
            if let Some(synced) = synced.take_if(|_| listed) {
                synced.add_permits(1);
            }
        }
    });
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: &str) -> EndpointSlice {
        let mut s = EndpointSlice::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("ns".into());
        s.metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into());
        s
    }

    fn svc(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_slice_index_follows_slices_between_services() {
        let mut index = SliceIndex::default();
        assert_eq!(index.insert(&slice("web-1", "web")), [svc("web")]);
        assert_eq!(index.insert(&slice("web-2", "web")), [svc("web")]);
        assert_eq!(index.insert(&slice("web-1", "web")), [svc("web")]);
        // Relabelled: both the Service it left and the one it joined are touched.
        assert_eq!(
            index.insert(&slice("web-2", "api")),
            [svc("web"), svc("api")]
        );
        let names = |s: &str| index.by_service.get(&svc(s)).cloned().unwrap_or_default();
        assert_eq!(names("web"), BTreeSet::from(["web-1".to_owned()]));
        assert_eq!(names("api"), BTreeSet::from(["web-2".to_owned()]));
        assert_eq!(index.remove(&slice("web-1", "web")), [svc("web")]);
        assert!(!index.by_service.contains_key(&svc("web")));
        assert!(index.remove(&slice("gone", "web")).is_empty());
    }
}
