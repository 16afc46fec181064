//! Which endpoints of a Service port become its backends: kube-proxy's rules exactly
//! (`pkg/proxy/endpointslicecache.go`, `pkg/proxy/topology.go`), so a Service behaves the same
//! whichever proxy a namespace uses.
//!
//! - An endpoint counts from each slice of the port's family that lists the port by name and
//!   protocol; a slice without it (a pod lacking the named container port) adds nothing to
//!   that port. Unset conditions: `ready` and `serving` true, `terminating` false.
//! - `internalTrafficPolicy: Local`: the ready endpoints on this node, else its serving and
//!   terminating ones; nothing if the node has none.
//! - Otherwise topology first: if every ready endpoint has node hints and one is for this node,
//!   those; else if every one has zone hints and one is for this zone, those; else all. Then
//!   the ready endpoints that pass, or if none is ready anywhere, the serving and terminating
//!   ones that pass. So a zone or node with nothing usable falls back to the whole cluster
//!   (what Cilium gets wrong: cilium#37930, #40883, #44060, #45214).
//! - Hints come from the EndpointSlice controller, which writes them for
//!   `spec.trafficDistribution` (or leaves them out on purpose: too few endpoints per zone for
//!   `topology-mode: Auto`, slices it does not manage), so, as for kube-proxy, only hints
//!   count. In standalone mode the node and zone are unknown: no topology.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice, ForNode, ForZone};

use crate::cluster::{FrontendKey, family_name};

/// Where the agent runs (both unknown in standalone mode: no topology, Local means all).
#[derive(Clone, Copy, Debug, Default)]
pub struct Here<'a> {
    pub node: Option<&'a str>,
    pub zone: Option<&'a str>,
}

/// How one Service chooses among its endpoints.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    pub here: Here<'a>,
    /// `internalTrafficPolicy: Local`.
    pub local: bool,
}

/// One endpoint of the port, as the rules need it.
struct Candidate<'a> {
    backend: SocketAddr,
    ready: bool,
    serving_terminating: bool,
    node: Option<&'a str>,
    /// `hints.forNodes` and `hints.forZones` (empty: none).
    for_nodes: &'a [ForNode],
    for_zones: &'a [ForZone],
}

/// The backends of one Service port (at one ClusterIP) across its slices, sorted.
pub fn backends_for_port(
    key: &FrontendKey,
    port_name: &str,
    slices: &[&EndpointSlice],
    policy: Policy<'_>,
) -> Result<Vec<SocketAddr>, String> {
    let candidates = candidates(key, port_name, slices)?;
    let here = policy.here;
    let usable: Box<dyn Fn(&Candidate) -> bool> = match (policy.local, here.node) {
        (true, Some(node)) => Box::new(move |c: &Candidate| c.node == Some(node)),
        (true, None) | (false, _) => match topology(&candidates, here) {
            Topology::All => Box::new(|_: &Candidate| true),
            Topology::Node(node) => Box::new(move |c: &Candidate| c.for_node(node)),
            Topology::Zone(zone) => Box::new(move |c: &Candidate| c.for_zone(zone)),
        },
    };
    let pick = |wanted: fn(&Candidate) -> bool| -> BTreeSet<SocketAddr> {
        candidates
            .iter()
            .filter(|c| wanted(c) && usable(c))
            .map(|c| c.backend)
            .collect()
    };
    let mut chosen = pick(|c| c.ready);
    if chosen.is_empty() {
        chosen = pick(|c| c.serving_terminating);
    }
    Ok(chosen.into_iter().collect())
}

/// The endpoints of the port in the slices of its family.
fn candidates<'a>(
    key: &FrontendKey,
    port_name: &str,
    slices: &[&'a EndpointSlice],
) -> Result<Vec<Candidate<'a>>, String> {
    let protocol = key.protocol.to_string();
    let family = family_name(key.ip);
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type != family {
            continue; // the other family's (or FQDN) slices
        }
        // kube-proxy skips a port without a valid number, and a slice without the port.
        let number = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        let Some(number) = number else {
            continue;
        };
        let slice_name = slice.metadata.name.as_deref().unwrap_or("?");
        for endpoint in &slice.endpoints {
            // kube-proxy uses the first address of an endpoint.
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let ip = endpoint_ip(address, family).map_err(|why| {
                format!("EndpointSlice {slice_name} (addressType {family}): {address:?} {why}")
            })?;
            out.push(candidate(endpoint, SocketAddr::new(ip, number)));
        }
    }
    Ok(out)
}

fn candidate(endpoint: &Endpoint, backend: SocketAddr) -> Candidate<'_> {
    let c = endpoint.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(true);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    let node = endpoint.node_name.as_deref();
    let hints = endpoint.hints.as_ref();
    Candidate {
        backend,
        ready,
        serving_terminating: serving && terminating,
        node,
        for_nodes: hints
            .and_then(|h| h.for_nodes.as_deref())
            .unwrap_or_default(),
        for_zones: hints
            .and_then(|h| h.for_zones.as_deref())
            .unwrap_or_default(),
    }
}

impl Candidate<'_> {
    fn for_node(&self, node: &str) -> bool {
        self.for_nodes.iter().any(|n| n.name == node)
    }

    fn for_zone(&self, zone: &str) -> bool {
        self.for_zones.iter().any(|z| z.name == zone)
    }
}

enum Topology<'a> {
    All,
    Node(&'a str),
    Zone(&'a str),
}

/// kube-proxy's `topologyModeFromHints`: a hint kind is used only if every ready endpoint has
/// one and at least one is for here.
fn topology<'a>(candidates: &[Candidate], here: Here<'a>) -> Topology<'a> {
    let ready = || candidates.iter().filter(|c| c.ready);
    let all_have = |hints: fn(&Candidate) -> bool| ready().all(hints);
    if let Some(node) = here.node
        && all_have(|c| !c.for_nodes.is_empty())
        && ready().any(|c| c.for_node(node))
    {
        return Topology::Node(node);
    }
    if let Some(zone) = here.zone
        && all_have(|c| !c.for_zones.is_empty())
        && ready().any(|c| c.for_zone(zone))
    {
        return Topology::Zone(zone);
    }
    Topology::All
}

/// An endpoint address of a slice of `family`.
fn endpoint_ip(address: &str, family: &str) -> Result<IpAddr, &'static str> {
    match (address.parse::<IpAddr>(), family) {
        (Ok(ip @ IpAddr::V4(_)), "IPv4") => Ok(ip),
        (Ok(IpAddr::V6(v6)), "IPv6") if v6.to_ipv4_mapped().is_some() => {
            Err("is a v4-mapped address, not an IPv6 endpoint")
        }
        (Ok(ip @ IpAddr::V6(_)), "IPv6") => Ok(ip),
        (Ok(_), _) => Err("is of the other IP family"),
        (Err(_), _) => Err("is not an IP address"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cluster::Protocol;

    const KEY: FrontendKey = FrontendKey {
        ip: IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10)),
        port: 80,
        protocol: Protocol::Tcp,
    };

    /// An endpoint 10.0.0.<n> on node n<n>, in `zone`, with these conditions and hints.
    fn ep(n: u8, zone: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut e = json!({"addresses": [format!("10.0.0.{n}")], "nodeName": format!("n{n}"), "zone": zone});
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        e
    }

    fn slice(ports: serde_json::Value, endpoints: Vec<serde_json::Value>) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "s"}, "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn http(endpoints: Vec<serde_json::Value>) -> EndpointSlice {
        slice(json!([{"name": "http", "port": 8080}]), endpoints)
    }

    fn pick(slices: &[EndpointSlice], policy: Policy) -> Vec<String> {
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        backends_for_port(&KEY, "http", &slices, policy)
            .unwrap()
            .iter()
            .map(|b| b.ip().to_string().replace("10.0.0.", ""))
            .collect()
    }

    const HERE: Here = Here {
        node: Some("n1"),
        zone: Some("a"),
    };

    fn cluster() -> Policy<'static> {
        Policy {
            here: HERE,
            local: false,
        }
    }

    #[test]
    fn unset_conditions_are_ready_and_serving_as_kube_proxy_reads_them() {
        let terminating = json!({"conditions": {"ready": false, "terminating": true}});
        let not_serving =
            json!({"conditions": {"ready": false, "serving": false, "terminating": true}});
        let s = [http(vec![ep(1, "a", terminating), ep(2, "a", not_serving)])];
        assert_eq!(pick(&s, cluster()), ["1"], "serving unset is serving");
        let s = [http(vec![ep(1, "a", json!({})), ep(2, "a", json!({}))])];
        assert_eq!(pick(&s, cluster()), ["1", "2"], "ready unset is ready");
    }

    #[test]
    fn slices_without_the_port_or_its_number_add_nothing() {
        let s = [
            http(vec![ep(1, "a", json!({}))]),
            slice(
                json!([{"name": "metrics", "port": 9090}]),
                vec![ep(2, "a", json!({}))],
            ),
            slice(json!([{"name": "http"}]), vec![ep(3, "a", json!({}))]),
            slice(
                json!([{"name": "http", "port": 8080, "protocol": "UDP"}]),
                vec![ep(4, "a", json!({}))],
            ),
        ];
        assert_eq!(pick(&s, cluster()), ["1"]);
    }

    #[test]
    fn zone_hints_keep_to_this_zone_and_fall_back_to_all_when_it_has_none() {
        let hinted = |zone: &str| json!({"hints": {"forZones": [{"name": zone}]}});
        let s = [http(vec![
            ep(1, "a", hinted("a")),
            ep(2, "b", hinted("b")),
            ep(3, "a", hinted("a")),
        ])];
        assert_eq!(
            pick(&s, cluster()),
            ["1", "3"],
            "hints apply without the field"
        );
        let elsewhere = Policy {
            here: Here {
                zone: Some("c"),
                ..HERE
            },
            ..cluster()
        };
        assert_eq!(
            pick(&s, elsewhere),
            ["1", "2", "3"],
            "no endpoint for zone c: all"
        );
        let unknown = Policy {
            here: Here::default(),
            ..cluster()
        };
        assert_eq!(pick(&s, unknown), ["1", "2", "3"], "zone unknown: all");
        let one_unhinted = [http(vec![ep(1, "a", hinted("a")), ep(2, "b", json!({}))])];
        assert_eq!(
            pick(&one_unhinted, cluster()),
            ["1", "2"],
            "a ready endpoint lacks hints: all"
        );
        // The zone's only endpoint is not ready: hints are judged on ready endpoints only.
        let down = json!({"hints": {"forZones": [{"name": "a"}]}, "conditions": {"ready": false}});
        let s = [http(vec![ep(1, "a", down), ep(2, "b", hinted("b"))])];
        assert_eq!(pick(&s, cluster()), ["2"]);
    }

    #[test]
    fn node_hints_come_first_then_zone_then_all() {
        let hints = |node: &str, zone: &str| json!({"hints": {"forNodes": [{"name": node}], "forZones": [{"name": zone}]}});
        let s = [http(vec![
            ep(1, "a", hints("n1", "a")),
            ep(2, "a", hints("n2", "a")),
            ep(3, "b", hints("n3", "b")),
        ])];
        assert_eq!(pick(&s, cluster()), ["1"]);
        let on_n9 = Policy {
            here: Here {
                node: Some("n9"),
                ..HERE
            },
            ..cluster()
        };
        assert_eq!(
            pick(&s, on_n9),
            ["1", "2"],
            "no endpoint for node n9: its zone"
        );
    }

    #[test]
    fn internal_traffic_policy_local_ignores_topology() {
        let local = Policy {
            local: true,
            ..cluster()
        };
        let s = [http(vec![ep(1, "a", json!({})), ep(2, "a", json!({}))])];
        assert_eq!(pick(&s, local), ["1"]);
        let s = [http(vec![ep(2, "a", json!({}))])];
        assert!(pick(&s, local).is_empty(), "no local endpoint: none");
    }
}
