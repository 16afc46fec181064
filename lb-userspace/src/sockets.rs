//! The sockets socklb assigned, read with the `dump_sockets` BPF iterator over the `SOCKETS`
//! socket storage: every live assignment in every network namespace, in one read, without
//! entering any namespace or dumping sockets socklb never touched. The recount, the
//! rebalancer, the forgetting of drained backends and `socklbctl socket list` all start here.

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
};

use anyhow::{Context as _, Result};
use aya::{
    Btf, Ebpf,
    maps::MapData,
    programs::{Iter, ProgramFd},
};
use lb_common::{SockState, SocketRecord};

use crate::bpf_sys;

/// The iterator, attached to the `SOCKETS` map.
pub struct SocketIterator {
    link: OwnedFd,
}

impl SocketIterator {
    /// Loads `dump_sockets` from `ebpf` and attaches it to `sockets` (the SOCKETS map).
    pub fn load(ebpf: &mut Ebpf, sockets: &MapData) -> Result<SocketIterator> {
        let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let program: &mut Iter = ebpf
            .program_mut("dump_sockets")
            .context("program dump_sockets missing from the BPF object")?
            .try_into()?;
        program
            .load("bpf_sk_storage_map", &btf)
            .context("loading dump_sockets")?;
        let fd: &ProgramFd = program.fd()?;
        let link = bpf_sys::iter_link_create(fd, sockets.fd())
            .context("attaching dump_sockets to the SOCKETS map")?;
        Ok(SocketIterator { link })
    }

    /// Every socket with a live assignment, as the kernel sees it now.
    pub fn list(&self) -> Result<Vec<SocketRecord>> {
        let mut file = bpf_sys::iter_create(&self.link).context("starting the socket iterator")?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .context("reading the socket iterator")?;
        Ok(bytes
            .as_chunks::<{ size_of::<SocketRecord>() }>()
            .0
            .iter()
            // SAFETY: SocketRecord is repr(C) plain data of exactly this size (checked in
            // lb-common); read_unaligned copes with the buffer's alignment.
            .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) })
            .collect())
    }
}

/// The socket's own and peer addresses as sock_diag names them: in the socket's family, so an
/// AF_INET6 socket talking IPv4 has `::ffff:` addresses. The local side is only known for TCP.
pub fn endpoints(s: &SockState) -> (SocketAddr, SocketAddr) {
    let in_family = |ip: IpAddr| match (ip, i32::from(s.family)) {
        (IpAddr::V4(v4), libc::AF_INET6) => IpAddr::V6(v4.to_ipv6_mapped()),
        (ip, _) => ip,
    };
    (
        SocketAddr::new(in_family(s.local.ip()), s.local_port),
        SocketAddr::new(in_family(s.backend_addr.ip()), u16::from_be(s.backend_port)),
    )
}
