//! Finding the sockets socklb assigned, from userspace: a netlink sock_diag dump of a network
//! namespace that also returns each socket's `SOCKETS` storage (INET_DIAG_REQ_SK_BPF_STORAGES,
//! as `ss --bpf-maps` does). Used to verify the connection counts after an agent restart.
//!
//! sock_diag answers for the network namespace of the calling thread, so each dump runs on a
//! short-lived thread that first enters the namespace (setns), as `ss` run inside it would.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use lb_common::SockState;
use netlink_packet_core::{
    DefaultNla, Emitable, NLA_F_NESTED, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, Nla, NlasIterator,
};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::{AF_INET, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla as InetNla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_ID: u16 = 2;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;

/// A socket carrying socklb storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignedSocket {
    pub protocol: u8,
    /// TCP state (1 = ESTABLISHED ...), 7 (CLOSE) for connected UDP.
    pub state: u8,
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// Bytes received but not read by the application.
    pub recv_queue: u32,
    /// Bytes written but not yet acknowledged by the peer (TCP).
    pub send_queue: u32,
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

/// Dumps the TCP and UDP IPv4 sockets of `netns` that have an entry in the socket storage map
/// (`map_fd`, kernel id `map_id`).
pub fn dump_assigned(
    netns: &fs::File,
    map_fd: BorrowedFd<'_>,
    map_id: u32,
) -> Result<Vec<AssignedSocket>> {
    let netns = netns.try_clone()?;
    let map_fd = map_fd.try_clone_to_owned()?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<Vec<AssignedSocket>> {
            // SAFETY: setns on this thread only; the thread ends right after the dump.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error()).context("entering the network namespace");
            }
            let mut out = dump_protocol(IPPROTO_TCP, map_fd.as_fd(), map_id)?;
            out.extend(dump_protocol(IPPROTO_UDP, map_fd.as_fd(), map_id)?);
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sock_diag thread panicked"))?
    })
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

fn dump_protocol(protocol: u8, map_fd: BorrowedFd<'_>, map_id: u32) -> Result<Vec<AssignedSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;

    let fd_attr = DefaultNla::new(
        SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
        (map_fd.as_raw_fd() as u32).to_ne_bytes().to_vec(),
    );
    let mut nested = vec![0; fd_attr.buffer_len()];
    fd_attr.emit(&mut nested);
    let request = DumpRequest {
        request: SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId::new_v4(),
        }),
        storages: DefaultNla::new(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED, nested),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut message = NetlinkMessage::new(header, request.into());
    message.finalize();
    let mut buf = vec![0; message.header.length as usize];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut out = Vec::new();
    let mut receive = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let bytes = &receive[offset..n];
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                .context("decoding a sock_diag answer")?;
            offset += msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => bail!("sock_diag dump failed: {e:?}"),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    if let Some(socket) = assigned(protocol, &r, map_id) {
                        out.push(socket);
                    }
                }
                _ => {}
            }
            if msg.header.length == 0 {
                break;
            }
        }
    }
}

/// The socket, if it carries a value of our storage map.
fn assigned(
    protocol: u8,
    r: &netlink_packet_sock_diag::inet::InetResponse,
    map_id: u32,
) -> Option<AssignedSocket> {
    let storages = r.nlas.iter().find_map(|nla| match nla {
        InetNla::Other(n) if n.kind() & !NLA_F_NESTED == INET_DIAG_SK_BPF_STORAGES => {
            let mut v = vec![0; n.value_len()];
            n.emit_value(&mut v);
            Some(v)
        }
        _ => None,
    })?;
    let storage = storage_value(&storages, map_id)?;
    let (IpAddr::V4(local), IpAddr::V4(remote)) = (
        r.header.socket_id.source_address,
        r.header.socket_id.destination_address,
    ) else {
        return None;
    };
    Some(AssignedSocket {
        protocol,
        state: r.header.state,
        local: SocketAddrV4::new(local, r.header.socket_id.source_port),
        remote: SocketAddrV4::new(remote, r.header.socket_id.destination_port),
        recv_queue: r.header.recv_queue,
        send_queue: r.header.send_queue,
        storage,
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
                SK_DIAG_BPF_STORAGE_MAP_VALUE => value = Some(field.value().to_vec()),
                _ => {}
            }
        }
        if id == Some(map_id) {
            return value.and_then(|v| parse_state(&v));
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
