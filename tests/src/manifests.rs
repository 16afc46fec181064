//! Service and EndpointSlice YAML for test pods, and a manifest directory for the agent.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Result;

/// A Service with one port and the pods behind it, as the manifests the agent reads.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// The ClusterIP (`clusterIPs[0]`).
    pub vip: IpAddr,
    /// A second ClusterIP of the other family: a dual-stack Service (RequireDualStack).
    pub vip2: Option<IpAddr>,
    pub port: u16,
    pub target_port: u16,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    /// `socklb.io/algorithm`, if set.
    pub algorithm: Option<&'static str>,
    /// `socklb.io/rebalance: "true"`.
    pub rebalance: bool,
    /// `socklb.io/rebalance-quiet`, if set (e.g. "20ms").
    pub rebalance_quiet: Option<&'static str>,
    /// `socklb.io/slow-start`, if set (e.g. "6s").
    pub slow_start: Option<&'static str>,
    /// `sessionAffinity: ClientIP` with this timeout (seconds).
    pub affinity_timeout: Option<u32>,
    /// Pods of either family: each family's go into an EndpointSlice of that `addressType`.
    pub pods: Vec<IpAddr>,
}

impl ServiceSpec {
    pub fn new<A: Into<IpAddr> + Copy>(
        name: &str,
        vip: impl Into<IpAddr>,
        port: u16,
        target_port: u16,
        pods: &[A],
    ) -> Self {
        ServiceSpec {
            namespace: "demo".into(),
            name: name.into(),
            vip: vip.into(),
            vip2: None,
            port,
            target_port,
            protocol: "TCP",
            algorithm: None,
            rebalance: false,
            rebalance_quiet: None,
            slow_start: None,
            affinity_timeout: None,
            pods: pods.iter().map(|p| (*p).into()).collect(),
        }
    }

    /// Sets the pods (either family).
    pub fn set_pods<A: Into<IpAddr> + Copy>(&mut self, pods: &[A]) {
        self.pods = pods.iter().map(|p| (*p).into()).collect();
    }

    /// Where clients connect.
    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }

    /// The VIP as a dual-mode IPv6 socket names it: `[::ffff:VIP]:port` (IPv4 Services only).
    pub fn mapped_target(&self) -> SocketAddr {
        match self.vip {
            IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), self.port),
            IpAddr::V6(_) => self.target(),
        }
    }

    /// The Service and one EndpointSlice with every pod ready.
    pub fn yaml(&self) -> String {
        let mut annotations = Vec::new();
        if let Some(a) = self.algorithm {
            annotations.push(format!("socklb.io/algorithm: {a}"));
        }
        if self.rebalance {
            annotations.push("socklb.io/rebalance: \"true\"".to_owned());
        }
        if let Some(q) = self.rebalance_quiet {
            annotations.push(format!("socklb.io/rebalance-quiet: \"{q}\""));
        }
        if let Some(w) = self.slow_start {
            annotations.push(format!("socklb.io/slow-start: \"{w}\""));
        }
        let annotations = match annotations.is_empty() {
            true => String::new(),
            false => format!("\n  annotations: {{{}}}", annotations.join(", ")),
        };
        let affinity = match self.affinity_timeout {
            Some(t) => format!(
                "\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}"
            ),
            None => String::new(),
        };
        let families = match self.vip2 {
            Some(second) => format!(
                "\n  clusterIPs: [\"{}\", \"{second}\"]\n  ipFamilies: [{}, {}]\n  ipFamilyPolicy: RequireDualStack",
                self.vip,
                family(self.vip),
                family(second)
            ),
            None => String::new(),
        };
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}{annotations}\nspec:\n  clusterIP: \"{vip}\"{families}{affinity}\n  ports:\n  - {{name: main, port: {port}, targetPort: {target}, protocol: {proto}}}\n",
            name = self.name,
            ns = self.namespace,
            vip = self.vip,
            port = self.port,
            target = self.target_port,
            proto = self.protocol,
        );
        // One slice per family that has a ClusterIP (`-1` for the first, as before).
        for (i, vip) in [Some(self.vip), self.vip2]
            .into_iter()
            .flatten()
            .enumerate()
        {
            let endpoints: String = self
                .pods
                .iter()
                .filter(|ip| ip.is_ipv4() == vip.is_ipv4())
                .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
                .collect();
            text += &format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{n}\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports: [{{name: main, port: {target}, protocol: {proto}}}]\nendpoints:{list}",
                n = i + 1,
                name = self.name,
                ns = self.namespace,
                family = family(vip),
                target = self.target_port,
                proto = self.protocol,
                list = if endpoints.is_empty() {
                    " []\n".to_owned()
                } else {
                    format!("\n{endpoints}")
                },
            );
        }
        text
    }
}

/// A temporary manifest directory, removed on drop.
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    pub fn new(prefix: &str) -> Result<ManifestDir> {
        let path = std::env::temp_dir().join(crate::unique(prefix));
        fs::create_dir_all(&path)?;
        Ok(ManifestDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file atomically (write then rename), as deploy tools do.
    pub fn write(&self, file: &str, text: &str) -> Result<()> {
        write_atomically(&self.path, file, text)
    }

    pub fn remove(&self, file: &str) -> Result<()> {
        Ok(fs::remove_file(self.path.join(file))?)
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Writes `dir/file` with a rename, so a reader never sees half a file.
pub(crate) fn write_atomically(dir: &Path, file: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

/// Pod addresses 10.244.<subnet>.1..=n.
pub fn pod_ips(subnet: u8, n: u8) -> Vec<Ipv4Addr> {
    (1..=n).map(|i| Ipv4Addr::new(10, 244, subnet, i)).collect()
}

/// IPv6 pod addresses fd00:244:<subnet>::1..=n (unique local addresses).
pub fn pod_ips6(subnet: u8, n: u8) -> Vec<Ipv6Addr> {
    (1..=n)
        .map(|i| Ipv6Addr::new(0xfd00, 0x244, subnet.into(), 0, 0, 0, 0, i.into()))
        .collect()
}

/// An IPv6 Service address fd00:96:<subnet>::10, the counterpart of 10.96.<subnet>.10.
pub fn vip6(subnet: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x96, subnet.into(), 0, 0, 0, 0, 0x10)
}

/// "IPv4" or "IPv6", as `ipFamilies` and `addressType` say it.
pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}
