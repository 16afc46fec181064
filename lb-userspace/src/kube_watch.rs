//! Kubernetes mode's source of truth: kube-rs reflectors (list, then watch, re-list after a
//! `410 Gone` or a dropped connection, with backoff) over Services, EndpointSlices and
//! Namespaces in the whole cluster, and the Pods of this node.

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::cluster::{ClusterState, ServiceRef};

/// What the agent reads from the API server: (API group, resource). Its ClusterRole grants
/// get, list and watch on exactly these (deploy/rbac.yaml; a test checks they agree).
pub const WATCHED: [(&str, &str); 4] = [
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "namespaces"),
    ("", "pods"),
];

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
    /// Starts the watches. `changed` receives a message after every change (and after every
    /// re-list), so the agent knows when to reconcile.
    pub fn start(client: Client, node: &str, changed: mpsc::UnboundedSender<()>) -> KubeCluster {
        let pods_here = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        KubeCluster {
            node: node.to_owned(),
            services: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                changed.clone(),
            ),
            slices: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                changed.clone(),
            ),
            namespaces: reflect(
                Api::all(client.clone()),
                watcher::Config::default(),
                changed.clone(),
            ),
            pods: reflect(Api::all(client), pods_here, changed),
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
        let key = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| ServiceRef {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        };
        ClusterState {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (key(&s.metadata), Service::clone(s)))
                .collect(),
            slices: self
                .slices
                .state()
                .iter()
                .map(|s| (key(&s.metadata), EndpointSlice::clone(s)))
                .collect(),
            node: Some(self.node.clone()),
        }
    }
}

/// A reflector for `api` running on its own task; returns its store.
fn reflect<K>(api: Api<K>, config: watcher::Config, changed: mpsc::UnboundedSender<()>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if changed.send(()).is_err() {
                        return; // the agent is gone
                    }
                }
                Err(e) => log::warn!("watch of {}: {e}", K::plural(&Default::default())),
            }
        }
    });
    store
}
