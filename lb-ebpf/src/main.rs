//! socklb's BPF programs, attached to a cgroup v2 directory.
//!
//! - `connect4`/`connect6` rewrite a connect to a Service VIP:port into a connect to a chosen
//!   backend, so there is no per-packet NAT and no conntrack entry. They also count the
//!   connection against the backend from that moment (`CONN_COUNTS`), which is what least-conn
//!   balances on.
//! - `sendmsg4`/`sendmsg6` do the same for each datagram an unconnected UDP socket sends to a
//!   Service (`sendto`, as DNS clients do), without counting it as a connection.
//! - `getpeername4/6` and `recvmsg4/6` show the application the Service address it asked for.
//!
//! Both families share one set of maps: addresses are 16 bytes, IPv4 stored v4-mapped
//! (`lb_common::Addr`). A dual-mode `AF_INET6` socket (Java's, .NET's and gRPC C-core's
//! default) connecting to `::ffff:VIP` reaches `connect6` with exactly the key an `AF_INET`
//! connect to `VIP` builds in `connect4`, so both get the same Service, algorithm and
//! per-backend count, and the v6 socket is sent to `::ffff:pod`. What the kernel runs for such
//! sockets (checked by the tests): `connect6` for TCP and connected UDP; `sendmsg4` for
//! `sendto(::ffff:VIP)`, because `udpv6_sendmsg` hands v4-mapped destinations to the IPv4
//! path before its own hook; `recvmsg6` and `getpeername6`, which see `::ffff:pod`.
//! - `sock_ops` asks for TCP state callbacks on the sockets socklb assigned and stops counting a
//!   connection when it leaves ESTABLISHED (closed, reset, refused, timed out).
//! - `sock_release` stops counting when the application closes a socket, whatever happened
//!   before: the backstop (see `lb_common::SockState` for why each assignment is uncounted
//!   exactly once).
//! - `dump_sockets` is a BPF iterator over `SOCKETS`: it lists every socket socklb assigned,
//!   in every network namespace, for the agent's recount and rebalancer.
//! - `adjust_count` is run by the agent (BPF_PROG_TEST_RUN) to repair a count with one
//!   compare-and-swap, so a repair never races with the programs' own updates.
//! - `setsockopt` notes which `AF_INET6` sockets set `IPV6_V6ONLY`: such a socket cannot
//!   reach an IPv4 address, so `connect6` leaves its connects to `::ffff:VIP` alone (the
//!   kernel fails them with ENETUNREACH, as without socklb) instead of assigning and counting
//!   a connection that can never be made.
//!
//! Per-socket state lives in socket-local storage (`SOCKETS`, and `UDP_PEERS` for unconnected
//! UDP), freed by the kernel with the socket.
//!
//! In Kubernetes mode the programs sit at the cgroup root and only balance sockets of pods the
//! agent switched on: their network namespace cookie is in `ENABLED_NETNS` (Kmesh does the
//! same). Everything else goes on to kube-proxy untouched.
//!
//! Oldest kernel: 5.18 (setsockopt hook 5.3, bpf_link cgroup attach 5.7, getpeername hooks
//! 5.8, sock_release 5.9, `bpf_sock_ops.sk` 5.10, atomic exchange and compare-and-swap 5.12,
//! `bpf_loop` 5.17, `bpf_set_retval` 5.18).
#![no_std]
#![no_main]
// core::sync::atomic offers no read-modify-write methods for the BPF target; the intrinsics
// map straight onto BPF's atomic instructions.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
    ptr::{self, read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_ESTABLISHED, BPF_TCP_SYN_RECV, BPF_TCP_SYN_SENT, bpf_sock,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SkStorage},
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_smp_processor_id, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_loop, bpf_map_update_elem, bpf_seq_write, bpf_set_retval,
        bpf_sk_storage_get, bpf_skb_load_bytes,
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext, SockoptContext},
};
use lb_common::{
    Addr, Affinity, AffinityKey, Algorithm, Backend, CountAdjustment, IPPROTO_UDP, ITER_ALL,
    ITER_COUNT, RebalanceStats, SLOW_START_OUT, Service, ServiceKey, ServiceName, ServiceStats,
    SlotKey, SockState, SocketRecord, UdpPeer, UdpPeers, adjust_result, backend_state, client_hash,
    limits::{
        LEAST_CONN_WINDOW, MAX_AFFINITY, MAX_BACKENDS, MAX_ENABLED_NETNS, MAX_ITER_FILTER,
        MAX_MAGLEV_ENTRIES, MAX_SERVICES, MAX_SLOTS, MAX_UNDERFLOW_RECORDS, UDP_PEERS_PER_SOCKET,
    },
    settings, slow_start_load,
};

const AF_INET: u32 = 2;
const SOL_IPV6: i32 = 41;
const IPV6_V6ONLY: i32 = 26;
/// `sk_state` of a connected UDP socket (it goes back to TCP_CLOSE when disconnected).
const UDP_CONNECTED: u32 = BPF_TCP_ESTABLISHED;

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map(pin_by_name)]
static SERVICES: HashMap<ServiceKey, Service, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(pin_by_name)]
static SLOTS: HashMap<SlotKey, u32, { MAX_SLOTS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(pin_by_name)]
static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }, NO_PREALLOC> = HashMap::new();

/// Live connections per backend id. Only the programs write it (atomic add/sub); userspace reads.
#[btf_map(pin_by_name)]
static CONN_COUNTS: Array<u64, { MAX_BACKENDS as usize }> = Array::new();

#[btf_map(pin_by_name)]
static SERVICE_STATS: Array<ServiceStats, { MAX_SERVICES as usize }> = Array::new();

/// Written and read by userspace only; declared here so it is created and pinned with the rest.
#[btf_map(pin_by_name)]
static SERVICE_NAMES: HashMap<u32, ServiceName, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(pin_by_name)]
static SOCKETS: SkStorage<SockState> = SkStorage::new();

/// Unconnected UDP sockets' Service peers (only such sockets get this storage).
#[btf_map(pin_by_name)]
static UDP_PEERS: SkStorage<UdpPeers> = SkStorage::new();

/// Which backend ids `dump_sockets` lists, each with how many of its sockets it may still
/// list (`ITER_ALL` as a key: every socket). Not pinned: each program that loads the object
/// (the agent, socklbctl) has its own. Listing only what is asked keeps a walk linear: the
/// kernel serves an iterator a page at a time, and each page after the first starts by
/// skipping again through a hash bucket of a map that has as few buckets as CPUs, so the
/// pages written, not the sockets walked, are what costs.
#[btf_map]
static ITER_BACKENDS: HashMap<u32, u64, { MAX_ITER_FILTER as usize }, NO_PREALLOC> = HashMap::new();

/// Backend id -> live sockets found by a counting walk (`ITER_COUNT`). Not pinned, like
/// `ITER_BACKENDS`.
#[btf_map]
static ITER_FOUND: HashMap<u32, u64, { MAX_BACKENDS as usize }, NO_PREALLOC> = HashMap::new();

/// Sockets a counting walk could not add to `ITER_FOUND` (an entry it could not allocate).
#[btf_map]
static ITER_MISSED: Array<u64, 1> = Array::new();

/// Backend id -> times its count was caught about to go below zero (and left at zero).
/// Nothing should ever be here; the agent reports whatever is.
#[btf_map(pin_by_name)]
static COUNT_UNDERFLOWS: HashMap<u32, u64, { MAX_UNDERFLOW_RECORDS as usize }, NO_PREALLOC> =
    HashMap::new();

/// Changes to the assignments (a count and a socket's `live` flag), one pair of monotonic
/// counters per CPU: `EVENT_STARTED` is bumped before a change, `EVENT_FINISHED` after it. The
/// agent trusts a look at the sockets and counts only if every change started before it had
/// finished and none started during it: then the look is a snapshot.
#[btf_map(pin_by_name)]
static EVENTS: PerCpuArray<u64, 2> = PerCpuArray::new();
const EVENT_STARTED: u32 = 0;
const EVENT_FINISHED: u32 = 1;

/// `AF_INET6` sockets that set `IPV6_V6ONLY` (1) or cleared it again (0).
#[btf_map(pin_by_name)]
static V6ONLY: SkStorage<u32> = SkStorage::new();

/// Round-robin position per Service, one per CPU: no shared counter, no lock.
#[btf_map(pin_by_name)]
static RR_CURSORS: PerCpuArray<u32, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Maglev lookup tables: (service id, index < its `Service.maglev_size`) -> backend id.
#[btf_map(pin_by_name)]
static MAGLEV: HashMap<SlotKey, u32, { MAX_MAGLEV_ENTRIES as usize }, NO_PREALLOC> = HashMap::new();

/// sessionAffinity: ClientIP. An LRU is right here: an evicted entry only loses stickiness.
#[btf_map(pin_by_name)]
static AFFINITY: LruHashMap<AffinityKey, Affinity, { MAX_AFFINITY as usize }> = LruHashMap::new();

/// The agent's switches (`lb_common::settings`).
#[btf_map(pin_by_name)]
static SETTINGS: Array<u64, 1> = Array::new();

/// Network namespace cookies of the pods switched on (Kubernetes mode).
#[btf_map(pin_by_name)]
static ENABLED_NETNS: HashMap<u64, u8, { MAX_ENABLED_NETNS as usize }, NO_PREALLOC> =
    HashMap::new();

/// Written by the agent's rebalancer only; declared here so it is pinned with the rest.
#[btf_map(pin_by_name)]
static REBALANCE_STATS: HashMap<u32, RebalanceStats, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

/// Allow the syscall (cgroup program verdict).
const ALLOW: i32 = 1;
/// Reject the syscall; the errno is the one set with `bpf_set_retval`.
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let key = unsafe { service_key(&ctx, Addr::v4((*ctx.sock_addr).user_ip4)) };
    match unsafe { try_connect(&ctx, key) } {
        Verdict::Rewrite(addr, port) => match addr.as_v4() {
            Some(ip4) => unsafe { write_v4(&ctx, ip4, port) },
            // An IPv4 Service only ever has IPv4 backends; leave anything else alone.
            None => ALLOW,
        },
        other => other.code(),
    }
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let key = unsafe { service_key(&ctx, read_v6(&ctx)) };
    if key.addr.as_v4().is_some() && unsafe { v6only(&ctx) } {
        // A V6ONLY socket's connect to `::ffff:VIP` fails in the kernel whatever we write;
        // only an earlier assignment (a reconnect) ends here.
        let previous = SOCKETS.get_ptr_mut(&ctx);
        if !previous.is_null() {
            unsafe { release(previous) };
        }
        return ALLOW;
    }
    match unsafe { try_connect(&ctx, key) } {
        // `::ffff:VIP` (an IPv4 Service) goes to `::ffff:pod`, an IPv6 VIP to an IPv6 pod.
        Verdict::Rewrite(addr, port) => unsafe { write_v6(&ctx, addr, port) },
        other => other.code(),
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    let key = unsafe { service_key(&ctx, Addr::v4((*ctx.sock_addr).user_ip4)) };
    match unsafe { try_sendmsg(&ctx, key) } {
        Verdict::Rewrite(addr, port) => match addr.as_v4() {
            Some(ip4) => unsafe { write_v4(&ctx, ip4, port) },
            None => ALLOW,
        },
        other => other.code(),
    }
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let key = unsafe { service_key(&ctx, read_v6(&ctx)) };
    if key.addr.as_v4().is_some() {
        // The kernel sends v4-mapped datagrams through sendmsg4 and never gets here with one;
        // rewriting to a v4-mapped destination here would fail the send (-ENOTSUPP).
        return ALLOW;
    }
    match unsafe { try_sendmsg(&ctx, key) } {
        Verdict::Rewrite(addr, port) => unsafe { write_v6(&ctx, addr, port) },
        other => other.code(),
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    unsafe { show_service_address4(&ctx) };
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    unsafe { show_service_address4(&ctx) };
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    unsafe { show_service_address6(&ctx) };
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    unsafe { show_service_address6(&ctx) };
    ALLOW
}

/// Records `IPV6_V6ONLY` as the application sets it; the option itself is left to the kernel.
#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    let opt = ctx.sockopt;
    // SAFETY: the context is valid for the run; optval is bounds-checked against optval_end.
    unsafe {
        if (*opt).level != SOL_IPV6 || (*opt).optname != IPV6_V6ONLY {
            return ALLOW;
        }
        let value = (*opt).__bindgen_anon_2.optval.cast::<u8>();
        let end = (*opt).__bindgen_anon_3.optval_end.cast::<u8>();
        if value.is_null() || value.add(4) > end {
            return ALLOW; // a short option: the kernel refuses it
        }
        let on = u32::from(read_volatile(value.cast::<u32>()) != 0);
        let sk = (*opt).__bindgen_anon_1.sk;
        if sk.is_null() || (*sk).src_port != 0 {
            return ALLOW; // bound already: the kernel refuses the change (EINVAL)
        }
        let flag: *mut u32 = bpf_sk_storage_get(
            v6only_map(),
            sk.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
        .cast();
        if !flag.is_null() {
            *flag = on;
        }
    }
    ALLOW
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    unsafe { track_tcp_state(&ctx) };
    ALLOW as u32
}

#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    let state = unsafe { storage_of(ctx.sock) };
    if !state.is_null() {
        unsafe { release(state) };
    }
    ALLOW
}

/// The context of an `iter/bpf_sk_storage_map` program (`struct bpf_iter__bpf_sk_storage_map`:
/// four pointers; the verifier checks each load against the kernel's BTF of it).
#[repr(C)]
struct SkStorageIterContext {
    meta: *mut IterMeta,
    map: *mut c_void,
    sk: *mut c_void,
    value: *mut SockState,
}

/// The start of `struct bpf_iter_meta`.
#[repr(C)]
struct IterMeta {
    seq: *mut c_void,
}

/// Lists the live assignments of `SOCKETS` (the agent attaches it to that map): one
/// `SocketRecord` per socket, whatever its network namespace.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/bpf_sk_storage_map")]
pub extern "C" fn dump_sockets(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<SkStorageIterContext>();
    // SAFETY: the kernel passes the iterator context; sk and value are null at the end.
    unsafe {
        let (sk, value) = ((*ctx).sk, (*ctx).value);
        if sk.is_null() || value.is_null() || read_volatile(&raw const (*value).live) == 0 {
            return 0;
        }
        if ITER_BACKENDS.get(&ITER_COUNT).is_some() {
            if !bump_key(&ITER_FOUND, (*value).backend_id)
                && let Some(missed) = ITER_MISSED.get_ptr_mut(0)
            {
                add(missed, 1); // the walk is not to be trusted
            }
            return 0;
        }
        if ITER_BACKENDS.get(&ITER_ALL).is_none() {
            // Only the backends asked for, as many of each as asked.
            let Some(left) = ITER_BACKENDS.get_ptr_mut(&(*value).backend_id) else {
                return 0;
            };
            if read_volatile(left) == 0 {
                return 0;
            }
        }
        let mut record = SocketRecord {
            cookie: bpf_get_socket_cookie(sk),
            state: *value,
        };
        let seq = (*(*ctx).meta).seq;
        let written = bpf_seq_write(
            seq.cast(),
            (&raw mut record).cast(),
            size_of::<SocketRecord>() as u32,
        );
        // A record that did not fit is written again on the next page: it costs no budget.
        if written == 0
            && let Some(left) = ITER_BACKENDS.get_ptr_mut(&(*value).backend_id)
        {
            add(left, u64::MAX); // one fewer (walks are one at a time per map)
        }
    }
    0
}

/// Adds a `CountAdjustment` (given as test-run data after a 14-byte Ethernet header) to a
/// backend's count with a compare-and-swap that refuses to go below zero. Run only by the
/// agent, never attached; returns one of `adjust_result`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "socket")]
pub extern "C" fn adjust_count(skb: *mut __sk_buff) -> i64 {
    let mut adjustment = CountAdjustment::default();
    // SAFETY: a bounded copy into a local of the same size.
    let copied = unsafe {
        bpf_skb_load_bytes(
            skb.cast(),
            0,
            (&raw mut adjustment).cast(),
            size_of::<CountAdjustment>() as u32,
        )
    };
    if copied != 0 {
        return i64::from(adjust_result::NOT_APPLIED);
    }
    let Some(count) = CONN_COUNTS.get_ptr_mut(adjustment.backend_id) else {
        return i64::from(adjust_result::NOT_APPLIED);
    };
    let delta = adjustment.delta as i64;
    for _ in 0..4 {
        let now = unsafe { read_volatile(count) };
        let Some(new) = (now as i64).checked_add(delta).filter(|n| *n >= 0) else {
            return i64::from(adjust_result::BELOW_ZERO);
        };
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                count, now, new as u64,
            )
        };
        if swapped {
            return i64::from(adjust_result::APPLIED);
        }
    }
    i64::from(adjust_result::NOT_APPLIED)
}

/// What a hook does with the address the application gave.
enum Verdict {
    /// Not a Service (or not this pod's): leave it.
    Pass,
    /// The Service has no backend: fail with ECONNREFUSED.
    Refuse,
    /// Send it to this backend (address, port in network byte order).
    Rewrite(Addr, u16),
}

impl Verdict {
    #[inline(always)]
    fn code(self) -> i32 {
        match self {
            Verdict::Refuse => {
                // Fail at once, like kube-proxy's REJECT rule, instead of letting the connect to
                // an unrouted VIP hang or leave the node.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
                REJECT
            }
            Verdict::Pass | Verdict::Rewrite(..) => ALLOW,
        }
    }
}

#[inline(always)]
unsafe fn service_key(ctx: &SockAddrContext, addr: Addr) -> ServiceKey {
    let sa = ctx.sock_addr;
    ServiceKey {
        addr,
        port: unsafe { (*sa).user_port } as u16,
        proto: unsafe { (*sa).protocol } as u8,
        _pad: 0,
    }
}

/// The IPv6 destination (only readable in the v6 hooks).
#[inline(always)]
unsafe fn read_v6(ctx: &SockAddrContext) -> Addr {
    let ip = unsafe { &raw const (*ctx.sock_addr).user_ip6 };
    unsafe {
        Addr([
            read_volatile(&raw const (*ip)[0]),
            read_volatile(&raw const (*ip)[1]),
            read_volatile(&raw const (*ip)[2]),
            read_volatile(&raw const (*ip)[3]),
        ])
    }
}

// The verifier only accepts full 4-byte stores into the address and port fields.
#[inline(always)]
unsafe fn write_v4(ctx: &SockAddrContext, ip4: u32, port: u16) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        write_volatile(&raw mut (*sa).user_ip4, ip4);
        write_volatile(&raw mut (*sa).user_port, u32::from(port));
    }
    ALLOW
}

#[inline(always)]
unsafe fn write_v6(ctx: &SockAddrContext, addr: Addr, port: u16) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        let ip = &raw mut (*sa).user_ip6;
        write_volatile(&raw mut (*ip)[0], addr.0[0]);
        write_volatile(&raw mut (*ip)[1], addr.0[1]);
        write_volatile(&raw mut (*ip)[2], addr.0[2]);
        write_volatile(&raw mut (*ip)[3], addr.0[3]);
        write_volatile(&raw mut (*sa).user_port, u32::from(port));
    }
    ALLOW
}

/// connect4/connect6: pick a backend for a connect to a Service and count it.
#[inline(always)]
unsafe fn try_connect(ctx: &SockAddrContext, key: ServiceKey) -> Verdict {
    let previous = SOCKETS.get_ptr_mut(ctx);
    if !previous.is_null() {
        // The socket is connecting again (UDP re-connect, or a TCP connect retried after a
        // failure that happened before any state change): its earlier assignment ends here.
        unsafe { release(previous) };
    }
    let Some(service) = (unsafe { SERVICES.get(&key) }) else {
        return Verdict::Pass;
    };
    if !switched_on(ctx) {
        return Verdict::Pass;
    }
    let Some((backend_id, backend)) = (unsafe { pick_backend(ctx, service) }) else {
        bump_stats(service.id, |s| unsafe { &raw mut (*s).refused });
        return Verdict::Refuse;
    };

    let state = SOCKETS.get_or_insert_ptr_mut(ctx, None);
    if !state.is_null() {
        note_event(EVENT_STARTED);
        if let Some(count) = CONN_COUNTS.get_ptr_mut(backend_id) {
            unsafe { add(count, 1) };
        }
        let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
        unsafe {
            *state = SockState {
                live: 1,
                netns: bpf_get_netns_cookie(ctx.as_ptr()),
                backend_id,
                service_id: service.id,
                vip: key.addr,
                backend_addr: backend.addr,
                local: Addr::default(),
                vport: key.port,
                backend_port: backend.port,
                local_port: 0,
                family: (*sk).family as u8,
                protocol: key.proto,
            };
        }
        note_event(EVENT_FINISHED);
    }
    bump_stats(service.id, |s| unsafe { &raw mut (*s).connects });
    Verdict::Rewrite(backend.addr, backend.port)
}

/// Whether this socket's pod is balanced by socklb (always, outside Kubernetes mode).
#[inline(always)]
fn switched_on(ctx: &SockAddrContext) -> bool {
    let flags = SETTINGS.get(settings::FLAGS).copied().unwrap_or(0);
    if flags & settings::FILTER_BY_NETNS == 0 {
        return true;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    (unsafe { ENABLED_NETNS.get(&cookie) }).is_some()
}

/// A datagram from an unconnected UDP socket to a Service: send it to a backend, and remember
/// the pair so that the answer is shown as coming from the Service. A socket keeps talking to
/// the backend it got for a Service address while that backend is an active backend of the
/// Service at the same address; otherwise it picks again, in the same entry.
#[inline(always)]
unsafe fn try_sendmsg(ctx: &SockAddrContext, key: ServiceKey) -> Verdict {
    if key.proto != IPPROTO_UDP {
        return Verdict::Pass;
    }
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let connected = SOCKETS.get_ptr_mut(ctx);
    if !connected.is_null() && unsafe { (*sk).state } != UDP_CONNECTED {
        // It was connected through socklb and has since been disconnected (connect with
        // AF_UNSPEC, which no hook sees): that assignment is over.
        unsafe { release(connected) };
    }
    let Some(service) = (unsafe { SERVICES.get(&key) }) else {
        return Verdict::Pass;
    };
    if !switched_on(ctx) {
        return Verdict::Pass;
    }
    let peers: *mut UdpPeers = unsafe {
        bpf_sk_storage_get(
            udp_peers_map(),
            sk.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast();
    if peers.is_null() {
        return Verdict::Pass;
    }
    // The entry for this Service address, else the next one to reuse.
    let mut slot = unsafe { (*peers).next } as usize % UDP_PEERS_PER_SOCKET;
    let mut known = false;
    for i in 0..UDP_PEERS_PER_SOCKET {
        let p = unsafe { (*peers).peers[i] };
        if !known && p.vip == key.addr && p.vport == key.port && !p.backend_addr.is_unspecified() {
            (slot, known) = (i, true);
        }
    }
    let cached = unsafe { (*peers).peers[slot % UDP_PEERS_PER_SOCKET] };
    if known && unsafe { still_serves(&cached, service.id) } {
        bump_stats(service.id, |s| unsafe { &raw mut (*s).connects });
        return Verdict::Rewrite(cached.backend_addr, cached.backend_port);
    }
    let Some((backend_id, backend)) = (unsafe { pick_backend(ctx, service) }) else {
        bump_stats(service.id, |s| unsafe { &raw mut (*s).refused });
        return Verdict::Refuse;
    };
    unsafe {
        (*peers).peers[slot % UDP_PEERS_PER_SOCKET] = UdpPeer {
            vip: key.addr,
            backend_addr: backend.addr,
            vport: key.port,
            backend_port: backend.port,
            backend_id,
        };
        if !known {
            (*peers).next = ((slot + 1) % UDP_PEERS_PER_SOCKET) as u32;
        }
    }
    bump_stats(service.id, |s| unsafe { &raw mut (*s).connects });
    Verdict::Rewrite(backend.addr, backend.port)
}

/// Whether a remembered peer's backend id still names that pod as an active backend of the
/// Service (an id is reused for another pod once the first is forgotten).
#[inline(always)]
unsafe fn still_serves(p: &UdpPeer, service_id: u32) -> bool {
    match unsafe { BACKENDS.get(&p.backend_id) } {
        Some(b) => {
            b.service_id == service_id
                && b.state == backend_state::ACTIVE
                && b.addr == p.backend_addr
                && b.port == p.backend_port
        }
        None => false,
    }
}

/// Chooses a backend of `service`, or `None` if it has none.
#[inline(always)]
unsafe fn pick_backend(ctx: &SockAddrContext, service: &Service) -> Option<(u32, Backend)> {
    let count = service.count;
    if count == 0 {
        return None;
    }
    // The client, for affinity and Maglev: its network namespace (its pod).
    let client = match service.affinity_timeout != 0 || service.algorithm == Algorithm::Maglev as u8
    {
        true => unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        false => 0,
    };
    if service.affinity_timeout != 0
        && let Some(hit) = unsafe { sticky_backend(service, client) }
    {
        return Some(hit);
    }
    let backend_id = if service.algorithm == Algorithm::Maglev as u8 {
        if service.maglev_size == 0 {
            return None; // never with backends (the agent sizes the table with them)
        }
        let index = client_hash(client, unsafe { bound_port(ctx) }) % service.maglev_size;
        *(unsafe {
            MAGLEV.get(&SlotKey {
                service_id: service.id,
                index,
            })
        })?
    } else {
        let index = if service.algorithm == Algorithm::LeastConn as u8 {
            // The scan returns the backend it compared, not a slot to look up again (a
            // rewrite in between could put another backend there).
            return unsafe { least_conn_backend(service, count) }
                .and_then(|id| Some((id, *(unsafe { BACKENDS.get(&id) })?)))
                .inspect(|(id, _)| unsafe { remember_affinity(service, client, *id) });
        } else if service.algorithm == Algorithm::RoundRobin as u8 {
            round_robin_slot(service.id, count)
        } else {
            random_below(count)
        };
        *(unsafe {
            SLOTS.get(&SlotKey {
                service_id: service.id,
                index,
            })
        })?
    };
    let backend = *(unsafe { BACKENDS.get(&backend_id) })?;
    unsafe { remember_affinity(service, client, backend_id) };
    Some((backend_id, backend))
}

/// Records the client's choice for session affinity, if the Service has it.
#[inline(always)]
unsafe fn remember_affinity(service: &Service, client: u64, backend_id: u32) {
    if service.affinity_timeout != 0 {
        let key = AffinityKey {
            service_id: service.id,
            _pad: 0,
            client,
        };
        let value = Affinity {
            backend_id,
            _pad: 0,
            last_used_ns: unsafe { bpf_ktime_get_ns() },
        };
        let _ = AFFINITY.insert(&key, &value, 0);
    }
}

/// The backend this client used within the affinity timeout, if it is still in the Service.
#[inline(always)]
unsafe fn sticky_backend(service: &Service, client: u64) -> Option<(u32, Backend)> {
    let key = AffinityKey {
        service_id: service.id,
        _pad: 0,
        client,
    };
    let entry = AFFINITY.get_ptr_mut(&key)?;
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout) * 1_000_000_000;
    if now.wrapping_sub(unsafe { (*entry).last_used_ns }) > timeout_ns {
        return None;
    }
    let backend_id = unsafe { (*entry).backend_id };
    let backend = *(unsafe { BACKENDS.get(&backend_id) })?;
    if backend.service_id != service.id || backend.state != backend_state::ACTIVE {
        return None;
    }
    unsafe { (*entry).last_used_ns = now };
    Some((backend_id, backend))
}

/// The next slot of this CPU's walk. CPUs start at different offsets so that a burst spread
/// over CPUs does not hit the same slots first. BPF programs run without migration, so the
/// per-CPU cursor needs no atomics.
#[inline(always)]
fn round_robin_slot(service_id: u32, count: u32) -> u32 {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    match RR_CURSORS.get_ptr_mut(service_id) {
        Some(cursor) => unsafe {
            let n = *cursor;
            *cursor = n.wrapping_add(1);
            n.wrapping_add(cpu) % count
        },
        None => random_below(count),
    }
}

/// The local port the application bound, or 0 (the usual case: bound during the connect).
#[inline(always)]
unsafe fn bound_port(ctx: &SockAddrContext) -> u16 {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        0
    } else {
        (unsafe { (*sk).src_port }) as u16
    }
}

/// Least connections over the Service's slots: the backend id with the fewest connections.
/// With more than `LEAST_CONN_WINDOW` backends it compares that many distinct slots from a
/// random start with a random stride coprime to the count (a prime above the largest count,
/// modulo it): the power of d choices, d = 32, with a bounded per-connect cost and every
/// backend as likely to be looked at. A window of consecutive slots would mostly miss the
/// block of new backends a scale-up appends; independent draws would repeat slots (32 draws
/// over 33 slots see about 21).
/// Ties are broken uniformly at random (reservoir sampling over the tied slots): with many
/// nodes each deciding on their own counts, a fixed tie-break order would send every node's
/// next connection to the same pod.
///
/// With a slow start window (`Service.slow_start_ms`), a backend that joined within it takes
/// part with the probability of its age (`slow_start_load`, one draw per connect), which
/// costs a `BACKENDS` lookup per slot: only Services that opted in pay it. If every slot
/// compared sat the connect out, the walk goes on (at most once round the slots) to the
/// first backend that takes part.
///
/// The scan runs under `bpf_loop` so the verifier checks the body once instead of walking
/// every path through every iteration.
#[inline(always)]
unsafe fn least_conn_backend(service: &Service, count: u32) -> Option<u32> {
    // Primes above MAX_BACKENDS_PER_SERVICE: coprime to every count.
    const PRIMES: [u32; 8] = [8209, 8219, 8221, 8231, 8233, 8237, 8243, 8263];
    let (start, stride, window) = if count <= LEAST_CONN_WINDOW {
        (0, 1, count)
    } else {
        let prime = PRIMES[(random_below(8) & 7) as usize];
        (random_below(count), prime % count, LEAST_CONN_WINDOW)
    };
    let window_ms = u64::from(service.slow_start_ms);
    let mut scan = LeastConnScan {
        service_id: service.id,
        count,
        start,
        stride,
        ties: 0,
        best: u32::MAX,
        best_load: u64::MAX,
        window_ms,
        now_ns: match window_ms {
            0 => 0,
            _ => unsafe { bpf_ktime_get_ns() },
        },
        draw: u64::from(random_below(service.slow_start_ms)),
        window,
    };
    // Under slow start the walk may go on past the window (see `scan_slot`), at most once
    // round the slots.
    let walk = match window_ms != 0 && count > window {
        true => count,
        false => window,
    };
    let callback = scan_slot as *const () as *mut c_void;
    unsafe { bpf_loop(walk, callback, (&raw mut scan).cast(), 0) };
    (scan.best != u32::MAX).then_some(scan.best)
}

/// State of one least-conn scan. Plain integers rather than Options: LLVM spills an Option's
/// undefined payload, and the verifier rejects reading an uninitialised stack slot.
#[repr(C)]
struct LeastConnScan {
    service_id: u32,
    count: u32,
    /// Look `i` is at slot `(start + i * stride) % count`.
    start: u32,
    stride: u32,
    ties: u32,
    /// The backend id of the least loaded so far.
    best: u32,
    best_load: u64,
    /// The Service's slow start window (0: none), the time of this connect and its draw.
    window_ms: u64,
    now_ns: u64,
    draw: u64,
    /// How many slots to compare (the walk may be longer, see `scan_slot`).
    window: u32,
}

/// `bpf_loop` body: looks at the `i`-th slot of the walk and keeps the least loaded.
extern "C" fn scan_slot(i: u64, ctx: *mut c_void) -> i64 {
    const CONTINUE: i64 = 0;
    const STOP: i64 = 1;
    let scan = ctx.cast::<LeastConnScan>();
    // SAFETY: ctx is the LeastConnScan on least_conn_slot's stack, alive during bpf_loop.
    unsafe {
        // Past the window only while every backend compared sat this connect out (slow
        // start): with many pods joining at once, 32 slots may all be new ones, and the
        // ramp must not leak to them. The walk goes on to the first backend taking part.
        if i >= u64::from((*scan).window) && (*scan).best_load < SLOW_START_OUT {
            return STOP;
        }
        let count = (*scan).count;
        if count == 0 {
            return STOP; // never: the caller checks
        }
        let index = (*scan)
            .start
            .wrapping_add((i as u32).wrapping_mul((*scan).stride))
            % count;
        let key = SlotKey {
            service_id: (*scan).service_id,
            index,
        };
        let Some(&backend_id) = SLOTS.get(&key) else {
            return CONTINUE;
        };
        let Some(load) = CONN_COUNTS.get_ptr(backend_id) else {
            return CONTINUE;
        };
        let mut load = read_volatile(load);
        let window_ms = (*scan).window_ms;
        if window_ms != 0 {
            let since = match BACKENDS.get(&backend_id) {
                Some(b) => b.since_ns,
                None => 0,
            };
            let age_ms = match since {
                0 => window_ms,
                _ => (*scan).now_ns.saturating_sub(since) / 1_000_000,
            };
            load = slow_start_load(load, age_ms, window_ms, (*scan).draw);
        }
        if load < (*scan).best_load {
            (*scan).best_load = load;
            (*scan).best = backend_id;
            (*scan).ties = 1;
        } else if load == (*scan).best_load {
            (*scan).ties += 1;
            if random_below((*scan).ties) == 0 {
                (*scan).best = backend_id;
            }
        }
    }
    CONTINUE
}

/// getpeername4/recvmsg4: see `service_address`.
#[inline(always)]
unsafe fn show_service_address4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (ip4, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if let Some((vip, vport)) = unsafe { service_address(ctx, Addr::v4(ip4), port) }
        && let Some(vip4) = vip.as_v4()
    {
        unsafe { write_v4(ctx, vip4, vport) };
    }
}

/// getpeername6/recvmsg6: see `service_address`. An IPv4 peer of a dual-mode socket is
/// `::ffff:pod` here, and is shown as `::ffff:VIP`.
#[inline(always)]
unsafe fn show_service_address6(ctx: &SockAddrContext) {
    let peer = unsafe { read_v6(ctx) };
    let port = unsafe { (*ctx.sock_addr).user_port };
    if let Some((vip, vport)) = unsafe { service_address(ctx, peer, port) } {
        unsafe { write_v6(ctx, vip, vport) };
    }
}

/// If the peer is the backend socklb chose for this socket (or, for unconnected UDP, one it
/// sent to), the Service address to show instead, as if the connection had gone to the VIP.
#[inline(always)]
unsafe fn service_address(ctx: &SockAddrContext, peer: Addr, port: u32) -> Option<(Addr, u16)> {
    // Plain initialised values rather than an Option built up in the loop: LLVM leaves an
    // Option's payload undefined on the None path, and the verifier rejects reading it.
    let (mut found, mut vip, mut vport) = (false, Addr::default(), 0u16);
    let state = SOCKETS.get_ptr_mut(ctx);
    if !state.is_null() {
        unsafe {
            if peer == (*state).backend_addr && port == u32::from((*state).backend_port) {
                (found, vip, vport) = (true, (*state).vip, (*state).vport);
            }
        }
    }
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let peers: *mut UdpPeers =
        unsafe { bpf_sk_storage_get(udp_peers_map(), sk.cast(), ptr::null_mut(), 0) }.cast();
    if !found && !peers.is_null() {
        for i in 0..UDP_PEERS_PER_SOCKET {
            let p = unsafe { (*peers).peers[i] };
            if p.backend_addr == peer && u32::from(p.backend_port) == port {
                (found, vip, vport) = (true, p.vip, p.vport);
            }
        }
    }
    found.then_some((vip, vport))
}

#[inline(always)]
unsafe fn track_tcp_state(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return;
    }
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let state = unsafe { storage_of(sk) };
    if state.is_null() {
        return; // not a socket socklb assigned
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SYN about to leave: follow this socket's state changes from now on (if another
        // program turns them off again, sock_release still uncounts it), and note its own
        // address, which the rebalancer needs to name the connection.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        // Both fields read, then one chosen: the verifier refuses a context load at a computed
        // offset, which is what LLVM makes of a load from one field or the other.
        let ops = ctx.ops;
        unsafe {
            let ip4 = read_volatile(&raw const (*ops).local_ip4);
            let ip6 = &raw const (*ops).local_ip6;
            let ip6 = Addr([
                read_volatile(&raw const (*ip6)[0]),
                read_volatile(&raw const (*ip6)[1]),
                read_volatile(&raw const (*ip6)[2]),
                read_volatile(&raw const (*ip6)[3]),
            ]);
            (*state).local = if ctx.family() == AF_INET {
                Addr::v4(ip4)
            } else {
                ip6
            };
            (*state).local_port = ctx.local_port() as u16;
        }
        return;
    }
    let new_state = ctx.arg(1);
    if new_state != BPF_TCP_ESTABLISHED
        && new_state != BPF_TCP_SYN_SENT
        && new_state != BPF_TCP_SYN_RECV
    {
        // Closing, closed, reset, refused or timed out: no longer a live connection.
        unsafe { release(state) };
    }
}

/// Ends a socket's assignment: the one caller whose atomic exchange takes `live` from 1 to 0
/// uncounts it (see `lb_common::SockState`).
#[inline(always)]
unsafe fn release(state: *mut SockState) {
    if unsafe { read_volatile(&raw const (*state).live) } == 0 {
        return; // already ended
    }
    note_event(EVENT_STARTED);
    let was = unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(&raw mut (*state).live, 0) };
    if was == 1 {
        unsafe { uncount((*state).backend_id) };
    }
    note_event(EVENT_FINISHED);
}

/// Bumps this CPU's `EVENTS` counter `which`.
#[inline(always)]
fn note_event(which: u32) {
    if let Some(n) = EVENTS.get_ptr_mut(which) {
        unsafe { add(n, 1) };
    }
}

/// Whether this socket set `IPV6_V6ONLY` (see `setsockopt`).
#[inline(always)]
unsafe fn v6only(ctx: &SockAddrContext) -> bool {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let flag: *mut u32 =
        unsafe { bpf_sk_storage_get(v6only_map(), sk.cast(), ptr::null_mut(), 0) }.cast();
    !flag.is_null() && unsafe { read_volatile(flag) } == 1
}

#[inline(always)]
fn v6only_map() -> *mut c_void {
    ptr::from_ref(&V6ONLY).cast_mut().cast()
}

/// `CONN_COUNTS[backend_id] -= 1`, refusing to go below zero: a compare-and-swap that stops
/// at 0 and records the backend in `COUNT_UNDERFLOWS` instead of wrapping.
#[inline(always)]
unsafe fn uncount(backend_id: u32) {
    let Some(count) = CONN_COUNTS.get_ptr_mut(backend_id) else {
        return;
    };
    // A few tries; if contention is so heavy that every one loses, an atomic decrement, undone
    // at once if it wrapped (the BPF target here has no fetch-and-add).
    for _ in 0..4 {
        let now = unsafe { read_volatile(count) };
        if now == 0 || now > i64::MAX as u64 {
            unsafe { record_underflow(backend_id) };
            return;
        }
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                count,
                now,
                now - 1,
            )
        };
        if swapped {
            return;
        }
    }
    unsafe { add(count, u64::MAX) }; // wrapping add of -1
    if unsafe { read_volatile(count) } > i64::MAX as u64 {
        unsafe { add(count, 1) };
        unsafe { record_underflow(backend_id) };
    }
}

/// Counts a refused decrement against `backend_id` in `COUNT_UNDERFLOWS`.
#[inline(always)]
unsafe fn record_underflow(backend_id: u32) {
    let _ = unsafe { bump_key(&COUNT_UNDERFLOWS, backend_id) };
}

/// `map[key] += 1`, creating the entry at 0 if it is not there (losing a race to create it
/// is fine: the other creator's entry is added to). False if there is no entry to add to
/// (the map is full or out of memory).
#[inline(always)]
unsafe fn bump_key<const N: usize>(map: &HashMap<u32, u64, N, NO_PREALLOC>, key: u32) -> bool {
    let zero = 0u64;
    unsafe {
        bpf_map_update_elem(
            ptr::from_ref(map).cast_mut().cast(),
            (&raw const key).cast(),
            (&raw const zero).cast(),
            u64::from(BPF_NOEXIST),
        )
    };
    match map.get_ptr_mut(&key) {
        Some(n) => {
            unsafe { add(n, 1) };
            true
        }
        None => false,
    }
}

/// The address of the `UDP_PEERS` map, for the helpers (SkStorage's own accessors only take a
/// sock_addr context).
#[inline(always)]
fn udp_peers_map() -> *mut c_void {
    ptr::from_ref(&UDP_PEERS).cast_mut().cast()
}

#[inline(always)]
unsafe fn storage_of(sk: *mut bpf_sock) -> *mut SockState {
    // SkStorage's own accessors take a sock_addr context; sock_ops and sock_release hand us the
    // socket itself. The map's address is what the helper needs.
    let map = ptr::from_ref::<SkStorage<SockState>>(&SOCKETS)
        .cast_mut()
        .cast();
    unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) }.cast()
}

#[inline(always)]
fn bump_stats(service_id: u32, field: impl Fn(*mut ServiceStats) -> *mut u64) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe { add(field(stats), 1) };
    }
}

/// Atomic `*counter += delta` (BPF atomic add; the old value is not needed).
#[inline(always)]
unsafe fn add(counter: *mut u64, delta: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta) };
}

/// Uniform in `0..n` (0 for n = 0; the explicit check also keeps a panic path out of the
/// object, which the loader would reject).
#[inline(always)]
fn random_below(n: u32) -> u32 {
    if n == 0 {
        0
    } else {
        (unsafe { bpf_get_prandom_u32() }) % n
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
