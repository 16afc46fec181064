//! The cluster model: Services and EndpointSlices in, the frontends socklb should program out.
//!
//! The rules are kube-proxy's, because users rely on them: a ClusterIP Service gets one
//! frontend per ClusterIP (one per IP family: `spec.clusterIPs`) and port; its backends are
//! the endpoints of that port in the EndpointSlices of the same family (`addressType`), so an
//! IPv6 ClusterIP never gets an IPv4 pod, chosen as kube-proxy chooses them (`endpoints`:
//! readiness, `internalTrafficPolicy`, topology). Headless, ExternalName and other proxies'
//! Services (`service.kubernetes.io/service-proxy-name`) are left alone.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use lb_common::{
    Algorithm,
    limits::{MAX_BACKENDS_PER_SERVICE, MAX_SLOW_START_MS},
};

use crate::{
    endpoints::{self, Here, Policy},
    manifest::SERVICE_NAME_LABEL,
};

/// Service annotation choosing the algorithm (`least-conn`, `random`, `round-robin`, `maglev`).
pub const ALGORITHM_ANNOTATION: &str = "socklb.io/algorithm";
/// Service annotation opting in to active rebalancing (`"true"`).
pub const REBALANCE_ANNOTATION: &str = "socklb.io/rebalance";
/// Service annotation: rebalancing's quiet time for the Service (`"250ms"`, `"2s"`).
pub const REBALANCE_QUIET_ANNOTATION: &str = "socklb.io/rebalance-quiet";
/// Service annotation: ports (names or numbers, comma-separated) never rebalanced, e.g. the
/// streaming ones.
pub const REBALANCE_EXCLUDE_ANNOTATION: &str = "socklb.io/rebalance-exclude-ports";
/// Service annotation: slow start window for pods that join (`"30s"`, `"500ms"`, `"2m"`).
pub const SLOW_START_ANNOTATION: &str = "socklb.io/slow-start";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10_800;
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Namespace and name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::IPPROTO_TCP => Some(Protocol::Tcp),
            lb_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A Service address as connect() sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    /// `10.96.0.10:80/TCP`, `[fd00:96::10]:80/TCP`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.ip, self.port),
            self.protocol
        )
    }
}

/// One Service port to program: where clients connect, and the pods that may take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub service: ServiceRef,
    pub port_name: String,
    pub algorithm: Algorithm,
    /// Close connections of overloaded backends so clients reconnect to light ones.
    pub rebalance: bool,
    /// Rebalancing's quiet time in ms for this Service (0: the agent's default).
    pub rebalance_quiet_ms: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds, 0 for none.
    pub affinity_timeout: u32,
    /// Slow start window for pods that join, in ms (0: none).
    pub slow_start_ms: u32,
    /// Sorted and deduplicated; all of the family of `key.ip`.
    pub backends: Vec<SocketAddr>,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Service {} port {:?} ({})",
            self.service, self.port_name, self.key
        )
    }
}

/// Everything socklb should program: frontends by address, and by Service (so that a
/// change finds a Service's frontends without walking them all).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    frontends: BTreeMap<FrontendKey, Frontend>,
    by_service: HashMap<ServiceRef, BTreeSet<FrontendKey>>,
}

impl Desired {
    pub fn frontends(&self) -> &BTreeMap<FrontendKey, Frontend> {
        &self.frontends
    }

    /// A Service's frontends.
    pub fn of_service(&self, service: &ServiceRef) -> impl Iterator<Item = &Frontend> {
        let keys = self.by_service.get(service).into_iter().flatten();
        keys.map(|k| &self.frontends[k])
    }

    pub fn insert(&mut self, f: Frontend) {
        let key = f.key;
        self.by_service
            .entry(f.service.clone())
            .or_default()
            .insert(key);
        if let Some(old) = self.frontends.insert(key, f) {
            self.unindex(&old);
        }
    }

    pub fn remove(&mut self, key: &FrontendKey) -> Option<Frontend> {
        let old = self.frontends.remove(key)?;
        self.unindex(&old);
        Some(old)
    }

    /// Drops `old` from the Service index unless its key is now another of its Service's.
    fn unindex(&mut self, old: &Frontend) {
        if self
            .frontends
            .get(&old.key)
            .is_some_and(|f| f.service == old.service)
        {
            return;
        }
        if let Some(keys) = self.by_service.get_mut(&old.service) {
            keys.remove(&old.key);
            if keys.is_empty() {
                self.by_service.remove(&old.service);
            }
        }
    }
}

impl FromIterator<Frontend> for Desired {
    fn from_iter<I: IntoIterator<Item = Frontend>>(frontends: I) -> Self {
        let mut d = Desired::default();
        frontends.into_iter().for_each(|f| d.insert(f));
        d
    }
}

/// The Services and EndpointSlices socklb knows about, from manifests or the API server.
/// Shared with the watch caches, so taking a snapshot copies no object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub services: BTreeMap<ServiceRef, Arc<Service>>,
    pub slices: BTreeMap<ServiceRef, Arc<EndpointSlice>>,
    /// The node the agent runs on, for `internalTrafficPolicy: Local` and topology (unknown in
    /// standalone mode, where Local Services use all their endpoints).
    pub node: Option<String>,
    /// That node's `topology.kubernetes.io/zone`, for topology.
    pub zone: Option<String>,
    /// The manifest file of each Service and EndpointSlice (standalone mode; empty for objects
    /// from the API server), for errors.
    pub service_files: BTreeMap<ServiceRef, String>,
    pub slice_files: BTreeMap<ServiceRef, String>,
}

impl ClusterState {
    /// The files a Service and its EndpointSlices came from (none in Kubernetes mode).
    pub fn files_of(&self, service: &ServiceRef) -> Vec<String> {
        let mut files: Vec<String> = self
            .service_files
            .get(service)
            .cloned()
            .into_iter()
            .collect();
        for (slice_ref, slice) in &self.slices {
            let labels = slice.metadata.labels.as_ref();
            let of_service = slice_ref.namespace == service.namespace
                && labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) == Some(&service.name);
            if let Some(file) = self.slice_files.get(slice_ref).filter(|_| of_service)
                && !files.contains(file)
            {
                files.push(file.clone());
            }
        }
        files
    }
}

/// A Service that could not be resolved; its previously programmed frontends stay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceError {
    pub service: ServiceRef,
    /// The manifest files of the Service and its EndpointSlices (standalone mode).
    pub files: Vec<String>,
    pub message: String,
    /// Refused an address another Service holds: it may get it once that one lets go.
    pub refused_address: bool,
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.files.is_empty() {
            write!(f, "{}: ", self.files.join(", "))?;
        }
        write!(f, "Service {}: {}", self.service, self.message)
    }
}

/// Computes the frontends to program. A Service in error keeps the frontends it had in
/// `previous`, so a bad edit never takes down what was working.
pub fn desired(
    state: &ClusterState,
    default_algorithm: Algorithm,
    previous: &Desired,
) -> (Desired, Vec<ServiceError>) {
    let resolver = Resolver::new(state, default_algorithm);
    let resolved: BTreeMap<&ServiceRef, Result<Vec<Frontend>, String>> = state
        .services
        .iter()
        .map(|(r, service)| (r, resolver.frontends(r, service)))
        .collect();
    // An address programmed for a Service stays with it while it still wants it (or is in
    // error, keeping what it had): another Service that wants the address is the one refused.
    let holders: BTreeMap<FrontendKey, &ServiceRef> = previous
        .frontends()
        .values()
        .filter(|f| match resolved.get(&f.service) {
            Some(Ok(wanted)) => wanted.iter().any(|w| w.key == f.key),
            Some(Err(_)) => true,
            None => false,
        })
        .map(|f| (f.key, &f.service))
        .collect();
    let mut out = Desired::default();
    let mut errors = Vec::new();
    for (service_ref, resolution) in resolved {
        let held_elsewhere = |frontends: Vec<Frontend>| {
            for f in &frontends {
                if let Some(holder) = holders.get(&f.key).filter(|h| **h != service_ref) {
                    return Err(format!("{} is already used by Service {holder}", f.key));
                }
            }
            Ok(frontends)
        };
        let wanted = match resolution {
            Ok(frontends) => held_elsewhere(frontends)
                .and_then(|frontends| claim(&out, frontends))
                .map_err(|message| (message, true)),
            Err(message) => Err((message, false)),
        };
        let frontends = match wanted {
            Ok(frontends) => frontends,
            Err((message, refused_address)) => {
                errors.push(ServiceError {
                    service: service_ref.clone(),
                    files: state.files_of(service_ref),
                    message,
                    refused_address,
                });
                // What it had, address by address: one taken meanwhile (an address it no
                // longer wanted) does not cost it the others.
                previous
                    .of_service(service_ref)
                    .filter(|f| !out.frontends().contains_key(&f.key))
                    .cloned()
                    .collect()
            }
        };
        for frontend in frontends {
            out.insert(frontend);
        }
    }
    (out, errors)
}

/// What `update` did.
#[derive(Debug, Default, PartialEq)]
pub struct Updated {
    /// The frontend addresses whose desired state changed.
    pub changed: BTreeSet<FrontendKey>,
    /// The Services of the change that are in error; each keeps the frontends it had.
    pub errors: Vec<ServiceError>,
}

/// Recomputes the frontends of `services` alone (after a change to them or their slices;
/// `state` needs to hold only those and their slices), keeping every other Service's. None,
/// with `desired` untouched, where the outcome depends on other Services: one of `services`
/// wants an address another Service holds, or lets go of an address while a Service in
/// `refused` (refused an address by the last full round) may want it. The caller then
/// computes everything with `desired`. A Service in error for itself keeps what it had, as in
/// `desired`, and costs the others nothing.
pub fn update(
    desired: &mut Desired,
    state: &ClusterState,
    services: &BTreeSet<ServiceRef>,
    default_algorithm: Algorithm,
    refused: &BTreeSet<ServiceRef>,
) -> Option<Updated> {
    let resolver = Resolver::new(state, default_algorithm);
    let mut new: BTreeMap<FrontendKey, Frontend> = BTreeMap::new();
    let mut errors = Vec::new();
    for service_ref in services {
        let Some(service) = state.services.get(service_ref) else {
            continue; // deleted
        };
        let frontends = match resolver.frontends(service_ref, service) {
            Ok(frontends) => frontends,
            Err(message) => {
                errors.push(ServiceError {
                    service: service_ref.clone(),
                    files: state.files_of(service_ref),
                    message,
                    refused_address: false,
                });
                desired.of_service(service_ref).cloned().collect()
            }
        };
        for f in frontends {
            let held_by_other = desired
                .frontends()
                .get(&f.key)
                .is_some_and(|o| !services.contains(&o.service));
            if held_by_other || new.contains_key(&f.key) {
                return None;
            }
            new.insert(f.key, f);
        }
    }
    let old_keys: Vec<FrontendKey> = services
        .iter()
        .flat_map(|s| desired.of_service(s))
        .map(|f| f.key)
        .collect();
    // An address let go, or passed between two of `services`: a refused Service may come
    // first for it.
    let released = old_keys.iter().any(|k| {
        let had = desired.frontends().get(k).map(|f| &f.service);
        new.get(k).map(|f| &f.service) != had
    });
    if released && refused.iter().any(|r| !services.contains(r)) {
        return None;
    }
    let old: BTreeMap<FrontendKey, Frontend> = old_keys
        .into_iter()
        .filter_map(|k| desired.remove(&k).map(|f| (k, f)))
        .collect();
    let changed = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(k) != new.get(k))
        .copied()
        .collect();
    new.into_values().for_each(|f| desired.insert(f));
    Some(Updated { changed, errors })
}

/// Resolves Services of one cluster state, each with its EndpointSlices (found by their
/// `kubernetes.io/service-name` label).
struct Resolver<'a> {
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    here: Here<'a>,
    default_algorithm: Algorithm,
}

impl<'a> Resolver<'a> {
    fn new(state: &'a ClusterState, default_algorithm: Algorithm) -> Self {
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for (slice_ref, slice) in &state.slices {
            let labels = slice.metadata.labels.as_ref();
            if let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) {
                slices
                    .entry((&slice_ref.namespace, service))
                    .or_default()
                    .push(slice);
            }
        }
        Resolver {
            slices,
            here: Here {
                node: state.node.as_deref(),
                zone: state.zone.as_deref(),
            },
            default_algorithm,
        }
    }

    fn frontends(
        &self,
        service_ref: &ServiceRef,
        service: &Service,
    ) -> Result<Vec<Frontend>, String> {
        let key = (service_ref.namespace.as_str(), service_ref.name.as_str());
        let slices = self.slices.get(&key).map_or(&[][..], Vec::as_slice);
        resolve_service(
            service_ref,
            service,
            slices,
            self.default_algorithm,
            self.here,
        )
    }
}

/// Checks that no frontend's address is already taken by another Service.
fn claim(out: &Desired, frontends: Vec<Frontend>) -> Result<Vec<Frontend>, String> {
    for frontend in &frontends {
        if let Some(owner) = out.frontends().get(&frontend.key) {
            return Err(format!(
                "{} is already used by Service {}",
                frontend.key, owner.service
            ));
        }
    }
    Ok(frontends)
}

/// The frontends of one Service, or why it cannot be programmed. Services socklb does not
/// handle (headless, ExternalName, another proxy's) resolve to no frontends.
fn resolve_service(
    service_ref: &ServiceRef,
    service: &Service,
    slices: &[&EndpointSlice],
    default_algorithm: Algorithm,
    here: Here<'_>,
) -> Result<Vec<Frontend>, String> {
    let labels = service.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(PROXY_NAME_LABEL)) {
        return Ok(Vec::new());
    }
    let Some(spec) = &service.spec else {
        return Err("missing field `spec`".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let Some(ips) = cluster_ips(spec)? else {
        return Ok(Vec::new()); // headless: DNS only
    };
    let annotation = |name| {
        service
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(name))
    };
    let algorithm = match annotation(ALGORITHM_ANNOTATION) {
        None => default_algorithm,
        Some(name) => Algorithm::from_name(name).ok_or_else(|| {
            format!(
                "annotation {ALGORITHM_ANNOTATION}: unknown algorithm {name:?} ({})",
                algorithm_names()
            )
        })?,
    };
    let rebalance = match annotation(REBALANCE_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") if algorithm == Algorithm::LeastConn => true,
        Some("true") => {
            return Err(format!(
                "annotation {REBALANCE_ANNOTATION} needs the least-conn algorithm (closed \
                 connections must reconnect to the least-loaded pods), not {}",
                algorithm.name()
            ));
        }
        Some(other) => {
            return Err(format!(
                "annotation {REBALANCE_ANNOTATION}: {other:?} is not \"true\" or \"false\""
            ));
        }
    };
    let rebalance_quiet_ms = match annotation(REBALANCE_QUIET_ANNOTATION) {
        None => 0,
        Some(text) => duration_ms(text, 60_000)
            .and_then(|ms| u16::try_from(ms).ok())
            .ok_or_else(|| {
                format!(
                    "annotation {REBALANCE_QUIET_ANNOTATION}: {text:?} is not a duration like \"250ms\" or \"2s\" (1ms to 60s)"
                )
            })?,
    };
    let slow_start_ms = match annotation(SLOW_START_ANNOTATION) {
        None => 0,
        Some(_) if algorithm != Algorithm::LeastConn => {
            return Err(format!(
                "annotation {SLOW_START_ANNOTATION} needs the least-conn algorithm (it ramps up \
                 how often a new pod takes part in least-conn's choice), not {}",
                algorithm.name()
            ));
        }
        Some(text) => duration_ms(text, MAX_SLOW_START_MS).ok_or_else(|| {
            format!(
                "annotation {SLOW_START_ANNOTATION}: {text:?} is not a duration like \"30s\", \"500ms\" or \"2m\" (1ms to 1h)"
            )
        })?,
    };
    let excluded: Vec<&str> = annotation(REBALANCE_EXCLUDE_ANNOTATION)
        .map(|a| {
            a.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => 0,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            u32::try_from(timeout)
                .ok()
                .filter(|t| (1..=86_400).contains(t))
                .ok_or_else(|| {
                    format!("sessionAffinityConfig timeoutSeconds {timeout} is not in 1..=86400")
                })?
        }
        Some(other) => return Err(format!("unknown sessionAffinity {other:?}")),
    };

    let policy = Policy {
        here,
        local: spec.internal_traffic_policy.as_deref() == Some("Local"),
    };

    let mut frontends = Vec::new();
    for ip in ips {
        for port in spec.ports.iter().flatten() {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "SCTP" => continue, // not balanced at the socket layer
                other => return Err(format!("port {}: unknown protocol {other:?}", port.port)),
            };
            let number = u16::try_from(port.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {} out of range", port.port))?;
            let port_name = port.name.clone().unwrap_or_default();
            let key = FrontendKey {
                ip,
                port: number,
                protocol,
            };
            let backends = endpoints::backends_for_port(&key, &port_name, slices, policy)?;
            if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
                return Err(format!(
                    "port {port_name:?} ({key}) has {} backends, more than the {MAX_BACKENDS_PER_SERVICE} one Service port may have",
                    backends.len()
                ));
            }
            let excluded = excluded
                .iter()
                .any(|p| *p == port_name || *p == number.to_string());
            frontends.push(Frontend {
                key,
                service: service_ref.clone(),
                port_name,
                algorithm,
                rebalance: rebalance && !excluded,
                rebalance_quiet_ms: if rebalance && !excluded {
                    rebalance_quiet_ms
                } else {
                    0
                },
                affinity_timeout,
                slow_start_ms,
                backends,
            });
        }
    }
    Ok(frontends)
}

/// The ClusterIPs to program, one per family (None for a headless Service), checked as the API
/// server checks them: `clusterIP` is `clusterIPs[0]`, at most one address per family,
/// `ipFamilies` in the same order, and as many as `ipFamilyPolicy` asks for.
fn cluster_ips(spec: &ServiceSpec) -> Result<Option<Vec<IpAddr>>, String> {
    let listed: Vec<&str> = match (&spec.cluster_ips, spec.cluster_ip.as_deref()) {
        (Some(ips), first) if !ips.is_empty() => {
            if let Some(first) = first.filter(|f| !f.is_empty())
                && first != ips[0]
            {
                return Err(format!(
                    "spec.clusterIP {first:?} is not spec.clusterIPs[0] {:?}",
                    ips[0]
                ));
            }
            ips.iter().map(String::as_str).collect()
        }
        (_, Some(ip)) if !ip.is_empty() => vec![ip],
        _ => return Err("missing field `spec.clusterIP`".into()),
    };
    if listed.contains(&"None") {
        return Ok(None);
    }
    let mut ips = Vec::new();
    for text in &listed {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| format!("spec.clusterIPs: {text:?} is not an IP address"))?;
        if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
            return Err(format!(
                "spec.clusterIPs: {text:?} is a v4-mapped IPv6 address; give the IPv4 address"
            ));
        }
        if ips.iter().any(|o: &IpAddr| o.is_ipv4() == ip.is_ipv4()) {
            return Err(format!(
                "spec.clusterIPs {listed:?}: at most one address per IP family"
            ));
        }
        ips.push(ip);
    }
    if let Some(families) = &spec.ip_families {
        let actual: Vec<&str> = ips.iter().map(|ip| family_name(*ip)).collect();
        if families
            .iter()
            .map(String::as_str)
            .ne(actual.iter().copied())
        {
            return Err(format!(
                "spec.ipFamilies {families:?} do not match spec.clusterIPs {listed:?}"
            ));
        }
    }
    match spec.ip_family_policy.as_deref() {
        None | Some("PreferDualStack") => {}
        Some("SingleStack") if ips.len() == 1 => {}
        Some("RequireDualStack") if ips.len() == 2 => {}
        Some(policy @ ("SingleStack" | "RequireDualStack")) => {
            return Err(format!(
                "spec.ipFamilyPolicy {policy} does not allow {} ClusterIP(s) {listed:?}",
                ips.len()
            ));
        }
        Some(other) => return Err(format!("unknown spec.ipFamilyPolicy {other:?}")),
    }
    Ok(Some(ips))
}

/// The Kubernetes name of an address's family (`ipFamilies`, EndpointSlice `addressType`).
pub(crate) fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// `"250ms"`, `"2s"`, `"3m"` or `"1h"` in milliseconds, if within 1 ms..=`max_ms`.
fn duration_ms(text: &str, max_ms: u32) -> Option<u32> {
    let (number, unit) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1000)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60_000)
    } else {
        (text.strip_suffix('h')?, 3_600_000)
    };
    let ms = number.trim().parse::<u32>().ok()?.checked_mul(unit)?;
    (1..=max_ms).contains(&ms).then_some(ms)
}

/// "least-conn, random, round-robin, maglev" for error messages.
pub fn algorithm_names() -> String {
    let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{self, Object};

    fn state(yaml: &str) -> ClusterState {
        let parsed = manifest::parse(std::path::Path::new("t.yaml"), yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut state = ClusterState::default();
        for object in parsed.objects {
            let id = object.id();
            let key = ServiceRef {
                namespace: id.namespace,
                name: id.name,
            };
            match object {
                Object::Service(s) => state.services.insert(key, s).is_none(),
                Object::EndpointSlice(s) => state.slices.insert(key, s).is_none(),
            };
        }
        state
    }

    fn service(name: &str, ip: &str, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns{extra}}}\nspec:\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: web}}\n  - {{name: dns, port: 53, protocol: UDP}}\n---\n"
        )
    }

    fn slice(name: &str, service: &str, endpoints: &[(&str, &str)]) -> String {
        let mut s = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n"
        );
        for (ip, conditions) in endpoints {
            s += &format!("- addresses: [{ip}]\n  conditions: {{{conditions}}}\n");
        }
        s + "---\n"
    }

    fn backends(d: &Desired, port: u16) -> Vec<String> {
        d.frontends()
            .values()
            .filter(|f| f.key.port == port)
            .flat_map(|f| f.backends.iter().map(ToString::to_string))
            .collect()
    }

    #[test]
    fn one_frontend_per_port_with_ready_endpoints_merged_across_slices() {
        let s = state(&format!(
            "{}{}{}",
            service("web", "10.96.0.10", ""),
            slice(
                "web-1",
                "web",
                &[("10.0.0.1", "ready: true"), ("10.0.0.2", "ready: false")]
            ),
            slice(
                "web-2",
                "web",
                &[("10.0.0.3", ""), ("10.0.0.1", "ready: true")]
            ),
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(d.frontends().len(), 2);
        assert_eq!(backends(&d, 80), ["10.0.0.1:8080", "10.0.0.3:8080"]);
        assert_eq!(backends(&d, 53), ["10.0.0.1:5353", "10.0.0.3:5353"]);
        let udp = d.frontends().values().find(|f| f.key.port == 53).unwrap();
        assert_eq!(udp.key.protocol, Protocol::Udp);
        assert_eq!(udp.algorithm, Algorithm::LeastConn);
    }

    #[test]
    fn update_redoes_one_service_and_defers_to_a_full_round_when_others_matter() {
        let web = |eps: &[(&str, &str)]| {
            state(&format!(
                "{}{}{}",
                service("web", "10.96.0.10", ""),
                slice("web-1", "web", eps),
                service("db", "10.96.0.11", ""),
            ))
        };
        let only_web = BTreeSet::from([ServiceRef {
            namespace: "ns".into(),
            name: "web".into(),
        }]);
        let (mut d, _) = desired(
            &web(&[("10.0.0.1", "")]),
            Algorithm::LeastConn,
            &Desired::default(),
        );
        let none = BTreeSet::new();
        let changed = update(
            &mut d,
            &web(&[("10.0.0.2", "")]),
            &only_web,
            Algorithm::LeastConn,
            &none,
        );
        // Both ports of web changed; db was not looked at.
        let changed = changed.expect("no clash");
        assert_eq!(changed.changed.len(), 2);
        assert_eq!(backends(&d, 80), ["10.0.0.2:8080"]);
        assert_eq!(d.frontends().len(), 4, "db (no endpoints: refused) kept");

        // web moving onto db's address: only a full round can tell.
        let clash = state(&service("web", "10.96.0.11", ""));
        let mut with_db = desired(&web(&[]), Algorithm::LeastConn, &Desired::default()).0;
        let before = with_db.clone();
        let up = |d: &mut Desired, s: &ClusterState, refused: &BTreeSet<ServiceRef>| {
            update(d, s, &only_web, Algorithm::LeastConn, refused)
        };
        assert_eq!(up(&mut with_db, &clash, &none), None);
        assert_eq!(with_db, before, "left as it was");
        // web in error keeps what it had, and says so.
        let bad = state(&service(
            "web",
            "10.96.0.10",
            ", annotations: {socklb.io/algorithm: nope}",
        ));
        let updated = up(&mut with_db, &bad, &none).unwrap();
        assert!(updated.changed.is_empty());
        assert!(
            updated.errors[0]
                .message
                .contains("unknown algorithm \"nope\"")
        );
        assert!(!updated.errors[0].refused_address);
        assert_eq!(with_db, before, "left as it was");
        // web leaving its address: a full round only if a Service was refused an address.
        let moved = state(&service("web", "10.96.0.12", ""));
        let refused = BTreeSet::from([ServiceRef {
            namespace: "ns".into(),
            name: "other".into(),
        }]);
        assert_eq!(up(&mut with_db.clone(), &moved, &refused), None);
        let updated = up(&mut with_db, &moved, &none).unwrap();
        assert!(updated.errors.is_empty() && updated.changed.len() == 4);
    }

    #[test]
    fn an_address_passed_between_changed_services_goes_to_a_refused_one_first() {
        let svc = |name: &str, ip: &str| service(name, ip, "");
        let x_only = state(&svc("x", "10.96.0.10"));
        let (held, _) = desired(&x_only, Algorithm::LeastConn, &Desired::default());
        let both = state(&format!(
            "{}{}",
            svc("x", "10.96.0.10"),
            svc("a", "10.96.0.10")
        ));
        let (mut d, errors) = desired(&both, Algorithm::LeastConn, &held);
        assert!(errors[0].refused_address && errors[0].service.name == "a");
        let refused = BTreeSet::from([errors[0].service.clone()]);
        // x lets go of its address and b takes it in the same batch: a comes first for it.
        let swap = state(&format!(
            "{}{}{}",
            svc("x", "10.96.0.12"),
            svc("a", "10.96.0.10"),
            svc("b", "10.96.0.10")
        ));
        let batch: BTreeSet<ServiceRef> = ["x", "b"]
            .map(|n| ServiceRef {
                namespace: "ns".into(),
                name: n.into(),
            })
            .into();
        let before = d.clone();
        assert_eq!(
            update(&mut d, &swap, &batch, Algorithm::LeastConn, &refused),
            None
        );
        assert_eq!(d, before, "left as it was for the full round");
        let (full, _) = desired(&swap, Algorithm::LeastConn, &d);
        assert!(
            full.frontends()
                .values()
                .any(|f| f.service.name == "a" && f.key.port == 80)
        );
    }

    #[test]
    fn terminating_endpoints_only_when_none_is_ready() {
        let term = "ready: false, serving: true, terminating: true";
        let s = state(&format!(
            "{}{}",
            service("web", "10.96.0.10", ""),
            slice(
                "a",
                "web",
                &[("10.0.0.1", term), ("10.0.0.2", "ready: true")]
            ),
        ));
        let (d, _) = desired(&s, Algorithm::Random, &Desired::default());
        assert_eq!(backends(&d, 80), ["10.0.0.2:8080"]);
        let s = state(&format!(
            "{}{}",
            service("web", "10.96.0.10", ""),
            slice(
                "a",
                "web",
                &[("10.0.0.1", term), ("10.0.0.2", "ready: false")]
            ),
        ));
        let (d, _) = desired(&s, Algorithm::Random, &Desired::default());
        assert_eq!(backends(&d, 80), ["10.0.0.1:8080"]);
    }

    #[test]
    fn algorithm_annotation_and_skipped_services() {
        let s = state(&format!(
            "{}{}{}",
            service(
                "a",
                "10.96.0.1",
                ", annotations: {socklb.io/algorithm: random}"
            ),
            service("headless", "None", ""),
            service(
                "other",
                "10.96.0.3",
                ", labels: {service.kubernetes.io/service-proxy-name: x}"
            ),
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(errors.is_empty());
        assert_eq!(d.frontends().len(), 2);
        assert!(
            d.frontends()
                .values()
                .all(|f| f.algorithm == Algorithm::Random)
        );
    }

    #[test]
    fn rebalance_and_session_affinity_are_read_from_the_service() {
        let s = state(&service(
            "web",
            "10.96.0.10",
            ", annotations: {socklb.io/rebalance: \"true\"}",
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert!(
            d.frontends()
                .values()
                .all(|f| f.rebalance && f.affinity_timeout == 0)
        );

        let affinity = service("web", "10.96.0.10", "").replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n",
        );
        let (d, _) = desired(&state(&affinity), Algorithm::LeastConn, &Desired::default());
        assert!(
            d.frontends().values().all(|f| f.affinity_timeout == 10_800),
            "kube-proxy's default"
        );
        let custom = affinity.replace(
            "sessionAffinity: ClientIP\n",
            "sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        );
        let (d, _) = desired(&state(&custom), Algorithm::LeastConn, &Desired::default());
        assert!(d.frontends().values().all(|f| f.affinity_timeout == 60));
    }

    #[test]
    fn internal_traffic_policy_local_keeps_to_this_node() {
        let svc = service("web", "10.96.0.10", "").replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n",
        );
        let slices = slice("a", "web", &[("10.0.0.1", ""), ("10.0.0.2", "")])
            .replace(
                "- addresses: [10.0.0.1]\n",
                "- addresses: [10.0.0.1]\n  nodeName: n1\n",
            )
            .replace(
                "- addresses: [10.0.0.2]\n",
                "- addresses: [10.0.0.2]\n  nodeName: n2\n",
            );
        let mut s = state(&format!("{svc}{slices}"));
        s.node = Some("n2".into());
        let (d, _) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert_eq!(backends(&d, 80), ["10.0.0.2:8080"]);
        s.node = Some("n3".into());
        let (d, _) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(
            backends(&d, 80).is_empty(),
            "no local endpoint: nothing, as kube-proxy drops it"
        );
    }

    #[test]
    fn rebalancing_quiet_time_and_excluded_ports_are_per_service() {
        let s = state(&service(
            "web",
            "10.96.0.10",
            ", annotations: {socklb.io/rebalance: \"true\", socklb.io/rebalance-quiet: 250ms, socklb.io/rebalance-exclude-ports: \"dns\"}",
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(errors.is_empty(), "{errors:?}");
        let http = d.frontends().values().find(|f| f.key.port == 80).unwrap();
        let dns = d.frontends().values().find(|f| f.key.port == 53).unwrap();
        assert!(http.rebalance && http.rebalance_quiet_ms == 250);
        assert!(!dns.rebalance, "excluded by name");
        for bad in ["0ms", "2 minutes", "61s", "-1s"] {
            let s = state(&service(
                "web",
                "10.96.0.10",
                &format!(
                    ", annotations: {{socklb.io/rebalance: \"true\", socklb.io/rebalance-quiet: \"{bad}\"}}"
                ),
            ));
            let (_, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
            assert!(
                errors[0].message.contains("rebalance-quiet"),
                "{bad}: {errors:?}"
            );
        }
        assert_eq!(duration_ms("2s", 60_000), Some(2000));
    }

    #[test]
    fn slow_start_takes_a_duration_and_least_conn() {
        let with = |annotations: &str| {
            let s = state(&service("web", "10.96.0.10", annotations));
            desired(&s, Algorithm::LeastConn, &Desired::default())
        };
        let (d, errors) = with(", annotations: {socklb.io/slow-start: 30s}");
        assert!(errors.is_empty(), "{errors:?}");
        assert!(d.frontends().values().all(|f| f.slow_start_ms == 30_000));
        let (d, _) = with("");
        assert!(
            d.frontends().values().all(|f| f.slow_start_ms == 0),
            "off by default"
        );
        assert_eq!(duration_ms("2m", MAX_SLOW_START_MS), Some(120_000));
        assert_eq!(duration_ms("1h", MAX_SLOW_START_MS), Some(3_600_000));
        for bad in ["0s", "61m", "2h", "soon", "-3s"] {
            let (d, errors) = with(&format!(
                ", annotations: {{socklb.io/slow-start: \"{bad}\"}}"
            ));
            assert!(d.frontends().is_empty(), "{bad}");
            assert!(
                errors[0].message.contains("slow-start"),
                "{bad}: {errors:?}"
            );
        }
        let (d, errors) =
            with(", annotations: {socklb.io/slow-start: 30s, socklb.io/algorithm: round-robin}");
        assert!(d.frontends().is_empty());
        assert!(
            errors[0].message.contains("needs the least-conn algorithm"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn rebalancing_needs_least_conn() {
        let s = state(&service(
            "web",
            "10.96.0.10",
            ", annotations: {socklb.io/rebalance: \"true\", socklb.io/algorithm: random}",
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(d.frontends().is_empty());
        assert!(
            errors[0].message.contains("needs the least-conn algorithm"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn errors_keep_the_previous_frontends() {
        let good = state(&format!(
            "{}{}",
            service("web", "10.96.0.10", ""),
            slice("a", "web", &[("10.0.0.1", "")]),
        ));
        let (before, _) = desired(&good, Algorithm::LeastConn, &Desired::default());
        for broken in [
            service(
                "web",
                "10.96.0.10",
                ", annotations: {socklb.io/algorithm: fastest}",
            ),
            service("web", "not-an-ip", ""),
        ] {
            let bad = state(&format!(
                "{broken}{}",
                slice("a", "web", &[("10.0.0.1", "")])
            ));
            let (after, errors) = desired(&bad, Algorithm::LeastConn, &before);
            assert_eq!(errors.len(), 1, "{broken}");
            assert!(errors[0].to_string().starts_with("Service ns/web: "));
            assert_eq!(after, before, "{}", errors[0]);
        }
    }

    #[test]
    fn a_slice_without_the_port_adds_nothing_to_it_and_is_no_error() {
        let other_port = slice("b", "web", &[("10.0.0.2", "")]).replace(
            "{name: http, port: 8080}, ",
            "{name: metrics, port: 9090}, ",
        );
        let s = state(&format!(
            "{}{}{other_port}",
            service("web", "10.96.0.10", ""),
            slice("a", "web", &[("10.0.0.1", "")]),
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(backends(&d, 80), ["10.0.0.1:8080"]);
        assert_eq!(backends(&d, 53), ["10.0.0.1:5353", "10.0.0.2:5353"]);
    }

    #[test]
    fn a_taken_address_is_an_error_for_the_second_service() {
        let s = state(&format!(
            "{}{}",
            service("a", "10.96.0.10", ""),
            service("b", "10.96.0.10", "")
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert_eq!(d.frontends().len(), 2);
        assert!(d.frontends().values().all(|f| f.service.name == "a"));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("Service ns/b: 10.96.0.10:"));
        assert!(errors[0].refused_address);
    }

    /// `slice()` with another address type.
    fn slice6(name: &str, service: &str, endpoints: &[(&str, &str)]) -> String {
        slice(name, service, endpoints).replace("addressType: IPv4", "addressType: IPv6")
    }

    fn dual_stack(policy: &str) -> String {
        service("web", "10.96.0.10", "").replace(
            "  clusterIP: 10.96.0.10\n",
            &format!(
                "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: {policy}\n"
            ),
        )
    }

    #[test]
    fn a_dual_stack_service_balances_each_family_over_its_own_endpoints() {
        let s = state(&format!(
            "{}{}{}",
            dual_stack("RequireDualStack"),
            slice("web-v4", "web", &[("10.0.0.1", ""), ("10.0.0.2", "")]),
            slice6(
                "web-v6",
                "web",
                &[("fd00:244::1", ""), ("fd00:244::2", "ready: false")]
            ),
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(errors.is_empty(), "{errors:?}");
        let keys: Vec<String> = d.frontends().keys().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            [
                "10.96.0.10:53/UDP",
                "10.96.0.10:80/TCP",
                "[fd00:96::10]:53/UDP",
                "[fd00:96::10]:80/TCP"
            ]
        );
        let of = |k: &str| {
            let f = d
                .frontends()
                .values()
                .find(|f| f.key.to_string() == k)
                .unwrap();
            f.backends
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(of("10.96.0.10:80/TCP"), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(of("[fd00:96::10]:80/TCP"), ["[fd00:244::1]:8080"]);

        // IPv6 only: the IPv4 slice is not used.
        let v6_only = service("web", "fd00:96::10", "")
            .replace("clusterIP: fd00:96::10", "clusterIP: \"fd00:96::10\"");
        let s = state(&format!(
            "{v6_only}{}{}",
            slice("web-v4", "web", &[("10.0.0.1", "")]),
            slice6("web-v6", "web", &[("fd00:244::1", "")]),
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(backends(&d, 80), ["[fd00:244::1]:8080"]);
    }

    #[test]
    fn cluster_ips_are_checked_as_the_api_server_does() {
        let with = |from: &str, to: &str| {
            let yaml = dual_stack("PreferDualStack").replace(from, to);
            let (d, errors) = desired(&state(&yaml), Algorithm::LeastConn, &Desired::default());
            assert!(d.frontends().is_empty(), "{yaml}");
            errors[0].message.clone()
        };
        let cases = [
            (
                "clusterIP: 10.96.0.10",
                "clusterIP: 10.96.0.11",
                "is not spec.clusterIPs[0]",
            ),
            (
                "\"fd00:96::10\"]",
                "10.96.0.12]",
                "at most one address per IP family",
            ),
            (
                "ipFamilies: [IPv4, IPv6]",
                "ipFamilies: [IPv6, IPv4]",
                "do not match",
            ),
            (
                "PreferDualStack",
                "SingleStack",
                "does not allow 2 ClusterIP(s)",
            ),
            (
                "PreferDualStack",
                "Sometimes",
                "unknown spec.ipFamilyPolicy",
            ),
            ("\"fd00:96::10\"]", "\"::ffff:10.96.0.12\"]", "v4-mapped"),
        ];
        for (from, to, want) in cases {
            let message = with(from, to);
            assert!(message.contains(want), "{to}: {message}");
        }
        let single = service("web", "10.96.0.10", "").replace(
            "  clusterIP: 10.96.0.10\n",
            "  clusterIP: 10.96.0.10\n  ipFamilyPolicy: RequireDualStack\n",
        );
        let (_, errors) = desired(&state(&single), Algorithm::LeastConn, &Desired::default());
        assert!(
            errors[0]
                .message
                .contains("RequireDualStack does not allow 1")
        );
    }

    #[test]
    fn an_endpoint_of_the_wrong_family_is_an_error_naming_the_slice() {
        for (endpoint, want) in [
            ("10.0.0.1", "is of the other IP family"),
            ("\"::ffff:10.0.0.1\"", "is a v4-mapped address"),
        ] {
            let s = state(&format!(
                "{}{}",
                dual_stack("PreferDualStack"),
                slice6("web-v6", "web", &[(endpoint, "")]),
            ));
            let (_, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
            assert!(
                errors[0]
                    .message
                    .contains("EndpointSlice web-v6 (addressType IPv6)")
                    && errors[0].message.contains(want),
                "{}",
                errors[0]
            );
        }
    }

    #[test]
    fn too_many_backends_is_an_error() {
        let many: Vec<String> = (0..=MAX_BACKENDS_PER_SERVICE)
            .map(|i| format!("10.1.{}.{}", i / 256, i % 256))
            .collect();
        let endpoints: Vec<(&str, &str)> = many.iter().map(|ip| (ip.as_str(), "")).collect();
        let s = state(&format!(
            "{}{}",
            service("web", "10.96.0.10", ""),
            slice("a", "web", &endpoints)
        ));
        let (d, errors) = desired(&s, Algorithm::LeastConn, &Desired::default());
        assert!(d.frontends().is_empty());
        assert!(
            errors[0]
                .message
                .contains("8193 backends, more than the 8192"),
            "{}",
            errors[0]
        );
    }
}
