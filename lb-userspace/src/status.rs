//! The agent's HTTP endpoints: `/healthz` (the agent loop is alive), `/readyz` (the first full
//! sync is programmed), Prometheus `/metrics`, and `/pods` (this node's pods and whether each
//! is balanced, as JSON rows for `socklbctl pod list`). Connection counts and per-Service
//! counters are read from the pinned maps at scrape time, so they are exact at that moment.

use std::{
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
    SlotKey, backend_state,
    limits::{MAX_BACKENDS, MAX_MAGLEV_ENTRIES, MAX_SERVICES, MAX_SLOTS},
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
    reconcile::{backend_addr, frontend_key, name_str},
};

/// Shared between the agent loop and the HTTP server.
pub struct Status {
    ready: AtomicBool,
    /// Unix seconds of the last loop turn, for /healthz.
    heartbeat: AtomicU64,
    pub reconciles: Counter,
    pub reconcile_seconds: Histogram,
    pub errors: Family<Vec<(String, String)>, Counter>,
    pods_pending: Gauge,
    /// The node's pods and whether each is balanced, for `/pods` (`socklbctl pod list`).
    pods: Mutex<Vec<Row>>,
    registry: Registry,
}

/// The agent loop counts as stuck after this long without a turn.
const STUCK: Duration = Duration::from_secs(60);

impl Status {
    pub fn new(pin_path: PathBuf) -> Arc<Status> {
        let reconciles = Counter::default();
        let reconcile_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        let errors = Family::<Vec<(String, String)>, Counter>::default();
        let mut registry = Registry::with_prefix("socklb");
        registry.register("reconciles", "Reconcile rounds", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "From a change to the maps written: reading the state, planning, writing",
            reconcile_seconds.clone(),
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
        registry.register_collector(Box::new(MapsCollector { pin_path }));
        let status = Status {
            ready: AtomicBool::new(false),
            heartbeat: AtomicU64::new(now()),
            reconciles,
            reconcile_seconds,
            errors,
            pods_pending,
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
/// "socklb_").
#[derive(Debug)]
struct MapsCollector {
    pin_path: PathBuf,
}

type Labels = Vec<(String, String)>;

impl Collector for MapsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Before the agent has pinned anything there is nothing to report.
        let Ok(maps) = Maps::open_pinned(&self.pin_path) else {
            return Ok(());
        };
        let Ok(p) = maps.read_programmed() else {
            return Ok(());
        };
        let service_labels = |id: u32| -> Labels {
            let (ns, name, port) = p.names.get(&id).map_or(Default::default(), |n| {
                (
                    name_str(&n.namespace),
                    name_str(&n.name),
                    name_str(&n.port_name),
                )
            });
            vec![
                ("service".into(), format!("{ns}/{name}")),
                ("port".into(), port),
            ]
        };

        let mut connections = Vec::new();
        for (id, b) in &p.backends {
            let mut l = service_labels(b.service_id);
            l.push(("backend".into(), backend_addr(b).to_string()));
            let state = if b.state == backend_state::ACTIVE {
                "active"
            } else {
                "draining"
            };
            l.push(("state".into(), state.into()));
            connections.push((l, maps.connections(*id) as i64));
        }
        gauges(
            &mut encoder,
            "backend_connections",
            "Live connections per backend, counted on this node",
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

        let (mut connects, mut refused, mut active) = (vec![], vec![], vec![]);
        let (mut closed, mut close_errors) = (vec![], vec![]);
        for (key, s) in &p.services {
            let mut l = service_labels(s.id);
            l.push((
                "frontend".into(),
                frontend_key(key).map(|k| k.to_string()).unwrap_or_default(),
            ));
            let stats = maps.stats(s.id);
            connects.push((l.clone(), stats.connects));
            refused.push((l.clone(), stats.refused));
            let rebalanced = maps.rebalance_stats(s.id);
            closed.push((l.clone(), rebalanced.closed));
            close_errors.push((l.clone(), rebalanced.errors));
            let live = (0..s.count)
                .filter(|i| {
                    p.slots.contains_key(&SlotKey {
                        service_id: s.id,
                        index: *i,
                    })
                })
                .count();
            active.push((l, live as i64));
        }
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
            "Connections closed by rebalancing",
            &closed,
        )?;
        counters(
            &mut encoder,
            "rebalance_errors",
            "Rebalancing closures that failed",
            &close_errors,
        )?;
        gauges(
            &mut encoder,
            "service_backends",
            "Backends in rotation per Service port",
            &active,
        )?;

        let enabled = maps.enabled_netns.keys().count();
        let fill = [
            ("SERVICES", p.services.len(), MAX_SERVICES),
            ("SLOTS", p.slots.len(), MAX_SLOTS),
            ("BACKENDS", p.backends.len(), MAX_BACKENDS),
            ("MAGLEV", p.maglev.len(), MAX_MAGLEV_ENTRIES),
        ];
        let entries: Vec<(Labels, i64)> = fill
            .iter()
            .map(|(m, n, _)| (vec![("map".into(), (*m).into())], *n as i64))
            .collect();
        let capacity: Vec<(Labels, i64)> = fill
            .iter()
            .map(|(m, _, c)| (vec![("map".into(), (*m).into())], i64::from(*c)))
            .collect();
        gauges(
            &mut encoder,
            "map_entries",
            "Entries in use per map",
            &entries,
        )?;
        gauges(
            &mut encoder,
            "map_capacity",
            "Entries each map can hold",
            &capacity,
        )?;
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
