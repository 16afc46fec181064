//! Kubernetes mode's source of truth: kube-rs reflectors (list, then watch, re-list after a
//! `410 Gone` or a dropped connection, with backoff) over Services, EndpointSlices and
//! Namespaces in the whole cluster, and the Pods of this node.

use std::{collections::BTreeSet, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
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

/// What the agent reads from the API server: (API group, resource). Its ClusterRole grants
/// get, list and watch on exactly these (deploy/rbac.yaml; a test checks they agree).
pub const WATCHED: [(&str, &str); 4] = [
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "namespaces"),
    ("", "pods"),
];

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
        changed: mpsc::UnboundedSender<Changed>,
    ) -> KubeCluster {
        let all = watcher::Config::default;
        let pods_here = all().fields(&format!("spec.nodeName={node}"));
        KubeCluster {
            node: node.to_owned(),
            services: reflect(Api::all(client.clone()), all(), changed.clone(), |s| {
                Some(Changed::Service(service_ref(&s.metadata)))
            }),
            // A slice moved to another Service (Kubernetes' controllers never do that) reaches
            // the one it left at the next full resync.
            slices: reflect(Api::all(client.clone()), all(), changed.clone(), |s| {
                let labels = s.metadata.labels.as_ref()?;
                Some(Changed::Service(ServiceRef {
                    namespace: s.metadata.namespace.clone()?,
                    name: labels.get(SERVICE_NAME_LABEL)?.clone(),
                }))
            }),
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
            ..ClusterState::default()
        }
    }
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
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
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
