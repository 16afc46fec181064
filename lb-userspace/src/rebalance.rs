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
//! keep-alive connection. A TCP connection is idle when (checked from tcp_info with a
//! sock_diag query, and again on the socket itself microseconds before closing it):
//! 1. it is established, with nothing unread and nothing unacknowledged;
//! 2. it has been quiet in both directions for the quiet time (default 500 ms, per Service
//!    `socklb.io/rebalance-quiet`): no exchange is under way;
//! 3. its last data was received after its last data was sent, and within the answer window
//!    (1 s) of it: the last request was answered, and what was received was that answer;
//! 4. it is not a stream: in none of the intervals between the looks of the last 30 s did it
//!    receive data without sending any. A connection is only closed once it has been looked
//!    at in three rounds (two intervals);
//! 5. its next request is not due: a client notices a close only some time after it (gRPC's
//!    Python client took 10-30 ms here), and a request it writes before that fails. So a
//!    connection is closed only early in its pause between requests, as far as the looks
//!    show it: when a look found it quiet for Q ms and it sent again before the next look, it
//!    pauses at least Q ms; when it sent n data segments in the T ms between two looks, at
//!    least T/(n+1) ms (a request is one segment or more). Past 3/4 of the longest such pause
//!    (kept for 30 looks), or within
//!    50 ms of its end, it is left open, unless it has not sent since the last look and has
//!    been quiet for twice that pause (it stopped asking). One seen sending in no interval
//!    between looks is idle. So a connection that pauses less than 4/3 of the quiet time (or
//!    the quiet time plus 50 ms) between requests is never moved: at the default 500 ms, one
//!    used more often than about every 670 ms.
//!
//! What that means per protocol: HTTP/1.1 keep-alive, HTTP/2 and gRPC unary calls, Redis,
//! SQL and other request/response protocols are closed between requests. Server streaming
//! (SSE, gRPC server streams, WebSocket push) is never closed while it delivers: each event
//! arrives long after the request (3) and events arrive without requests (4). The limits,
//! which is why the quiet time is long by default:
//! - TCP does not show requests, only data. Two requests in flight at once on one connection
//!   (HTTP/2 or gRPC calls from several threads, pipelining) look answered as soon as the first
//!   answer arrives; if the second answer takes longer than the quiet time after that, the
//!   connection looks idle and that request would be cut. The quiet time must exceed the
//!   slowest answer of such a Service.
//! - A connection used more often than once per quiet time is never quiet long enough and is
//!   never moved. Services with sequential clients (one request at a time per connection, as
//!   connection pools do) can take a much shorter quiet time.
//! - A stream or long poll silent since before its first event looks like an answered
//!   request, and so does a stream whose client sends something (a keep-alive ping) in every
//!   interval between looks while the events are sparse. Exclude such ports
//!   (`socklb.io/rebalance-exclude-ports`).
//! - A request whose answer crosses a look (sent before it, answered after) looks like a
//!   stream for a while: that connection is left alone for 30 s.
//!
//! # How
//!
//! The sockets come from the socket iterator (only the ones socklb assigned, in every
//! namespace). Of each backend over its share, a bounded sample (four times what may be
//! closed there, at least 32, doubled each round in which it gave no idle connection; the
//! iterator lists them in the map's order, so mostly the same sockets from round to round,
//! which rule 4 needs) is looked at with one sock_diag query each in its network namespace,
//! so a round's cost follows what it may close, not how many sockets the node has. A socket is
//! closed with `shutdown(SHUT_RDWR)` on a duplicate of its owner's descriptor (`close`), which
//! clients see as a normal close. Each closure is counted, and so is each failure
//! (REBALANCE_STATS, the log, metrics, socklbctl).
//!
//! # Budget
//!
//! Per Service and round, at most `max_share` of its connections (default 10%, at least one);
//! rounds every `interval` on average (default 1 s; each pause is random between half and one
//! and a half of it, so that no periodic client is always looked at in the same phase); on
//! the whole node at most `max_per_second` closures
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
    bpf_sys::monotonic_ns,
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
            quiet: Duration::from_millis(500),
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
    /// When the slow start of its newest backend ends (CLOCK_MONOTONIC ns; 0: none).
    /// Until then nothing is moved: the ramp decides how fast the new pods get connections,
    /// and moving connections onto them would defeat it.
    pub slow_start_ends_ns: u64,
}

/// What a Service port needs to be even.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Backend id -> connections over its share, for the backends over it.
    pub excess: BTreeMap<u32, u64>,
    /// Connections to close this round: all the excess, within the budget.
    pub moves: u64,
}

/// The plan for one Service port, from its backends' live counts: the even spread of its
/// connections, counting `pending` ones (closed earlier, not back yet) as already back, gives
/// every backend the mean rounded down or up (up for the busiest, so that as few as possible
/// move); what a backend holds over that is its excess. Closing the excess, each closed
/// connection coming back on the least loaded (least-conn), leaves a spread of at most one.
pub fn plan(counts: &[(u32, u64)], pending: u64, budget: u64) -> Plan {
    if counts.len() < 2 {
        return Plan::default();
    }
    let total = counts.iter().map(|(_, c)| c).sum::<u64>() + pending;
    let k = counts.len() as u64;
    let mut busiest: Vec<(u32, u64)> = counts.to_vec();
    busiest.sort_by_key(|(id, c)| (std::cmp::Reverse(*c), *id));
    let mut excess = BTreeMap::new();
    for (i, (id, count)) in busiest.iter().enumerate() {
        let share = total / k + u64::from((i as u64) < total % k);
        if *count > share {
            excess.insert(*id, count - share);
        }
    }
    let moves = excess.values().sum::<u64>().min(budget);
    Plan { excess, moves }
}

/// Which backend to close a connection on next: of those with excess left and a candidate
/// to close, the most loaded (lowest id on a tie).
fn next_backend(
    load: &HashMap<u32, u64>,
    excess: &BTreeMap<u32, u64>,
    has_candidate: impl Fn(u32) -> bool,
) -> Option<u32> {
    excess
        .iter()
        .filter(|(id, left)| **left > 0 && has_candidate(**id))
        .max_by_key(|(id, _)| (load.get(id).copied().unwrap_or(0), std::cmp::Reverse(**id)))
        .map(|(id, _)| *id)
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

/// What the looks showed of how a connection paces its requests (rule 5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pace {
    /// How long it pauses between requests (ms), at least: the longest of the quiet a look
    /// saw before the connection sent again, and T/(n+1) for n data segments sent in the T ms
    /// between two looks (a request takes one segment or more, and n sends every P ms fit in
    /// T only if T < (n+1) P). `None` until it was seen sending after a look.
    pub pause_ms: Option<u32>,
    /// Looks since `pause_ms` was seen: after `PAUSE_MEMORY` of them the next pause seen
    /// replaces it (even if shorter; pauses seen in between are not kept: the estimate only
    /// errs shorter, which closes less), so one long stall does not stand for ever.
    pub pause_age: u32,
    /// It has sent nothing since the previous look.
    pub silent_since_look: bool,
}

/// Looks (about a second apart) a longest pause is kept for.
const PAUSE_MEMORY: u32 = 30;

impl Pace {
    /// The pace after a new look, from the previous look (`since_ms` ago) and its pace.
    fn after(before: Option<(&Activity, Pace)>, now: &Activity, since_ms: u32) -> Pace {
        let Some((b, pace)) = before else {
            return Pace::default();
        };
        let segments = now.data_segs_out.wrapping_sub(b.data_segs_out);
        let sent = segments != 0;
        // n sends of a client that sends every P ms fit in T ms only if T < (n + 1) P.
        let seen = sent.then(|| b.last_sent_ms.max(since_ms / (segments + 1)));
        let replaced = seen.is_some() && (seen >= pace.pause_ms || pace.pause_age >= PAUSE_MEMORY);
        Pace {
            pause_ms: if replaced { seen } else { pace.pause_ms },
            pause_age: if replaced {
                0
            } else {
                pace.pause_age.saturating_add(1)
            },
            silent_since_look: !sent,
        }
    }
}

/// How long before its next request a connection may be closed at the latest: clients take
/// a while to notice a close (gRPC's Python asyncio client: 10-30 ms measured, so a close 20 ms
/// before a call failed it about one time in fifty; none in 200 tries at 35 and 50 ms).
const NOTICE_MS: u64 = 50;

/// Rule 5: a connection is not closed late in its usual pause, when its next request could
/// come before the client noticed the close: past 3/4 of the longest pause seen or within
/// [`NOTICE_MS`] of its end, unless it has since been silent for twice that pause across a
/// look (it stopped asking).
pub fn not_due(pace: Pace, last_sent_ms: u32) -> Result<(), &'static str> {
    let Some(p) = pace.pause_ms else {
        return Ok(());
    };
    let (sent, p) = (u64::from(last_sent_ms), u64::from(p));
    let stopped = pace.silent_since_look && sent > 2 * p;
    if (sent * 4 > p * 3 || sent + NOTICE_MS > p) && !stopped {
        return Err("its next request is due");
    }
    Ok(())
}

/// Rule 4: whether, between two looks, the connection received like a stream: data without
/// sending any. (How much it received says nothing: an answer can take many segments.)
pub fn streaming(before: &Activity, now: &Activity) -> bool {
    let got = now.data_segs_in.wrapping_sub(before.data_segs_in);
    let sent = now.data_segs_out.wrapping_sub(before.data_segs_out);
    got > 0 && sent == 0
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
    /// Closures that failed.
    pub errors: u64,
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

/// How long closed connections are expected back within.
const RECONNECT_WINDOW: Duration = Duration::from_secs(5);
/// Sockets of a busy backend looked at per round: this many times what may be closed there,
/// at least `MIN_SAMPLE`, doubled per round that found none idle, up to `MAX_SAMPLE`.
const SAMPLE_FACTOR: u64 = 4;
const MIN_SAMPLE: u64 = 32;
const MAX_SAMPLE: u64 = 4096;

/// Connections closed and not back yet, per Service port.
#[derive(Debug, Default)]
struct Recent {
    /// Service id -> its total when the closures began, and when each closure was made.
    by_service: HashMap<u32, (u64, Vec<Instant>)>,
}

impl Recent {
    /// How many of the closures within the window have not come back, judged by the total.
    fn pending(&self, service_id: u32, total: u64, now: Instant) -> u64 {
        let Some((baseline, at)) = self.by_service.get(&service_id) else {
            return 0;
        };
        let recent = at
            .iter()
            .filter(|t| now.duration_since(**t) < RECONNECT_WINDOW)
            .count() as u64;
        recent.min(baseline.saturating_sub(total))
    }

    fn closed(&mut self, service_id: u32, total_before: u64, n: u64, now: Instant) {
        let (_, at) = self
            .by_service
            .entry(service_id)
            .or_insert_with(|| (total_before, Vec::new()));
        at.extend((0..n).map(|_| now));
    }

    /// Forgets closures older than the window, and Services with none left.
    fn expire(&mut self, now: Instant) {
        self.by_service.retain(|_, (_, at)| {
            at.retain(|t| now.duration_since(*t) < RECONNECT_WINDOW);
            !at.is_empty()
        });
    }
}

/// The rebalancer's memory between rounds.
pub struct Rebalancer {
    policy: Policy,
    /// Where the clients' processes are (their network namespaces are found under it).
    cgroup: PathBuf,
    cookies: netns::Cookies,
    /// The last look at each socket, by cookie (rule 4).
    seen: HashMap<u64, Seen>,
    /// Sockets seen receiving without sending (rule 4), and when last.
    streams: HashMap<u64, Instant>,
    recent: Recent,
    /// (service id, backend id) -> sample size multiplier, for backends whose sample had no
    /// idle connection.
    widen: HashMap<(u32, u32), u64>,
    /// Closures in the last second, node-wide.
    spent: Vec<Instant>,
    /// What the last round that looked at sockets cost.
    pub cost: Option<Cost>,
}

/// The last look at a socket.
#[derive(Clone, Copy)]
struct Seen {
    activity: Activity,
    /// How many rounds have looked at it (in a row or not).
    looks: u32,
    at: Instant,
    pace: Pace,
}

/// How long stream evidence (rule 4) keeps a socket from being closed, and a look is kept.
const STREAM_MEMORY: Duration = Duration::from_secs(30);
const SEEN_MEMORY: Duration = Duration::from_secs(60);
/// Looks before a socket may be closed: two intervals for rule 4 to catch a stream in.
const LOOKS_BEFORE_CLOSING: u32 = 3;

/// A socket the round may close.
struct Candidate {
    inode: u64,
    cookie: u64,
    netns: u64,
    last_received_ms: u32,
    pace: Pace,
}

/// One Service port's part of a round.
struct Work {
    quiet_ms: u32,
    total: u64,
    plan: Plan,
    load: HashMap<u32, u64>,
    candidates: HashMap<u32, Vec<Candidate>>,
    round: Round,
}

impl Rebalancer {
    pub fn new(policy: Policy, cgroup: PathBuf) -> Rebalancer {
        Rebalancer {
            policy,
            cgroup,
            cookies: netns::Cookies::default(),
            seen: HashMap::new(),
            streams: HashMap::new(),
            recent: Recent::default(),
            widen: HashMap::new(),
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
        self.recent.expire(now);
        self.seen
            .retain(|_, s| now.duration_since(s.at) < SEEN_MEMORY);
        self.streams
            .retain(|_, at| now.duration_since(*at) < STREAM_MEMORY);
        let mut node_budget =
            u64::from(self.policy.max_per_second).saturating_sub(self.spent.len() as u64);

        // Plans, from the counts alone: no socket is looked at for an even Service.
        let mut work: BTreeMap<u32, Work> = BTreeMap::new();
        let now_ns = monotonic_ns();
        for t in targets.iter().filter(|t| t.slow_start_ends_ns <= now_ns) {
            let counts: Vec<(u32, u64)> = t
                .backends
                .iter()
                .map(|id| (*id, maps.connections(*id)))
                .collect();
            let total: u64 = counts.iter().map(|(_, c)| c).sum();
            let pending = self.recent.pending(t.service_id, total, now);
            let budget = ((self.policy.max_share * total as f64).floor() as u64)
                .max(1)
                .min(node_budget);
            let plan = plan(&counts, pending, budget);
            if plan.moves == 0 {
                continue;
            }
            node_budget -= plan.moves;
            work.insert(
                t.service_id,
                Work {
                    quiet_ms: t.quiet.as_millis() as u32,
                    total,
                    round: Round {
                        service: t.name.clone(),
                        wanted: plan.moves,
                        budget,
                        ..Round::default()
                    },
                    plan,
                    load: counts.into_iter().collect(),
                    candidates: HashMap::new(),
                },
            );
        }
        let keys: HashSet<(u32, u32)> = work
            .iter()
            .flat_map(|(s, w)| w.plan.excess.keys().map(move |b| (*s, *b)))
            .collect();
        self.widen.retain(|k, _| keys.contains(k));
        if work.is_empty() {
            return Ok(Vec::new());
        }

        // A sample of each busy backend's sockets: the iterator stops listing a backend's
        // sockets once it has its share, so a round costs what it looks at.
        let mut sample: BTreeMap<u32, u64> = BTreeMap::new();
        for (service_id, w) in &work {
            for (backend, excess) in &w.plan.excess {
                let widen = self
                    .widen
                    .get(&(*service_id, *backend))
                    .copied()
                    .unwrap_or(1);
                let n = (excess.min(&w.plan.moves) * SAMPLE_FACTOR).max(MIN_SAMPLE) * widen;
                sample.insert(*backend, n.min(MAX_SAMPLE));
            }
        }
        let listed = sockets.of(&sample)?;
        let mut cost = Cost {
            listed: listed.len(),
            ..Cost::default()
        };
        let mut by_netns: BTreeMap<u64, Vec<SocketRecord>> = BTreeMap::new();
        for r in listed {
            let busy = work
                .get(&r.state.service_id)
                .is_some_and(|w| w.plan.excess.contains_key(&r.state.backend_id));
            if r.state.protocol == IPPROTO_TCP && busy {
                by_netns.entry(r.state.netns).or_default().push(r);
            }
        }
        let namespaces = self.cookies.under(&self.cgroup)?;
        cost.namespaces = namespaces.len();
        let answer_ms = self.policy.answer_window.as_millis() as u32;
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
                let before = self.seen.get(&d.cookie).copied();
                if before.is_some_and(|b| streaming(&b.activity, &activity)) {
                    self.streams.insert(d.cookie, now);
                }
                let since_ms = before.map_or(0, |b| now.duration_since(b.at).as_millis() as u32);
                let pace = Pace::after(
                    before.as_ref().map(|b| (&b.activity, b.pace)),
                    &activity,
                    since_ms,
                );
                let seen = Seen {
                    activity,
                    looks: before.map_or(1, |b| b.looks + 1),
                    at: now,
                    pace,
                };
                self.seen.insert(d.cookie, seen);
                let w = work.get_mut(&state.service_id).expect("planned");
                let verdict = if seen.looks < LOOKS_BEFORE_CLOSING {
                    Err("not watched long enough")
                } else if self.streams.contains_key(&d.cookie) {
                    Err("receiving a stream")
                } else {
                    idle(&live_state(&d, &activity), w.quiet_ms, answer_ms)
                        .and_then(|()| not_due(pace, activity.last_sent_ms))
                };
                match verdict {
                    Ok(()) => w
                        .candidates
                        .entry(state.backend_id)
                        .or_default()
                        .push(Candidate {
                            inode: u64::from(d.inode),
                            cookie: d.cookie,
                            netns: *cookie,
                            last_received_ms: activity.last_received_ms,
                            pace,
                        }),
                    Err(why) => *w.round.left.entry(why).or_default() += 1,
                }
            }
        }
        cost.looked = looked.len();

        // Close, one at a time, on the most loaded backend over its share that has an idle
        // connection left: a backend whose connections are all busy does not hold up the
        // rest. Of a backend's idle connections the quietest go first.
        let mut owners: HashMap<u64, Owners> = HashMap::new();
        for (service_id, w) in &mut work {
            for list in w.candidates.values_mut() {
                list.sort_by_key(|c| c.last_received_ms); // quietest last: popped first
            }
            for backend in w.plan.excess.keys() {
                if w.candidates.get(backend).is_none_or(Vec::is_empty) {
                    let widen = self.widen.entry((*service_id, *backend)).or_insert(1);
                    *widen = (*widen * 2).min(MAX_SAMPLE / MIN_SAMPLE);
                } else {
                    self.widen.remove(&(*service_id, *backend));
                }
            }
            let mut moves = w.plan.moves;
            while moves > 0 {
                let Some(backend) = next_backend(&w.load, &w.plan.excess, |b| {
                    w.candidates.get(&b).is_some_and(|l| !l.is_empty())
                }) else {
                    break;
                };
                let c = w
                    .candidates
                    .get_mut(&backend)
                    .and_then(Vec::pop)
                    .expect("has a candidate");
                let Some(ns) = namespaces.get(&c.netns) else {
                    continue;
                };
                let owner = owners
                    .entry(c.netns)
                    .or_insert_with(|| Owners::of(&ns.pids));
                let quiet_ms = w.quiet_ms;
                let outcome = owner.shut_down(c.inode, c.cookie, |live| {
                    idle(live, quiet_ms, answer_ms)
                        .and_then(|()| not_due(c.pace, live.last_sent_ms))
                });
                match outcome {
                    Ok(Outcome::Closed) => {
                        moves -= 1;
                        *w.plan.excess.get_mut(&backend).expect("planned") -= 1;
                        *w.load.get_mut(&backend).expect("counted") -= 1;
                        *w.round.closed.entry(backend).or_default() += 1;
                        self.spent.push(Instant::now());
                    }
                    Ok(Outcome::Busy(why)) => *w.round.left.entry(why).or_default() += 1,
                    Ok(Outcome::Gone) => *w.round.left.entry("gone").or_default() += 1,
                    Err(e) => {
                        log::warn!(
                            "rebalance: closing a connection of {}: {e}",
                            w.round.service
                        );
                        w.round.errors += 1;
                    }
                }
            }
            let closed = w.round.total();
            if closed > 0 {
                self.recent.closed(*service_id, w.total, closed, now);
            }
        }

        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (service_id, w) in &work {
            let (n, errors) = (w.round.total(), w.round.errors);
            if n == 0 && errors == 0 {
                continue;
            }
            let mut stats: RebalanceStats = maps.rebalance_stats(*service_id);
            stats.closed += n;
            stats.errors += errors;
            if n > 0 {
                stats.rounds += 1;
                stats.largest_round = stats.largest_round.max(n);
                stats.last_unix = unix;
            }
            maps.rebalance_stats.insert(service_id, &stats, 0)?;
        }
        cost.took = now.elapsed();
        self.cost = Some(cost);
        Ok(work.into_values().map(|w| w.round).collect())
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

    /// What a round closes when every connection is idle: per backend, in the order the
    /// rebalancer picks them.
    fn closures(counts: &[(u32, u64)], mut plan: Plan) -> Vec<(u32, u64)> {
        let mut load: HashMap<u32, u64> = counts.iter().copied().collect();
        let mut out: BTreeMap<u32, u64> = BTreeMap::new();
        for _ in 0..plan.moves {
            let b = next_backend(&load, &plan.excess, |_| true).expect("excess left");
            *plan.excess.get_mut(&b).unwrap() -= 1;
            *load.get_mut(&b).unwrap() -= 1;
            *out.entry(b).or_default() += 1;
        }
        out.into_iter().collect()
    }

    /// Simulates rounds: closed connections come back on the least-loaded backend. Returns
    /// the final counts and the rounds taken.
    fn converge(mut counts: Vec<(u32, u64)>, share: f64) -> (Vec<u64>, usize) {
        let total: u64 = counts.iter().map(|(_, c)| c).sum();
        for round in 0..100 {
            let budget = ((share * total as f64) as u64).max(1);
            let p = plan(&counts, 0, budget);
            if p.moves == 0 {
                return (counts.iter().map(|(_, c)| *c).collect(), round);
            }
            assert!(p.moves <= budget, "bound exceeded: {}", p.moves);
            let n = p.moves;
            for (id, k) in closures(&counts, p) {
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
            (2, 4, 3),
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
        assert_eq!(plan(&ids(&[5, 5, 5, 5]), 0, 10).moves, 0);
        assert_eq!(
            plan(&ids(&[6, 5, 5, 6]), 0, 10).moves,
            0,
            "spread 1 is even"
        );
        assert_eq!(plan(&ids(&[7]), 0, 10).moves, 0, "nowhere to move to");
        assert_eq!(plan(&ids(&[1, 1, 1, 1, 1, 1, 0, 0]), 0, 10).moves, 0);
    }

    #[test]
    fn closures_come_from_the_busiest_within_the_budget() {
        let c = ids(&[6, 6, 6, 6, 4, 4, 4, 4]);
        assert_eq!(
            closures(&c, plan(&c, 0, 10)),
            [(0, 1), (1, 1), (2, 1), (3, 1)]
        );
        let c = ids(&[40, 10, 10]);
        assert_eq!(closures(&c, plan(&c, 0, 3)), [(0, 3)]);
        let c = ids(&[2, 0]);
        assert_eq!(closures(&c, plan(&c, 0, 5)), [(0, 1)], "1/1 is the end");
        let c = ids(&[9, 8, 0, 0]);
        assert_eq!(
            closures(&c, plan(&c, 0, 3)),
            [(0, 2), (1, 1)],
            "the busiest first, then whichever is busiest now"
        );
    }

    #[test]
    fn a_backend_without_idle_connections_does_not_hold_up_the_rest() {
        // Backend 0 is the busiest but all its connections are busy: the round closes on 1.
        let p = plan(&ids(&[10, 8, 0, 0]), 0, 4);
        assert_eq!(p.excess, BTreeMap::from([(0, 5), (1, 3)]));
        let load: HashMap<u32, u64> = ids(&[10, 8, 0, 0]).into_iter().collect();
        assert_eq!(next_backend(&load, &p.excess, |b| b != 0), Some(1));
        assert_eq!(next_backend(&load, &p.excess, |_| false), None);
    }

    #[test]
    fn connections_not_back_yet_count_where_they_will_land() {
        // A pool of 40 on 4 pods, 8 pods now, 20 closed and not reconnected yet: 5/5/5/5/0/0/0/0.
        // Those 20 will land on the empty pods; closing more would be closing twice over.
        assert_eq!(plan(&ids(&[5, 5, 5, 5, 0, 0, 0, 0]), 20, 100).moves, 0);
        // Without them it would close 8 (to 3/3/3/3/2/2/2/2).
        assert_eq!(plan(&ids(&[5, 5, 5, 5, 0, 0, 0, 0]), 0, 100).moves, 8);
    }

    #[test]
    fn closures_are_remembered_until_they_come_back_or_the_window_ends() {
        let t0 = Instant::now();
        let mut r = Recent::default();
        // Service 1: 40 connections, 5 closed; service 2 never closed anything.
        r.closed(1, 40, 5, t0);
        assert_eq!(r.pending(1, 35, t0), 5);
        assert_eq!(r.pending(2, 35, t0), 0);
        // A round in which service 1 planned nothing (its pending made it even) forgets
        // nothing: 2 s on, 3 are back.
        r.expire(t0 + Duration::from_secs(2));
        assert_eq!(r.pending(1, 38, t0 + Duration::from_secs(2)), 2);
        // More closures later keep the first baseline: 3 more closed, from 38.
        r.closed(1, 38, 3, t0 + Duration::from_secs(3));
        assert_eq!(r.pending(1, 35, t0 + Duration::from_secs(3)), 5);
        // The first five leave the window; the last three are still expected.
        let t6 = t0 + Duration::from_secs(6);
        r.expire(t6);
        assert_eq!(r.pending(1, 36, t6), 3);
        let t9 = t0 + Duration::from_secs(9);
        r.expire(t9);
        assert_eq!(r.pending(1, 36, t9), 0);
        assert!(r.by_service.is_empty());
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
        assert_eq!(idle(&state(600, 400), 500, 1000), Err("not quiet"));
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
    fn a_connection_whose_next_request_is_due_is_left_open() {
        let look = |out, last_sent_ms| Activity {
            data_segs_out: out,
            last_sent_ms,
            ..Activity::default()
        };
        // A client sending every 200 ms, looked at in three rounds.
        let first = Pace::after(None, &look(10, 30), 0);
        assert_eq!(not_due(first, 150), Ok(()), "no pause known yet");
        let second = Pace::after(Some((&look(10, 30), first)), &look(30, 150), 0);
        assert_eq!(second.pause_ms, Some(30), "quiet 30 ms, then it sent");
        let third = Pace::after(Some((&look(30, 150), second)), &look(50, 10), 0);
        assert_eq!(third.pause_ms, Some(150), "the longest pause");
        let fourth = Pace::after(Some((&look(50, 10), third)), &look(70, 20), 0);
        assert_eq!(fourth.pause_ms, Some(150), "is kept");
        assert_eq!(not_due(fourth, 100), Ok(()), "well within its pause");
        assert_eq!(not_due(fourth, 113), Err("its next request is due"));
        assert_eq!(
            not_due(fourth, 180),
            Err("its next request is due"),
            "late, but it sent since the last look: it still asks"
        );
        // A pause of 80 ms: 3/4 of it is within 50 ms of its end.
        let short = Pace {
            pause_ms: Some(80),
            ..Pace::default()
        };
        assert_eq!(not_due(short, 25), Ok(()));
        assert_eq!(not_due(short, 35), Err("its next request is due"));
        // Then it stops asking: nothing sent since the last look, quiet for 2 s.
        let idle = Pace::after(Some((&look(70, 20), fourth)), &look(70, 2_000), 0);
        assert!(idle.silent_since_look);
        assert_eq!(not_due(idle, 2_000), Ok(()), "it stopped asking");
        // A stall of 5 s is forgotten after PAUSE_MEMORY looks at a 200 ms pace.
        let mut pace = Pace::after(Some((&look(70, 5_000), fourth)), &look(71, 20), 0);
        assert_eq!(pace.pause_ms, Some(5_000));
        for i in 0..=PAUSE_MEMORY {
            pace = Pace::after(Some((&look(72 + i, 150), pace)), &look(73 + i, 20), 0);
        }
        assert_eq!(pace.pause_ms, Some(150));
        // 9 segments sent in the second between two looks: it pauses at least 100 ms, though
        // the looks only saw it quiet for 30 ms.
        let averaged = Pace::after(Some((&look(10, 30), first)), &look(19, 40), 1_000);
        assert_eq!(averaged.pause_ms, Some(100));
        // A pool connection never seen sending between looks.
        let pool = Pace::after(Some((&look(7, 900), first)), &look(7, 1_900), 0);
        assert_eq!(not_due(pool, 1_900), Ok(()));
    }

    #[test]
    fn a_connection_receiving_without_asking_is_a_stream() {
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
        assert!(!streaming(&at(5, 5), &at(5, 6)), "a request, no answer yet");
        assert!(streaming(&at(10, 1), &at(11, 1)), "one push, nothing asked");
        assert!(streaming(&at(10, 1), &at(30, 1)), "20 pushes");
        assert!(
            !streaming(&at(10, 10), &at(22, 11)),
            "an answer of 12 segments (16 KB at a 1500-byte MTU)"
        );
    }
}
