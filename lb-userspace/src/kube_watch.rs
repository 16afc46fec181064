//! Kubernetes mode's source of truth: kube-rs reflectors (list, then watch, re-list after a
//! `410 Gone` or a dropped connection) over Services, EndpointSlices and Namespaces in the
//! whole cluster, and the Pods of this node; and this node's zone, read once at start.
//!
//! Services and slices are watched with kube-proxy's label selector: other proxies' and
//! headless Services' slices never reach the cache. After an error a watch retries within a
//! second (client-go's reflector waits up to 30 s, which left the agent on stale state for
//! 10–20 s after an API server came back); the backoff resets on the first answer.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
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
use tokio::sync::mpsc;

use crate::{
    cluster::{ClusterState, ServiceRef},
    manifest::SERVICE_NAME_LABEL,
};

/// What the agent watches: (API group, resource). Its ClusterRole grants get, list and watch
/// on exactly these, and `get` on `GOT` (deploy/rbac.yaml; a test checks they agree).
pub const WATCHED: [(&str, &str); 4] = [
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "namespaces"),
    ("", "pods"),
];
/// What the agent only reads once: its own Node, for its zone.
pub const GOT: [(&str, &str); 1] = [("", "nodes")];

/// kube-proxy's selector for Services and EndpointSlices: not another proxy's, not headless.
const PROXIED: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
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

/// Local copies of the watched objects, kept current by background tasks.
#[derive(Clone)]
pub struct KubeCluster {
    node: String,
    zone: Option<String>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pub namespaces: Store<Namespace>,
    pub pods: Store<Pod>,
}

impl KubeCluster {
    /// Starts the watches. `changed` learns what every change (and every re-list) touched,
    /// so the agent knows what to reconcile.
    pub fn start(
        client: Client,
        node: &str,
        zone: Option<String>,
        changed: mpsc::UnboundedSender<Changed>,
    ) -> KubeCluster {
        let all = watcher::Config::default;
        let pods_here = all().fields(&format!("spec.nodeName={node}"));
        KubeCluster {
            node: node.to_owned(),
            zone,
            services: reflect(
                Api::all(client.clone()),
                all().labels(PROXIED),
                changed.clone(),
                |s| Some(Changed::Service(service_ref(&s.metadata))),
            ),
            // A slice moved to another Service (Kubernetes' controllers never do that) reaches
            // the one it left at the next full resync.
            slices: reflect(
                Api::all(client.clone()),
                all().labels(PROXIED),
                changed.clone(),
                |s| {
                    let labels = s.metadata.labels.as_ref()?;
                    Some(Changed::Service(ServiceRef {
                        namespace: s.metadata.namespace.clone()?,
                        name: labels.get(SERVICE_NAME_LABEL)?.clone(),
                    }))
                },
            ),
            namespaces: reflect(Api::all(client.clone()), all(), changed.clone(), |_| {
                Some(Changed::Pods)
            }),
            pods: reflect(Api::all(client), pods_here, changed, |_| {
                Some(Changed::Pods)
            }),
        }
    }

    /// Waits until every watch has finished its first list.
    pub async fn wait_synced(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
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
            zone: self.zone.clone(),
            ..ClusterState::default()
        }
    }

    /// The part of the state `services` need: those Services and their EndpointSlices.
    pub fn state_of(&self, services: &BTreeSet<ServiceRef>) -> ClusterState {
        let slices = self.slices.state().into_iter().filter(|s| {
            let labels = s.metadata.labels.as_ref();
            labels
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|name| {
                    services.iter().any(|r| {
                        &r.name == name && Some(&r.namespace) == s.metadata.namespace.as_ref()
                    })
                })
        });
        ClusterState {
            services: services
                .iter()
                .filter_map(|r| {
                    let object = ObjectRef::new(&r.name).within(&r.namespace);
                    Some((r.clone(), self.services.get(&object)?))
                })
                .collect(),
            slices: slices.map(|s| (service_ref(&s.metadata), s)).collect(),
            node: Some(self.node.clone()),
            zone: self.zone.clone(),
            ..ClusterState::default()
        }
    }
}

/// This node's zone (None if the Node has no zone label).
pub async fn node_zone(client: Client, node: &str) -> kube::Result<Option<String>> {
    let node = Api::<Node>::all(client).get(node).await?;
    Ok(node.metadata.labels.and_then(|mut l| l.remove(ZONE_LABEL)))
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

/// A reflector for `api` running on its own task; returns its store. `touched` says what a
/// change to an object touches (None: nothing socklb uses).
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: mpsc::UnboundedSender<Changed>,
    touched: fn(&K) -> Option<Changed>,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).backoff(retry_soon());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let touched = match event {
                // The store takes a re-list in whole at its end.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(watcher::Event::InitDone) => Changed::Everything,
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => match touched(&o) {
                    Some(t) => t,
                    None => continue,
                },
                Err(e) => {
                    log::warn!("watch of {}: {e}", K::plural(&Default::default()));
                    continue;
                }
            };
            if changed.send(touched).is_err() {
                return; // the agent is gone
            }
        }
    });
    store
}
