//! Active rebalancing: evening out long-lived connections after a scale-up.
//!
//! Connect-time least-conn only places new connections; after a scale-up the pods that were
//! there keep every old connection. For Service ports that opt in (`socklb.io/rebalance:
//! "true"`, least-conn only), every interval the agent compares the live counts of the
//! backends and, while the busiest has more than one connection over the idlest (spread > 1),
//! closes connections on the busiest ones. Their clients reconnect, and least-conn places the
//! new connections on the light backends, until the spread is at most one.
//!
//! # Which connections are closed
//!
//! Only idle ones, where closing is what a client sees when a server closes an idle
//! keep-alive connection. A TCP connection is idle when (checked from tcp_info in a sock_diag
//! dump, and again on the socket itself microseconds before closing it):
//! 1. it is established, with nothing unread and nothing unacknowledged;
//! 2. it has been quiet in both directions for the quiet time (default 10 ms, per Service
//!    `socklb.io/rebalance-quiet`): no exchange is under way;
//! 3. its last data was received after its last data was sent, and within the answer window
//!    (1 s) of it: the last request was answered, and what was received was that answer;
//! 4. since the previous round it has not received more data than a request/response
//!    pattern gives (at most 3 data segments in per segment out, plus 3): a connection that
//!    receives without asking is delivering a stream. A connection is only closed once it has
//!    been looked at in two rounds.
//!
//! What that means per protocol: HTTP/1.1 keep-alive, HTTP/2 and gRPC unary calls, Redis,
//! SQL and other request/response protocols are closed between requests; pipelined requests
//! keep data in flight or answers arriving, so they are not. Server streaming (SSE, gRPC
//! server streams, WebSocket push, long polls) is never closed while it delivers: each event
//! arrives long after the request (3) and events arrive without requests (4). The limits: a
//! long poll or stream that has been silent since before its first event could look like an
//! answered request, and so could a request whose answer takes longer than the quiet time
//! while nothing is in flight; exclude such ports (`socklb.io/rebalance-exclude-ports`) or
//! raise the quiet time.
//!
//! # How
//!
//! The sockets come from the socket iterator (only the ones socklb assigned, in every
//! namespace). Of each busy backend, a bounded sample (four times what the round may close
//! there, at least 32; the iterator lists them in the map's order, so mostly the same sockets
//! from round to round, which rule 4 needs) is looked at with one sock_diag query each in its
//! network namespace, so a round's cost follows what it may close, not how many sockets the
//! node has. A socket is closed with `shutdown(SHUT_RDWR)` on
//! a duplicate of its owner's descriptor (`close`), which clients see as a normal close. Each
//! closure is counted (REBALANCE_STATS, the log, metrics, socklbctl).
//!
//! # Budget
//!
//! Per Service and round, at most `max_share` of its connections (default 10%, at least one);
//! rounds every `interval` (default 1 s); on the whole node at most `max_per_second` closures
//! per second (default 100). Connections closed but not yet back (their clients reconnect
//! when they next need them) are counted as if they had come back on the least-loaded
//! backends, so a slow pool is not closed twice over.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use lb_common::{IPPROTO_TCP, RebalanceStats, SocketRecord};

use crate::{
    close::{LiveState, Outcome, Owners},
    datapath::Maps,
    netns,
    sockdiag::{self, Activity, DiagSocket},
    sockets::{self, SocketIterator},
};

const TCP_ESTABLISHED: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    pub interval: Duration,
    /// The most of a Service's connections closed in one round (at least one).
    pub max_share: f64,
    /// The most closures per second on the node, over all Services.
    pub max_per_second: u32,
    /// Default quiet time (rule 2); a Service may set its own.
    pub quiet: Duration,
    /// Rule 3: how long after a request its answer may come.
    pub answer_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(1),
            max_share: 0.1,
            max_per_second: 100,
            quiet: Duration::from_millis(10),
            answer_window: Duration::from_secs(1),
        }
    }
}

/// A Service port that opted in, as the agent last programmed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service_id: u32,
    /// "namespace/name port \"p\" (frontend)", for the log.
    pub name: String,
    /// Its active backends.
    pub backends: Vec<u32>,
    pub quiet: Duration,
}

/// How many connections to close on which backends, from the live counts of a Service's
/// backends: one at a time from the busiest, each assumed to come back on the least loaded
/// (least-conn), until the spread is at most one or the budget is spent. `pending`
/// connections closed earlier and not back yet are first placed on the least loaded.
pub fn plan(counts: &[(u32, u64)], pending: u64, budget: u64) -> Vec<(u32, u64)> {
    if counts.len() < 2 {
        return Vec::new();
    }
    let mut load: Vec<(u32, u64)> = counts.to_vec();
    let least = |load: &mut Vec<(u32, u64)>| -> usize {
        (0..load.len())
            .min_by_key(|i| (load[*i].1, load[*i].0))
            .expect("two or more")
    };
    for _ in 0..pending {
        let i = least(&mut load);
        load[i].1 += 1;
    }
    let mut out: BTreeMap<u32, u64> = BTreeMap::new();
    for _ in 0..budget {
        let most = (0..load.len())
            .max_by_key(|i| (load[*i].1, std::cmp::Reverse(load[*i].0)))
            .expect("two or more");
        let fewest = least(&mut load);
        if load[most].1 <= load[fewest].1 + 1 {
            break;
        }
        load[most].1 -= 1;
        load[fewest].1 += 1;
        *out.entry(load[most].0).or_default() += 1;
    }
    out.into_iter().collect()
}

/// Rules 1 to 3 (see the module comment) on a socket's state; `Err` says why it is busy.
pub fn idle(s: &LiveState, quiet_ms: u32, answer_ms: u32) -> Result<(), &'static str> {
    if s.tcp_state != TCP_ESTABLISHED {
        return Err("not established");
    }
    if s.recv_queue > 0 || s.send_queue > 0 {
        return Err("data in flight");
    }
    if s.last_sent_ms < quiet_ms || s.last_received_ms < quiet_ms {
        return Err("not quiet");
    }
    if s.last_received_ms > s.last_sent_ms {
        return Err("waiting for an answer");
    }
    if s.last_sent_ms - s.last_received_ms > answer_ms {
        return Err("receiving without asking");
    }
    Ok(())
}

/// Rule 4: whether, between two looks, the connection received like a stream.
pub fn streaming(before: &Activity, now: &Activity) -> bool {
    let got = now.data_segs_in.wrapping_sub(before.data_segs_in);
    let sent = now.data_segs_out.wrapping_sub(before.data_segs_out);
    got > 3 * sent + 3
}

/// What one round did to one Service.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub service: String,
    /// Backend id -> connections closed there.
    pub closed: BTreeMap<u32, u64>,
    /// What the plan asked for, and the round's budget for the Service.
    pub wanted: u64,
    pub budget: u64,
    /// Connections not closed, by reason.
    pub left: BTreeMap<&'static str, u64>,
}

impl Round {
    pub fn total(&self) -> u64 {
        self.closed.values().sum()
    }
}

/// What the last round that looked at sockets cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub took: Duration,
    /// Assigned sockets of the busy backends the iterator listed, on the whole node.
    pub listed: usize,
    /// Network namespaces found under the cgroup, and those entered to look at sockets.
    pub namespaces: usize,
    pub entered: usize,
    /// Sockets of the busy backends looked at (sock_diag queries).
    pub looked: usize,
}

/// The rebalancer's memory between rounds.
pub struct Rebalancer {
    policy: Policy,
    /// Where the clients' processes are (their network namespaces are found under it).
    cgroup: PathBuf,
    cookies: netns::Cookies,
    /// The last look at each socket, by cookie (rule 4).
    seen: HashMap<u64, Activity>,
    /// Per service id: its total before the last closures, and when; connections closed and
    /// not back yet are counted from it.
    recent: HashMap<u32, (u64, Instant)>,
    /// Closures in the last second, node-wide.
    spent: Vec<Instant>,
    /// What the last round that looked at sockets cost.
    pub cost: Option<Cost>,
}

/// How long closed connections are expected back within.
const RECONNECT_WINDOW: Duration = Duration::from_secs(5);
/// Sockets of a busy backend looked at per round: this many times what may be closed there.
const SAMPLE_FACTOR: u64 = 4;
const MIN_SAMPLE: u64 = 32;

/// A socket the round may close.
struct Candidate {
    service_id: u32,
    backend_id: u32,
    inode: u64,
    cookie: u64,
    netns: u64,
    last_received_ms: u32,
    quiet_ms: u32,
}

impl Rebalancer {
    pub fn new(policy: Policy, cgroup: PathBuf) -> Rebalancer {
        Rebalancer {
            policy,
            cgroup,
            cookies: netns::Cookies::default(),
            seen: HashMap::new(),
            recent: HashMap::new(),
            spent: Vec::new(),
            cost: None,
        }
    }

    /// One round over every target.
    pub fn round(
        &mut self,
        maps: &mut Maps,
        sockets: &SocketIterator,
        targets: &[Target],
    ) -> Result<Vec<Round>> {
        let now = Instant::now();
        self.spent
            .retain(|t| now.duration_since(*t) < Duration::from_secs(1));
        let mut node_budget =
            u64::from(self.policy.max_per_second).saturating_sub(self.spent.len() as u64);

        // Plans, from the counts alone: no socket is looked at for an even Service.
        let mut rounds: BTreeMap<u32, Round> = BTreeMap::new();
        let mut quota: HashMap<(u32, u32), u64> = HashMap::new();
        let mut watched: HashMap<u32, u32> = HashMap::new(); // service id -> quiet ms
        for t in targets {
            let counts: Vec<(u32, u64)> = t
                .backends
                .iter()
                .map(|id| (*id, maps.connections(*id)))
                .collect();
            let total: u64 = counts.iter().map(|(_, c)| c).sum();
            let pending = match self.recent.get(&t.service_id) {
                Some((before, at)) if now.duration_since(*at) < RECONNECT_WINDOW => {
                    before.saturating_sub(total)
                }
                _ => 0,
            };
            let budget = ((self.policy.max_share * total as f64).floor() as u64)
                .max(1)
                .min(node_budget);
            let wanted = plan(&counts, pending, budget);
            if wanted.is_empty() {
                continue;
            }
            let n: u64 = wanted.iter().map(|(_, n)| n).sum();
            node_budget -= n;
            watched.insert(t.service_id, t.quiet.as_millis() as u32);
            for (id, k) in &wanted {
                quota.insert((t.service_id, *id), *k);
            }
            rounds.insert(
                t.service_id,
                Round {
                    service: t.name.clone(),
                    wanted: n,
                    budget,
                    ..Round::default()
                },
            );
            self.recent.entry(t.service_id).or_insert((total, now));
        }
        if quota.is_empty() {
            self.seen.clear();
            return Ok(Vec::new());
        }

        // Look at a sample of each busy backend's sockets, in their namespaces.
        // A sample of each busy backend's sockets: the iterator stops listing a backend's
        // sockets once it has its share, so a round costs what it looks at.
        let busy: BTreeMap<u32, u64> = quota
            .iter()
            .map(|((_, b), q)| (*b, (q * SAMPLE_FACTOR).max(MIN_SAMPLE)))
            .collect();
        let listed = sockets.of(&busy)?;
        let mut cost = Cost {
            listed: listed.len(),
            ..Cost::default()
        };
        let mut of_backend: HashMap<(u32, u32), Vec<SocketRecord>> = HashMap::new();
        for r in listed {
            let key = (r.state.service_id, r.state.backend_id);
            if r.state.protocol == IPPROTO_TCP && quota.contains_key(&key) {
                of_backend.entry(key).or_default().push(r);
            }
        }
        let mut by_netns: BTreeMap<u64, Vec<SocketRecord>> = BTreeMap::new();
        for records in of_backend.into_values() {
            for r in records {
                by_netns.entry(r.state.netns).or_default().push(r);
            }
        }
        let namespaces = self.cookies.under(&self.cgroup)?;
        cost.namespaces = namespaces.len();
        let answer_ms = self.policy.answer_window.as_millis() as u32;
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut looked: HashSet<u64> = HashSet::new();
        for (cookie, records) in &by_netns {
            let Some(ns) = namespaces.get(cookie) else {
                continue; // no process of the cgroup is in it (any more)
            };
            cost.entered += 1;
            let found = sockdiag::in_netns(&ns.file, |session| {
                let mut found = Vec::new();
                for r in records {
                    let (local, remote) = sockets::endpoints(&r.state);
                    let d = session.query(r.state.family, IPPROTO_TCP, local, remote, r.cookie)?;
                    found.extend(d.map(|d| (r.state, d)));
                }
                Ok(found)
            });
            let found = match found {
                Ok(f) => f,
                Err(e) => {
                    log::warn!("rebalance: sock_diag in network namespace {cookie}: {e:#}");
                    continue;
                }
            };
            for (state, d) in found {
                let Some(activity) = d.activity else { continue };
                looked.insert(d.cookie);
                let before = self.seen.insert(d.cookie, activity);
                let key = (state.service_id, state.backend_id);
                let quiet_ms = watched[&key.0];
                let live = live_state(&d, &activity);
                let verdict = match before {
                    None => Err("first look"),
                    Some(b) if streaming(&b, &activity) => Err("receiving a stream"),
                    Some(_) => idle(&live, quiet_ms, answer_ms),
                };
                match verdict {
                    Ok(()) => candidates.push(Candidate {
                        service_id: key.0,
                        backend_id: key.1,
                        inode: u64::from(d.inode),
                        cookie: d.cookie,
                        netns: *cookie,
                        last_received_ms: activity.last_received_ms,
                        quiet_ms,
                    }),
                    Err(why) => {
                        let round = rounds.get_mut(&key.0).expect("planned");
                        *round.left.entry(why).or_default() += 1;
                    }
                }
            }
        }
        self.seen.retain(|c, _| looked.contains(c));
        cost.looked = looked.len();

        // Close the quietest first: a connection that has been idle longest is the least
        // likely to be about to carry a request.
        candidates.sort_by_key(|c| std::cmp::Reverse(c.last_received_ms));
        let mut owners: HashMap<u64, Owners> = HashMap::new();
        for c in candidates {
            let left = quota.get_mut(&(c.service_id, c.backend_id)).expect("quota");
            if *left == 0 {
                continue;
            }
            let Some(ns) = namespaces.get(&c.netns) else {
                continue;
            };
            let owner = owners
                .entry(c.netns)
                .or_insert_with(|| Owners::of(&ns.pids));
            let outcome =
                owner.shut_down(c.inode, c.cookie, |live| idle(live, c.quiet_ms, answer_ms));
            let round = rounds.get_mut(&c.service_id).expect("planned");
            match outcome {
                Ok(Outcome::Closed) => {
                    *left -= 1;
                    *round.closed.entry(c.backend_id).or_default() += 1;
                    self.spent.push(Instant::now());
                }
                Ok(Outcome::Busy(why)) => *round.left.entry(why).or_default() += 1,
                Ok(Outcome::Gone) => *round.left.entry("gone").or_default() += 1,
                Err(e) => {
                    log::warn!("rebalance: closing a connection of {}: {e}", round.service);
                    *round.left.entry("error").or_default() += 1;
                }
            }
        }

        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (service_id, round) in &rounds {
            let n = round.total();
            if n == 0 {
                continue;
            }
            let mut stats: RebalanceStats = maps.rebalance_stats(*service_id);
            stats.closed += n;
            stats.rounds += 1;
            stats.largest_round = stats.largest_round.max(n);
            stats.last_unix = unix;
            maps.rebalance_stats.insert(service_id, &stats, 0)?;
        }
        cost.took = now.elapsed();
        self.cost = Some(cost);
        // A Service that is even again starts afresh.
        let planned: HashSet<u32> = rounds.keys().copied().collect();
        self.recent.retain(|id, _| planned.contains(id));
        Ok(rounds.into_values().collect())
    }
}

fn live_state(d: &DiagSocket, a: &Activity) -> LiveState {
    LiveState {
        tcp_state: d.state,
        recv_queue: d.recv_queue,
        send_queue: d.send_queue,
        last_sent_ms: a.last_sent_ms,
        last_received_ms: a.last_received_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(counts: &[u64]) -> Vec<(u32, u64)> {
        counts
            .iter()
            .enumerate()
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    /// Simulates rounds: closed connections come back on the least-loaded backend. Returns
    /// the final counts and the rounds taken.
    fn converge(mut counts: Vec<(u32, u64)>, share: f64) -> (Vec<u64>, usize) {
        let total: u64 = counts.iter().map(|(_, c)| c).sum();
        for round in 0..100 {
            let budget = ((share * total as f64) as u64).max(1);
            let p = plan(&counts, 0, budget);
            if p.is_empty() {
                return (counts.iter().map(|(_, c)| *c).collect(), round);
            }
            let n: u64 = p.iter().map(|(_, n)| n).sum();
            assert!(n <= budget, "bound exceeded: {n}");
            for (id, k) in p {
                counts.iter_mut().find(|(i, _)| *i == id).unwrap().1 -= k;
            }
            for _ in 0..n {
                counts.iter_mut().min_by_key(|(_, c)| *c).unwrap().1 += 1;
            }
        }
        panic!("did not converge: {counts:?}");
    }

    fn spread(c: &[u64]) -> u64 {
        c.iter().max().unwrap() - c.iter().min().unwrap()
    }

    #[test]
    fn scale_ups_even_out_to_a_spread_of_at_most_one() {
        for (before, after, total) in [
            (4u64, 8u64, 40u64),
            (3, 6, 60),
            (4, 8, 8),
            (4, 8, 6),
            (2, 10, 1000),
        ] {
            let mut counts = vec![total / before; before as usize];
            for c in counts.iter_mut().take((total % before) as usize) {
                *c += 1;
            }
            counts.resize(after as usize, 0);
            let (end, rounds) = converge(ids(&counts), 0.1);
            assert!(spread(&end) <= 1, "{before}->{after} with {total}: {end:?}");
            assert_eq!(end.iter().sum::<u64>(), total);
            assert!(
                rounds <= 10,
                "{rounds} rounds for {before}->{after} with {total}"
            );
        }
    }

    #[test]
    fn even_services_and_single_backends_are_left_alone() {
        assert!(plan(&ids(&[5, 5, 5, 5]), 0, 10).is_empty());
        assert!(
            plan(&ids(&[6, 5, 5, 6]), 0, 10).is_empty(),
            "spread 1 is even"
        );
        assert!(plan(&ids(&[7]), 0, 10).is_empty(), "nowhere to move to");
        assert!(plan(&ids(&[1, 1, 1, 1, 1, 1, 0, 0]), 0, 10).is_empty());
    }

    #[test]
    fn closures_come_from_the_busiest_within_the_budget() {
        assert_eq!(
            plan(&ids(&[6, 6, 6, 6, 4, 4, 4, 4]), 0, 10),
            [(0, 1), (1, 1), (2, 1), (3, 1)]
        );
        assert_eq!(plan(&ids(&[40, 10, 10]), 0, 3), [(0, 3)]);
        assert_eq!(plan(&ids(&[2, 0]), 0, 5), [(0, 1)], "1/1 is the end");
    }

    #[test]
    fn connections_not_back_yet_count_where_they_will_land() {
        // A pool of 40 on 4 pods, 8 pods now, 20 closed and not reconnected yet: 5/5/5/5/0/0/0/0.
        // Those 20 will land on the empty pods; closing more would be closing twice over.
        assert!(plan(&ids(&[5, 5, 5, 5, 0, 0, 0, 0]), 20, 100).is_empty());
        // Without them it would close 8 (to 3/3/3/3/2/2/2/2).
        let p = plan(&ids(&[5, 5, 5, 5, 0, 0, 0, 0]), 0, 100);
        assert_eq!(p.iter().map(|(_, n)| n).sum::<u64>(), 8);
    }

    fn state(sent: u32, received: u32) -> LiveState {
        LiveState {
            tcp_state: TCP_ESTABLISHED,
            recv_queue: 0,
            send_queue: 0,
            last_sent_ms: sent,
            last_received_ms: received,
        }
    }

    #[test]
    fn idle_means_answered_and_quiet_both_ways() {
        assert_eq!(
            idle(&state(40, 39), 10, 1000),
            Ok(()),
            "answered, quiet since"
        );
        assert_eq!(
            idle(&state(5_000, 4_990), 10, 1000),
            Ok(()),
            "a pooled connection"
        );
        assert_eq!(idle(&state(8, 7), 10, 1000), Err("not quiet"));
        assert_eq!(idle(&state(30, 50), 10, 1000), Err("waiting for an answer"));
        assert_eq!(
            idle(&state(60_000, 40), 10, 1000),
            Err("receiving without asking"),
            "an event long after the request: a stream"
        );
        let mut s = state(50, 40);
        s.send_queue = 17;
        assert_eq!(idle(&s, 10, 1000), Err("data in flight"));
        s = state(50, 40);
        s.recv_queue = 9;
        assert_eq!(idle(&s, 10, 1000), Err("data in flight"));
        s = state(50, 40);
        s.tcp_state = 8;
        assert_eq!(idle(&s, 10, 1000), Err("not established"));
    }

    #[test]
    fn a_connection_receiving_more_than_it_asks_is_a_stream() {
        let at = |i, o| Activity {
            data_segs_in: i,
            data_segs_out: o,
            ..Activity::default()
        };
        assert!(
            !streaming(&at(100, 100), &at(140, 120)),
            "20 calls, 2 segments each"
        );
        assert!(!streaming(&at(0, 0), &at(0, 0)), "silent");
        assert!(
            streaming(&at(10, 1), &at(30, 1)),
            "20 pushes, nothing asked"
        );
        assert!(
            streaming(&at(10, 1), &at(30, 2)),
            "20 pushes, one window update"
        );
    }
}
