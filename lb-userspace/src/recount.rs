//! Checking the connection counts against the live sockets, when an agent starts on maps an
//! earlier run left pinned. The BPF programs keep counting while no agent runs, and count
//! each assignment exactly once (see `lb_common::SockState`), so the counts should be right;
//! this makes sure instead of trusting them.
//!
//! The live sockets come from the socket iterator, which sees every socket socklb assigned in
//! every network namespace (also those of processes that left the cgroup), counted per backend
//! in the kernel in one pass (`SocketIterator::count`: a listing read a buffer at a time can
//! skip a live socket when a closed one is freed meanwhile). A look is only
//! trusted when no change to an assignment was under way as it began and none began while it
//! was taken (the programs' per-CPU `EVENTS` counters, see `datapath::Events`): then the
//! sockets listed and the counts read are one snapshot, and a count that differs is really
//! wrong. The repair is the difference, applied
//! in the kernel with a compare-and-swap (`Tools::adjust_count`), so a connect or close
//! counted after the look is never lost and a count never goes below zero. A node so busy
//! that no quiet look comes in a few tries is left alone and reported.

use std::{collections::BTreeMap, thread, time::Duration};

use anyhow::Result;

use crate::datapath::{Maps, Tools};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recount {
    /// Live sockets socklb assigned.
    pub sockets: usize,
    /// (backend id, count in the map, sockets found) for counts repaired.
    pub corrected: Vec<(u32, u64, u64)>,
    /// Backends whose count disagreed in the last look, when no look was a snapshot, or
    /// whose count moved below the repair before it was applied: left alone.
    pub unsettled: Vec<u32>,
}

/// Looks taken before giving up on a snapshot, and the pause between them.
const LOOKS: usize = 5;
const PAUSE: Duration = Duration::from_millis(20);

pub fn verify(maps: &Maps, tools: &Tools) -> Result<Recount> {
    let mut report = Recount::default();
    for look in 0..LOOKS {
        let before = maps.events()?;
        let quiet_start = before.started == before.finished;
        let found = tools.sockets.count()?;
        let mut counted: BTreeMap<u32, u64> = BTreeMap::new();
        for id in maps.backends.keys().chain(found.keys().copied().map(Ok)) {
            let id = id?;
            counted.insert(id, maps.connections(id));
        }
        let snapshot = quiet_start && maps.events()?.started == before.started;
        report = Recount {
            sockets: found.values().sum::<u64>() as usize,
            ..Recount::default()
        };
        let wrong = counted.into_iter().filter_map(|(id, counted)| {
            let live = found.get(&id).copied().unwrap_or(0);
            (counted != live).then_some((id, counted, live))
        });
        if !snapshot {
            report.unsettled = wrong.map(|(id, ..)| id).collect();
            if look + 1 < LOOKS {
                thread::sleep(PAUSE);
            }
            continue;
        }
        for (id, counted, live) in wrong {
            if tools.adjust_count(id, live as i64 - counted as i64)? {
                report.corrected.push((id, counted, live));
            } else {
                report.unsettled.push(id);
            }
        }
        break;
    }
    Ok(report)
}
