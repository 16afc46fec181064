//! Checking the connection counts against the live sockets, when an agent starts on maps an
//! earlier run left pinned. The BPF programs keep counting while no agent runs, so the counts
//! should be right; this makes sure instead of trusting them, and repairs a count that is
//! provably wrong.
//!
//! A count is only rewritten when it and the sockets behind it did not move across two dumps:
//! userspace cannot add atomically to a map value, so rewriting a count while connections open
//! or close could lose one of their updates. A count that keeps moving is reported and left.

use std::{collections::BTreeMap, path::Path};

use anyhow::Result;

use crate::{datapath::Maps, sockdiag};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recount {
    pub namespaces: usize,
    /// Live sockets socklb assigned.
    pub sockets: usize,
    /// (backend id, count in the map, sockets found) for counts rewritten.
    pub corrected: Vec<(u32, u64, u64)>,
    /// Backends whose count disagreed but kept changing, so were left alone.
    pub unsettled: Vec<u32>,
}

pub fn verify(maps: &mut Maps, cgroup: &Path) -> Result<Recount> {
    let backends: Vec<u32> = maps.backends.keys().collect::<Result<_, _>>()?;
    let counts = |maps: &Maps| -> BTreeMap<u32, u64> {
        backends
            .iter()
            .map(|id| (*id, maps.connections(*id)))
            .collect()
    };
    let before = counts(maps);
    let (first, namespaces, sockets) = live_sockets(maps, cgroup)?;
    let after = counts(maps);
    let (second, _, _) = live_sockets(maps, cgroup)?;

    let mut report = Recount {
        namespaces,
        sockets,
        ..Recount::default()
    };
    for id in &backends {
        let counted = after[id];
        let found = first.get(id).copied().unwrap_or(0);
        if counted == found {
            continue;
        }
        let settled = before[id] == counted && second.get(id).copied().unwrap_or(0) == found;
        if settled {
            maps.counts.set(*id, &found, 0)?;
            report.corrected.push((*id, counted, found));
        } else {
            report.unsettled.push(*id);
        }
    }
    Ok(report)
}

/// Live assigned sockets per backend id over every network namespace of the cgroup.
fn live_sockets(maps: &Maps, cgroup: &Path) -> Result<(BTreeMap<u32, u64>, usize, usize)> {
    let (namespaces, dumps) = sockdiag::each_netns(cgroup, &maps.sockets, |s| s.assigned())?;
    let mut per_backend = BTreeMap::new();
    let mut total = 0;
    for socket in dumps.iter().flatten().filter(|s| s.storage.live == 1) {
        *per_backend.entry(socket.storage.backend_id).or_insert(0) += 1;
        total += 1;
    }
    Ok((per_backend, namespaces, total))
}
