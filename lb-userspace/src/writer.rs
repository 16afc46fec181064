//! Applies a reconcile plan to the maps, keeping the mirror of what is programmed exact.

use anyhow::Result;

use crate::{
    programmed::{Op, Programmed},
    reconcile::Plan,
};

/// Where ops go: the pinned BPF maps in the agent, an in-memory model in tests.
pub trait MapWriter {
    fn write(&mut self, op: &Op) -> Result<()>;
}

/// What applying a plan did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub ops: usize,
    /// One message per change that stopped part-way.
    pub errors: Vec<String>,
}

/// Writes each change's ops in order. If an op fails, the rest of that change is skipped: the
/// plan orders ops so the service entry is written last, so a failed change leaves the old
/// entry (and the slots it can see) in charge. `mirror` records only the ops that succeeded,
/// so the next plan retries exactly what is missing.
pub fn apply(plan: &Plan, maps: &mut impl MapWriter, mirror: &mut Programmed) -> Applied {
    let mut applied = Applied::default();
    for change in &plan.changes {
        for op in &change.ops {
            match maps.write(op) {
                Ok(()) => {
                    mirror.apply(op);
                    applied.ops += 1;
                }
                Err(e) => {
                    applied
                        .errors
                        .push(format!("{}: {op:?} failed: {e:#}", change.what));
                    break;
                }
            }
        }
    }
    applied
}

impl MapWriter for Programmed {
    fn write(&mut self, op: &Op) -> Result<()> {
        self.apply(op);
        Ok(())
    }
}
