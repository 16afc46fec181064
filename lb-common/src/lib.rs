//! Types shared by the BPF programs (lb-ebpf) and userspace (lb-userspace).
//!
//! Every struct here is the layout of a BPF map key or value, so all are `#[repr(C)]` with
//! explicit padding: the kernel compares keys byte by byte, and an implicit hole would make
//! two equal keys differ. Addresses and ports are kept in network byte order, exactly as the
//! `bpf_sock_addr` context carries them, so the hot path never swaps bytes.
//!
//! Every address is 16 bytes (`Addr`). IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`),
//! which is also how an `AF_INET6` socket names an IPv4 peer: a connect to `VIP` from an
//! `AF_INET` socket and a connect to `::ffff:VIP` from a dual-mode `AF_INET6` socket (Java,
//! .NET, gRPC C-core) look up the same Service entry, pick from the same backends and count
//! against the same per-backend counter. One set of maps serves both families.
#![no_std]

#[cfg(test)]
extern crate std;

/// Names of the maps, as pinned under the pin path (bpffs file names).
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const SLOTS: &str = "SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONN_COUNTS: &str = "CONN_COUNTS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const SERVICE_NAMES: &str = "SERVICE_NAMES";
    pub const SOCKETS: &str = "SOCKETS";
    pub const UDP_PEERS: &str = "UDP_PEERS";
    pub const RR_CURSORS: &str = "RR_CURSORS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const AFFINITY: &str = "AFFINITY";
    pub const REBALANCE_STATS: &str = "REBALANCE_STATS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const ENABLED_NETNS: &str = "ENABLED_NETNS";
    pub const COUNT_UNDERFLOWS: &str = "COUNT_UNDERFLOWS";
    pub const EVENTS: &str = "EVENTS";
    pub const V6ONLY: &str = "V6ONLY";
    pub const ALL: [&str; 17] = [
        SERVICES,
        SLOTS,
        BACKENDS,
        CONN_COUNTS,
        SERVICE_STATS,
        SERVICE_NAMES,
        SOCKETS,
        UDP_PEERS,
        RR_CURSORS,
        MAGLEV,
        AFFINITY,
        REBALANCE_STATS,
        SETTINGS,
        ENABLED_NETNS,
        COUNT_UNDERFLOWS,
        EVENTS,
        V6ONLY,
    ];
}

/// The layout of the pinned maps: their names, key and value types, sizes and limits. Bump it
/// with any change to them. The agent writes it next to the maps it pins (`LAYOUT`) and, when
/// it finds maps of another layout (an upgrade across such a change), replaces them instead
/// of failing to load on them.
pub const LAYOUT_VERSION: u32 = 5;

/// Capacity limits. They size the maps, so changing one needs `socklb-agent cleanup` first
/// (the loader refuses to reuse a pinned map of another size).
pub mod limits {
    /// Service frontends (one per ClusterIP, port and protocol).
    pub const MAX_SERVICES: u32 = 65_536;
    /// Backend entries, including draining ones that still hold connections: 50,000
    /// Services of 10 endpoints with room for churn. The hash maps allocate entries on use;
    /// their bucket arrays and the `CONN_COUNTS` array cost about 28 MiB of kernel memory.
    pub const MAX_BACKENDS: u32 = 524_288;
    /// Active slots over all services (a backend in service rotation takes one slot).
    pub const MAX_SLOTS: u32 = 524_288;
    /// Backends one frontend may have; larger sets are rejected with an error naming the
    /// Service. Bounds how long the userspace slot rewrite of one Service takes, not the
    /// BPF path (least-conn scans a bounded window, see `LEAST_CONN_WINDOW`).
    pub const MAX_BACKENDS_PER_SERVICE: u32 = 8_192;
    /// How many slots least-conn inspects per connect. Services with at most this many
    /// backends get an exact least-connections choice; larger ones compare this many
    /// distinct slots drawn at random (a "power of d choices" with d = 32), which keeps the
    /// per-connect cost bounded while staying close to exact.
    pub const LEAST_CONN_WINDOW: u32 = 32;
    /// Sizes a Service's Maglev lookup table may have: primes, as the algorithm needs. A
    /// Service gets the smallest that is at least 100 times its backends (so each backend
    /// owns about 100 entries or more and the shares differ by a few percent), and keeps it
    /// while its backends come and go within a factor of four (a new size reshuffles the
    /// clients: see `maglev::table_size` in the agent). The largest caps a table at 512 KiB of
    /// entries; beyond 1,310 backends a Service has fewer than 100 entries per backend.
    pub const MAGLEV_TABLE_SIZES: [u32; 4] = [4_093, 16_381, 65_521, 131_071];
    /// Maglev entries over all Services: eight of the largest tables, or 256 of the smallest.
    pub const MAX_MAGLEV_ENTRIES: u32 = 1_048_576;
    /// Session affinity entries (Service, client) in an LRU map: losing an old entry only
    /// loses that client's stickiness, never a connection.
    pub const MAX_AFFINITY: u32 = 65_536;
    /// Pods (network namespaces) a node can have switched on.
    pub const MAX_ENABLED_NETNS: u32 = 16_384;
    /// Service addresses one unconnected UDP socket can talk to at once (see `UdpPeers`).
    pub const UDP_PEERS_PER_SOCKET: usize = 4;
    /// Backends whose count was caught going below zero (`COUNT_UNDERFLOWS`).
    pub const MAX_UNDERFLOW_RECORDS: u32 = 4_096;
    /// Backend ids one socket walk can be narrowed to (more: the walk lists every socket).
    pub const MAX_ITER_FILTER: u32 = 16_384;
    /// The longest slow start window (`socklb.io/slow-start`): one hour.
    pub const MAX_SLOW_START_MS: u32 = 3_600_000;
}

/// Index of the agent's switches in the `SETTINGS` array, and their bits.
pub mod settings {
    pub const FLAGS: u32 = 0;
    /// Only sockets whose network namespace is in `ENABLED_NETNS` are balanced (Kubernetes
    /// mode: the programs sit at the cgroup root, the switch is per pod). Off in standalone
    /// mode, where everything in the cgroup is balanced.
    pub const FILTER_BY_NETNS: u64 = 1;
}

/// IP protocol numbers as they appear in `bpf_sock_addr.protocol`.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// How a Service picks a backend for a new connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// Uniform random draw per connection (what kube-proxy, Cilium and Calico do).
    Random = 0,
    /// Fewest live connections, ties broken at random.
    LeastConn = 1,
    /// Each CPU walks the slots in turn (per-CPU cursors: no shared counter to fight over).
    RoundRobin = 2,
    /// Consistent hashing of the client (Maglev): the same client goes to the same backend,
    /// and adding or removing one backend moves about 1/n of the clients.
    Maglev = 3,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Random,
        Algorithm::LeastConn,
        Algorithm::RoundRobin,
        Algorithm::Maglev,
    ];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Random),
            1 => Some(Self::LeastConn),
            2 => Some(Self::RoundRobin),
            3 => Some(Self::Maglev),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::LeastConn => "least-conn",
            Self::RoundRobin => "round-robin",
            Self::Maglev => "maglev",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// The Maglev key of a client: its network namespace (one per pod, known before the connect
/// is routed, unlike its IP) and the local port if the socket was bound to one. A 64-bit
/// finaliser (splitmix64) spreads it; userspace uses the same function in tests.
pub const fn client_hash(netns_cookie: u64, port: u16) -> u32 {
    let mut z = netns_cookie ^ ((port as u64) << 48) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// An IP address as the maps hold it: 16 bytes in network byte order, laid out as the
/// `user_ip6` words of `bpf_sock_addr`. IPv4 is v4-mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub [u32; 4]);

/// The third word of a v4-mapped address (bytes `00 00 ff ff`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// The v4-mapped form of an IPv4 address (network byte order, as `user_ip4`).
    #[inline(always)]
    pub const fn v4(ip4: u32) -> Addr {
        Addr([0, 0, V4_MAPPED_WORD, ip4])
    }

    /// The IPv4 address (network byte order) if this is v4-mapped.
    #[inline(always)]
    pub const fn as_v4(&self) -> Option<u32> {
        if self.0[0] == 0 && self.0[1] == 0 && self.0[2] == V4_MAPPED_WORD {
            Some(self.0[3])
        } else {
            None
        }
    }

    pub const fn is_unspecified(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == 0 && self.0[3] == 0
    }

    /// The address as userspace knows it: IPv4 for a v4-mapped address, else IPv6.
    pub fn ip(&self) -> core::net::IpAddr {
        let [a, b, c, d] = self.0.map(u32::to_ne_bytes);
        let v6 = core::net::Ipv6Addr::from([
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]);
        match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => v6.into(),
        }
    }
}

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Addr {
        let octets = match ip {
            core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            core::net::IpAddr::V6(v6) => v6.octets(),
        };
        let word =
            |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
        Addr([word(0), word(4), word(8), word(12)])
    }
}

/// Key of the `SERVICES` map: a Service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// ClusterIP (IPv4 v4-mapped).
    pub addr: Addr,
    /// Service port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Stable id of this frontend: index into `SERVICE_STATS`, part of `SlotKey`.
    pub id: u32,
    /// Number of active slots (`SlotKey.index` in `0..count`). Zero means the Service has no
    /// ready backend and connects are refused.
    pub count: u32,
    /// `Algorithm` as u8.
    pub algorithm: u8,
    /// `service_flags`.
    pub flags: u8,
    /// Rebalancing's quiet time for this Service in milliseconds (0: the agent's default).
    /// Only userspace reads it; kept here so a restarted agent reads it back with the rest.
    pub rebalance_quiet_ms: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 means no affinity.
    pub affinity_timeout: u32,
    /// Entries of its Maglev table (`MAGLEV`, indexes `0..maglev_size`); 0 unless the
    /// algorithm is maglev and there are backends.
    pub maglev_size: u32,
    /// Slow start window in milliseconds (`socklb.io/slow-start`), 0 for none: a backend that
    /// joins the Service takes part in a growing fraction of its connects until the window
    /// has passed (see `slow_start_load`).
    pub slow_start_ms: u32,
}

/// Bits of `Service.flags`. Only userspace reads them.
pub mod service_flags {
    /// Opted in to active rebalancing (`socklb.io/rebalance: "true"`).
    pub const REBALANCE: u8 = 1;
}

/// Key of the `AFFINITY` LRU map: a client of a Service. The client is identified by its
/// network namespace cookie, as with Maglev (Cilium's socket LB does the same).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub service_id: u32,
    pub _pad: u32,
    pub client: u64,
}

/// Value of the `AFFINITY` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last connect that used it.
    pub last_used_ns: u64,
}

/// Per-frontend rebalancing record in `REBALANCE_STATS` (keyed by service id), written by the
/// agent only, read by socklbctl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebalanceStats {
    /// Connections closed to rebalance, in all.
    pub closed: u64,
    /// Intervals in which at least one was closed.
    pub rounds: u64,
    /// The most closed in one interval.
    pub largest_round: u64,
    /// Unix time (seconds) of the last closure.
    pub last_unix: u64,
    /// Closures that failed (the socket could not be reached or shut down).
    pub errors: u64,
}

/// Key of the `SLOTS` map: slot `index` of frontend `service_id`. The value is a backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub index: u32,
}

/// Backend states, for `Backend.state`.
pub mod backend_state {
    /// In its Service's slots: gets new connections.
    pub const ACTIVE: u8 = 0;
    /// Out of rotation (removed or not ready); kept until its last connection closes so the
    /// id is not reused while sockets still refer to it.
    pub const DRAINING: u8 = 1;
}

/// Value of the `BACKENDS` map, keyed by backend id (`0..MAX_BACKENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Pod address (IPv4 v4-mapped); always of the family of its Service's ClusterIP.
    pub addr: Addr,
    /// Pod port, network byte order.
    pub port: u16,
    pub state: u8,
    pub _pad: u8,
    /// Frontend this backend belongs to.
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it joined its Service's rotation, the start
    /// of its slow start; 0 for a backend that does not ramp up: one a Service was created or
    /// scaled up from zero with (nothing to ramp up against), or one that joined while the
    /// Service had no slow start.
    pub since_ns: u64,
}

/// Added to the load of a backend left out of a connect by its slow start: it still wins
/// if every backend compared is left out (a connect is never refused for it).
pub const SLOW_START_OUT: u64 = 1 << 48;

/// The load least-conn compares for a backend with `load` live connections that joined its
/// Service `age_ms` ago, under a slow start window of `window_ms`. `draw` is one uniform draw
/// in `0..window_ms` per connect, shared by every backend it compares. A backend still in
/// its window takes part in the connect only if `draw < age_ms`, that is with probability
/// `f = age / window`; otherwise it counts as `SLOW_START_OUT` more. Backends that joined
/// together are in or out together, so the share of new connections they get is `f` times
/// what least-conn alone would give them: it ramps up linearly from 0 to their full share at
/// the end of the window, whether connections are long-lived (where least-conn alone would
/// send them every new connection until they caught up) or short (where it would give them
/// their 1/n at once). Envoy's `slow_start_config` scales weights by the same factor.
/// Shared by the BPF scan and the tests.
#[inline(always)]
pub const fn slow_start_load(load: u64, age_ms: u64, window_ms: u64, draw: u64) -> u64 {
    if age_ms >= window_ms || draw < age_ms {
        load
    } else {
        load + SLOW_START_OUT
    }
}

/// Per-frontend counters in `SERVICE_STATS` (indexed by service id), bumped atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connects rewritten to a backend.
    pub connects: u64,
    /// Connects refused because the Service had no backend.
    pub refused: u64,
}

/// Userspace-only metadata of a frontend (`SERVICE_NAMES`, keyed by service id), so
/// `socklbctl` can name what it shows while the agent is stopped. NUL-padded strings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub namespace: [u8; 64],
    pub name: [u8; 64],
    pub port_name: [u8; 16],
}

/// Socket-local storage (`SOCKETS`, a `BPF_MAP_TYPE_SK_STORAGE`) of a TCP or connected UDP
/// socket that socklb assigned to a backend. The kernel frees it with the socket, so unlike an
/// LRU map no live entry can be evicted.
///
/// # Exactly-once counting
///
/// `connect4`/`connect6` count a socket against its backend (`CONN_COUNTS[backend_id] += 1`)
/// and set `live` to 1 in the same run, under the socket lock that connect() holds. Every path
/// that ends the assignment takes `live` back to 0 with one atomic exchange and decrements the
/// count only if the exchange returned 1, so of all the paths that may race (a TCP state
/// callback in softirq, `sock_release`, a new connect on the same socket) exactly one
/// decrements:
/// - `sock_ops`, when the TCP connection leaves ESTABLISHED / SYN_SENT (closed, reset,
///   refused, timed out);
/// - `sock_release`, when the application closes the socket, unconditionally: it is the
///   backstop for sockets whose state callbacks never come (a connect that failed before the
///   SYN, connected UDP, or another program that switched the callbacks off);
/// - `connect4`/`connect6` on a socket that connects again, before the new assignment (also
///   when `connect6` then leaves the new connect alone, as for a V6ONLY socket connecting to a
///   v4-mapped address);
/// - `sendmsg4`/`sendmsg6` on a UDP socket that was connected through socklb and is no longer
///   connected (the application disconnected it with `connect(AF_UNSPEC)`, which no hook
///   sees) and now sends with an explicit address.
///
/// A new assignment sets `live` to 1 only in connect(), which cannot run concurrently with
/// `sock_release` on the same socket, and only after the previous one was ended, so a
/// count is never incremented twice for one assignment. The decrement never takes a count
/// below zero: it is a compare-and-swap that refuses at 0 (or, if it keeps losing races, a
/// decrement undone at once if it wrapped) and records the backend in
/// `COUNT_UNDERFLOWS`, which the agent reports (log, metric, `socklbctl backend list`).
///
/// Each change (an assignment, or the end of one) is bracketed by the per-CPU `EVENTS`
/// counters (started before, finished after), which is what lets the agent take a snapshot
/// of sockets and counts (see the agent's `recount`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// 1 while the socket counts against `backend_id`; cleared only by atomic exchange.
    pub live: u64,
    /// Network namespace cookie of the socket: where the agent finds it (rebalancing,
    /// closing sockets to removed UDP backends).
    pub netns: u64,
    pub backend_id: u32,
    pub service_id: u32,
    /// The Service address the application asked for, shown back to it by getpeername and
    /// recvmsg (v4-mapped for an IPv4 Service, whatever the socket's family).
    pub vip: Addr,
    pub backend_addr: Addr,
    /// The socket's own address, recorded when the TCP connect goes out (sock_ops); zero for
    /// UDP. With `backend_addr` it names the connection for sock_diag.
    pub local: Addr,
    pub vport: u16,
    pub backend_port: u16,
    /// Host byte order (as sock_ops gives it); 0 for UDP.
    pub local_port: u16,
    /// `AF_INET` or `AF_INET6`: the socket's family (an AF_INET6 socket may talk IPv4).
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
}

/// The key of `ITER_BACKENDS` that makes the socket iterator list every backend's sockets.
pub const ITER_ALL: u32 = u32::MAX;
/// The key of `ITER_BACKENDS` that makes the socket iterator count every backend's sockets
/// into `ITER_FOUND` instead of listing them: a walk that writes nothing is served in one
/// read, never resumed part-way (see the agent's `sockets::SocketIterator::count`).
pub const ITER_COUNT: u32 = u32::MAX - 1;

/// What the socket iterator (`dump_sockets`) writes per assigned socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// The kernel's socket cookie: SOCK_DESTROY and SO_COOKIE name exactly this socket.
    pub cookie: u64,
    pub state: SockState,
}

/// Socket-local storage (`UDP_PEERS`) of an unconnected UDP socket that sent to Services:
/// each Service address it sent to and the backend that got it, so that it keeps talking to
/// that backend and recvmsg shows the answers as coming from the Service. A few entries
/// suffice (a DNS client talks to one to three servers); the oldest is reused. Kept apart from
/// `SockState` so TCP sockets do not carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpPeers {
    /// Next entry to overwrite.
    pub next: u32,
    pub _pad: u32,
    pub peers: [UdpPeer; limits::UDP_PEERS_PER_SOCKET],
}

/// One Service address an unconnected UDP socket sent to. The backend is remembered by id
/// *and* address: an entry is used only while that id still names that address in the same
/// Service, so an id handed to another pod never misroutes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpPeer {
    pub vip: Addr,
    pub backend_addr: Addr,
    pub vport: u16,
    pub backend_port: u16,
    pub backend_id: u32,
}

/// What `adjust_count` reads from the test-run data after the 14-byte Ethernet header: the
/// agent applies a repair as one compare-and-swap in the kernel, never as a racing absolute
/// write. Its return value is one of `adjust_result`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountAdjustment {
    pub backend_id: u32,
    pub _pad: u32,
    /// Two's complement: a negative delta wraps.
    pub delta: u64,
}

/// What `adjust_count` returns.
pub mod adjust_result {
    pub const APPLIED: u32 = 0;
    /// The count is lower than the decrement asked for (it moved since the agent looked): left
    /// as it was.
    pub const BELOW_ZERO: u32 = 1;
    /// Unknown backend id, or the count kept changing under the compare-and-swap.
    pub const NOT_APPLIED: u32 = 2;
}

impl ServiceName {
    pub const fn empty() -> Self {
        Self {
            namespace: [0; 64],
            name: [0; 64],
            port_name: [0; 16],
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all types are repr(C), Copy, and have no implicit padding (checked below).
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for UdpPeer {}
    unsafe impl aya::Pod for UdpPeers {}
    unsafe impl aya::Pod for SocketRecord {}
    unsafe impl aya::Pod for CountAdjustment {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for RebalanceStats {}

    const _: () = {
        assert!(size_of::<Addr>() == 16);
        assert!(size_of::<ServiceKey>() == 20);
        assert!(size_of::<Service>() == 24);
        assert!(size_of::<AffinityKey>() == 16);
        assert!(size_of::<Affinity>() == 16);
        assert!(size_of::<RebalanceStats>() == 40);
        assert!(size_of::<SlotKey>() == 8);
        assert!(size_of::<Backend>() == 32);
        assert!(size_of::<ServiceStats>() == 16);
        assert!(size_of::<ServiceName>() == 144);
        assert!(size_of::<UdpPeer>() == 40);
        assert!(size_of::<UdpPeers>() == 8 + 40 * limits::UDP_PEERS_PER_SOCKET);
        assert!(size_of::<SockState>() == 80);
        assert!(size_of::<SocketRecord>() == 88);
        assert!(size_of::<CountAdjustment>() == 16);
    };
}

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn slow_start_lets_a_backend_in_with_the_probability_of_its_age() {
        let w = 30_000;
        assert_eq!(slow_start_load(7, w, w, 0), 7, "after the window");
        assert_eq!(slow_start_load(7, 0, 0, 0), 7, "no window");
        // Over every draw, a backend 1/4 into its window takes part in 1/4 of the connects.
        for age in [0, 7_500, 15_000, 29_999] {
            let taking_part = (0..w)
                .filter(|draw| slow_start_load(3, age, w, *draw) == 3)
                .count() as u64;
            assert_eq!(taking_part, age);
        }
        // Left out, it still beats nothing: more than any real load, far from overflow.
        assert!(slow_start_load(0, 0, w, w - 1) > 1 << 40);
        assert!(slow_start_load(1 << 40, 0, w, w - 1) < u64::MAX / 2);
    }

    #[test]
    fn ipv4_is_stored_v4_mapped_as_connect6_sees_it() {
        let ip = Ipv4Addr::new(10, 96, 7, 7);
        // What connect4 reads from user_ip4 (network byte order, read as a native u32) ...
        let user_ip4 = u32::from_ne_bytes(ip.octets());
        // ... and what connect6 reads from user_ip6 for `::ffff:10.96.7.7`.
        let mapped = ip.to_ipv6_mapped().octets();
        let user_ip6 = [0, 4, 8, 12]
            .map(|i| u32::from_ne_bytes([mapped[i], mapped[i + 1], mapped[i + 2], mapped[i + 3]]));
        assert_eq!(Addr::v4(user_ip4), Addr(user_ip6));
        assert_eq!(Addr::from(IpAddr::V4(ip)), Addr(user_ip6));
        assert_eq!(Addr::v4(user_ip4).as_v4(), Some(user_ip4));
        assert_eq!(Addr::v4(user_ip4).ip(), IpAddr::V4(ip));
    }

    #[test]
    fn ipv6_round_trips_and_is_not_v4() {
        let ip: Ipv6Addr = "fd00:96::10".parse().unwrap();
        let a = Addr::from(IpAddr::V6(ip));
        assert_eq!(a.as_v4(), None);
        assert_eq!(a.ip(), IpAddr::V6(ip));
        assert!(Addr::default().is_unspecified() && !a.is_unspecified());
    }
}
