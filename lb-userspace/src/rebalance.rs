//! Active rebalancing: evening out long-lived connections after a scale-up.
//!
//! Connect-time least-conn only places new connections; after a scale-up the pods that were
//! there keep every old connection. For Services that opt in (`socklb.io/rebalance: "true"`,
//! least-conn only), every interval the agent compares the live counts of the Service's
//! backends and, where they are uneven beyond the threshold, closes a bounded number of
//! connections on the most loaded ones. Their clients reconnect, and least-conn places the new
//! connections on the light backends.
//!
//! Safety rules:
//! - Only sockets socklb itself assigned to that Service are touched (their socket storage
//!   says so), in the network namespaces of the balanced cgroup, with SOCK_DESTROY (`ss -K`).
//! - At most `max_share` of the Service's connections per interval (and at least one).
//! - Only idle connections are closed: nothing waiting to be read or acknowledged, and the
//!   last data on the connection was an answer received, not a request sent, at least 1 ms
//!   ago. For request/response protocols (HTTP/1.1 keep-alive, gRPC unary between calls,
//!   Redis, SQL) that means no request is waiting for its answer, so the client sees a closed
//!   idle connection and reconnects, as it does when a server closes one. A connection that
//!   is never idle (a client that sends its next request in the same millisecond the answer
//!   arrives) is never closed; if a Service has too few idle connections, fewer are closed
//!   and the next interval tries again. The choice is made from one sock_diag snapshot, so a
//!   request sent between the snapshot and the close (microseconds) can still be cut.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use lb_common::{IPPROTO_TCP, RebalanceStats, SlotKey, service_flags};

use crate::{
    datapath::Maps,
    reconcile::{Programmed, backend_addr, frontend_key, name_str},
    sockdiag::{self, AssignedSocket},
};

const TCP_ESTABLISHED: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub interval: Duration,
    /// How far a backend may be from the mean, as a fraction of it, before anything is
    /// closed (never less than one connection).
    pub threshold: f64,
    /// The most of a Service's connections closed in one interval (at least one).
    pub max_share: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(10),
            threshold: 0.1,
            max_share: 0.05,
        }
    }
}

/// How many connections to close on which backends this interval, from the live counts of a
/// Service's active backends. Each closure is assumed to come back on the least-loaded backend
/// (least-conn), so closures are taken one by one from the currently most loaded.
pub fn closures(counts: &[(u32, u64)], policy: &Policy) -> Vec<(u32, u64)> {
    if counts.len() < 2 {
        return Vec::new();
    }
    let total: u64 = counts.iter().map(|(_, c)| c).sum();
    let mean = total as f64 / counts.len() as f64;
    let (lo, hi) = (mean.floor() as u64, mean.ceil() as u64);
    let tolerance = ((policy.threshold * mean).floor() as u64).max(1);
    let max = counts.iter().map(|(_, c)| *c).max().unwrap_or(0);
    let min = counts.iter().map(|(_, c)| *c).min().unwrap_or(0);
    if max <= hi + tolerance && min + tolerance >= lo {
        return Vec::new();
    }
    let surplus: u64 = counts.iter().map(|(_, c)| c.saturating_sub(hi)).sum();
    let deficit: u64 = counts.iter().map(|(_, c)| lo.saturating_sub(*c)).sum();
    let budget = ((policy.max_share * total as f64).floor() as u64).max(1);
    let mut left: Vec<(u32, u64)> = counts.to_vec();
    let mut out: BTreeMap<u32, u64> = BTreeMap::new();
    for _ in 0..surplus.max(deficit).min(budget) {
        let Some((id, count)) = left
            .iter_mut()
            .max_by_key(|(id, c)| (*c, std::cmp::Reverse(*id)))
        else {
            break;
        };
        if *count <= lo {
            break;
        }
        *count -= 1;
        *out.entry(*id).or_default() += 1;
    }
    out.into_iter().collect()
}

/// How long a connection has been idle, if it is safe to close (see the module comment).
pub fn idle_ms(s: &AssignedSocket) -> Option<u32> {
    if s.protocol != IPPROTO_TCP || s.state != TCP_ESTABLISHED {
        return None;
    }
    if s.recv_queue > 0 || s.send_queue > 0 {
        return None;
    }
    let (sent, received) = (s.last_sent_ms?, s.last_received_ms?);
    // The answer came after (or with) the last request, and not this very millisecond.
    (received <= sent && sent >= 1).then_some(sent)
}

/// What one interval did to one Service.
#[derive(Debug, PartialEq, Eq)]
pub struct Round {
    pub service: String,
    /// Backend address -> connections closed there.
    pub closed: BTreeMap<String, u64>,
    /// Wanted this interval (what `closures` asked for).
    pub wanted: u64,
    /// The interval's bound for this Service.
    pub budget: u64,
}

/// One interval over every opted-in Service. Returns what was closed.
pub fn run(
    maps: &mut Maps,
    programmed: &Programmed,
    cgroup: &Path,
    policy: &Policy,
) -> Result<Vec<Round>> {
    // (service id, backend id) -> how many to close.
    let mut quota: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut rounds: BTreeMap<u32, Round> = BTreeMap::new();
    for (key, service) in &programmed.services {
        if service.flags & service_flags::REBALANCE == 0 {
            continue;
        }
        let counts: Vec<(u32, u64)> = (0..service.count)
            .filter_map(|index| {
                programmed.slots.get(&SlotKey {
                    service_id: service.id,
                    index,
                })
            })
            .map(|id| (*id, maps.connections(*id)))
            .collect();
        let wanted = closures(&counts, policy);
        if wanted.is_empty() {
            continue;
        }
        let name = programmed
            .names
            .get(&service.id)
            .map_or_else(String::new, |n| {
                format!(
                    "{}/{} port {:?}",
                    name_str(&n.namespace),
                    name_str(&n.name),
                    name_str(&n.port_name)
                )
            });
        let frontend = frontend_key(key).map_or_else(String::new, |k| format!(" ({k})"));
        let total: u64 = counts.iter().map(|(_, c)| c).sum();
        rounds.insert(
            service.id,
            Round {
                service: format!("{name}{frontend}"),
                closed: BTreeMap::new(),
                wanted: wanted.iter().map(|(_, n)| n).sum(),
                budget: ((policy.max_share * total as f64).floor() as u64).max(1),
            },
        );
        for (backend, n) in wanted {
            quota.insert((service.id, backend), n);
        }
    }
    if quota.is_empty() {
        return Ok(Vec::new());
    }

    // One pass over the client namespaces: snapshot, choose the idlest, close.
    let (_, closed) = sockdiag::each_netns(cgroup, &maps.sockets, |session| {
        let mut candidates: Vec<AssignedSocket> = session
            .assigned()?
            .into_iter()
            .filter(|s| s.storage.live == 1 && idle_ms(s).is_some())
            .filter(|s| quota.contains_key(&(s.storage.service_id, s.storage.backend_id)))
            .collect();
        candidates.sort_by_key(|s| std::cmp::Reverse(idle_ms(s)));
        let mut closed = Vec::new();
        for s in candidates {
            let key = (s.storage.service_id, s.storage.backend_id);
            let left = quota.get_mut(&key).expect("filtered on quota");
            if *left == 0 {
                continue;
            }
            // A socket that closed or changed since the snapshot is simply not found.
            if session.destroy(&s).is_ok() {
                *left -= 1;
                closed.push(key);
            }
        }
        Ok(closed)
    })?;

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (service_id, backend_id) in closed.into_iter().flatten() {
        let round = rounds
            .get_mut(&service_id)
            .expect("quota came from a round");
        let addr = programmed
            .backends
            .get(&backend_id)
            .map_or_else(|| "?".into(), |b| backend_addr(b).to_string());
        *round.closed.entry(addr).or_default() += 1;
    }
    for (service_id, round) in &rounds {
        let n: u64 = round.closed.values().sum();
        if n == 0 {
            continue;
        }
        let mut stats: RebalanceStats = maps.rebalance_stats(*service_id);
        stats.closed += n;
        stats.rounds += 1;
        stats.largest_round = stats.largest_round.max(n);
        stats.last_unix = now;
        maps.rebalance_stats.insert(service_id, &stats, 0)?;
    }
    Ok(rounds.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(threshold: f64, max_share: f64) -> Policy {
        Policy {
            interval: Duration::from_secs(1),
            threshold,
            max_share,
        }
    }

    fn ids(counts: &[u64]) -> Vec<(u32, u64)> {
        counts
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    /// Simulates intervals: closed connections come back on the least-loaded backend.
    fn converge(mut counts: Vec<(u32, u64)>, p: &Policy) -> (Vec<(u32, u64)>, usize, u64) {
        let total: u64 = counts.iter().map(|(_, c)| c).sum();
        let mut largest = 0;
        for round in 0..100 {
            let plan = closures(&counts, p);
            if plan.is_empty() {
                return (counts, round, largest);
            }
            let n: u64 = plan.iter().map(|(_, n)| n).sum();
            largest = largest.max(n);
            assert!(
                n <= ((p.max_share * total as f64) as u64).max(1),
                "bound exceeded: {n}"
            );
            for (id, k) in plan {
                counts.iter_mut().find(|(i, _)| *i == id).unwrap().1 -= k;
            }
            for _ in 0..n {
                counts.iter_mut().min_by_key(|(_, c)| *c).unwrap().1 += 1;
            }
        }
        panic!("did not converge: {counts:?}");
    }

    #[test]
    fn a_scale_up_from_three_to_six_evens_out_within_one_in_bounded_rounds() {
        let p = policy(0.1, 0.1);
        let (end, rounds, largest) = converge(ids(&[20, 20, 20, 0, 0, 0]), &p);
        assert!(end.iter().all(|(_, c)| (9..=11).contains(c)), "{end:?}");
        assert_eq!(largest, 6, "10% of 60 per interval");
        assert!(rounds <= 6, "{rounds} rounds");
    }

    #[test]
    fn even_or_nearly_even_services_are_left_alone() {
        let p = policy(0.1, 0.1);
        assert!(closures(&ids(&[10, 10, 10]), &p).is_empty());
        assert!(closures(&ids(&[11, 10, 9]), &p).is_empty());
        assert!(closures(&ids(&[3, 2]), &p).is_empty());
        assert!(
            closures(&ids(&[7]), &p).is_empty(),
            "one backend: nowhere to move to"
        );
        assert!(
            closures(&ids(&[30, 30, 30, 36]), &policy(0.25, 0.1)).is_empty(),
            "within 25%"
        );
    }

    #[test]
    fn closures_come_from_the_most_loaded_and_respect_the_bound() {
        let plan = closures(&ids(&[40, 10, 10]), &policy(0.1, 0.05));
        assert_eq!(plan, [(0, 3)], "5% of 60, all from the overloaded pod");
        let plan = closures(&ids(&[4, 0]), &policy(0.1, 0.01));
        assert_eq!(plan, [(0, 1)], "at least one per interval");
    }

    #[test]
    fn a_backend_far_below_the_mean_pulls_from_the_top() {
        // Nobody is far above the mean, but one pod is nearly empty.
        let (end, _, _) = converge(ids(&[11, 11, 11, 11, 11, 5]), &policy(0.1, 0.2));
        assert!(end.iter().all(|(_, c)| (9..=11).contains(c)), "{end:?}");
    }

    fn socket(state: u8, queues: (u32, u32), sent: u32, received: u32) -> AssignedSocket {
        AssignedSocket {
            family: libc::AF_INET as u8,
            protocol: IPPROTO_TCP,
            state,
            local: "10.0.0.1:1".parse().unwrap(),
            remote: "10.0.0.2:2".parse().unwrap(),
            cookie: [0; 8],
            recv_queue: queues.0,
            send_queue: queues.1,
            last_sent_ms: Some(sent),
            last_received_ms: Some(received),
            storage: Default::default(),
        }
    }

    #[test]
    fn only_connections_without_a_request_in_flight_are_idle() {
        assert_eq!(
            idle_ms(&socket(1, (0, 0), 40, 39)),
            Some(40),
            "answered, quiet since"
        );
        assert_eq!(
            idle_ms(&socket(1, (0, 0), 5, 5)),
            Some(5),
            "answered in the same ms"
        );
        assert_eq!(
            idle_ms(&socket(1, (0, 0), 3, 12)),
            None,
            "request sent, no answer yet"
        );
        assert_eq!(
            idle_ms(&socket(1, (0, 0), 0, 0)),
            None,
            "this very millisecond"
        );
        assert_eq!(
            idle_ms(&socket(1, (0, 17), 50, 40)),
            None,
            "data not yet acknowledged"
        );
        assert_eq!(
            idle_ms(&socket(1, (9, 0), 50, 40)),
            None,
            "data not yet read"
        );
        assert_eq!(idle_ms(&socket(8, (0, 0), 50, 40)), None, "not established");
    }
}
