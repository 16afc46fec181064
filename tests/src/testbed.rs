//! One test's world: a network namespace, a client cgroup, a manifest directory, pods and
//! (once started) an agent. Everything is removed when it is dropped, also when the test fails.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;

use crate::{
    agent::Agent,
    cgroup::Cgroup,
    client::Client,
    manifests::{ManifestDir, ServiceSpec},
    netns::Netns,
    pod::Pod,
};

pub struct Testbed {
    // Field order is drop order: the agent's pins go first, the namespace last.
    pub agent: Option<Agent>,
    pub pods: Vec<Pod>,
    pub manifests: ManifestDir,
    pub cgroup: Cgroup,
    pub netns: Netns,
}

impl Testbed {
    pub fn new(prefix: &str) -> Result<Testbed> {
        Ok(Testbed {
            agent: None,
            pods: Vec::new(),
            manifests: ManifestDir::new(prefix)?,
            cgroup: Cgroup::new(prefix)?,
            netns: Netns::new(prefix)?,
        })
    }

    /// Starts a TCP pod named `pod-<last octet>` on each address.
    pub fn add_pods(&mut self, ips: &[Ipv4Addr], port: u16) -> Result<()> {
        for ip in ips {
            self.netns.add_address(*ip)?;
            let name = format!("pod-{}", ip.octets()[3]);
            self.pods
                .push(Pod::tcp(&self.netns, &name, SocketAddrV4::new(*ip, port))?);
        }
        Ok(())
    }

    /// Writes `spec` as `<name>.yaml` in the manifest directory.
    pub fn write_service(&self, spec: &ServiceSpec) -> Result<()> {
        self.manifests
            .write(&format!("{}.yaml", spec.name), &spec.yaml())
    }

    pub fn start_agent(&mut self, extra: &[&str]) -> Result<&mut Agent> {
        Ok(self
            .agent
            .insert(Agent::start(&self.manifests, &self.cgroup, extra)?))
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    /// A client inside the cgroup: socklb balances its connections.
    pub fn client(&self) -> Result<Client> {
        Client::spawn(&self.netns, Some(&self.cgroup))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    /// Accepted connections per pod, from the pods themselves.
    pub fn accepted(&self) -> Vec<(String, u64)> {
        self.pods
            .iter()
            .map(|p| (p.name.clone(), p.accepted()))
            .collect()
    }

    /// Open connections per pod, from the pods themselves.
    pub fn open(&self) -> Vec<(String, u64)> {
        self.pods
            .iter()
            .map(|p| (p.name.clone(), p.open()))
            .collect()
    }
}
