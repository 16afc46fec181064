//! The agent's HTTP endpoints: `/healthz` (the agent loop is alive), `/readyz` (the first full
//! sync is programmed), Prometheus `/metrics`, and `/pods` (this node's pods and whether each
//! is balanced, as JSON rows for `socklbctl pod list`). Connection counts and per-Service
//! counters are read from the pinned maps at scrape time, so they are exact at that moment.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use lb_common::{
    Backend, Service, ServiceKey, SlotKey, backend_state,
    limits::{MAX_BACKENDS, MAX_MAGLEV_ENTRIES, MAX_SERVICES, MAX_SLOTS},
    service_flags,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text::encode},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        gauge::Gauge, histogram::Histogram,
    },
    registry::Registry,
};

use serde_json::json;

use crate::{
    ctl::Row,
    datapath::Maps,
    pod_switch::PodRef,
    programmed::{Programmed, backend_addr, frontend_key, name_str},
};

/// Shared between the agent loop and the HTTP server.
pub struct Status {
    ready: AtomicBool,
    /// Unix seconds of the last loop turn, for /healthz.
    heartbeat: AtomicU64,
    pub reconciles: Counter,
    pub reconcile_seconds: Histogram,
    pub change_seconds: Histogram,
    pub errors: Family<Vec<(String, String)>, Counter>,
    pods_pending: Gauge,
    map_entries: Family<Vec<(String, String)>, Gauge>,
    backends: Family<Vec<(String, String)>, Gauge>,
    /// The node's pods and whether each is balanced, for `/pods` (`socklbctl pod list`).
    pods: Mutex<Vec<Row>>,
    registry: Registry,
}

/// The maps whose fill is reported, and their capacity.
const MAPS: [(&str, u32); 4] = [
    ("SERVICES", MAX_SERVICES),
    ("SLOTS", MAX_SLOTS),
    ("BACKENDS", MAX_BACKENDS),
    ("MAGLEV", MAX_MAGLEV_ENTRIES),
];

/// The agent loop counts as stuck after this long without a turn.
const STUCK: Duration = Duration::from_secs(60);

impl Status {
    /// `per_backend`: a connection-count series for every backend, not only for those of
    /// the Services that rebalance.
    pub fn new(pin_path: PathBuf, per_backend: bool) -> Arc<Status> {
        let reconciles = Counter::default();
        let reconcile_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        let change_seconds = Histogram::new([
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
        ]);
        let errors = Family::<Vec<(String, String)>, Counter>::default();
        let mut registry = Registry::with_prefix("socklb");
        registry.register("reconciles", "Reconcile rounds", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "From a change to the maps written: reading the state, planning, writing",
            reconcile_seconds.clone(),
        );
        registry.register(
            "change_seconds",
            "From a watch event (or a change in the manifest directory) to the last map write \
             of the round that took it in",
            change_seconds.clone(),
        );
        registry.register(
            "errors",
            "Errors by kind (manifest, service, map, watch)",
            errors.clone(),
        );
        let pods_pending = Gauge::default();
        registry.register(
            "pods_pending",
            "Pods to switch on whose cgroup or network namespace is not found yet",
            pods_pending.clone(),
        );
        let map_entries = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register("map_entries", "Entries in use per map", map_entries.clone());
        let capacity = Family::<Vec<(String, String)>, Gauge>::default();
        for (map, max) in MAPS {
            let labels = vec![("map".to_owned(), map.to_owned())];
            capacity.get_or_create(&labels).set(i64::from(max));
        }
        registry.register("map_capacity", "Entries each map can hold", capacity);
        let backends = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "backends",
            "Backends programmed, active or draining",
            backends.clone(),
        );
        registry.register_collector(Box::new(MapsCollector {
            pin_path,
            per_backend,
        }));
        let status = Status {
            ready: AtomicBool::new(false),
            heartbeat: AtomicU64::new(now()),
            reconciles,
            reconcile_seconds,
            change_seconds,
            errors,
            pods_pending,
            map_entries,
            backends,
            pods: Mutex::default(),
            registry,
        };
        Arc::new(status)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn beat(&self) {
        self.heartbeat.store(now(), Ordering::Relaxed);
    }

    /// Records the node's pods: switched on, waiting (to be switched on, network namespace not
    /// found yet) or off, with why; and how many wait (`pods_pending`).
    pub fn set_pods(&self, decided: &[(PodRef, Option<&str>)], pending: &[(PodRef, &str)]) {
        self.pods_pending.set(pending.len() as i64);
        let rows = decided
            .iter()
            .map(|(pod, off)| {
                let waiting = pending.iter().find(|(p, _)| p == pod).map(|(_, why)| *why);
                let (state, why) = match (off, waiting) {
                    (Some(why), _) => ("off", *why),
                    (None, Some(why)) => ("waiting", why),
                    (None, None) => ("on", ""),
                };
                Row::from_iter([
                    ("namespace".to_owned(), json!(pod.namespace)),
                    ("pod".to_owned(), json!(pod.name)),
                    ("state".to_owned(), json!(state)),
                    ("why".to_owned(), json!(why)),
                ])
            })
            .collect();
        if let Ok(mut pods) = self.pods.lock() {
            *pods = rows;
        }
    }

    /// Records the fill of the maps and the backends by state, from the agent's mirror.
    pub fn set_programmed(&self, p: &Programmed) {
        let entries = [
            p.services().len(),
            p.slots().len(),
            p.backends().len(),
            p.maglev().len(),
        ];
        for ((map, _), n) in MAPS.iter().zip(entries) {
            let labels = vec![("map".to_owned(), (*map).to_owned())];
            self.map_entries.get_or_create(&labels).set(n as i64);
        }
        let draining = p.draining().count();
        for (state, n) in [
            ("active", p.backends().len() - draining),
            ("draining", draining),
        ] {
            let labels = vec![("state".to_owned(), state.to_owned())];
            self.backends.get_or_create(&labels).set(n as i64);
        }
    }

    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Binds `addr` (so a taken port stops the agent at once) and serves the endpoints there
/// until the process ends.
pub async fn start(addr: SocketAddr, status: Arc<Status>) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/pods", get(pods))
        .with_state(status);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for health and metrics"))?;
    log::info!(
        "health and metrics on http://{}/ (healthz, readyz, metrics)",
        listener.local_addr()?
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            log::error!("health and metrics server: {e}");
        }
    });
    Ok(())
}

async fn pods(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let rows = status.pods.lock().map(|p| p.clone()).unwrap_or_default();
    (
        [("content-type", "application/json")],
        serde_json::to_string(&rows).unwrap_or_default(),
    )
}

async fn healthz(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let age = now().saturating_sub(status.heartbeat.load(Ordering::Relaxed));
    if age > STUCK.as_secs() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("agent loop silent for {age} s\n"),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

async fn readyz(State(status): State<Arc<Status>>) -> impl IntoResponse {
    if status.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "first sync not programmed yet\n",
        )
    }
}

async fn metrics(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &status.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            String::new(),
        ),
    }
}

/// Per-scrape metrics from the pinned maps (named without the prefix: the registry adds
/// "socklb_"). A scrape reads each Service's entry, name and counters, one syscall each, so
/// its cost and its series follow the Services; per-backend series only for the Services that
/// rebalance (their backends in rotation), or for every backend with `per_backend`. Map fill
/// comes from the agent's mirror (`Status::set_programmed`), not from walking the maps.
#[derive(Debug)]
struct MapsCollector {
    pin_path: PathBuf,
    per_backend: bool,
}

type Labels = Vec<(String, String)>;

impl Collector for MapsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Before the agent has pinned anything there is nothing to report.
        let Ok(maps) = Maps::open_pinned(&self.pin_path) else {
            return Ok(());
        };
        let services: Vec<(ServiceKey, Service)> =
            maps.services.iter().filter_map(Result::ok).collect();
        let service_labels = |key: &ServiceKey, id: u32| -> Labels {
            let (ns, name, port) = maps.names.get(&id, 0).map_or(Default::default(), |n| {
                (
                    name_str(&n.namespace),
                    name_str(&n.name),
                    name_str(&n.port_name),
                )
            });
            vec![
                ("service".into(), format!("{ns}/{name}")),
                ("port".into(), port),
                (
                    "frontend".into(),
                    frontend_key(key).map(|k| k.to_string()).unwrap_or_default(),
                ),
            ]
        };

        let (mut connects, mut refused, mut active) = (vec![], vec![], vec![]);
        let (mut closed, mut close_errors) = (vec![], vec![]);
        let mut connections = Vec::new();
        let mut add_backend = |l: &Labels, id: u32, b: &Backend| {
            let mut l = l.clone();
            l.push(("backend".into(), backend_addr(b).to_string()));
            let state = match b.state == backend_state::ACTIVE {
                true => "active",
                false => "draining",
            };
            l.push(("state".into(), state.into()));
            connections.push((l, maps.connections(id) as i64));
        };
        for (key, s) in &services {
            let l = service_labels(key, s.id);
            let stats = maps.stats(s.id);
            connects.push((l.clone(), stats.connects));
            refused.push((l.clone(), stats.refused));
            active.push((l.clone(), i64::from(s.count)));
            let rebalanced = s.flags & service_flags::REBALANCE != 0;
            if rebalanced {
                let r = maps.rebalance_stats(s.id);
                closed.push((l.clone(), r.closed));
                close_errors.push((l.clone(), r.errors));
            }
            if rebalanced && !self.per_backend {
                // The backends in rotation: those a connect can pick.
                for index in 0..s.count {
                    let slot = SlotKey {
                        service_id: s.id,
                        index,
                    };
                    let Ok(id) = maps.slots.get(&slot, 0) else {
                        continue;
                    };
                    if let Ok(b) = maps.backends.get(&id, 0) {
                        add_backend(&l, id, &b);
                    }
                }
            }
        }
        if self.per_backend {
            let keys: HashMap<u32, ServiceKey> = services.iter().map(|(k, s)| (s.id, *k)).collect();
            for (id, b) in maps.backends.iter().filter_map(Result::ok) {
                let l = match keys.get(&b.service_id) {
                    Some(key) => service_labels(key, b.service_id),
                    None => vec![("service_id".into(), b.service_id.to_string())],
                };
                add_backend(&l, id, &b);
            }
        }
        gauges(
            &mut encoder,
            "backend_connections",
            "Live connections per backend, counted on this node (backends in rotation of \
             Services that rebalance; every backend with --metrics-per-backend)",
            &connections,
        )?;
        let underflows: Vec<(Labels, u64)> = maps
            .underflows()
            .into_iter()
            .map(|(id, n)| (vec![("backend_id".into(), id.to_string())], n))
            .collect();
        counters(
            &mut encoder,
            "count_underflows",
            "Decrements refused because a backend's count was already zero (never expected)",
            &underflows,
        )?;
        counters(
            &mut encoder,
            "service_connects",
            "Connects (and unconnected UDP datagrams) balanced",
            &connects,
        )?;
        counters(
            &mut encoder,
            "service_refused",
            "Connects refused because the Service had no backend",
            &refused,
        )?;
        counters(
            &mut encoder,
            "rebalance_closed",
            "Connections closed by rebalancing (Services that rebalance)",
            &closed,
        )?;
        counters(
            &mut encoder,
            "rebalance_errors",
            "Rebalancing closures that failed (Services that rebalance)",
            &close_errors,
        )?;
        gauges(
            &mut encoder,
            "service_backends",
            "Backends in rotation per Service port",
            &active,
        )?;
        let enabled = maps.enabled_netns.keys().count();
        gauges(
            &mut encoder,
            "enabled_pods",
            "Pods switched on (network namespaces)",
            &[(vec![], enabled as i64)],
        )?;
        Ok(())
    }
}

fn gauges(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in values {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}
