//! The baseline: kube-proxy's iptables mode for the same Services, installed inside a test
//! namespace with iptables-restore. Chains and rules are shaped as kube-proxy writes them
//! (pkg/proxy/iptables/proxier.go): `KUBE-SERVICES` matches the ClusterIP and port and jumps to
//! `KUBE-SVC-<hash>`, which picks an endpoint chain `KUBE-SEP-<hash>` with the probability
//! ladder 1/n, 1/(n-1), ... and a last unconditional rule; each `KUBE-SEP` DNATs to its pod.
//! The pick happens once per connection, so long-lived connections never move. Like
//! kube-proxy it hooks both OUTPUT (processes of the namespace itself) and PREROUTING (pods
//! whose traffic comes in over their veth). IPv6 Services get the same chains in ip6tables, as
//! kube-proxy's IPv6 proxier writes them.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::netns::Netns;

/// One Service port as kube-proxy sees it.
#[derive(Clone, Debug)]
pub struct ChainService {
    /// "namespace/name:port", kube-proxy's ServicePortName.
    pub port_name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    /// Of the VIP's family.
    pub endpoints: Vec<SocketAddr>,
}

/// kube-proxy's chain-name hash: base32(sha256(text)) cut to 16 characters.
fn hash(text: &str) -> String {
    BASE32.encode(&Sha256::digest(text.as_bytes()))[..16].to_owned()
}

/// The nat table kube-proxy would write for the `services` of one family (`ipv6`), as
/// iptables-restore (ip6tables-restore) input; the other family's are left out.
pub fn rules(services: &[ChainService], ipv6: bool) -> String {
    let host = if ipv6 { 128 } else { 32 };
    let mut chains = vec![
        "KUBE-SERVICES".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
    ];
    let mut rules = vec![
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".to_owned(),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".to_owned(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".to_owned(),
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".to_owned(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_owned(),
    ];
    for s in services.iter().filter(|s| s.vip.is_ipv6() == ipv6) {
        let proto_upper = s.protocol.to_uppercase();
        let svc_chain = format!(
            "KUBE-SVC-{}",
            hash(&format!("{}{proto_upper}", s.port_name))
        );
        chains.push(svc_chain.clone());
        rules.push(format!(
            "-A KUBE-SERVICES -d {}/{host} -p {p} -m comment --comment \"{} cluster IP\" -m {p} --dport {} -j {svc_chain}",
            s.vip, s.port_name, s.port, p = s.protocol
        ));
        let n = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let sep_chain = format!(
                "KUBE-SEP-{}",
                hash(&format!("{}{proto_upper}{ep}", s.port_name))
            );
            chains.push(sep_chain.clone());
            let pick = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            rules.push(format!(
                "-A {svc_chain} -m comment --comment \"{} -> {ep}\"{pick} -j {sep_chain}",
                s.port_name
            ));
            rules.push(format!(
                "-A {sep_chain} -s {}/{host} -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                ep.ip(),
                s.port_name
            ));
            rules.push(format!(
                "-A {sep_chain} -p {p} -m comment --comment \"{}\" -m {p} -j DNAT --to-destination {ep}",
                s.port_name,
                p = s.protocol
            ));
        }
    }
    let mut out = String::from("*nat\n");
    for c in chains {
        out += &format!(":{c} - [0:0]\n");
    }
    for r in rules {
        out += &r;
        out.push('\n');
    }
    out + "COMMIT\n"
}

/// The Service ranges of the test beds (10.96.0.0/12, and fd00:96::/32 for IPv6).
pub const SERVICE_RANGES: [&str; 2] = ["10.96.0.0/12", "fd00:96::/32"];

/// Installs the chains of both families in `netns`, with a route for the Service ranges to
/// loopback (inside the namespace only) so a connect to a VIP reaches the nat OUTPUT hook.
pub fn install(netns: &Netns, services: &[ChainService]) -> Result<()> {
    for range in SERVICE_RANGES {
        netns.ip(&["route", "add", range, "dev", "lo"])?;
    }
    reload(netns, services)
}

/// Replaces the chains of both families with those for `services`.
pub fn reload(netns: &Netns, services: &[ChainService]) -> Result<()> {
    netns.run_with_input("iptables-restore", &[], &rules(services, false))?;
    netns.run_with_input("ip6tables-restore", &[], &rules(services, true))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn probability_ladder_and_chain_names_follow_kube_proxy() {
        let text = rules(
            &[ChainService {
                port_name: "demo/web:http".into(),
                vip: Ipv4Addr::new(10, 96, 0, 10).into(),
                port: 80,
                protocol: "tcp",
                endpoints: (1..=3)
                    .map(|i| SocketAddr::from((Ipv4Addr::new(10, 244, 0, i), 8080)))
                    .collect(),
            }],
            false,
        );
        assert!(text.contains("--probability 0.3333333333 -j KUBE-SEP-"));
        assert!(text.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert_eq!(
            text.matches("--probability").count(),
            2,
            "last endpoint unconditional"
        );
        assert!(text.contains("-j DNAT --to-destination 10.244.0.3:8080"));
        let svc = text.lines().find(|l| l.starts_with(":KUBE-SVC-")).unwrap();
        assert_eq!(svc.len(), ":KUBE-SVC-".len() + 16 + " - [0:0]".len());
    }

    #[test]
    fn ipv6_services_get_ip6tables_rules_only() {
        let six = ChainService {
            port_name: "demo/web:http".into(),
            vip: "fd00:96::10".parse().unwrap(),
            port: 80,
            protocol: "tcp",
            endpoints: vec!["[fd00:244::1]:8080".parse().unwrap()],
        };
        let v6 = rules(std::slice::from_ref(&six), true);
        assert!(v6.contains("-d fd00:96::10/128 -p tcp"));
        assert!(v6.contains("-j DNAT --to-destination [fd00:244::1]:8080"));
        assert!(!rules(&[six], false).contains("fd00"));
    }
}
