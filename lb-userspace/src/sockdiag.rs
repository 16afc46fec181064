//! sock_diag (netlink) inside one network namespace: one socket, or a dump of its TCP or UDP
//! sockets, with their queues, tcp_info and inode (what `ss -tinpe` shows), and SOCK_DESTROY of
//! one socket (what `ss -K` does). The socket iterator says which sockets are socklb's and in
//! which namespace; this is how the agent looks at them there.
//!
//! sock_diag acts on the network namespace of the calling thread, so a session runs on a
//! short-lived thread that entered the namespace (`netns::in_netns`).

use std::{fs, io, net::SocketAddr};

use anyhow::{Context as _, Result};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, AF_INET6},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla as InetNla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::netns;

/// A socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// AF_INET or AF_INET6 (a dual-mode socket talking to `::ffff:pod` is AF_INET6).
    pub family: u8,
    pub protocol: u8,
    /// TCP state (1 = ESTABLISHED ...); for UDP, 1 when connected and 7 (CLOSE) when not.
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's socket cookie (as `bpf_get_socket_cookie` gives it).
    pub cookie: u64,
    pub inode: u32,
    /// Bytes received but not read by the application.
    pub recv_queue: u32,
    /// Bytes written but not yet acknowledged by the peer (TCP).
    pub send_queue: u32,
    /// TCP only.
    pub activity: Option<Activity>,
}

/// What tcp_info says of a connection's recent traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// Milliseconds since data was last sent and last received.
    pub last_sent_ms: u32,
    pub last_received_ms: u32,
    /// Data segments received and sent so far.
    pub data_segs_in: u32,
    pub data_segs_out: u32,
}

/// A sock_diag session inside one network namespace.
pub struct Session {
    socket: Socket,
}

/// Runs `f` with a session in `netns`.
pub fn in_netns<T: Send>(
    netns: &fs::File,
    f: impl FnOnce(&mut Session) -> Result<T> + Send,
) -> Result<T> {
    netns::in_netns(netns, || {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        f(&mut Session { socket })
    })
}

impl Session {
    /// The sockets of `protocol` (IPPROTO_TCP or IPPROTO_UDP) of both families, with tcp_info.
    pub fn sockets(&mut self, protocol: u8) -> Result<Vec<DiagSocket>> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let request = SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                extensions: ExtensionFlags::INFO,
                states: StateFlags::all(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            });
            self.send(request, NLM_F_REQUEST | NLM_F_DUMP)?;
            self.receive(|message| {
                if let SockDiagMessage::InetResponse(r) = message {
                    out.push(diag_socket(family, protocol, &r));
                }
            })?;
        }
        Ok(out)
    }

    /// One socket, named by its family, protocol, addresses and cookie: None if it is gone.
    pub fn query(
        &mut self,
        family: u8,
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
        cookie: u64,
    ) -> Result<Option<DiagSocket>> {
        let mut id = SocketId::new_v4();
        id.source_address = local.ip();
        id.source_port = local.port();
        id.destination_address = remote.ip();
        id.destination_port = remote.port();
        id.cookie = cookie_bytes(cookie);
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::INFO,
            states: StateFlags::all(),
            socket_id: id,
        });
        self.send(request, NLM_F_REQUEST | NLM_F_ACK)?;
        let mut found = None;
        let answer = self.receive(|message| {
            if let SockDiagMessage::InetResponse(r) = message {
                found = Some(diag_socket(family, protocol, &r));
            }
        });
        match answer {
            Ok(()) => Ok(found),
            Err(e)
                if e.root_cause()
                    .downcast_ref::<io::Error>()
                    .and_then(io::Error::raw_os_error)
                    == Some(libc::ENOENT) =>
            {
                Ok(None) // closed since it was listed
            }
            Err(e) => Err(e),
        }
    }

    /// Closes one socket (SOCK_DESTROY, as `ss -K`): the kernel aborts it, a TCP peer gets a
    /// reset, and the application's next call on it fails with ECONNABORTED.
    pub fn destroy(&mut self, socket: &DiagSocket) -> Result<()> {
        // The addresses as the dump reported them, in the socket's own family: the kernel looks
        // an AF_INET6 request with v4-mapped addresses up among the IPv4 connections.
        let mut id = SocketId::new_v4();
        id.source_address = socket.local.ip();
        id.source_port = socket.local.port();
        id.destination_address = socket.remote.ip();
        id.destination_port = socket.remote.port();
        id.cookie = cookie_bytes(socket.cookie);
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
                            return Err(io::Error::from_raw_os_error(-code.get()))
                                .context("sock_diag");
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

fn diag_socket(family: u8, protocol: u8, r: &InetResponse) -> DiagSocket {
    let activity = r.nlas.iter().find_map(|nla| match nla {
        InetNla::TcpInfo(info) => Some(Activity {
            last_sent_ms: info.last_data_sent,
            last_received_ms: info.last_data_recv,
            data_segs_in: info.data_segs_in,
            data_segs_out: info.data_segs_out,
        }),
        _ => None,
    });
    let id = &r.header.socket_id;
    DiagSocket {
        family,
        protocol,
        state: r.header.state,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        cookie: cookie_value(id.cookie),
        inode: r.header.inode,
        recv_queue: r.header.recv_queue,
        send_queue: r.header.send_queue,
        activity,
    }
}

/// inet_diag carries the cookie as two u32 in host order, low half first.
fn cookie_value(b: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let hi = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
    u64::from(lo) | (u64::from(hi) << 32)
}

fn cookie_bytes(cookie: u64) -> [u8; 8] {
    let (lo, hi) = (
        (cookie as u32).to_ne_bytes(),
        ((cookie >> 32) as u32).to_ne_bytes(),
    );
    [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_round_trip_through_inet_diag_order() {
        let c = 0x0123_4567_89ab_cdef;
        assert_eq!(cookie_value(cookie_bytes(c)), c);
    }
}
