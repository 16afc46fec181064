//! Checking the connection counts against the live sockets, when an agent starts on maps an
//! earlier run left pinned. The BPF programs keep counting while no agent runs, and count
//! each assignment exactly once (see `lb_common::SockState`), so the counts should be right;
//! this makes sure instead of trusting them.
//!
//! The live sockets come from the socket iterator, which sees every socket socklb assigned in
//! every network namespace (also those of processes that left the cgroup). A count is only
//! repaired when it and the sockets behind it did not move across two looks, and the repair
//! is the difference, added atomically in the kernel (`Tools::adjust_count`): a connect or
//! close the programs count meanwhile is never lost, as an absolute write could lose it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use crate::datapath::{Maps, Tools};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recount {
    /// Live sockets socklb assigned, and the network namespaces they are in.
    pub sockets: usize,
    pub namespaces: usize,
    /// (backend id, count in the map, sockets found) for counts repaired.
    pub corrected: Vec<(u32, u64, u64)>,
    /// Backends whose count disagreed but kept changing, so were left alone.
    pub unsettled: Vec<u32>,
}

pub fn verify(maps: &Maps, tools: &Tools) -> Result<Recount> {
    let first = live(tools)?;
    let mut ids: BTreeSet<u32> = maps.backends.keys().collect::<Result<_, _>>()?;
    ids.extend(first.per_backend.keys());
    let counts = |maps: &Maps| -> BTreeMap<u32, u64> {
        ids.iter().map(|id| (*id, maps.connections(*id))).collect()
    };
    let before = counts(maps);
    let second = live(tools)?;
    let after = counts(maps);

    let mut report = Recount {
        sockets: second.sockets,
        namespaces: second.namespaces.len(),
        ..Recount::default()
    };
    let found = |l: &Live, id: &u32| l.per_backend.get(id).copied().unwrap_or(0);
    for id in &ids {
        let counted = after[id];
        if counted == found(&second, id) {
            continue;
        }
        let settled = before[id] == counted && found(&first, id) == found(&second, id);
        if settled {
            let delta = found(&second, id) as i64 - counted as i64;
            tools.adjust_count(*id, delta)?;
            report.corrected.push((*id, counted, found(&second, id)));
        } else {
            report.unsettled.push(*id);
        }
    }
    Ok(report)
}

/// The live assigned sockets, per backend id.
struct Live {
    per_backend: BTreeMap<u32, u64>,
    sockets: usize,
    namespaces: BTreeSet<u64>,
}

fn live(tools: &Tools) -> Result<Live> {
    let records = tools.sockets.list()?;
    let mut per_backend = BTreeMap::new();
    for r in &records {
        *per_backend.entry(r.state.backend_id).or_insert(0) += 1;
    }
    Ok(Live {
        per_backend,
        sockets: records.len(),
        namespaces: records.iter().map(|r| r.state.netns).collect(),
    })
}
