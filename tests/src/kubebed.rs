//! A one-node Kubernetes world for the agent's Kubernetes mode:
//!
//! - the API server double (`apiserver`) holding Namespaces, Services, EndpointSlices, Pods,
//!   and the node's Node (in zone `ZONE`);
//! - a "node" network namespace where the backend pods listen (on its loopback) and where
//!   kube-proxy's chain is installed (PREROUTING, as for pod traffic);
//! - client pods, each with its own network namespace joined to the node by a veth pair, with
//!   an IPv4 and an IPv6 (ULA) address (routes only to the pod and Service ranges of each
//!   family: no default route), and a cgroup laid out as kubelet does (any of its six layouts,
//!   `KUBELET_LAYOUTS`) under a test cgroup root;
//! - the agent in Kubernetes mode, through a kubeconfig pointing at the double.
//!
//! A connect from a pod that socklb does not balance reaches the node unchanged and goes
//! through kube-proxy's chain, as in a cluster.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::Result;
use k8s_openapi::{
    api::{
        core::v1::{
            Container, Namespace, Pod as PodObject, PodSpec, PodStatus, Service, ServicePort,
            ServiceSpec as K8sServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use crate::{
    agent::Agent,
    apiserver::ApiServer,
    cgroup::{self, Cgroup},
    client::Client,
    kube_proxy::{self, ChainService},
    manifests::{ManifestDir, ServiceSpec, family},
    netns::Netns,
    pod::Pod,
};

pub const NODE: &str = "node-1";
/// The node's `topology.kubernetes.io/zone`.
pub const ZONE: &str = "zone-a";
/// Where kubelet puts a pod's cgroup under its root, by cgroup driver and QoS class.
pub const KUBELET_LAYOUTS: [fn(&str) -> String; 6] = [
    |uid| format!("kubepods/pod{uid}"),
    |uid| format!("kubepods/burstable/pod{uid}"),
    |uid| format!("kubepods/besteffort/pod{uid}"),
    |uid| format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_")),
    |uid| {
        let u = uid.replace('-', "_");
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
    },
    |uid| {
        let u = uid.replace('-', "_");
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
    },
];
/// The node's IPv6 address on every pod's veth: the pods' next hop.
const NODE_HOP6: &str = "fd00:169::1";

/// A pod on the node whose connections socklb may balance.
pub struct ClientPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// Its container's cgroup.
    pub cgroup: PathBuf,
    pod_cgroup: PathBuf,
    // Last: the namespace goes after the processes in the cgroup are gone.
    pub netns: Netns,
}

impl Drop for ClientPod {
    fn drop(&mut self) {
        cgroup::remove(&self.pod_cgroup);
    }
}

/// How an endpoint is doing (EndpointSlice conditions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    Ready,
    /// Shutting down but still serving (ready false, serving true, terminating true).
    Terminating,
}

pub struct KubeBed {
    // Drop order: agent, client pods, backends, then the rest.
    pub agent: Option<Agent>,
    pub client_pods: Vec<ClientPod>,
    pub backends: Vec<Pod>,
    pub api: ApiServer,
    files: ManifestDir,
    services: BTreeMap<String, ChainService>,
    chain_installed: bool,
    next_pod: u32,
    pub cgroup_root: Cgroup,
    pub node: Netns,
}

impl KubeBed {
    pub fn new(prefix: &str) -> Result<KubeBed> {
        let node = Netns::new(&format!("{prefix}n"))?;
        // Pod traffic arrives on veths whose peers have addresses the node has no route back
        // through by default; loose reverse-path checks are what node networking uses.
        node.run_with_input(
            "sysctl",
            &["-q", "-p", "-"],
            "net.ipv4.conf.all.rp_filter=0\nnet.ipv4.conf.default.rp_filter=0\n",
        )?;
        let cgroup_root = Cgroup::new(prefix)?;
        let api = ApiServer::start()?;
        api.apply(&serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": ZONE}},
        }))?;
        std::fs::create_dir_all(
            cgroup_root
                .path()
                .join("kubepods.slice/kubepods-besteffort.slice"),
        )?;
        Ok(KubeBed {
            agent: None,
            client_pods: Vec::new(),
            backends: Vec::new(),
            api,
            files: ManifestDir::new(prefix)?,
            services: BTreeMap::new(),
            chain_installed: false,
            next_pod: 1,
            cgroup_root,
            node,
        })
    }

    /// A namespace, labelled socklb.io/enabled=<enabled> if given.
    pub fn namespace(&self, name: &str, enabled: Option<bool>) -> Result<()> {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        if let Some(e) = enabled {
            ns.metadata.labels = Some(BTreeMap::from([(
                "socklb.io/enabled".to_owned(),
                e.to_string(),
            )]));
        }
        self.api.apply(&ns)
    }

    /// TCP backend pods (HTTP servers) on the node at `ips`.
    pub fn tcp_backends<A: Into<IpAddr> + Copy>(&mut self, ips: &[A], port: u16) -> Result<()> {
        for ip in ips {
            let ip: IpAddr = (*ip).into();
            self.node.add_address(ip)?;
            self.backends
                .push(Pod::tcp(&self.node, &Pod::name_for(ip), (ip, port))?);
        }
        Ok(())
    }

    /// UDP backend pods on the node at `ips`.
    pub fn udp_backends<A: Into<IpAddr> + Copy>(&mut self, ips: &[A], port: u16) -> Result<()> {
        for ip in ips {
            let ip: IpAddr = (*ip).into();
            self.node.add_address(ip)?;
            let name = Pod::name_for(ip).replacen("pod", "dns", 1);
            self.backends.push(Pod::udp(&self.node, &name, (ip, port))?);
        }
        Ok(())
    }

    /// Creates or updates a Service and its EndpointSlices (every pod ready), and kube-proxy's
    /// chain for it.
    pub fn service(&mut self, spec: &ServiceSpec) -> Result<()> {
        let endpoints: Vec<(IpAddr, Condition)> =
            spec.pods.iter().map(|ip| (*ip, Condition::Ready)).collect();
        self.service_with(spec, &endpoints)
    }

    /// Same, with each endpoint's condition given.
    /// Like `service`, with each endpoint's condition given. A dual-stack spec (`vip2`) gets
    /// `clusterIPs` and one EndpointSlice per family.
    pub fn service_with<A: Into<IpAddr> + Copy>(
        &mut self,
        spec: &ServiceSpec,
        endpoints: &[(A, Condition)],
    ) -> Result<()> {
        let endpoints: Vec<(IpAddr, Condition)> =
            endpoints.iter().map(|(ip, c)| ((*ip).into(), *c)).collect();
        let vips: Vec<IpAddr> = [Some(spec.vip), spec.vip2].into_iter().flatten().collect();
        let meta = |name: &str| ObjectMeta {
            name: Some(name.into()),
            namespace: Some(spec.namespace.clone()),
            ..ObjectMeta::default()
        };
        let mut annotations = BTreeMap::new();
        if let Some(a) = spec.algorithm {
            annotations.insert("socklb.io/algorithm".to_owned(), a.to_owned());
        }
        let service = Service {
            metadata: ObjectMeta {
                annotations: Some(annotations),
                ..meta(&spec.name)
            },
            spec: Some(K8sServiceSpec {
                cluster_ip: Some(spec.vip.to_string()),
                cluster_ips: Some(vips.iter().map(ToString::to_string).collect()),
                ip_families: Some(vips.iter().map(|ip| family(*ip).to_owned()).collect()),
                ip_family_policy: Some(
                    if vips.len() == 2 {
                        "RequireDualStack"
                    } else {
                        "SingleStack"
                    }
                    .into(),
                ),
                ports: Some(vec![ServicePort {
                    name: Some("main".into()),
                    port: i32::from(spec.port),
                    target_port: Some(IntOrString::Int(i32::from(spec.target_port))),
                    protocol: Some(spec.protocol.into()),
                    ..ServicePort::default()
                }]),
                ..K8sServiceSpec::default()
            }),
            status: None,
        };
        self.api.apply(&service)?;
        for (i, vip) in vips.iter().enumerate() {
            let of_family: Vec<(IpAddr, Condition)> = endpoints
                .iter()
                .filter(|(ip, _)| ip.is_ipv4() == vip.is_ipv4())
                .copied()
                .collect();
            let slice = EndpointSlice {
                metadata: ObjectMeta {
                    labels: Some(BTreeMap::from([(
                        "kubernetes.io/service-name".to_owned(),
                        spec.name.clone(),
                    )])),
                    ..meta(&format!("{}-{}", spec.name, i + 1))
                },
                address_type: family(*vip).into(),
                ports: Some(vec![EndpointPort {
                    name: Some("main".into()),
                    port: Some(i32::from(spec.target_port)),
                    protocol: Some(spec.protocol.into()),
                    ..EndpointPort::default()
                }]),
                endpoints: of_family
                    .iter()
                    .map(|(ip, c)| Endpoint {
                        addresses: vec![ip.to_string()],
                        node_name: Some(NODE.into()),
                        conditions: Some(match c {
                            Condition::Ready => EndpointConditions {
                                ready: Some(true),
                                serving: Some(true),
                                terminating: Some(false),
                            },
                            Condition::Terminating => EndpointConditions {
                                ready: Some(false),
                                serving: Some(true),
                                terminating: Some(true),
                            },
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            };
            self.api.apply(&slice)?;

            // kube-proxy, too, uses ready endpoints, or serving-terminating ones if none is
            // ready; one chain per ClusterIP.
            let ready: Vec<IpAddr> = of_family
                .iter()
                .filter(|(_, c)| *c == Condition::Ready)
                .map(|(ip, _)| *ip)
                .collect();
            let used = if ready.is_empty() {
                of_family.iter().map(|(ip, _)| *ip).collect()
            } else {
                ready
            };
            self.services.insert(
                format!("{}/{}/{vip}", spec.namespace, spec.name),
                ChainService {
                    port_name: format!("{}/{}:main", spec.namespace, spec.name),
                    vip: *vip,
                    port: spec.port,
                    protocol: if spec.protocol == "UDP" { "udp" } else { "tcp" },
                    endpoints: used
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, spec.target_port))
                        .collect(),
                },
            );
        }
        let chain: Vec<ChainService> = self.services.values().cloned().collect();
        if self.chain_installed {
            kube_proxy::reload(&self.node, &chain)?;
        } else {
            kube_proxy::install(&self.node, &chain)?;
            self.chain_installed = true;
        }
        Ok(())
    }

    /// A running pod in `namespace` with its own network namespace and cgroup, and its Pod
    /// object on this node. `opt_out` annotates it socklb.io/enabled: "false". Its cgroup is
    /// laid out as kubelet's systemd driver does for a BestEffort pod, under CRI-O.
    pub fn client_pod(&mut self, namespace: &str, name: &str, opt_out: bool) -> Result<&ClientPod> {
        self.client_pod_in(namespace, name, opt_out, KUBELET_LAYOUTS.len() - 1)
    }

    /// The same, with its cgroup in `KUBELET_LAYOUTS[layout]`; odd layouts under CRI-O (its
    /// `crio-<id>.scope`), even ones under containerd (`cri-containerd-<id>.scope`).
    pub fn client_pod_in(
        &mut self,
        namespace: &str,
        name: &str,
        opt_out: bool,
        layout: usize,
    ) -> Result<&ClientPod> {
        let n = self.next_pod;
        self.next_pod += 1;
        let ip = Ipv4Addr::new(10, 250, 0, n as u8);
        let ip6 = Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, n as u16);
        let uid = format!("5e0c1b2a-{n:04x}-4c00-8000-{:012x}", std::process::id());
        let netns = Netns::new(&format!("p{n}"))?;
        let veth = format!("{}v{n}", &crate::unique("")[2..])
            .chars()
            .take(15)
            .collect::<String>();
        self.node.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        self.node
            .ip(&["addr", "add", "169.254.1.1/32", "dev", &veth])?;
        self.node.ip(&["link", "set", &veth, "up"])?;
        self.node
            .ip(&["route", "add", &format!("{ip}/32"), "dev", &veth])?;
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        for range in ["10.244.0.0/16", "10.96.0.0/12"] {
            netns.ip(&["route", "add", range, "via", "169.254.1.1", "dev", "eth0"])?;
        }
        // IPv6: the node's end of the veth is fd00:169::1 (a ULA, like 169.254.1.1 above, on
        // every pod's veth); the pod reaches it on-link and routes the IPv6 pod and Service
        // ranges there, and the node routes the pod's address back down the veth.
        self.node.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_HOP6}/128"),
            "dev",
            &veth,
            "nodad",
        ])?;
        self.node
            .ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &veth])?;
        netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        netns.ip(&["-6", "route", "add", NODE_HOP6, "dev", "eth0"])?;
        for range in ["fd00:244::/32", kube_proxy::SERVICE_RANGES[1]] {
            netns.ip(&["-6", "route", "add", range, "via", NODE_HOP6, "dev", "eth0"])?;
        }

        let pod_cgroup = self.cgroup_root.path().join(KUBELET_LAYOUTS[layout](&uid));
        let runtime = if layout % 2 == 1 {
            "crio"
        } else {
            "cri-containerd"
        };
        let container = pod_cgroup.join(format!("{runtime}-{n:064x}.scope"));
        std::fs::create_dir_all(&container)?;

        let mut meta = ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid.clone()),
            ..ObjectMeta::default()
        };
        if opt_out {
            meta.annotations = Some(BTreeMap::from([(
                "socklb.io/enabled".to_owned(),
                "false".to_owned(),
            )]));
        }
        let pod = PodObject {
            metadata: meta,
            spec: Some(PodSpec {
                node_name: Some(NODE.into()),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("app".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                qos_class: Some("BestEffort".into()),
                pod_ip: Some(ip.to_string()),
                ..PodStatus::default()
            }),
        };
        self.api.apply(&pod)?;
        self.client_pods.push(ClientPod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            ip,
            ip6,
            cgroup: container,
            pod_cgroup,
            netns,
        });
        Ok(self.client_pods.last().expect("just pushed"))
    }

    /// A process in the pod (its network namespace and container cgroup).
    pub fn client(&self, pod: &str) -> Result<Client> {
        let p = self
            .client_pods
            .iter()
            .find(|p| p.name == pod)
            .expect("pod exists");
        Client::spawn(&p.netns, Some(&p.cgroup))
    }

    pub fn start_agent(&mut self, extra: &[&str]) -> Result<&mut Agent> {
        let kubeconfig = self.files.path().join("kubeconfig");
        self.api.write_kubeconfig(&kubeconfig)?;
        Ok(self.agent.insert(Agent::kubernetes(
            &kubeconfig,
            NODE,
            self.cgroup_root.path(),
            extra,
        )?))
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    /// Live connections socklb counts, over all backends.
    pub fn counted(&self) -> Result<u64> {
        Ok(self.agent().backends()?.iter().map(|b| b.connections).sum())
    }
}
