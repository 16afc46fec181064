//! Service and EndpointSlice YAML for test pods, and a manifest directory for the agent.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::Result;

/// A Service with one port and the pods behind it, as the manifests the agent reads.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    /// `socklb.io/algorithm`, if set.
    pub algorithm: Option<&'static str>,
    /// `socklb.io/rebalance: "true"`.
    pub rebalance: bool,
    /// `sessionAffinity: ClientIP` with this timeout (seconds).
    pub affinity_timeout: Option<u32>,
    pub pods: Vec<Ipv4Addr>,
}

impl ServiceSpec {
    pub fn new(name: &str, vip: Ipv4Addr, port: u16, target_port: u16, pods: &[Ipv4Addr]) -> Self {
        ServiceSpec {
            namespace: "demo".into(),
            name: name.into(),
            vip,
            port,
            target_port,
            protocol: "TCP",
            algorithm: None,
            rebalance: false,
            affinity_timeout: None,
            pods: pods.to_vec(),
        }
    }

    /// Where clients connect.
    pub fn target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, self.port)
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
        let endpoints: String = self
            .pods
            .iter()
            .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}{annotations}\nspec:\n  clusterIP: {vip}{affinity}\n  ports:\n  - {{name: main, port: {port}, targetPort: {target}, protocol: {proto}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: main, port: {target}, protocol: {proto}}}]\nendpoints:{list}",
            name = self.name,
            ns = self.namespace,
            vip = self.vip,
            port = self.port,
            target = self.target_port,
            proto = self.protocol,
            list = if endpoints.is_empty() {
                " []\n".to_owned()
            } else {
                format!("\n{endpoints}")
            },
        )
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
        let tmp = self.path.join(format!(".{file}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.path.join(file))?;
        Ok(())
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

/// Pod addresses 10.244.<subnet>.1..=n.
pub fn pod_ips(subnet: u8, n: u8) -> Vec<Ipv4Addr> {
    (1..=n).map(|i| Ipv4Addr::new(10, 244, subnet, i)).collect()
}
