//! Finding and closing the sockets socklb assigned, from userspace: a netlink sock_diag dump of
//! a network namespace that also returns each socket's `SOCKETS` storage
//! (INET_DIAG_REQ_SK_BPF_STORAGES, as `ss --bpf-maps` does), and SOCK_DESTROY for one socket
//! (as `ss -K`). Used to check the connection counts after an agent restart, and by the
//! rebalancer.
//!
//! sock_diag acts on the network namespace of the calling thread, so each session runs on a
//! short-lived thread that first enters the namespace (setns), as `ss` run inside it would.

use std::{
    collections::BTreeMap,
    fs, io,
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use lb_common::SockState;
use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable, Nla, NlasIterator,
};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla as InetNla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_ID: u16 = 2;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;

/// A socket carrying socklb storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignedSocket {
    /// AF_INET or AF_INET6 (a dual-mode socket talking to `::ffff:pod` is AF_INET6).
    pub family: u8,
    pub protocol: u8,
    /// TCP state (1 = ESTABLISHED ...), 7 (CLOSE) for connected UDP.
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's socket cookie: SOCK_DESTROY acts on exactly this socket.
    pub cookie: [u8; 8],
    /// Bytes received but not read by the application.
    pub recv_queue: u32,
    /// Bytes written but not yet acknowledged by the peer (TCP).
    pub send_queue: u32,
    /// Milliseconds since data was last sent and received (TCP only).
    pub last_sent_ms: Option<u32>,
    pub last_received_ms: Option<u32>,
    pub storage: SockState,
}

/// The distinct network namespaces of the processes in `cgroup` and below.
pub fn netns_of_cgroup(cgroup: &Path) -> Result<Vec<fs::File>> {
    let mut seen = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = fs::read_to_string(dir.join("cgroup.procs"))
            .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
        for pid in procs.lines() {
            // A process may exit between listing and opening; skip it.
            if let Ok(ns) = fs::File::open(format!("/proc/{pid}/ns/net"))
                && let Ok(meta) = ns.metadata()
            {
                seen.entry((meta.dev(), meta.ino())).or_insert(ns);
            }
        }
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Ok(seen.into_values().collect())
}

/// A sock_diag session inside one network namespace.
pub struct Session {
    socket: Socket,
    map_fd: OwnedFd,
    map_id: u32,
}

/// Runs `f` with a session in `netns`, on a thread that entered it. `map_fd`/`map_id` are the
/// socket storage map whose values the dumps return.
pub fn in_netns<T: Send>(
    netns: &fs::File,
    map_fd: BorrowedFd<'_>,
    map_id: u32,
    f: impl FnOnce(&mut Session) -> Result<T> + Send,
) -> Result<T> {
    let netns = netns.try_clone()?;
    let map_fd = map_fd.try_clone_to_owned()?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: setns on this thread only; the thread ends right after the session.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error()).context("entering the network namespace");
            }
            let mut socket =
                Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
            socket.bind_auto()?;
            socket.connect(&NetlinkAddr::new(0, 0))?;
            f(&mut Session {
                socket,
                map_fd,
                map_id,
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sock_diag thread panicked"))?
    })
}

impl Session {
    /// The TCP and UDP sockets of the namespace, of both families, that carry socklb storage.
    /// (A dump is per family: an AF_INET6 socket connected to `::ffff:pod` is only in the
    /// AF_INET6 one.)
    pub fn assigned(&mut self) -> Result<Vec<AssignedSocket>> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
                out.extend(self.dump(family, protocol)?);
            }
        }
        Ok(out)
    }

    fn dump(&mut self, family: u8, protocol: u8) -> Result<Vec<AssignedSocket>> {
        let fd = (self.map_fd.as_raw_fd() as u32).to_ne_bytes().to_vec();
        let fd_attr = DefaultNla::new(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, fd);
        let mut nested = vec![0; fd_attr.buffer_len()];
        fd_attr.emit(&mut nested);
        let request = DumpRequest {
            request: SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                // tcp_info carries the last-send and last-receive times the rebalancer uses.
                extensions: ExtensionFlags::INFO,
                states: StateFlags::all(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            }),
            storages: DefaultNla::new(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, nested),
        };
        self.send(request, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        let map_id = self.map_id;
        self.receive(|message| {
            if let SockDiagMessage::InetResponse(r) = message
                && let Some(socket) = assigned(family, protocol, &r, map_id)
            {
                out.push(socket);
            }
        })?;
        Ok(out)
    }

    /// Closes one socket (SOCK_DESTROY, as `ss -K`): the kernel aborts it, the peer gets a
    /// reset and the application's next call on it fails with ECONNABORTED.
    pub fn destroy(&mut self, socket: &AssignedSocket) -> Result<()> {
        // The addresses as the dump reported them, in the socket's own family: the kernel looks
        // an AF_INET6 request with v4-mapped addresses up among the IPv4 connections.
        let mut id = SocketId::new_v4();
        id.source_address = socket.local.ip();
        id.source_port = socket.local.port();
        id.destination_address = socket.remote.ip();
        id.destination_port = socket.remote.port();
        id.cookie = socket.cookie;
        let request = SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family: socket.family,
            protocol: socket.protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        }));
        self.send(request, NLM_F_REQUEST | NLM_F_ACK)?;
        self.receive(|_| {})
    }

    fn send<T: NetlinkSerializable>(&mut self, payload: T, flags: u16) -> Result<()>
    where
        NetlinkPayload<T>: From<T>,
    {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        let mut message = NetlinkMessage::new(header, payload.into());
        message.finalize();
        let mut buf = vec![0; message.header.length as usize];
        message.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(())
    }

    /// Reads answers until the dump is done or the request is acknowledged.
    fn receive(&mut self, mut each: impl FnMut(SockDiagMessage)) -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..n])
                    .context("decoding a sock_diag answer")?;
                let length = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(()), // the ACK of a request
                        Some(code) => {
                            bail!("sock_diag: {}", io::Error::from_raw_os_error(-code.get()))
                        }
                    },
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }
}

/// A dump request with the storage map attached (the crate's request has no attributes).
struct DumpRequest {
    request: SockDiagMessage,
    storages: DefaultNla,
}

impl NetlinkSerializable for DumpRequest {
    fn message_type(&self) -> u16 {
        SOCK_DIAG_BY_FAMILY
    }

    fn buffer_len(&self) -> usize {
        Emitable::buffer_len(&self.request) + self.storages.buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        let n = Emitable::buffer_len(&self.request);
        self.request.serialize(&mut buffer[..n]);
        self.storages.emit(&mut buffer[n..]);
    }
}

impl From<DumpRequest> for NetlinkPayload<DumpRequest> {
    fn from(r: DumpRequest) -> Self {
        NetlinkPayload::InnerMessage(r)
    }
}

/// The socket, if it carries a value of our storage map.
fn assigned(family: u8, protocol: u8, r: &InetResponse, map_id: u32) -> Option<AssignedSocket> {
    let mut storage = None;
    let mut times = None;
    for nla in &r.nlas {
        match nla {
            InetNla::Other(n) if n.kind() & !NLA_F_NESTED == INET_DIAG_SK_BPF_STORAGES => {
                let mut v = vec![0; n.value_len()];
                n.emit_value(&mut v);
                storage = storage_value(&v, map_id);
            }
            InetNla::TcpInfo(info) => times = Some((info.last_data_sent, info.last_data_recv)),
            _ => {}
        }
    }
    let id = &r.header.socket_id;
    Some(AssignedSocket {
        family,
        protocol,
        state: r.header.state,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        cookie: r.header.socket_id.cookie,
        recv_queue: r.header.recv_queue,
        send_queue: r.header.send_queue,
        last_sent_ms: times.map(|t| t.0),
        last_received_ms: times.map(|t| t.1),
        storage: storage?,
    })
}

/// Finds our map's value among the nested SK_DIAG_BPF_STORAGE attributes.
fn storage_value(attrs: &[u8], map_id: u32) -> Option<SockState> {
    for storage in NlasIterator::new(attrs).filter_map(Result::ok) {
        if storage.kind() & !NLA_F_NESTED != SK_DIAG_BPF_STORAGE {
            continue;
        }
        let mut id = None;
        let mut value = None;
        for field in NlasIterator::new(storage.value()).filter_map(Result::ok) {
            match field.kind() {
                SK_DIAG_BPF_STORAGE_MAP_ID => {
                    id = field
                        .value()
                        .get(..4)
                        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
                }
                SK_DIAG_BPF_STORAGE_MAP_VALUE => value = parse_state(field.value()),
                _ => {}
            }
        }
        if id == Some(map_id) {
            return value;
        }
    }
    None
}

fn parse_state(v: &[u8]) -> Option<SockState> {
    if v.len() < size_of::<SockState>() {
        return None;
    }
    // SAFETY: SockState is repr(C) plain data of exactly this size (checked in lb-common);
    // read_unaligned copes with the netlink buffer's alignment.
    Some(unsafe { std::ptr::read_unaligned(v.as_ptr().cast::<SockState>()) })
}

/// Runs `f` on every network namespace of `cgroup` with the storage map of `maps`.
pub fn each_netns<T: Send>(
    cgroup: &Path,
    maps_sockets: &aya::maps::MapData,
    mut f: impl FnMut(&mut Session) -> Result<T> + Send,
) -> Result<(usize, Vec<T>)> {
    let map_id = maps_sockets.info()?.id();
    let namespaces = netns_of_cgroup(cgroup)?;
    let mut out = Vec::new();
    for netns in &namespaces {
        out.push(in_netns(netns, maps_sockets.fd().as_fd(), map_id, &mut f)?);
    }
    Ok((namespaces.len(), out))
}
