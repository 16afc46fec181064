//! What the maps hold. `Programmed` is the agent's mirror of the maps it writes, changed only
//! by `apply` (one `Op`, one map write), so the indexes it keeps beside the maps stay exact:
//! the backends of each service id, the draining backends, the free ids. The planner reads
//! those instead of walking every entry, which is what makes one Service's change cost what
//! that Service has rather than what the cluster has. Also here: the conversions between the
//! cluster model (`cluster`) and the maps' types (`lb_common`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, btree_set},
    iter::{Chain, Copied},
    net::SocketAddr,
    ops::Range,
};

use lb_common::{
    Addr, Algorithm, Backend, Service, ServiceKey, ServiceName, SlotKey, backend_state,
    limits::{MAX_BACKENDS, MAX_SERVICES},
    service_flags,
};

use crate::cluster::{Desired, Frontend, FrontendKey, Protocol, ServiceRef};

/// One map write.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Boxed: a name is 144 bytes and a first sync plans hundreds of thousands of ops.
    PutName(u32, Box<ServiceName>),
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutMaglev(SlotKey, u32),
    PutService(ServiceKey, Service),
    /// Zero a reused service id's counters.
    ResetStats(u32),
    /// Zero the live count of a backend id about to be handed to a pod. The id is free: no
    /// slot points at it and no live socket holds it (`gc` only forgets a backend whose count
    /// is 0 and which no assigned socket refers to), so nothing else writes this count.
    ResetCount(u32),
    DeleteService(ServiceKey),
    DeleteSlot(SlotKey),
    DeleteMaglev(SlotKey),
    DeleteBackend(u32),
    DeleteName(u32),
}

/// A mirror of the maps socklb writes (SERVICES, SERVICE_NAMES, SLOTS, BACKENDS, MAGLEV),
/// with indexes over them. Equal when the maps are equal (the indexes follow from them).
#[derive(Clone, Debug)]
pub struct Programmed {
    services: BTreeMap<ServiceKey, Service>,
    names: BTreeMap<u32, ServiceName>,
    slots: BTreeMap<SlotKey, u32>,
    backends: BTreeMap<u32, Backend>,
    /// Maglev tables: (service id, table index) -> backend id.
    maglev: BTreeMap<SlotKey, u32>,
    index: Index,
}

#[derive(Clone, Debug, PartialEq)]
struct Index {
    /// Backend ids by their service id.
    backends_of: HashMap<u32, BTreeSet<u32>>,
    draining: BTreeSet<u32>,
    /// Frontends (service entries) by service id.
    frontends_of: HashMap<u32, BTreeSet<ServiceKey>>,
    /// Frontends whose entry asks for rebalancing.
    rebalanced: BTreeSet<ServiceKey>,
    /// How many entries of the five maps refer to each service id: an id is free when none.
    service_refs: HashMap<u32, usize>,
    free_service_ids: FreeIds,
    free_backend_ids: FreeIds,
}

impl Default for Programmed {
    fn default() -> Self {
        Programmed {
            services: BTreeMap::new(),
            names: BTreeMap::new(),
            slots: BTreeMap::new(),
            backends: BTreeMap::new(),
            maglev: BTreeMap::new(),
            index: Index {
                backends_of: HashMap::new(),
                draining: BTreeSet::new(),
                frontends_of: HashMap::new(),
                rebalanced: BTreeSet::new(),
                service_refs: HashMap::new(),
                free_service_ids: FreeIds::below(MAX_SERVICES),
                free_backend_ids: FreeIds::below(MAX_BACKENDS),
            },
        }
    }
}

impl PartialEq for Programmed {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.services,
            &self.names,
            &self.slots,
            &self.backends,
            &self.maglev,
        ) == (
            &other.services,
            &other.names,
            &other.slots,
            &other.backends,
            &other.maglev,
        )
    }
}

impl Programmed {
    /// The maps as read from the kernel (after a restart).
    pub fn adopt(
        services: impl IntoIterator<Item = (ServiceKey, Service)>,
        names: impl IntoIterator<Item = (u32, ServiceName)>,
        slots: impl IntoIterator<Item = (SlotKey, u32)>,
        backends: impl IntoIterator<Item = (u32, Backend)>,
        maglev: impl IntoIterator<Item = (SlotKey, u32)>,
    ) -> Programmed {
        let mut p = Programmed::default();
        let ops = (services.into_iter().map(|(k, s)| Op::PutService(k, s)))
            .chain(
                names
                    .into_iter()
                    .map(|(id, n)| Op::PutName(id, Box::new(n))),
            )
            .chain(slots.into_iter().map(|(k, id)| Op::PutSlot(k, id)))
            .chain(backends.into_iter().map(|(id, b)| Op::PutBackend(id, b)))
            .chain(maglev.into_iter().map(|(k, id)| Op::PutMaglev(k, id)));
        ops.for_each(|op| p.apply(&op));
        p
    }

    /// What applying `op` does to the maps.
    pub fn apply(&mut self, op: &Op) {
        let index = &mut self.index;
        match op {
            Op::PutName(id, name) => {
                if self.names.insert(*id, **name).is_none() {
                    index.refer(*id);
                }
            }
            Op::PutBackend(id, b) => {
                match self.backends.insert(*id, *b) {
                    None => {
                        index.free_backend_ids.take(*id);
                        index.add_backend(*id, b.service_id);
                    }
                    Some(old) if old.service_id != b.service_id => {
                        index.remove_backend(*id, old.service_id);
                        index.add_backend(*id, b.service_id);
                    }
                    Some(_) => {}
                }
                match b.state == backend_state::DRAINING {
                    true => index.draining.insert(*id),
                    false => index.draining.remove(id),
                };
            }
            Op::PutSlot(k, id) => {
                if self.slots.insert(*k, *id).is_none() {
                    index.refer(k.service_id);
                }
            }
            Op::PutMaglev(k, id) => {
                if self.maglev.insert(*k, *id).is_none() {
                    index.refer(k.service_id);
                }
            }
            Op::PutService(k, s) => {
                match self.services.insert(*k, *s) {
                    None => index.add_frontend(*k, s.id),
                    Some(old) if old.id != s.id => {
                        index.remove_frontend(k, old.id);
                        index.add_frontend(*k, s.id);
                    }
                    Some(_) => {}
                }
                match s.flags & service_flags::REBALANCE != 0 {
                    true => index.rebalanced.insert(*k),
                    false => index.rebalanced.remove(k),
                };
            }
            Op::ResetStats(_) | Op::ResetCount(_) => {}
            Op::DeleteService(k) => {
                if let Some(old) = self.services.remove(k) {
                    index.remove_frontend(k, old.id);
                    index.rebalanced.remove(k);
                }
            }
            Op::DeleteSlot(k) => {
                if self.slots.remove(k).is_some() {
                    index.unrefer(k.service_id);
                }
            }
            Op::DeleteMaglev(k) => {
                if self.maglev.remove(k).is_some() {
                    index.unrefer(k.service_id);
                }
            }
            Op::DeleteBackend(id) => {
                if let Some(old) = self.backends.remove(id) {
                    index.free_backend_ids.give_back(*id);
                    index.remove_backend(*id, old.service_id);
                    index.draining.remove(id);
                }
            }
            Op::DeleteName(id) => {
                if self.names.remove(id).is_some() {
                    index.unrefer(*id);
                }
            }
        }
    }

    pub fn services(&self) -> &BTreeMap<ServiceKey, Service> {
        &self.services
    }

    pub fn names(&self) -> &BTreeMap<u32, ServiceName> {
        &self.names
    }

    pub fn slots(&self) -> &BTreeMap<SlotKey, u32> {
        &self.slots
    }

    pub fn backends(&self) -> &BTreeMap<u32, Backend> {
        &self.backends
    }

    pub fn maglev(&self) -> &BTreeMap<SlotKey, u32> {
        &self.maglev
    }

    /// The backends of a service id, by id.
    pub fn backends_of(&self, service_id: u32) -> impl Iterator<Item = (u32, &Backend)> {
        let ids = self
            .index
            .backends_of
            .get(&service_id)
            .into_iter()
            .flatten();
        ids.map(|id| (*id, &self.backends[id]))
    }

    pub fn backend_count_of(&self, service_id: u32) -> usize {
        self.index
            .backends_of
            .get(&service_id)
            .map_or(0, |s| s.len())
    }

    /// The draining backends, by id.
    pub fn draining(&self) -> impl Iterator<Item = (u32, &Backend)> {
        (self.index.draining.iter()).map(|id| (*id, &self.backends[id]))
    }

    /// The frontends (service entries) with this service id.
    pub fn frontends_of(&self, service_id: u32) -> impl Iterator<Item = &ServiceKey> {
        self.index
            .frontends_of
            .get(&service_id)
            .into_iter()
            .flatten()
    }

    /// The frontends whose entry asks for rebalancing.
    pub fn rebalanced(&self) -> impl Iterator<Item = (&ServiceKey, &Service)> {
        (self.index.rebalanced.iter()).map(|k| (k, &self.services[k]))
    }

    /// Service ids no map entry refers to.
    pub fn free_service_ids(&self) -> &FreeIds {
        &self.index.free_service_ids
    }

    /// Backend ids not in BACKENDS.
    pub fn free_backend_ids(&self) -> &FreeIds {
        &self.index.free_backend_ids
    }

    /// The indexes as built from scratch from the maps: a test's check of `apply`.
    #[cfg(test)]
    pub fn check_index(&self) {
        let fresh = Programmed::adopt(
            self.services.clone(),
            self.names.clone(),
            self.slots.clone(),
            self.backends.clone(),
            self.maglev.clone(),
        );
        assert_eq!(self.index, fresh.index, "indexes kept by apply");
    }
}

impl Index {
    fn refer(&mut self, service_id: u32) {
        let n = self.service_refs.entry(service_id).or_default();
        *n += 1;
        if *n == 1 {
            self.free_service_ids.take(service_id);
        }
    }

    fn unrefer(&mut self, service_id: u32) {
        let n = self.service_refs.get_mut(&service_id).expect("referred");
        *n -= 1;
        if *n == 0 {
            self.service_refs.remove(&service_id);
            self.free_service_ids.give_back(service_id);
        }
    }

    fn add_backend(&mut self, id: u32, service_id: u32) {
        self.backends_of.entry(service_id).or_default().insert(id);
        self.refer(service_id);
    }

    fn remove_backend(&mut self, id: u32, service_id: u32) {
        if let Some(ids) = self.backends_of.get_mut(&service_id) {
            ids.remove(&id);
            if ids.is_empty() {
                self.backends_of.remove(&service_id);
            }
        }
        self.unrefer(service_id);
    }

    fn add_frontend(&mut self, key: ServiceKey, service_id: u32) {
        self.frontends_of.entry(service_id).or_default().insert(key);
        self.refer(service_id);
    }

    fn remove_frontend(&mut self, key: &ServiceKey, service_id: u32) {
        if let Some(keys) = self.frontends_of.get_mut(&service_id) {
            keys.remove(key);
            if keys.is_empty() {
                self.frontends_of.remove(&service_id);
            }
        }
        self.unrefer(service_id);
    }
}

/// The free ids below a maximum, kept as ids are taken and given back: every id from `end`
/// on is free, and `holes` are the free ones below it. Ids at or past the maximum (only a
/// damaged map could hold one) are ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct FreeIds {
    holes: BTreeSet<u32>,
    end: u32,
    max: u32,
}

/// The free ids, lowest first.
pub type Lowest<'a> = Chain<Copied<btree_set::Iter<'a, u32>>, Range<u32>>;

impl FreeIds {
    fn below(max: u32) -> FreeIds {
        FreeIds {
            holes: BTreeSet::new(),
            end: 0,
            max,
        }
    }

    fn take(&mut self, id: u32) {
        if id >= self.max {
            return;
        }
        if id >= self.end {
            self.holes.extend(self.end..id);
            self.end = id + 1;
        } else {
            self.holes.remove(&id);
        }
    }

    fn give_back(&mut self, id: u32) {
        if id >= self.end {
            return;
        }
        self.holes.insert(id);
        // `end` stays one past the highest id in use, so equal contents index equally.
        while self.end > 0 && self.holes.remove(&(self.end - 1)) {
            self.end -= 1;
        }
    }

    pub fn count(&self) -> usize {
        self.holes.len() + (self.max - self.end) as usize
    }

    pub fn lowest(&self) -> Lowest<'_> {
        self.holes.iter().copied().chain(self.end..self.max)
    }
}

pub fn map_key(key: &FrontendKey) -> ServiceKey {
    ServiceKey {
        addr: Addr::from(key.ip),
        port: key.port.to_be(),
        proto: key.protocol.number(),
        _pad: 0,
    }
}

/// The frontend a map key stands for (None for a protocol socklb never writes).
pub fn frontend_key(key: &ServiceKey) -> Option<FrontendKey> {
    Some(FrontendKey {
        ip: key.addr.ip(),
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.proto)?,
    })
}

pub fn backend_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(b.addr.ip(), u16::from_be(b.port))
}

pub fn service_name(f: &Frontend) -> ServiceName {
    let mut n = ServiceName::empty();
    copy_str(&mut n.namespace, &f.service.namespace);
    copy_str(&mut n.name, &f.service.name);
    copy_str(&mut n.port_name, &f.port_name);
    n
}

/// NUL-padded copy, truncated to leave a terminating NUL (Kubernetes names always fit).
fn copy_str(dst: &mut [u8], src: &str) {
    let n = src.len().min(dst.len() - 1);
    dst[..n].copy_from_slice(&src.as_bytes()[..n]);
}

pub fn name_str(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The algorithm stored in a service entry (unknown values read as random).
pub fn algorithm_of(s: &Service) -> Algorithm {
    Algorithm::from_u8(s.algorithm).unwrap_or(Algorithm::Random)
}

/// The frontends the maps hold, read back: after a restart this stands in for the desired
/// state of the previous run, so a Service that is in error at start keeps what it had.
pub fn programmed_frontends(p: &Programmed) -> Desired {
    let mut desired = Desired::default();
    for (key, service) in &p.services {
        let Some(key) = frontend_key(key) else {
            continue;
        };
        let name = p
            .names
            .get(&service.id)
            .copied()
            .unwrap_or(ServiceName::empty());
        let mut backends: Vec<SocketAddr> = (0..service.count)
            .filter_map(|index| {
                let id = p.slots.get(&SlotKey {
                    service_id: service.id,
                    index,
                })?;
                p.backends.get(id).map(backend_addr)
            })
            .collect();
        backends.sort();
        backends.dedup();
        let frontend = Frontend {
            key,
            service: ServiceRef {
                namespace: name_str(&name.namespace),
                name: name_str(&name.name),
            },
            port_name: name_str(&name.port_name),
            algorithm: algorithm_of(service),
            rebalance: service.flags & service_flags::REBALANCE != 0,
            rebalance_quiet_ms: service.rebalance_quiet_ms,
            affinity_timeout: service.affinity_timeout,
            slow_start_ms: service.slow_start_ms,
            backends,
        };
        desired.insert(frontend);
    }
    desired
}
