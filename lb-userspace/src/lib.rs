//! socklb userspace: the agent that programs the BPF maps, and socklbctl that reads them.
//!
//! Data flows one way:
//!
//! ```text
//! manifest / manifest_dir   YAML files -> Service and EndpointSlice objects
//!        |
//! cluster                   objects -> desired frontends (Service ports and their pods)
//!        |
//! reconcile                 desired + what the maps hold (programmed) -> ordered map writes (pure)
//!        |
//! writer                    applies the writes, keeps the mirror (programmed) exact
//!        |
//! datapath                  pinned BPF maps and programs on the cgroup (lb-ebpf)
//! ```
//!
//! `agent` runs that loop. Work on sockets runs on its `background` thread: `recount` checks
//! the connection counts against the live sockets after a restart, `rebalance` closes idle
//! connections to even out long-lived ones (`close`), `stale_udp` closes connected UDP
//! sockets whose backend left; all find socklb's sockets with the BPF socket iterator
//! (`sockets`) and act on them in their network namespace (`netns`, `sockdiag`). `maglev`
//! builds consistent-hashing tables; `ctl` is socklbctl's reading side.

pub mod agent;
pub mod background;
mod bpf_sys;
pub mod close;
pub mod cluster;
pub mod ctl;
pub mod datapath;
pub mod endpoints;
pub mod kube_watch;
pub mod maglev;
pub mod manifest;
pub mod manifest_dir;
pub mod netns;
pub mod pod_switch;
pub mod programmed;
pub mod rebalance;
pub mod reconcile;
pub mod recount;
pub mod sockdiag;
pub mod sockets;
pub mod stale_udp;
pub mod status;
pub mod writer;

/// Logging to stderr, `info` unless RUST_LOG says otherwise.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
}
