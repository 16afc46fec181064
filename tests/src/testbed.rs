//! One test's world: a network namespace, a client cgroup, a manifest directory, pods and
//! (once started) an agent. Everything is removed when it is dropped, also when the test fails.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    agent::Agent,
    cgroup::Cgroup,
    client::Client,
    manifests::{ManifestDir, ServiceSpec, pod_ips, write_atomically},
    netns::Netns,
    pod::Pod,
    wait_for,
};

pub struct Testbed {
    // Field order is drop order: the agent's pins go first, the namespace last.
    pub agent: Option<Agent>,
    pub pods: Vec<Pod>,
    pub manifests: ManifestDir,
    pub cgroup: Cgroup,
    pub netns: Netns,
    /// Held for the bed's whole life: agents it starts directly (not through `Agent`) find
    /// bpffs mounted, and leave nothing mounted behind.
    _bpffs: crate::bpffs::Held,
}

impl Testbed {
    pub fn new(prefix: &str) -> Result<Testbed> {
        Ok(Testbed {
            agent: None,
            pods: Vec::new(),
            manifests: ManifestDir::new(prefix)?,
            cgroup: Cgroup::new(prefix)?,
            netns: Netns::new(prefix)?,
            _bpffs: crate::bpffs::hold()?,
        })
    }

    /// The common case: `pods` TCP pods at 10.244.<subnet>.1.. port 8080, Service `demo/web`
    /// at 10.96.<subnet>.10:80 as `configure` leaves it, and a running agent (`agent_args`).
    pub fn serving(
        prefix: &str,
        subnet: u8,
        pods: u8,
        configure: impl FnOnce(&mut ServiceSpec),
        agent_args: &[&str],
    ) -> Result<(Testbed, ServiceSpec)> {
        let mut bed = Testbed::new(prefix)?;
        let ips = pod_ips(subnet, pods);
        bed.add_pods(&ips, 8080)?;
        let mut spec = ServiceSpec::new("web", Ipv4Addr::new(10, 96, subnet, 10), 80, 8080, &ips);
        configure(&mut spec);
        bed.write_service(&spec)?;
        bed.start_agent(agent_args)?;
        Ok((bed, spec))
    }

    /// Starts a TCP pod on each address, named as `Pod::name_for` says.
    pub fn add_pods<A: Into<IpAddr> + Copy>(&mut self, ips: &[A], port: u16) -> Result<()> {
        for ip in ips {
            let ip: IpAddr = (*ip).into();
            self.netns.add_address(ip)?;
            self.pods
                .push(Pod::tcp(&self.netns, &Pod::name_for(ip), (ip, port))?);
        }
        Ok(())
    }

    /// Starts a UDP pod (answering with its name) on each address.
    pub fn add_udp_pods<A: Into<IpAddr> + Copy>(&mut self, ips: &[A], port: u16) -> Result<()> {
        for ip in ips {
            let ip: IpAddr = (*ip).into();
            self.netns.add_address(ip)?;
            self.pods
                .push(Pod::udp(&self.netns, &Pod::name_for(ip), (ip, port))?);
        }
        Ok(())
    }

    /// Writes `spec` as `<name>.yaml` in the manifest directory.
    pub fn write_service(&self, spec: &ServiceSpec) -> Result<()> {
        self.manifests
            .write(&format!("{}.yaml", spec.name), &spec.yaml())
    }

    /// Rewrites `spec`'s manifest every `every` with the pods of `sets[0]`, then `sets[1]`,
    /// in turn (at most `max` times), until the returned flipper is stopped.
    pub fn flip_pods<A: Into<IpAddr> + Copy + Send + 'static>(
        &self,
        spec: &ServiceSpec,
        sets: [Vec<A>; 2],
        every: Duration,
        max: usize,
    ) -> Flipper {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, mut spec) = (self.manifests.path().to_owned(), spec.clone());
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let mut flips = 0;
            while !stopped.load(Ordering::Relaxed) && flips < max {
                spec.set_pods(&sets[flips % 2]);
                write_atomically(&dir, &format!("{}.yaml", spec.name), &spec.yaml())
                    .expect("writing the manifest");
                flips += 1;
                thread::sleep(every);
            }
            flips
        });
        Flipper { stop, thread }
    }

    /// `processes` client processes, each making `count` connect-request-close cycles to
    /// `target` in a thread of its own.
    pub fn churn(&self, processes: usize, target: SocketAddr, count: usize) -> Result<Churn> {
        let mut threads = Vec::with_capacity(processes);
        for _ in 0..processes {
            let mut client = self.client()?;
            threads.push(thread::spawn(move || client.churn(target, count)));
        }
        Ok(Churn(threads))
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
        Client::spawn(&self.netns, Some(self.cgroup.path()))
    }

    /// The pod listening on `ip` (names repeat across subnets, addresses do not).
    pub fn pod_at(&self, ip: impl Into<IpAddr>) -> &Pod {
        let ip = ip.into();
        self.pods
            .iter()
            .find(|p| p.addr.ip() == ip)
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

    /// Live connections per pod as socklb's maps count them (`socklbctl -j backend list`),
    /// in the same shape and order as `open()`.
    pub fn counted(&self) -> Result<Vec<(String, u64)>> {
        let mut v: Vec<(String, u64)> = self
            .agent()
            .backends()?
            .into_iter()
            .map(|b| {
                let name = b.ip.parse().map_or_else(|_| b.ip.clone(), Pod::name_for);
                (name, b.connections)
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// All live connections socklb counts.
    pub fn counted_total(&self) -> Result<u64> {
        Ok(self.counted()?.iter().map(|(_, n)| n).sum())
    }

    /// Waits until socklb counts `total` live connections and the pods hold as many open,
    /// then checks that both agree pod by pod.
    pub fn settle_at(&self, total: u64) -> Result<()> {
        // Bounded generously: on a loaded 2-core machine a pod's threads can take seconds to
        // see a thousand closes. What is asserted is the end state, not how fast it comes.
        let mut seen = (0, 0);
        wait_for(
            &format!("{total} live connections"),
            Duration::from_secs(20),
            || {
                let pods: u64 = self.open().iter().map(|(_, n)| n).sum();
                seen = (self.counted_total()?, pods);
                Ok((seen == (total, total)).then_some(()))
            },
        )
        .with_context(|| format!("maps count {}, pods hold {}", seen.0, seen.1))?;
        let (counted, open) = (self.counted()?, self.open());
        anyhow::ensure!(
            counted == open,
            "maps count {counted:?}, pods hold {open:?}"
        );
        Ok(())
    }
}

/// A thread rewriting a manifest (`Testbed::flip_pods`).
pub struct Flipper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<usize>,
}

impl Flipper {
    /// Stops flipping; how many times the manifest was written.
    pub fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("flipper thread")
    }
}

/// Of one churning process: cycles that succeeded, and failures by error.
pub type Churned = (u64, BTreeMap<String, u64>);

/// Client processes churning connections (`Testbed::churn`).
pub struct Churn(Vec<JoinHandle<Result<Churned>>>);

impl Churn {
    /// Whether every process is done.
    pub fn finished(&self) -> bool {
        self.0.iter().all(JoinHandle::is_finished)
    }

    /// Per process, what it churned.
    pub fn join(self) -> Vec<Churned> {
        self.0
            .into_iter()
            .map(|t| t.join().expect("churn thread").expect("churn"))
            .collect()
    }
}
