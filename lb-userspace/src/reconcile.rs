//! The reconciler: from the desired frontends and what the maps hold now, the ordered list of
//! map operations that gets from one to the other. Pure: no I/O, so it is unit-tested on its own.
//!
//! Order matters because the BPF programs read the maps while they are being written. A connect
//! must never see a half-written Service, so for each frontend: backends first, then slots, then
//! the service entry (whose `count` makes new slots visible), and backends that left are marked
//! draining. Slots past a lowered count stay one more round: a connect that read the old count
//! a moment before may still look one up (with `random`, `round-robin` and a stale window), and
//! must find a backend rather than nothing, which would refuse it. The next round deletes them. Removing a frontend deletes its
//! service entry first. Every intermediate state only points at backends that exist. Maglev
//! tables are written like slots: after the backends, before the service entry (whose
//! `maglev_size` makes them visible), and entries past a smaller size, or a whole table the
//! Service stops using, stay a round like tail slots.
//!
//! Ids are stable: a frontend keeps its service id and a pod keeps its backend id (and so its
//! connection count) for as long as they are programmed, and a draining backend's id is only
//! reused after its last connection closed (`gc`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
};

use lb_common::{
    Addr, Algorithm, Backend, Service, ServiceKey, SlotKey, backend_state,
    limits::{MAX_BACKENDS, MAX_MAGLEV_ENTRIES, MAX_SERVICES, MAX_SLOTS},
    service_flags,
};

use crate::{
    cluster::{Desired, Frontend, FrontendKey, ServiceRef},
    maglev,
    programmed::{
        FreeIds, Lowest, Op, Programmed, backend_addr, frontend_key, map_key, service_name,
    },
};

/// The ops for one frontend (or one clean-up), applied in order; if one fails the rest of
/// its group is skipped so the old service entry stays in charge.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub what: String,
    pub ops: Vec<Op>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Frontends left as they were because a map would overflow: their Service and why.
    pub errors: Vec<(ServiceRef, String)>,
    /// Frontends whose count went down: their slots past it are deleted by the next round,
    /// which must take them in.
    pub deferred: BTreeSet<FrontendKey>,
}

/// Computes the plan. `connections(backend_id)` is the live count, used to tell when a
/// draining backend can go; `now_ns` (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`) starts the slow
/// start of the pods that join a Service.
pub fn plan(
    desired: &Desired,
    current: &Programmed,
    connections: &dyn Fn(u32) -> u64,
    now_ns: u64,
) -> Plan {
    plan_in(desired, None, current, connections, now_ns)
}

/// Like `plan`, for the frontends at `keys` only (those whose desired state changed); every
/// other frontend is taken to be programmed as desired already. Its cost follows the size of
/// the change rather than of the cluster (apart from one pass over the backends to forget
/// drained ones), which is what keeps one EndpointSlice change in a large cluster fast. The
/// agent still runs the full `plan` at start and periodically, which also repairs anything
/// left by an interrupted run.
pub fn plan_for(
    desired: &Desired,
    keys: &BTreeSet<FrontendKey>,
    current: &Programmed,
    connections: &dyn Fn(u32) -> u64,
    now_ns: u64,
) -> Plan {
    plan_in(desired, Some(keys), current, connections, now_ns)
}

fn plan_in(
    desired: &Desired,
    keys: Option<&BTreeSet<FrontendKey>>,
    current: &Programmed,
    connections: &dyn Fn(u32) -> u64,
    now_ns: u64,
) -> Plan {
    let scope = keys.map(|keys| {
        keys.iter()
            .filter_map(|k| current.services().get(&map_key(k)))
            .map(|s| s.id)
            .collect()
    });
    let mut planner = Planner::new(current, scope, now_ns);
    let mut plan = Plan::default();

    let programmed: Vec<(ServiceKey, Service)> = match keys {
        None => current.services().iter().map(|(k, s)| (*k, *s)).collect(),
        Some(keys) => keys
            .iter()
            .filter_map(|k| {
                let key = map_key(k);
                current.services().get(&key).map(|s| (key, *s))
            })
            .collect(),
    };
    for (key, service) in programmed {
        let wanted = frontend_key(&key).is_some_and(|k| desired.frontends().contains_key(&k));
        if !wanted {
            plan.changes.push(planner.remove(key, service));
        }
    }
    let frontends: Vec<&Frontend> = match keys {
        None => desired.frontends().values().collect(),
        Some(keys) => keys
            .iter()
            .filter_map(|k| desired.frontends().get(k))
            .collect(),
    };
    // Frontends already programmed first, so updates never lose capacity to new Services.
    let (existing, new): (Vec<_>, Vec<_>) = frontends
        .into_iter()
        .partition(|f| current.services().contains_key(&map_key(&f.key)));
    for frontend in existing.into_iter().chain(new) {
        match planner.upsert(frontend) {
            Ok(Some(change)) => plan.changes.push(change),
            Ok(None) => {}
            Err(e) => {
                planner.keep(frontend);
                plan.errors.push((
                    frontend.service.clone(),
                    format!("{frontend}: {e}; left as it was"),
                ));
            }
        }
    }
    if let Some(change) = planner.repair() {
        plan.changes.push(change);
    }
    if let Some(change) = gc(current, &planner, connections) {
        plan.changes.push(change);
    }
    plan.deferred = planner.deferred;
    plan
}

/// Tracks ids and map fill while the plan is built.
struct Planner<'a> {
    current: &'a Programmed,
    /// The service ids of the programmed frontends the plan covers; None for all.
    scope: Option<BTreeSet<u32>>,
    /// Slots per service id in scope, by index (`u32::MAX` where a slot is missing),
    /// including any past the service's count left by an interrupted run.
    slots: HashMap<u32, Vec<u32>>,
    /// (service id, pod) -> backend id, for the service ids in scope.
    backend_ids: HashMap<(u32, SocketAddr), u32>,
    service_ids: IdAllocator<'a>,
    backend_ids_free: IdAllocator<'a>,
    /// Service ids of removed frontends (their slots are deleted by the removal).
    removed_service_ids: HashSet<u32>,
    /// Frontends whose slots past a lowered count are left for the next round.
    deferred: BTreeSet<FrontendKey>,
    /// Service ids of the desired frontends.
    wanted_service_ids: HashSet<u32>,
    /// Backend ids the desired frontends use.
    wanted_backends: HashSet<u32>,
    services: usize,
    slot_count: usize,
    maglev_count: usize,
    now_ns: u64,
}

/// The Maglev entries of one service id, by table index.
fn maglev_entries(current: &Programmed, service_id: u32) -> BTreeMap<u32, u32> {
    service_range(current.maglev(), service_id)
        .map(|(k, id)| (k.index, *id))
        .collect()
}

/// The entries of one service id in a map keyed by `SlotKey`.
fn service_range(
    map: &BTreeMap<SlotKey, u32>,
    service_id: u32,
) -> impl Iterator<Item = (&SlotKey, &u32)> {
    map.range(
        slot(service_id, 0)..=SlotKey {
            service_id,
            index: u32::MAX,
        },
    )
}

impl<'a> Planner<'a> {
    fn new(current: &'a Programmed, scope: Option<BTreeSet<u32>>, now_ns: u64) -> Self {
        let mut slots: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut add_slot = |k: &SlotKey, id: u32| {
            let v = slots.entry(k.service_id).or_default();
            let i = k.index as usize;
            if v.len() <= i {
                v.resize(i + 1, u32::MAX);
            }
            v[i] = id;
        };
        match &scope {
            None => current.slots().iter().for_each(|(k, id)| add_slot(k, *id)),
            Some(ids) => ids
                .iter()
                .flat_map(|id| service_range(current.slots(), *id))
                .for_each(|(k, id)| add_slot(k, *id)),
        }
        let backend_ids = backends_in(current, scope.as_ref())
            .map(|(id, b)| ((b.service_id, backend_addr(b)), id))
            .collect();
        Planner {
            current,
            slots,
            backend_ids,
            service_ids: IdAllocator::new(current.free_service_ids()),
            backend_ids_free: IdAllocator::new(current.free_backend_ids()),
            removed_service_ids: HashSet::new(),
            deferred: BTreeSet::new(),
            wanted_service_ids: HashSet::new(),
            wanted_backends: HashSet::new(),
            scope,
            services: current.services().len(),
            slot_count: current.slots().len(),
            maglev_count: current.maglev().len(),
            now_ns,
        }
    }

    /// A frontend left as it was: its backends stay in use.
    fn keep(&mut self, f: &Frontend) {
        if let Some(service) = self.current.services().get(&map_key(&f.key)) {
            self.wanted_service_ids.insert(service.id);
            let slots = self.slots.get(&service.id).into_iter().flatten();
            self.wanted_backends
                .extend(slots.filter(|id| **id != u32::MAX));
        }
    }

    fn remove(&mut self, key: ServiceKey, service: Service) -> Change {
        let mut ops = vec![Op::DeleteService(key)];
        let old = self.slots.remove(&service.id).unwrap_or_default();
        for (index, _) in old.iter().enumerate().filter(|(_, id)| **id != u32::MAX) {
            ops.push(Op::DeleteSlot(slot(service.id, index)));
            self.slot_count -= 1;
        }
        for index in maglev_entries(self.current, service.id).keys() {
            ops.push(Op::DeleteMaglev(slot(service.id, *index as usize)));
            self.maglev_count -= 1;
        }
        self.services -= 1;
        self.removed_service_ids.insert(service.id);
        let what = frontend_key(&key).map_or_else(|| format!("{key:?}"), |k| k.to_string());
        Change {
            what: format!("remove {what}"),
            ops,
        }
    }

    fn upsert(&mut self, f: &Frontend) -> Result<Option<Change>, String> {
        let key = map_key(&f.key);
        let existing = self.current.services().get(&key).copied();
        if existing.is_none() && self.services >= MAX_SERVICES as usize {
            return Err(format!("map SERVICES is full ({MAX_SERVICES} entries)"));
        }
        let old = existing
            .and_then(|s| self.slots.get(&s.id))
            .cloned()
            .unwrap_or_default();
        let old_count = existing.map_or(0, |s| s.count as usize).min(old.len());
        let old_present = old.iter().filter(|id| **id != u32::MAX).count();
        // Slots a connect may still see (below the old count) past the new count: kept a round.
        let tail = |index: usize, id: u32| {
            index >= f.backends.len() && index < old_count && id != u32::MAX
        };
        let kept = old
            .iter()
            .enumerate()
            .filter(|(i, id)| tail(*i, **id))
            .count();
        let slot_total = self.slot_count - old_present + f.backends.len() + kept;
        if slot_total > MAX_SLOTS as usize {
            return Err(format!("map SLOTS is full ({MAX_SLOTS} entries)"));
        }
        let fresh = f
            .backends
            .iter()
            .filter(|addr| existing.is_none_or(|s| !self.backend_ids.contains_key(&(s.id, **addr))))
            .count();
        if fresh > self.backend_ids_free.free() {
            return Err(format!("map BACKENDS is full ({MAX_BACKENDS} entries)"));
        }
        if existing.is_none() && self.service_ids.free() == 0 {
            return Err(format!("no free service id (all {MAX_SERVICES} in use)"));
        }
        let old_maglev = existing
            .map(|s| maglev_entries(self.current, s.id))
            .unwrap_or_default();
        let uses_maglev = f.algorithm == Algorithm::Maglev && !f.backends.is_empty();
        // The table size a connect may have read, and the new one. Entries in between stay a
        // round, like tail slots: a connect that read the old size may still look one up.
        let old_size = existing.map_or(0, |s| s.maglev_size);
        let maglev_size = match uses_maglev {
            true => maglev::table_size(f.backends.len(), old_size),
            false => 0,
        };
        let maglev_tail = |index: u32| index >= maglev_size && index < old_size;
        let maglev_kept = old_maglev.keys().filter(|i| maglev_tail(**i)).count();
        let maglev_total =
            self.maglev_count - old_maglev.len() + maglev_size as usize + maglev_kept;
        if maglev_total > MAX_MAGLEV_ENTRIES as usize {
            return Err(format!(
                "map MAGLEV is full ({MAX_MAGLEV_ENTRIES} entries; this Service port's table \
                 needs {maglev_size})"
            ));
        }

        // Nothing can fail from here on.
        let service_id = match existing {
            Some(s) => s.id,
            None => self.service_ids.take(),
        };
        // A pod that joins a Service already in service starts its slow start now; the pods a
        // Service starts with have nothing to ramp up against.
        let since_ns = match f.slow_start_ms != 0 && old_count > 0 {
            true => self.now_ns,
            false => 0,
        };
        // A pod already known to this frontend keeps its backend id, and so its count.
        let mut backend_ops = Vec::new();
        let mut ids = Vec::with_capacity(f.backends.len());
        for addr in &f.backends {
            let id = match self.backend_ids.get(&(service_id, *addr)) {
                Some(&id) => {
                    let known = self.current.backends().get(&id);
                    if known.is_none_or(|b| b.state != backend_state::ACTIVE) {
                        let b = backend(*addr, service_id, since_ns);
                        backend_ops.push(Op::PutBackend(id, b));
                    }
                    id
                }
                None => {
                    let id = self.backend_ids_free.take();
                    backend_ops.push(Op::ResetCount(id));
                    backend_ops.push(Op::PutBackend(id, backend(*addr, service_id, since_ns)));
                    id
                }
            };
            ids.push(id);
        }
        let mut new_slots = assign_slots(&old[..old_count], &ids);
        let mut ops = Vec::new();
        let name = service_name(f);
        if self.current.names().get(&service_id) != Some(&name) {
            ops.push(Op::PutName(service_id, Box::new(name)));
        }
        if existing.is_none() {
            ops.push(Op::ResetStats(service_id));
        }
        ops.extend(backend_ops);
        for (index, id) in new_slots.iter().enumerate() {
            if old.get(index) != Some(id) {
                ops.push(Op::PutSlot(slot(service_id, index), *id));
            }
        }
        if uses_maglev {
            // The table is computed from the addresses in `f.backends` order (sorted), so
            // every node writes the same table.
            for (index, owner) in maglev::table(&f.backends, maglev_size).iter().enumerate() {
                let id = ids[*owner as usize];
                if old_maglev.get(&(index as u32)) != Some(&id) {
                    ops.push(Op::PutMaglev(slot(service_id, index), id));
                }
            }
        }
        let entry = Service {
            id: service_id,
            count: new_slots.len() as u32,
            algorithm: f.algorithm as u8,
            flags: if f.rebalance {
                service_flags::REBALANCE
            } else {
                0
            },
            rebalance_quiet_ms: f.rebalance_quiet_ms,
            affinity_timeout: f.affinity_timeout,
            maglev_size,
            slow_start_ms: f.slow_start_ms,
        };
        if existing != Some(entry) {
            ops.push(Op::PutService(key, entry));
        }
        let count = new_slots.len();
        for (index, id) in old.iter().enumerate().skip(count) {
            if tail(index, *id) {
                new_slots.push(*id);
            } else {
                new_slots.push(u32::MAX);
                if *id != u32::MAX {
                    ops.push(Op::DeleteSlot(slot(service_id, index)));
                }
            }
        }
        for index in old_maglev.keys().filter(|i| **i >= maglev_size) {
            if !maglev_tail(*index) {
                ops.push(Op::DeleteMaglev(slot(service_id, *index as usize)));
            }
        }
        if kept > 0 || maglev_kept > 0 {
            self.deferred.insert(f.key);
        }

        self.wanted_service_ids.insert(service_id);
        self.wanted_backends.extend(&ids);
        self.services += usize::from(existing.is_none());
        self.slot_count = slot_total;
        self.maglev_count = maglev_total;
        for (addr, id) in f.backends.iter().zip(&ids) {
            self.backend_ids.insert((service_id, *addr), *id);
        }
        self.slots.insert(service_id, new_slots);
        Ok((!ops.is_empty()).then(|| Change {
            what: f.to_string(),
            ops,
        }))
    }

    /// Marks backends no desired frontend uses as draining and, in a full plan, deletes slots
    /// and table entries that belong to no frontend (left over by an interrupted run).
    fn repair(&self) -> Option<Change> {
        let mut ops: Vec<Op> = Vec::new();
        if self.scope.is_none() {
            let orphan = |k: &&SlotKey| {
                !self.wanted_service_ids.contains(&k.service_id)
                    && !self.removed_service_ids.contains(&k.service_id)
            };
            ops.extend(
                (self.current.slots().keys())
                    .filter(orphan)
                    .map(|k| Op::DeleteSlot(*k)),
            );
            ops.extend(
                (self.current.maglev().keys())
                    .filter(orphan)
                    .map(|k| Op::DeleteMaglev(*k)),
            );
        }
        for (id, b) in backends_in(self.current, self.scope.as_ref()) {
            if b.state == backend_state::ACTIVE && !self.wanted_backends.contains(&id) {
                let draining = Backend {
                    state: backend_state::DRAINING,
                    ..*b
                };
                ops.push(Op::PutBackend(id, draining));
            }
        }
        (!ops.is_empty()).then(|| Change {
            what: "drain backends that left their Service".into(),
            ops,
        })
    }
}

/// The backends of the service ids in `scope` (all for None).
fn backends_in<'a>(
    current: &'a Programmed,
    scope: Option<&'a BTreeSet<u32>>,
) -> Box<dyn Iterator<Item = (u32, &'a Backend)> + 'a> {
    match scope {
        None => Box::new(current.backends().iter().map(|(id, b)| (*id, b))),
        Some(ids) => Box::new(ids.iter().flat_map(|id| current.backends_of(*id))),
    }
}

/// Hands out the lowest free ids, in increasing order.
struct IdAllocator<'a> {
    ids: Lowest<'a>,
    free: usize,
}

impl<'a> IdAllocator<'a> {
    fn new(free: &'a FreeIds) -> Self {
        IdAllocator {
            ids: free.lowest(),
            free: free.count(),
        }
    }

    fn free(&self) -> usize {
        self.free
    }

    /// The lowest free id. Callers check `free()` first.
    fn take(&mut self) -> u32 {
        self.free -= 1;
        self.ids.next().expect("checked by free()")
    }
}

/// Deletes draining backends whose last connection has closed, and the names of service ids
/// nothing refers to any more. A backend goes only if it was already draining and out of every
/// slot before this plan: a connect racing with the slot rewrite that took it out may still
/// look it up, and if that rewrite failed part-way a slot may still point at it.
fn gc(
    current: &Programmed,
    planner: &Planner<'_>,
    connections: &dyn Fn(u32) -> u64,
) -> Option<Change> {
    // A backend is only ever in the slots and table of its own service id: the ids the
    // Services with draining backends still refer to, each range read once (a Maglev table
    // has up to 131,071 entries).
    let draining_services: BTreeSet<u32> = current.draining().map(|(_, b)| b.service_id).collect();
    let referenced: HashSet<u32> = draining_services
        .iter()
        .flat_map(|s| service_range(current.slots(), *s).chain(service_range(current.maglev(), *s)))
        .map(|(_, id)| *id)
        .collect();
    let mut ops = Vec::new();
    // Backends forgotten, by service id.
    let mut forgotten: BTreeMap<u32, usize> = BTreeMap::new();
    for (id, b) in current.draining() {
        let unused = !planner.wanted_backends.contains(&id) && !referenced.contains(&id);
        if unused && connections(id) == 0 {
            ops.push(Op::DeleteBackend(id));
            *forgotten.entry(b.service_id).or_default() += 1;
        }
    }
    // A name goes with the last frontend and backend of its service id. A partial plan looks
    // at the ids it removed or forgot backends of; a full one at every name, so it also
    // clears names an interrupted run left behind.
    let live = |id: u32| {
        planner.wanted_service_ids.contains(&id)
            || (current.frontends_of(id).next().is_some()
                && !planner.removed_service_ids.contains(&id))
    };
    let candidates: BTreeSet<u32> = match planner.scope {
        None => current.names().keys().copied().collect(),
        Some(_) => (planner.removed_service_ids.iter().chain(forgotten.keys()))
            .copied()
            .filter(|id| current.names().contains_key(id))
            .collect(),
    };
    ops.extend(
        (candidates.into_iter())
            .filter(|id| !live(*id))
            .filter(|id| current.backend_count_of(*id) == forgotten.get(id).copied().unwrap_or(0))
            .map(Op::DeleteName),
    );
    (!ops.is_empty()).then(|| Change {
        what: "forget drained backends".into(),
        ops,
    })
}

/// New slot contents: backends that stay keep their slot where they can, newcomers fill the
/// holes. Keeps the number of slot writes (and the churn seen by concurrent connects) small.
fn assign_slots(old: &[u32], wanted: &[u32]) -> Vec<u32> {
    let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
    let mut placed = BTreeSet::new();
    let mut slots: Vec<Option<u32>> = vec![None; wanted.len()];
    for (index, id) in old.iter().enumerate().take(wanted.len()) {
        if wanted_set.contains(id) && placed.insert(*id) {
            slots[index] = Some(*id);
        }
    }
    let mut rest = wanted.iter().filter(|id| !placed.contains(*id));
    slots
        .into_iter()
        .map(|s| {
            s.or_else(|| rest.next().copied())
                .expect("as many ids as slots")
        })
        .collect()
}

fn backend(addr: SocketAddr, service_id: u32, since_ns: u64) -> Backend {
    Backend {
        addr: Addr::from(addr.ip()),
        port: addr.port().to_be(),
        state: backend_state::ACTIVE,
        _pad: 0,
        service_id,
        since_ns,
    }
}

fn slot(service_id: u32, index: usize) -> SlotKey {
    SlotKey {
        service_id,
        index: index as u32,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::{
        cluster::{Protocol, ServiceRef},
        programmed::programmed_frontends,
        writer::{self, MapWriter},
    };

    /// The clock the tests plan at.
    const NOW: u64 = 1_000_000_000;

    fn frontend(vip: u8, backends: &[u8]) -> Frontend {
        let mut backends: Vec<SocketAddr> = backends
            .iter()
            .map(|b| SocketAddr::from((Ipv4Addr::new(10, 244, 0, *b), 8080)))
            .collect();
        backends.sort();
        backends.dedup();
        Frontend {
            key: FrontendKey {
                ip: Ipv4Addr::new(10, 96, 0, vip).into(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            service: ServiceRef {
                namespace: "ns".into(),
                name: format!("svc{vip}"),
            },
            port_name: "http".into(),
            algorithm: Algorithm::LeastConn,
            rebalance: false,
            rebalance_quiet_ms: 0,
            affinity_timeout: 0,
            slow_start_ms: 0,
            backends,
        }
    }

    fn desired(frontends: impl IntoIterator<Item = Frontend>) -> Desired {
        frontends.into_iter().collect()
    }

    /// Every slot (and Maglev entry) a connect can see points at a backend of the same
    /// service.
    fn check_visible(p: &Programmed) {
        for (key, s) in p.services() {
            if s.algorithm == Algorithm::Maglev as u8 && s.count > 0 {
                assert!(s.maglev_size > 0, "{key:?}: maglev without a table");
                for index in 0..s.maglev_size {
                    let id = p.maglev().get(&SlotKey {
                        service_id: s.id,
                        index,
                    });
                    let b = id.and_then(|id| p.backends().get(id));
                    assert!(
                        b.is_some_and(|b| b.service_id == s.id),
                        "{key:?} maglev {index} -> {id:?}"
                    );
                }
            }
            for index in 0..s.count {
                let id = p.slots().get(&SlotKey {
                    service_id: s.id,
                    index,
                });
                let b = id.and_then(|id| p.backends().get(id));
                assert!(
                    b.is_some_and(|b| b.service_id == s.id),
                    "{key:?} slot {index} -> {id:?} is not a backend of service {}",
                    s.id
                );
            }
        }
    }

    /// What a concurrent connect could see right after `op`: checks only what `op` can have
    /// changed, so big Maglev tables stay cheap to check op by op.
    fn check_after(p: &Programmed, op: &Op) {
        let visible = |k: &SlotKey, maglev: bool| {
            p.services().values().any(|s| {
                s.id == k.service_id
                    && s.count > 0
                    && if maglev {
                        k.index < s.maglev_size
                    } else {
                        k.index < s.count
                    }
            })
        };
        let backend_of = |k: &SlotKey, id: &u32| {
            p.backends()
                .get(id)
                .is_some_and(|b| b.service_id == k.service_id)
        };
        match op {
            Op::PutService(..) | Op::DeleteService(..) => check_visible(p),
            Op::PutSlot(k, id) | Op::PutMaglev(k, id) => {
                assert!(backend_of(k, id), "{op:?} points nowhere")
            }
            Op::ResetCount(id) => assert!(
                !p.backends().contains_key(id)
                    && !p
                        .slots()
                        .values()
                        .chain(p.maglev().values())
                        .any(|b| b == id),
                "{op:?} on an id in use"
            ),
            Op::DeleteSlot(k) => assert!(!visible(k, false), "{op:?} while visible"),
            Op::DeleteMaglev(k) => assert!(!visible(k, true), "{op:?} while visible"),
            Op::DeleteBackend(id) => {
                let used = p
                    .slots()
                    .iter()
                    .chain(p.maglev())
                    .any(|(k, v)| v == id && visible(k, p.maglev().contains_key(k)));
                assert!(!used, "{op:?} still in use");
            }
            _ => {}
        }
    }

    /// Applies op by op, checking what a concurrent connect could see after each; also that
    /// no slot or Maglev entry a connect could still look up with the count and table size
    /// it read before the plan (the second field) is deleted while its service is programmed.
    struct Checked<'a>(&'a mut Programmed, BTreeMap<u32, (u32, u32)>);
    impl MapWriter for Checked<'_> {
        fn write(&mut self, op: &Op) -> anyhow::Result<()> {
            self.0.apply(op);
            check_after(self.0, op);
            let (k, which) = match op {
                Op::DeleteSlot(k) => (k, 0),
                Op::DeleteMaglev(k) => (k, 1),
                _ => return Ok(()),
            };
            let programmed = self.0.services().values().any(|s| s.id == k.service_id);
            let before = self.1.get(&k.service_id).map_or(0, |b| [b.0, b.1][which]);
            assert!(
                !programmed || k.index >= before,
                "{op:?} below the count or size {before} a connect may have read"
            );
            Ok(())
        }
    }

    fn step(d: &Desired, p: &mut Programmed, conns: &dyn Fn(u32) -> u64) -> Plan {
        apply_checked(super::plan(d, p, conns, NOW), p)
    }

    /// Applies `plan` op by op, checking after each op that no slot points nowhere.
    fn apply_checked(plan: Plan, p: &mut Programmed) -> Plan {
        let mut mirror = p.clone();
        let counts = p
            .services()
            .values()
            .map(|s| (s.id, (s.count, s.maglev_size)))
            .collect();
        let applied = writer::apply(&plan, &mut Checked(p, counts), &mut mirror);
        assert!(applied.errors.is_empty());
        assert_eq!(&mirror, p);
        p.check_index();
        plan
    }

    /// `step` without the per-op check, for the map-size tests.
    fn fill(d: &Desired, p: &mut Programmed) {
        let plan = super::plan(d, p, &none, NOW);
        assert!(plan.errors.is_empty());
        let mut mirror = p.clone();
        assert!(writer::apply(&plan, p, &mut mirror).errors.is_empty());
    }

    /// `p` programs `d`; slots past a service's count (left for the next round after a scale
    /// down) point at backends of that service.
    fn assert_programs(d: &Desired, p: &Programmed) {
        assert_eq!(&programmed_frontends(p), d);
        let mut visible = BTreeSet::new();
        for (key, s) in p.services() {
            for index in 0..s.count {
                assert!(
                    p.slots().contains_key(&slot(s.id, index as usize)),
                    "{key:?} {index}"
                );
            }
            for (k, id) in service_range(p.slots(), s.id) {
                match k.index < s.count {
                    true => drop(visible.insert(*id)),
                    false => assert_eq!(p.backends()[id].service_id, s.id, "{key:?}: tail {k:?}"),
                }
            }
        }
        // A table that is no longer used may stay a round (a connect may have read it).
        let maglev_services: BTreeSet<u32> = p.maglev().keys().map(|k| k.service_id).collect();
        for s in p.services().values() {
            let wants = s.algorithm == Algorithm::Maglev as u8 && s.count > 0;
            assert!(
                !wants || maglev_services.contains(&s.id),
                "maglev table of service {}",
                s.id
            );
        }
        for (id, b) in p.backends() {
            assert_eq!(
                b.state == backend_state::ACTIVE,
                visible.contains(id),
                "backend {id}"
            );
        }
    }

    fn ops(plan: &Plan) -> Vec<&Op> {
        plan.changes.iter().flat_map(|c| &c.ops).collect()
    }

    fn none(_: u32) -> u64 {
        0
    }

    #[test]
    fn a_new_service_is_written_backends_first_and_entry_last() {
        let mut p = Programmed::default();
        let d = desired([frontend(1, &[1, 2, 3])]);
        let plan = step(&d, &mut p, &none);
        let kinds: Vec<&str> = ops(&plan)
            .iter()
            .map(|op| match op {
                Op::PutName(..) => "name",
                Op::ResetStats(..) => "stats",
                Op::ResetCount(..) => "count",
                Op::PutBackend(..) => "backend",
                Op::PutSlot(..) => "slot",
                Op::PutService(..) => "service",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "name", "stats", "count", "backend", "count", "backend", "count", "backend",
                "slot", "slot", "slot", "service"
            ]
        );
        assert_programs(&d, &p);
        assert!(
            super::plan(&d, &p, &none, NOW).changes.is_empty(),
            "a second plan has nothing to do"
        );
    }

    #[test]
    fn ipv6_and_dual_stack_frontends_are_programmed_like_ipv4_ones() {
        let mut p = Programmed::default();
        let v6 = |f: &mut Frontend, b: &[u16]| {
            f.key.ip = "fd00:96::1".parse().unwrap();
            f.backends = b
                .iter()
                .map(|i| SocketAddr::from((Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, *i), 8080)))
                .collect();
        };
        let mut six = frontend(1, &[]);
        v6(&mut six, &[1, 2]);
        let d = desired([frontend(1, &[1, 2, 3]), six.clone()]);
        step(&d, &mut p, &none);
        assert_programs(&d, &p);
        let keys: Vec<String> = p
            .services()
            .keys()
            .filter_map(|k| frontend_key(k).map(|k| k.to_string()))
            .collect();
        assert_eq!(keys, ["10.96.0.1:80/TCP", "[fd00:96::1]:80/TCP"]);
        // The IPv4 frontend's key and backends are v4-mapped, as connect6 sees `::ffff:VIP`.
        let v4_key = p
            .services()
            .keys()
            .find(|k| k.addr.as_v4().is_some())
            .unwrap();
        assert_eq!(v4_key.addr.ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(
            p.backends()
                .values()
                .filter(|b| b.addr.as_v4().is_some())
                .count(),
            3
        );
        // Scaling the IPv6 side drains only IPv6 backends.
        v6(&mut six, &[2]);
        let d = desired([frontend(1, &[1, 2, 3]), six]);
        step(&d, &mut p, &|_| 1);
        assert_programs(&d, &p);
        let draining: Vec<String> = p
            .backends()
            .values()
            .filter(|b| b.state == backend_state::DRAINING)
            .map(|b| backend_addr(b).to_string())
            .collect();
        assert_eq!(draining, ["[fd00:244::1]:8080"]);
    }

    #[test]
    fn pods_that_join_a_slow_started_service_start_their_ramp_when_planned() {
        let slow = |backends: &[u8]| Frontend {
            slow_start_ms: 30_000,
            ..frontend(1, backends)
        };
        let since = |p: &Programmed| -> BTreeMap<String, u64> {
            p.backends()
                .values()
                .filter(|b| b.state == backend_state::ACTIVE)
                .map(|b| (backend_addr(b).to_string(), b.since_ns))
                .collect()
        };
        let mut p = Programmed::default();
        step(&desired([slow(&[1, 2])]), &mut p, &none);
        assert!(
            since(&p).values().all(|s| *s == 0),
            "the first pods: no ramp"
        );
        step(&desired([slow(&[1, 2, 3])]), &mut p, &none);
        assert_eq!(since(&p)["10.244.0.3:8080"], NOW, "a pod that joins ramps");
        assert_eq!(since(&p)["10.244.0.1:8080"], 0, "the others keep theirs");
        // A pod that left and comes back (not ready for a while) ramps again.
        step(&desired([slow(&[2, 3])]), &mut p, &|_| 1);
        let plan = apply_checked(
            super::plan(&desired([slow(&[1, 2, 3])]), &p, &none, NOW + 7),
            &mut p,
        );
        assert!(!plan.changes.is_empty());
        assert_eq!(since(&p)["10.244.0.1:8080"], NOW + 7);
        assert_eq!(since(&p)["10.244.0.3:8080"], NOW, "kept while it stays");
        // Without the annotation nobody ramps.
        let mut p = Programmed::default();
        step(&desired([frontend(1, &[1])]), &mut p, &none);
        step(&desired([frontend(1, &[1, 2])]), &mut p, &none);
        assert!(since(&p).values().all(|s| *s == 0));
    }

    #[test]
    fn scale_up_keeps_slots_and_ids_of_the_pods_already_there() {
        let mut p = Programmed::default();
        step(&desired([frontend(1, &[1, 2, 3])]), &mut p, &none);
        let before = p.backends().clone();
        let d = desired([frontend(1, &[1, 2, 3, 4, 5, 6])]);
        let plan = step(&d, &mut p, &none);
        let slot_writes: Vec<u32> = ops(&plan)
            .iter()
            .filter_map(|op| match op {
                Op::PutSlot(k, _) => Some(k.index),
                _ => None,
            })
            .collect();
        assert_eq!(slot_writes, [3, 4, 5]);
        for (id, b) in &before {
            assert_eq!(p.backends().get(id), Some(b));
        }
        assert_programs(&d, &p);
    }

    #[test]
    fn a_removed_pod_drains_and_is_forgotten_after_its_last_connection() {
        let mut p = Programmed::default();
        step(&desired([frontend(1, &[1, 2, 3])]), &mut p, &none);
        let gone = *p
            .backends()
            .iter()
            .find(|(_, b)| backend_addr(b).ip() == Ipv4Addr::new(10, 244, 0, 1))
            .unwrap()
            .0;
        let d = desired([frontend(1, &[2, 3])]);
        let plan = step(&d, &mut p, &|_| 1);
        // The last slot moves into the hole and the count drops; the tail slot stays for a
        // connect that read the old count, and the next round deletes it.
        assert!(
            ops(&plan)
                .iter()
                .all(|op| !matches!(op, Op::DeleteSlot(..)))
        );
        assert_eq!(plan.deferred, BTreeSet::from([frontend(1, &[]).key]));
        assert_eq!(p.backends()[&gone].state, backend_state::DRAINING);
        assert_programs(&d, &p);
        let tail = slot(p.services().values().next().unwrap().id, 2);
        assert!(p.slots().contains_key(&tail));
        let held = |id| u64::from(id == gone);
        let plan = apply_checked(plan_for(&d, &plan.deferred, &p, &held, NOW), &mut p);
        assert_eq!(ops(&plan), [&Op::DeleteSlot(tail)]);
        assert!(plan.deferred.is_empty());

        // Still one connection: kept. Last one closed: forgotten.
        assert!(
            step(&d, &mut p, &|id| u64::from(id == gone))
                .changes
                .is_empty()
        );
        let plan = step(&d, &mut p, &none);
        assert_eq!(ops(&plan), [&Op::DeleteBackend(gone)]);
        assert!(!p.backends().contains_key(&gone));
    }

    #[test]
    fn a_pod_that_comes_back_keeps_its_id_and_so_its_count() {
        let mut p = Programmed::default();
        step(&desired([frontend(1, &[1, 2])]), &mut p, &none);
        let ids: BTreeMap<SocketAddr, u32> = p
            .backends()
            .iter()
            .map(|(id, b)| (backend_addr(b), *id))
            .collect();
        step(&desired([frontend(1, &[2])]), &mut p, &|_| 3);
        let d = desired([frontend(1, &[1, 2])]);
        step(&d, &mut p, &|_| 3);
        let again: BTreeMap<SocketAddr, u32> = p
            .backends()
            .iter()
            .map(|(id, b)| (backend_addr(b), *id))
            .collect();
        assert_eq!(ids, again);
        assert_programs(&d, &p);
    }

    #[test]
    fn removing_a_service_deletes_its_entry_before_its_slots() {
        let mut p = Programmed::default();
        step(
            &desired([frontend(1, &[1]), frontend(2, &[1, 2])]),
            &mut p,
            &none,
        );
        let d = desired([frontend(1, &[1])]);
        let plan = step(&d, &mut p, &none);
        assert!(matches!(plan.changes[0].ops[0], Op::DeleteService(_)));
        assert_programs(&d, &p);
        // Its backends drain, then go, then its name.
        step(&d, &mut p, &none);
        step(&d, &mut p, &none);
        assert_eq!(p.names().len(), 1);
        assert_eq!(p.backends().len(), 1);
    }

    fn with(mut f: Frontend, algorithm: Algorithm) -> Frontend {
        f.algorithm = algorithm;
        f
    }

    #[test]
    fn maglev_tables_come_with_the_backends_and_go_with_the_algorithm() {
        let mut p = Programmed::default();
        let d = desired([with(frontend(1, &[1, 2, 3]), Algorithm::Maglev)]);
        let plan = step(&d, &mut p, &none);
        let o = ops(&plan);
        let last_table = o
            .iter()
            .rposition(|op| matches!(op, Op::PutMaglev(..)))
            .unwrap();
        let service = o
            .iter()
            .position(|op| matches!(op, Op::PutService(..)))
            .unwrap();
        assert!(last_table < service, "table before the entry that uses it");
        assert_eq!(p.maglev().len(), 4_093);
        assert_programs(&d, &p);

        // One more backend rewrites only the entries it takes over: about 1/4 of them.
        let d = desired([with(frontend(1, &[1, 2, 3, 4]), Algorithm::Maglev)]);
        let plan = step(&d, &mut p, &none);
        let rewritten = ops(&plan)
            .iter()
            .filter(|op| matches!(op, Op::PutMaglev(..)))
            .count();
        let share = rewritten as f64 / 4_093.0;
        assert!((0.2..0.3).contains(&share), "{rewritten} entries rewritten");
        assert_programs(&d, &p);

        // 41 backends need a table four times as large: written in place, the entry last.
        let many: Vec<u8> = (1..=41).collect();
        let d = desired([with(frontend(1, &many), Algorithm::Maglev)]);
        step(&d, &mut p, &none);
        assert_eq!(p.maglev().len(), 16_381);
        assert_programs(&d, &p);
        // Back to 4: the entries past 4,093 stay a round (a connect may have read the size),
        // then go.
        let d = desired([with(frontend(1, &[1, 2, 3, 4]), Algorithm::Maglev)]);
        let plan = step(&d, &mut p, &none);
        assert_eq!(p.maglev().len(), 16_381);
        assert!(!plan.deferred.is_empty());
        let plan = apply_checked(plan_for(&d, &plan.deferred, &p, &none, NOW), &mut p);
        assert!(plan.deferred.is_empty());
        assert_eq!(p.maglev().len(), 4_093);
        assert_programs(&d, &p);

        // Back to least-conn: the table goes a round after the entry stops using it.
        let d = desired([frontend(1, &[1, 2, 3, 4])]);
        let plan = step(&d, &mut p, &none);
        assert_eq!(
            p.maglev().len(),
            4_093,
            "kept for connects that read maglev"
        );
        apply_checked(plan_for(&d, &plan.deferred, &p, &none, NOW), &mut p);
        assert!(p.maglev().is_empty());
        assert_programs(&d, &p);
    }

    #[test]
    fn a_full_map_refuses_new_services_and_keeps_the_others() {
        let mut p = Programmed::default();
        let many = |n: u32| {
            (0..n).map(|i| {
                let mut f = frontend(0, &[]);
                f.key.ip = Ipv4Addr::from(0x0a60_0000 + i).into();
                f
            })
        };
        fill(&desired(many(MAX_SERVICES)), &mut p);
        let before = p.clone();
        let plan = super::plan(&desired(many(MAX_SERVICES + 1)), &p, &none, NOW);
        assert!(plan.changes.is_empty());
        assert_eq!(plan.errors.len(), 1);
        assert!(
            plan.errors[0]
                .1
                .contains("map SERVICES is full (65536 entries)"),
            "{}",
            plan.errors[0].1
        );
        assert!(
            plan.errors[0]
                .1
                .starts_with("Service ns/svc0 port \"http\" (10.97.0.0:80/TCP)")
        );
        assert_eq!(p, before);
    }

    #[test]
    fn too_many_slots_overall_is_refused_for_the_newcomer_only() {
        let mut p = Programmed::default();
        let per_service = lb_common::limits::MAX_BACKENDS_PER_SERVICE as usize;
        let big = |vip: u8| {
            let mut f = frontend(vip, &[]);
            f.backends = (0..per_service as u32)
                .map(|i| SocketAddr::from((Ipv4Addr::from(0x0af4_0000 + i), 8080)))
                .collect();
            f
        };
        let full: Vec<Frontend> = (0..(MAX_SLOTS as usize / per_service) as u8)
            .map(big)
            .collect();
        fill(&desired(full.clone()), &mut p);
        assert_eq!(p.slots().len(), MAX_SLOTS as usize);
        let mut more = full;
        more.push(frontend(250, &[1]));
        let plan = super::plan(&desired(more), &p, &none, NOW);
        assert!(plan.changes.is_empty());
        assert!(
            plan.errors[0].1.contains("map SLOTS is full"),
            "{:?}",
            plan.errors
        );
    }

    /// A writer that fails after a number of successful writes.
    struct FailAfter(usize, Programmed);
    impl MapWriter for FailAfter {
        fn write(&mut self, op: &Op) -> anyhow::Result<()> {
            if self.0 == 0 {
                anyhow::bail!("E2BIG");
            }
            self.0 -= 1;
            self.1.apply(op);
            check_after(&self.1, op);
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_leaves_the_old_entry_in_charge_and_the_next_plan_finishes() {
        let mut p = Programmed::default();
        step(&desired([frontend(1, &[1, 2, 3])]), &mut p, &none);
        let d = desired([frontend(1, &[4, 5, 6])]);
        let the_plan = super::plan(&d, &p, &none, NOW);
        for fail_at in 0..ops(&the_plan).len() {
            let mut mirror = p.clone();
            let mut maps = FailAfter(fail_at, p.clone());
            let applied = writer::apply(&the_plan, &mut maps, &mut mirror);
            assert!(applied.errors[0].contains("E2BIG"));
            assert_eq!(mirror, maps.1);
            // Retrying from what was written converges (the drained pods go in a later round).
            for _ in 0..3 {
                step(&d, &mut mirror, &none);
            }
            assert_programs(&d, &mirror);
        }
    }

    #[test]
    fn stray_slots_and_backends_from_an_interrupted_run_are_repaired() {
        let mut p = Programmed::default();
        let d = desired([frontend(1, &[1, 2])]);
        step(&d, &mut p, &none);
        let stray = SocketAddr::from((Ipv4Addr::new(10, 244, 0, 9), 80));
        for op in [
            Op::PutSlot(slot(9, 0), 0),
            Op::PutSlot(slot(0, 7), 0),
            Op::PutBackend(42, backend(stray, 9, 0)),
        ] {
            p.apply(&op);
        }
        step(&d, &mut p, &none);
        step(&d, &mut p, &none);
        assert_programs(&d, &p);
        assert!(!p.backends().contains_key(&42));
    }

    proptest! {
        // Each case writes and checks Maglev tables op by op; fewer cases keep this quick.
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// After any sequence of desired states, with connections open or not, the maps end
        /// up holding exactly the desired state, and no write along the way lets a connect
        /// see a slot that points nowhere.
        #[test]
        fn maps_converge_to_any_sequence_of_desired_states(
            states in prop::collection::vec(
                prop::collection::btree_map(
                    1u8..6,
                    (prop::collection::vec(1u8..12, 0..8), 0usize..Algorithm::ALL.len()),
                    0..5,
                ),
                1..8,
            ),
            busy in prop::collection::btree_set(0u32..40, 0..10),
        ) {
            let mut p = Programmed::default();
            for state in states {
                let d = desired(state.iter().map(|(vip, (backends, algorithm))| {
                    with(frontend(*vip, backends), Algorithm::ALL[*algorithm])
                }));
                step(&d, &mut p, &|id| u64::from(busy.contains(&id)));
                assert_programs(&d, &p);
                // Once every connection closed, drained backends and unused names go.
                step(&d, &mut p, &none);
                step(&d, &mut p, &none);
                assert_programs(&d, &p);
                prop_assert_eq!(p.backends().len(), p.slots().len());
                prop_assert_eq!(p.names().len(), p.services().len());
                let tables: u32 = p.services().values().map(|s| s.maglev_size).sum();
                prop_assert_eq!(p.maglev().len(), tables as usize, "no table left behind");
            }
        }
    }

    /// An endpoint's (ready, serving, terminating), each possibly unset.
    type Conditions = (Option<bool>, Option<bool>, Option<bool>);

    /// A change to the cluster, as the watches or the manifest directory deliver them.
    #[derive(Clone, Debug)]
    enum Event {
        /// Service `svc{n}` at 10.96.1.`ip` (another's address sometimes) with `ports` ports
        /// (80 + `first`, then up), TCP or UDP; `bad`: an unknown algorithm, so in error.
        Service {
            n: u8,
            ip: u8,
            first: u8,
            ports: u8,
            udp: bool,
            algorithm: usize,
            bad: bool,
        },
        DeleteService(u8),
        /// EndpointSlice `svc{n}-{k}` listing the ports p0..p2 whose bit is set in `ports`
        /// (a slice may lack a Service's port), with endpoints (pod, ready, serving,
        /// terminating), each condition possibly unset.
        Slice {
            n: u8,
            k: u8,
            ports: u8,
            endpoints: Vec<(u8, Conditions)>,
        },
        DeleteSlice {
            n: u8,
            k: u8,
        },
    }

    fn apply_event(state: &mut crate::cluster::ClusterState, e: &Event) {
        use k8s_openapi::api::{
            core::v1::{Service as K8sService, ServicePort, ServiceSpec},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        };
        let key = |name: String| ServiceRef {
            namespace: "ns".into(),
            name,
        };
        match e {
            Event::Service {
                n,
                ip,
                first,
                ports,
                udp,
                algorithm,
                bad,
            } => {
                let mut s = K8sService::default();
                s.metadata.name = Some(format!("svc{n}"));
                s.metadata.namespace = Some("ns".into());
                s.metadata.annotations = Some(
                    [(
                        "socklb.io/algorithm".to_owned(),
                        match bad {
                            true => "fastest".to_owned(),
                            false => Algorithm::ALL[*algorithm].name().to_owned(),
                        },
                    )]
                    .into(),
                );
                s.spec = Some(ServiceSpec {
                    cluster_ip: Some(format!("10.96.1.{ip}")),
                    ports: Some(
                        (0..*ports)
                            .map(|p| ServicePort {
                                name: Some(format!("p{p}")),
                                port: 80 + i32::from(*first + p),
                                protocol: Some(if *udp { "UDP" } else { "TCP" }.into()),
                                ..ServicePort::default()
                            })
                            .collect(),
                    ),
                    ..ServiceSpec::default()
                });
                state.services.insert(key(format!("svc{n}")), s.into());
            }
            Event::DeleteService(n) => drop(state.services.remove(&key(format!("svc{n}")))),
            Event::Slice {
                n,
                k,
                ports,
                endpoints,
            } => {
                let mut slice = EndpointSlice {
                    address_type: "IPv4".into(),
                    ports: Some(
                        (0..3u8)
                            .filter(|p| ports & (1 << p) != 0)
                            .flat_map(|p| {
                                ["TCP", "UDP"].map(|proto| EndpointPort {
                                    name: Some(format!("p{p}")),
                                    port: Some(8080 + i32::from(p)),
                                    protocol: Some(proto.into()),
                                    ..EndpointPort::default()
                                })
                            })
                            .collect(),
                    ),
                    endpoints: endpoints
                        .iter()
                        .map(|(pod, (ready, serving, terminating))| Endpoint {
                            addresses: vec![format!("10.244.{n}.{pod}")],
                            conditions: Some(EndpointConditions {
                                ready: *ready,
                                serving: *serving,
                                terminating: *terminating,
                            }),
                            ..Endpoint::default()
                        })
                        .collect(),
                    ..EndpointSlice::default()
                };
                slice.metadata.name = Some(format!("svc{n}-{k}"));
                slice.metadata.namespace = Some("ns".into());
                slice.metadata.labels = Some(
                    [(
                        crate::manifest::SERVICE_NAME_LABEL.to_owned(),
                        format!("svc{n}"),
                    )]
                    .into(),
                );
                state
                    .slices
                    .insert(key(format!("svc{n}-{k}")), slice.into());
            }
            Event::DeleteSlice { n, k } => drop(state.slices.remove(&key(format!("svc{n}-{k}")))),
        }
    }

    /// The Service an event is about.
    fn service_of(e: &Event) -> ServiceRef {
        let n = match e {
            Event::Service { n, .. }
            | Event::DeleteService(n)
            | Event::Slice { n, .. }
            | Event::DeleteSlice { n, .. } => n,
        };
        ServiceRef {
            namespace: "ns".into(),
            name: format!("svc{n}"),
        }
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (
                1u8..5,
                prop_oneof![4 => Just(None), 1 => (1u8..5).prop_map(Some)],
                0u8..2,
                1u8..3,
                any::<bool>(),
                0..Algorithm::ALL.len(),
                prop::bool::weighted(0.15),
            )
                .prop_map(|(n, ip, first, ports, udp, algorithm, bad)| {
                    Event::Service {
                        n,
                        ip: ip.unwrap_or(n),
                        first,
                        ports,
                        udp,
                        algorithm,
                        bad,
                    }
                }),
            (1u8..5).prop_map(Event::DeleteService),
            (
                1u8..5,
                0u8..2,
                prop_oneof![3 => Just(7u8), 1 => 0u8..8],
                prop::collection::vec((1u8..8, any::<Conditions>()), 0..6)
            )
                .prop_map(|(n, k, ports, endpoints)| Event::Slice {
                    n,
                    k,
                    ports,
                    endpoints
                }),
            (1u8..5, 0u8..2).prop_map(|(n, k)| Event::DeleteSlice { n, k }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// After any sequence of cluster events, each reconciled with connections open or not,
        /// the maps hold exactly the desired state computed from the cluster, and no write on
        /// the way let a connect see a slot or table entry pointing nowhere.
        #[test]
        fn maps_follow_any_sequence_of_cluster_events(
            events in prop::collection::vec(event(), 1..25),
            busy in prop::collection::btree_set(0u32..40, 0..10),
        ) {
            let mut state = crate::cluster::ClusterState::default();
            let mut p = Programmed::default();
            let mut previous = Desired::default();
            for e in &events {
                apply_event(&mut state, e);
                let (d, _) = crate::cluster::desired(&state, Algorithm::LeastConn, &previous);
                step(&d, &mut p, &|id| u64::from(busy.contains(&id)));
                assert_programs(&d, &p);
                previous = d;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The agent's path for a batch of changes (`cluster::update` over the Services they
        /// touched, then `plan_for` over the frontends that changed; a full round where that
        /// cannot tell) programs exactly what recomputing everything does: the same desired
        /// state and the same maps, ids included, through Services in error and Services
        /// wanting each other's addresses.
        #[test]
        fn the_changed_services_alone_program_what_a_full_reconcile_does(
            batches in prop::collection::vec(prop::collection::vec(event(), 1..4), 1..20),
            busy in prop::collection::btree_set(0u32..40, 0..10),
        ) {
            let conns = |id| u64::from(busy.contains(&id));
            let mut state = crate::cluster::ClusterState::default();
            let (mut full, mut fast) = (Programmed::default(), Programmed::default());
            let (mut full_desired, mut fast_desired) = (Desired::default(), Desired::default());
            let mut deferred = BTreeSet::new();
            let mut refused = BTreeSet::new();
            for batch in &batches {
                for e in batch {
                    apply_event(&mut state, e);
                }
                let (d, _) = crate::cluster::desired(&state, Algorithm::LeastConn, &full_desired);
                step(&d, &mut full, &conns);
                full_desired = d;

                // As the agent does.
                let services: BTreeSet<ServiceRef> = batch.iter().map(service_of).collect();
                let updated = crate::cluster::update(
                    &mut fast_desired,
                    &state,
                    &services,
                    Algorithm::LeastConn,
                    &refused,
                );
                if updated.is_some() {
                    refused.retain(|s| !services.contains(s));
                }
                let plan = match updated {
                    Some(u) => {
                        let mut keys = u.changed;
                        keys.append(&mut deferred);
                        plan_for(&fast_desired, &keys, &fast, &conns, NOW)
                    }
                    None => {
                        let (d, errors) =
                            crate::cluster::desired(&state, Algorithm::LeastConn, &fast_desired);
                        refused = errors
                            .into_iter()
                            .filter(|e| e.refused_address)
                            .map(|e| e.service)
                            .collect();
                        fast_desired = d;
                        plan(&fast_desired, &fast, &conns, NOW)
                    }
                };
                let plan = apply_checked(plan, &mut fast);
                deferred = plan.deferred;
                prop_assert_eq!(&fast_desired, &full_desired);
                prop_assert_eq!(&fast, &full);
            }
        }
    }
}
