//! An in-process Kubernetes API server double, because no kube-apiserver binary can run here.
//! It speaks the real HTTP list/watch protocol to kube-rs, for the resources the agent reads:
//! lists with a resourceVersion, watch streams of ADDED/MODIFIED/DELETED events as JSON lines,
//! BOOKMARK events, `410 Gone` (an ERROR event with an Expired Status) for a resourceVersion
//! older than the compacted history, `fieldSelector=spec.nodeName=` for pods, label selectors
//! (`key`, `!key`, `key=value`, `key!=value`; an object leaving the selection is a DELETED
//! event, as the real server sends), and a get of one cluster-scoped object (the Node). Tests
//! change objects, compact the history, drop every watch, or stop the server and start it
//! again on the same port (all connections cut), and the agent's production code follows.
//!
//! Served on 127.0.0.1 only, over plain HTTP; the agent reaches it through a kubeconfig.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Result, bail};
use axum::{
    Router,
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    serve::ListenerExt as _,
};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// The resources the double serves: (URL prefix, plural, list kind, kind, apiVersion).
const RESOURCES: [(&str, &str, &str, &str, &str); 5] = [
    ("/api/v1", "services", "ServiceList", "Service", "v1"),
    ("/api/v1", "nodes", "NodeList", "Node", "v1"),
    ("/api/v1", "namespaces", "NamespaceList", "Namespace", "v1"),
    ("/api/v1", "pods", "PodList", "Pod", "v1"),
    (
        "/apis/discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSliceList",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
];

#[derive(Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    what: &'static str,
    object: Value,
    /// The object before a MODIFIED event, for selectors it may have left or entered.
    old: Option<Value>,
}

/// What etcd would hold: survives restarts of the server.
#[derive(Default)]
struct Store {
    rv: u64,
    /// (kind, namespace, name) -> object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Event>,
    /// Watches from before this resourceVersion get 410 Gone.
    oldest: u64,
    next_uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    /// Wakes the watches when something changed (true) or tells them to drop (false).
    tick: broadcast::Sender<bool>,
}

pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ApiServer {
    pub fn start() -> Result<ApiServer> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                oldest: 1,
                ..Store::default()
            }),
            tick: broadcast::channel(1024).0,
        });
        let mut server = ApiServer {
            addr: "127.0.0.1:0".parse()?,
            shared,
            runtime: None,
        };
        server.serve()?;
        Ok(server)
    }

    fn serve(&mut self) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(self.addr))?;
        self.addr = listener.local_addr()?;
        // As the real API server (Go sets TCP_NODELAY): with Nagle, a watch event written in
        // two parts waits out the client's 40 ms delayed ACK.
        let listener = listener.tap_io(|tcp| drop(tcp.set_nodelay(true)));
        let app = Router::new()
            .route("/api/v1/{resource}", get(handle))
            .route("/api/v1/{resource}/{name}", get(get_one))
            .route("/apis/discovery.k8s.io/v1/{resource}", get(handle))
            .with_state(self.shared.clone());
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        self.runtime = Some(runtime);
        Ok(())
    }

    /// Stops the server, cutting every connection, and starts it again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.resume()
    }

    /// Stops the server (an outage): every connection is cut and new ones are refused.
    /// Changes can still be made; the server serves them once it resumes.
    pub fn stop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }

    /// Starts a stopped server again on the same port.
    pub fn resume(&mut self) -> Result<()> {
        // The old listening socket may take a moment to go.
        crate::wait_for(
            "the API server's port to be free",
            Duration::from_secs(5),
            || Ok(self.serve().ok()),
        )
    }

    /// Forgets the event history: a watch resuming from before now gets 410 Gone and the
    /// client has to list again.
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().unwrap();
        s.history.clear();
        s.oldest = s.rv + 1;
    }

    /// Ends every open watch stream (as a load balancer in front of the API server would).
    pub fn drop_watches(&self) {
        let _ = self.shared.tick.send(false);
    }

    /// Creates or replaces an object (any of the four kinds, as a k8s-openapi value).
    pub fn apply(&self, object: &impl serde::Serialize) -> Result<()> {
        let mut object = serde_json::to_value(object)?;
        let kind = kind_of(&object)?;
        let mut s = self.shared.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let meta = object["metadata"].as_object_mut().expect("metadata");
        let namespace = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let key = (kind, namespace, name);
        let uid = match s.objects.get(&key) {
            Some(old) => old["metadata"]["uid"].clone(),
            None => match meta.get("uid") {
                Some(uid) => uid.clone(),
                None => {
                    s.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", s.next_uid))
                }
            },
        };
        object["metadata"]["uid"] = uid;
        let old = s.objects.insert(key, object.clone());
        let what = if old.is_some() { "MODIFIED" } else { "ADDED" };
        s.history.push(Event {
            rv,
            kind,
            what,
            object,
            old,
        });
        drop(s);
        let _ = self.shared.tick.send(true);
        Ok(())
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let mut s = self.shared.store.lock().unwrap();
        let Some((key, _)) = s
            .objects
            .iter()
            .find(|((k, ns, n), _)| *k == kind && ns == namespace && n == name)
            .map(|(k, v)| (k.clone(), v.clone()))
        else {
            bail!("no {kind} {namespace}/{name}");
        };
        let mut object = s.objects.remove(&key).expect("found");
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push(Event {
            rv,
            kind: key.0,
            what: "DELETED",
            object,
            old: None,
        });
        drop(s);
        let _ = self.shared.tick.send(true);
        Ok(())
    }

    /// The uid the server gave an object.
    pub fn uid(&self, kind: &str, namespace: &str, name: &str) -> Option<String> {
        let s = self.shared.store.lock().unwrap();
        s.objects
            .iter()
            .find(|((k, ns, n), _)| *k == kind && ns == namespace && n == name)
            .and_then(|(_, v)| v["metadata"]["uid"].as_str().map(str::to_owned))
    }

    /// A kubeconfig for the agent.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: agent}}\n\
             current-context: double\n",
            self.addr
        );
        std::fs::write(path, text)?;
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Whether an object's labels satisfy a label selector (`key`, `!key`, `key=value`,
/// `key==value`, `key!=value`, comma-separated).
fn labels_match(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .all(|term| {
            let term = term.trim();
            let value = |key: &str| labels.get(key.trim()).and_then(Value::as_str);
            if let Some(key) = term.strip_prefix('!') {
                value(key).is_none()
            } else if let Some((key, v)) = term.split_once("!=") {
                value(key) != Some(v.trim())
            } else if let Some((key, v)) = term.split_once('=') {
                value(key) == Some(v.trim_start_matches('=').trim())
            } else {
                value(term).is_some()
            }
        })
}

/// A get of one cluster-scoped object (`/api/v1/nodes/NAME`).
async fn get_one(
    State(shared): State<Arc<Shared>>,
    UrlPath((resource, name)): UrlPath<(String, String)>,
) -> Response {
    let Some(&(_, _, _, kind, _)) = RESOURCES.iter().find(|r| r.1 == resource) else {
        return (StatusCode::NOT_FOUND, "no such resource").into_response();
    };
    let s = shared.store.lock().unwrap();
    match s.objects.get(&(kind, String::new(), name.clone())) {
        Some(o) => ([("content-type", "application/json")], o.to_string()).into_response(),
        None => {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{resource} {name:?} not found"), "reason": "NotFound", "code": 404});
            (
                StatusCode::NOT_FOUND,
                [("content-type", "application/json")],
                status.to_string(),
            )
                .into_response()
        }
    }
}

fn kind_of(object: &Value) -> Result<&'static str> {
    let kind = object["kind"].as_str().unwrap_or_default();
    match RESOURCES.iter().find(|r| r.3 == kind) {
        Some(r) => Ok(r.3),
        None => bail!("the double does not serve kind {kind:?}"),
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    UrlPath(resource): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(&(_, _, list_kind, kind, api_version)) = RESOURCES.iter().find(|r| r.1 == resource)
    else {
        return (StatusCode::NOT_FOUND, "no such resource").into_response();
    };
    let node = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_owned);
    let labels = query.get("labelSelector").cloned().unwrap_or_default();
    let selected = move |o: &Value| {
        node.as_deref()
            .is_none_or(|n| o["spec"]["nodeName"].as_str() == Some(n))
            && labels_match(&labels, &o["metadata"]["labels"])
    };
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        let s = shared.store.lock().unwrap();
        let items: Vec<&Value> = s
            .objects
            .iter()
            .filter(|((k, _, _), o)| *k == kind && selected(o))
            .map(|(_, o)| o)
            .collect();
        let body = json!({
            "kind": list_kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        return ([("content-type", "application/json")], body.to_string()).into_response();
    }

    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290),
    );
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut ticks = shared.tick.subscribe();
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        let expired = {
            let s = shared.store.lock().unwrap();
            from != 0 && from < s.oldest
        };
        if expired {
            let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
            let _ = tx.send(line(status)).await;
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = from;
        loop {
            let (events, rv) = {
                let s = shared.store.lock().unwrap();
                // The history is in resourceVersion order: only what is newer is read.
                let newer = s.history.partition_point(|e| e.rv <= sent);
                let events: Vec<Event> = s.history[newer..]
                    .iter()
                    .filter(|e| e.kind == kind)
                    .cloned()
                    .collect();
                (events, s.rv)
            };
            for e in events {
                sent = sent.max(e.rv);
                let was = e.old.as_ref().is_some_and(&selected);
                let (what, object) = match (was, selected(&e.object)) {
                    (false, true) if e.what == "MODIFIED" => ("ADDED", e.object),
                    // As the real server: the object as it was, at the event's version.
                    (true, false) => {
                        let mut old = e.old.expect("was selected");
                        old["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                        ("DELETED", old)
                    }
                    (_, true) => (e.what, e.object),
                    (false, false) => continue,
                };
                if tx
                    .send(line(json!({"type": what, "object": object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            sent = sent.max(rv);
            tokio::select! {
                tick = ticks.recv() => match tick {
                    Ok(true) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Ok(false) | Err(broadcast::error::RecvError::Closed) => return, // dropped
                },
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if bookmarks {
                        let b = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                            "metadata": {"resourceVersion": sent.to_string()}}});
                        if tx.send(line(b)).await.is_err() {
                            return;
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
