//! The sockets socklb assigned, read with the `dump_sockets` BPF iterator over the `SOCKETS`
//! socket storage: every live assignment in every network namespace, in one read, without
//! entering any namespace or dumping sockets socklb never touched. The recount, the
//! rebalancer, the forgetting of drained backends and `socklbctl socket list` all start here.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::{Mutex, MutexGuard},
};

use anyhow::{Context as _, Result};
use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{Iter, ProgramFd},
};
use lb_common::{ITER_ALL, ITER_COUNT, SockState, SocketRecord, limits::MAX_ITER_FILTER};

use crate::bpf_sys;

/// The iterator, attached to the `SOCKETS` map.
pub struct SocketIterator {
    link: OwnedFd,
    /// Which backends a walk lists and how many sockets of each (`ITER_BACKENDS`, this
    /// loader's own copy), and what was put in it last; one walk at a time.
    filter: Mutex<Filter>,
    /// What a counting walk found per backend (`ITER_FOUND`, this loader's own) and how many
    /// sockets it could not count (`ITER_MISSED`); taken after `filter`.
    found: Mutex<Counting>,
}

/// `ITER_BACKENDS` and the keys put in it last.
type Filter = (HashMap<MapData, u32, u64>, Vec<u32>);

/// A counting walk's results: `ITER_FOUND` and `ITER_MISSED`.
struct Counting {
    found: HashMap<MapData, u32, u64>,
    missed: Array<MapData, u64>,
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
        let filter = ebpf
            .take_map("ITER_BACKENDS")
            .context("map ITER_BACKENDS missing from the BPF object")?
            .try_into()?;
        let found = ebpf
            .take_map("ITER_FOUND")
            .context("map ITER_FOUND missing from the BPF object")?
            .try_into()?;
        let missed = ebpf
            .take_map("ITER_MISSED")
            .context("map ITER_MISSED missing from the BPF object")?
            .try_into()?;
        Ok(SocketIterator {
            link,
            filter: Mutex::new((filter, Vec::new())),
            found: Mutex::new(Counting { found, missed }),
        })
    }

    /// Live assignments per backend id, counted in the kernel in one pass.
    ///
    /// Exact for every socket assigned during the whole walk, which a listing cannot promise:
    /// the kernel serves a listing a buffer at a time and resumes each by skipping as many
    /// entries of a hash bucket as it gave before, so an entry freed meanwhile ahead of that
    /// point (a closed socket's storage goes when the kernel destroys the socket, with no
    /// program run to tell) makes it skip or repeat a live one. A walk that writes nothing is
    /// never resumed: the kernel stops only at the end, or with EAGAIN past a million socket
    /// storage entries (an error here: the recount then leaves the counts alone).
    pub fn count(&self) -> Result<BTreeMap<u32, u64>> {
        let _walk = self.narrow(&[(ITER_COUNT, 0)])?;
        let mut guard = self
            .found
            .lock()
            .map_err(|_| anyhow::anyhow!("socket iterator lock poisoned"))?;
        let Counting { found, missed } = &mut *guard;
        let stale: Vec<u32> = found.keys().filter_map(Result::ok).collect();
        for id in stale {
            let _ = found.remove(&id);
        }
        missed.set(0, &0, 0)?;
        let mut file = bpf_sys::iter_create(&self.link).context("starting the socket iterator")?;
        let mut rest = Vec::new();
        file.read_to_end(&mut rest)
            .context("counting with the socket iterator")?;
        anyhow::ensure!(
            rest.is_empty(),
            "a counting walk wrote {} bytes",
            rest.len()
        );
        let lost = missed.get(&0, 0)?;
        anyhow::ensure!(lost == 0, "a counting walk could not count {lost} sockets");
        Ok(found.iter().filter_map(Result::ok).collect())
    }

    /// Every socket with a live assignment, as the kernel sees it now.
    pub fn list(&self) -> Result<Vec<SocketRecord>> {
        self.walk(None)
    }

    /// Live assignments to the given backends, at most the given number of each (the kernel
    /// lists only those: a walk costs what it returns, see `ITER_BACKENDS`).
    pub fn of(&self, backends: &BTreeMap<u32, u64>) -> Result<Vec<SocketRecord>> {
        self.walk(Some(backends))
    }

    fn walk(&self, backends: Option<&BTreeMap<u32, u64>>) -> Result<Vec<SocketRecord>> {
        let wanted: Vec<(u32, u64)> = match backends {
            Some(b) if b.len() < MAX_ITER_FILTER as usize => {
                b.iter().map(|(id, n)| (*id, *n)).collect()
            }
            _ => vec![(ITER_ALL, u64::MAX)],
        };
        let _walk = self.narrow(&wanted)?;
        let mut file = bpf_sys::iter_create(&self.link).context("starting the socket iterator")?;
        // Each read() the kernel serves from the start of a hash bucket again (skipping what
        // it gave before), and a socket storage map has as few buckets as CPUs: reads as large
        // as the kernel serves (its 32 KiB buffer) keep those restarts few.
        let mut bytes = Vec::with_capacity(1 << 20);
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let n = file
                .read(&mut chunk)
                .context("reading the socket iterator")?;
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
        let records = bytes
            .as_chunks::<{ size_of::<SocketRecord>() }>()
            .0
            .iter()
            // SAFETY: SocketRecord is repr(C) plain data of exactly this size (checked in
            // lb-common); read_unaligned copes with the buffer's alignment.
            .map(|chunk| unsafe { std::ptr::read_unaligned::<SocketRecord>(chunk.as_ptr().cast()) })
            .filter(|r| backends.is_none_or(|b| b.contains_key(&r.state.backend_id)))
            .collect();
        Ok(records)
    }
}

impl SocketIterator {
    /// Sets `ITER_BACKENDS` to exactly `wanted` for the next walk, and holds it (one walk at a
    /// time) until the returned guard drops.
    fn narrow(&self, wanted: &[(u32, u64)]) -> Result<MutexGuard<'_, Filter>> {
        let mut guard = self
            .filter
            .lock()
            .map_err(|_| anyhow::anyhow!("socket iterator lock poisoned"))?;
        let (filter, set) = &mut *guard;
        for id in set.drain(..) {
            let _ = filter.remove(&id);
        }
        for (id, n) in wanted {
            filter.insert(id, n, 0)?;
            set.push(*id);
        }
        Ok(guard)
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
