//! Connected UDP sockets whose backend left its Service. A connected socket cannot be sent
//! elsewhere (its peer was fixed at connect time), so it would keep sending to a pod that is
//! gone or out of rotation (DNS clients pinned to a dead CoreDNS pod: calico#4509,
//! cilium#27300). The agent closes such sockets with SOCK_DESTROY, as Cilium does: the
//! application's next call fails with ECONNABORTED and it connects again, which least-conn
//! places on a live pod. (Unconnected sockets need nothing: each datagram is placed again when
//! its backend is no longer active, see `sendmsg4`.)
//!
//! "Left" means draining: the pod is gone, not ready, or terminating, and so is out of
//! rotation for new connections. A socket is only closed while sock_diag still shows it
//! connected to that backend: one the application connected elsewhere since, or disconnected
//! (`connect(AF_UNSPEC)`), is left alone.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use lb_common::IPPROTO_UDP;

use crate::{
    netns, sockdiag,
    sockets::{self, SocketIterator},
};

/// Closes the connected UDP sockets assigned to `gone` backend ids. Returns how many.
pub fn close(
    sockets: &SocketIterator,
    gone: &BTreeSet<u32>,
    cookies: &mut netns::Cookies,
    cgroup: &std::path::Path,
) -> Result<u64> {
    // Per network namespace: socket cookie -> the backend it was sent to.
    let mut by_netns: BTreeMap<u64, BTreeMap<u64, std::net::SocketAddr>> = BTreeMap::new();
    let all: BTreeMap<u32, u64> = gone.iter().map(|id| (*id, u64::MAX)).collect();
    for r in sockets.of(&all)? {
        if r.state.protocol == IPPROTO_UDP && gone.contains(&r.state.backend_id) {
            let (_, backend) = sockets::endpoints(&r.state);
            by_netns
                .entry(r.state.netns)
                .or_default()
                .insert(r.cookie, backend);
        }
    }
    if by_netns.is_empty() {
        return Ok(0);
    }
    let namespaces = cookies.under(cgroup)?;
    let mut closed = 0;
    for (cookie, wanted) in by_netns {
        let Some(ns) = namespaces.get(&cookie) else {
            continue;
        };
        closed += sockdiag::in_netns(&ns.file, |session| {
            let mut n = 0;
            for s in session.sockets(IPPROTO_UDP)? {
                let still_there = wanted.get(&s.cookie) == Some(&s.remote);
                if still_there && session.destroy(&s).is_ok() {
                    n += 1;
                }
            }
            Ok(n)
        })?;
    }
    Ok(closed)
}
