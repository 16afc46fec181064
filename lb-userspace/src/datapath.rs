//! Loading the BPF programs, attaching them to a cgroup, and the pinned maps and links that
//! keep them working while the agent is stopped or restarting.
//!
//! Layout under the pin path (default /sys/fs/bpf/socklb): one file per map (named as in
//! `lb_common::map_names`), `links/<program>` for each attachment, and `LAYOUT`, a symlink to
//! the `lb_common::LAYOUT_VERSION` of the maps (bpffs holds no regular files). A starting agent reuses whatever is pinned: maps
//! keep their contents and connection counts, links stay attached. If a pinned link runs a
//! program from another build, its program is swapped in place with BPF_LINK_UPDATE, so there
//! is never a moment without a balancer. Only maps of another layout (an upgrade that changed
//! them) are not reused: they are removed with their links and made afresh (see `install`).

use std::{
    ffi::CString,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Program, ProgramFd, SockOps, SocketFilter,
        links::FdLink, loaded_programs,
    },
};
use lb_common::{
    Affinity, AffinityKey, Backend, CountAdjustment, LAYOUT_VERSION, RebalanceStats, Service,
    ServiceKey, ServiceName, ServiceStats, SlotKey, adjust_result, map_names,
};
use log::{info, warn};

use crate::{
    bpf_sys,
    programmed::{Op, Programmed},
    sockets::SocketIterator,
    writer::MapWriter,
};

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/socklb";

/// The programs, in the order they are attached: the ones that undo or show a rewrite before
/// the ones that make it, so no rewritten socket ever lacks its counterpart.
pub const PROGRAMS: [&str; 11] = [
    "sock_ops",
    "sock_release",
    "setsockopt",
    "getpeername4",
    "getpeername6",
    "recvmsg4",
    "recvmsg6",
    "sendmsg4",
    "sendmsg6",
    "connect4",
    "connect6",
];

static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socklb"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// What happened to each program when the datapath was set up.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkAction {
    Attached,
    Adopted,
    Replaced,
}

/// Typed handles on the pinned maps.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub names: HashMap<MapData, u32, ServiceName>,
    pub counts: Array<MapData, u64>,
    pub stats: Array<MapData, ServiceStats>,
    pub maglev: HashMap<MapData, SlotKey, u32>,
    pub affinity: HashMap<MapData, AffinityKey, Affinity>,
    pub settings: Array<MapData, u64>,
    /// Network namespace cookies of the pods switched on (Kubernetes mode).
    pub enabled_netns: HashMap<MapData, u64, u8>,
    /// Written by the rebalancer, read by socklbctl.
    pub rebalance_stats: HashMap<MapData, u32, RebalanceStats>,
    /// Backends whose count the programs refused to take below zero, and how often.
    pub count_underflows: HashMap<MapData, u32, u64>,
    /// Assignments made and ended, per CPU (see `Maps::events`).
    pub events: PerCpuArray<MapData, u64>,
    /// The socket storage map, read through `SocketIterator` (and by sock_diag).
    pub sockets: MapData,
}

/// The programs' count of changes to the assignments (`EVENTS`): `started` is bumped before
/// a count and a socket's `live` flag change, `finished` after. A look at the sockets and the
/// counts is a snapshot if `started == finished` before it (nothing under way) and `started`
/// did not move by its end (nothing began).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    pub started: u64,
    pub finished: u64,
}

/// The two programs the agent runs itself rather than attaching: the socket iterator and the
/// count repair.
pub struct Tools {
    pub sockets: SocketIterator,
    adjust_count: ProgramFd,
}

impl Tools {
    fn load(ebpf: &mut Ebpf, sockets: &MapData) -> Result<Tools> {
        let iterator = SocketIterator::load(ebpf, sockets)?;
        let adjust: &mut SocketFilter = ebpf
            .program_mut("adjust_count")
            .context("program adjust_count missing from the BPF object")?
            .try_into()?;
        adjust.load().context("loading adjust_count")?;
        Ok(Tools {
            sockets: iterator,
            adjust_count: adjust.fd()?.try_clone()?,
        })
    }

    /// The tools for an installed datapath (socklbctl, while the agent runs or not): the
    /// object is loaded again on the pinned maps, nothing is attached.
    pub fn open(pin_path: &Path) -> Result<Tools> {
        check_layout(pin_path)?;
        let sockets = pin_path.join(map_names::SOCKETS);
        let sockets = MapData::from_pin(&sockets).with_context(|| {
            format!(
                "opening {} (is socklb installed at this pin path?)",
                sockets.display()
            )
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .load(BPF_OBJECT)
            .context("loading the BPF object on the pinned maps")?;
        Tools::load(&mut ebpf, &sockets)
    }

    /// Adds `delta` to a backend's live count with a compare-and-swap in the kernel, so that
    /// no connect or close the programs count meanwhile is lost and the count never goes
    /// below zero. Returns whether it was applied.
    pub fn adjust_count(&self, backend_id: u32, delta: i64) -> Result<bool> {
        let adjustment = CountAdjustment {
            backend_id,
            _pad: 0,
            delta: delta as u64,
        };
        // A 14-byte Ethernet header (the test run strips it), then the adjustment. The
        // EtherType is the local experimental one: with IPv4's the kernel would want an IPv4
        // header behind it.
        let mut data = vec![0u8; 14];
        data[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        // SAFETY: CountAdjustment is repr(C) plain data without padding holes.
        data.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (&raw const adjustment).cast::<u8>(),
                size_of::<CountAdjustment>(),
            )
        });
        match bpf_sys::prog_test_run(&self.adjust_count, &data).context("running adjust_count")? {
            adjust_result::APPLIED => Ok(true),
            adjust_result::BELOW_ZERO | adjust_result::NOT_APPLIED => Ok(false),
            other => bail!("adjust_count returned {other}"),
        }
    }
}

/// What `install` set up.
pub struct Installed {
    pub maps: Maps,
    pub tools: Tools,
    /// What was done per attached program.
    pub actions: Vec<(&'static str, LinkAction)>,
}

/// Loads the programs and attaches them to `cgroup`, or adopts what an earlier run pinned at
/// `pin_path`. `flags` (`lb_common::settings`) are in force before any program is attached.
pub fn install(pin_path: &Path, cgroup: &Path, flags: u64) -> Result<Installed> {
    let cgroup_dir = fs::File::open(cgroup)
        .with_context(|| format!("cgroup {} cannot be opened", cgroup.display()))?;
    if fs_magic(cgroup)? != CGROUP2_SUPER_MAGIC {
        bail!("{} is not a cgroup v2 directory", cgroup.display());
    }
    let cgroup_id = fs::metadata(cgroup)?.ino();
    ensure_bpffs(pin_path)?;
    replace_other_layout(pin_path)?;
    let links_dir = pin_path.join("links");
    fs::create_dir_all(&links_dir)
        .with_context(|| format!("cannot create {}", links_dir.display()))?;
    // Before any map is pinned, so that pinned maps never lack it.
    let layout = pin_path.join(LAYOUT_FILE);
    let version = LAYOUT_VERSION.to_string();
    if fs::read_link(&layout).ok() != Some(PathBuf::from(&version)) {
        let _ = fs::remove_file(&layout); // a leftover without maps
        std::os::unix::fs::symlink(&version, &layout)
            .with_context(|| format!("making {}", layout.display()))?;
    }

    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_path)
        .load(BPF_OBJECT)
        .with_context(|| {
            format!(
                "loading the BPF programs with the maps pinned at {} (if they come from an \
                 incompatible build, run `socklb-agent cleanup` first)",
                pin_path.display()
            )
        })?;

    let settings = ebpf
        .map_mut(map_names::SETTINGS)
        .context("map SETTINGS missing from the BPF object")?;
    Array::<_, u64>::try_from(settings)?.set(lb_common::settings::FLAGS, &flags, 0)?;

    let mut actions = Vec::new();
    for name in PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the BPF object"))?;
        load(program).with_context(|| format!("loading program {name}"))?;
        let link_path = links_dir.join(name);
        let action = if link_path.exists() {
            adopt(program, &link_path, cgroup_id)
                .with_context(|| format!("adopting {}", link_path.display()))?
        } else {
            attach_pinned(program, &cgroup_dir, &link_path)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            LinkAction::Attached
        };
        info!("{name}: {action:?} ({})", cgroup.display());
        actions.push((name, action));
    }
    let maps = Maps::take(&mut ebpf)?;
    let tools = Tools::load(&mut ebpf, &maps.sockets)?;
    Ok(Installed {
        maps,
        tools,
        actions,
    })
}

/// Next to the pinned maps: a symlink to their `LAYOUT_VERSION`.
const LAYOUT_FILE: &str = "LAYOUT";

/// The layout of the maps pinned at `pin_path`: `None` if none are pinned, `Some(None)` if
/// they are but say nothing (pinned by a build from before `LAYOUT`).
fn pinned_layout(pin_path: &Path) -> Option<Option<u32>> {
    if !map_names::ALL.iter().any(|n| pin_path.join(n).exists()) {
        return None;
    }
    let target = fs::read_link(pin_path.join(LAYOUT_FILE)).ok();
    Some(target.and_then(|t| t.to_str()?.parse().ok()))
}

/// Refuses to open maps of another layout, which would fail or be misread.
fn check_layout(pin_path: &Path) -> Result<()> {
    match pinned_layout(pin_path) {
        Some(Some(LAYOUT_VERSION)) | None => Ok(()),
        Some(found) => bail!(
            "the maps at {} have layout {} and this build reads layout {LAYOUT_VERSION}: \
             start the matching socklb-agent, which replaces them",
            pin_path.display(),
            found.map_or("unknown (older)".to_string(), |v| v.to_string()),
        ),
    }
}

/// An upgrade that changed the maps' layout: the loader cannot reuse maps of another layout,
/// so the old programs, links and maps go and fresh ones are made. Connections made before
/// keep working (their sockets hold their own addresses), but they no longer count against
/// their backends, and getpeername shows them the pod's address; new connections are
/// balanced as soon as the new programs are attached, a few milliseconds later (until then a
/// connect to a VIP goes where the application asked: to kube-proxy's rules in Kubernetes).
fn replace_other_layout(pin_path: &Path) -> Result<()> {
    let Some(found) = pinned_layout(pin_path) else {
        return Ok(());
    };
    if found == Some(LAYOUT_VERSION) {
        return Ok(());
    }
    warn!(
        "the maps pinned at {} have layout {} and this build uses layout {LAYOUT_VERSION}: \
         replacing them (connections made before are no longer counted)",
        pin_path.display(),
        found.map_or("unknown (older)".to_string(), |v| v.to_string()),
    );
    uninstall(pin_path).context("removing the maps and links of the other layout")?;
    Ok(())
}

fn load(program: &mut Program) -> Result<()> {
    match program {
        Program::CgroupSockAddr(p) => p.load()?,
        Program::SockOps(p) => p.load()?,
        Program::CgroupSock(p) => p.load()?,
        Program::CgroupSockopt(p) => p.load()?,
        other => bail!("unexpected program type {:?}", other.prog_type()),
    }
    Ok(())
}

/// Attaches `program` to `cgroup` with a bpf_link and pins the link at `link_path`.
fn attach_pinned(program: &mut Program, cgroup: &fs::File, link_path: &Path) -> Result<()> {
    let mode = CgroupAttachMode::Single; // bpf_link attachments always coexist with others
    let link = match program {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(CgroupSockAddr::take_link(p, id)?)?
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(SockOps::take_link(p, id)?)?
        }
        Program::CgroupSock(p) => {
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(CgroupSock::take_link(p, id)?)?
        }
        Program::CgroupSockopt(p) => {
            let link =
                bpf_sys::cgroup_link_create(p.fd()?, cgroup, bpf_sys::BPF_CGROUP_SETSOCKOPT)?;
            bpf_sys::obj_pin(&link, link_path)
                .with_context(|| format!("pinning {}", link_path.display()))?;
            return Ok(());
        }
        other => bail!("unexpected program type {:?}", other.prog_type()),
    };
    link.pin(link_path)
        .with_context(|| format!("pinning {}", link_path.display()))?;
    Ok(())
}

/// Keeps a pinned link, swapping in `program` if the link runs different code.
fn adopt(program: &Program, link_path: &Path, cgroup_id: u64) -> Result<LinkAction> {
    let link = bpf_sys::obj_get(link_path)?;
    let info = bpf_sys::link_info(&link)?;
    if info.cgroup_id != cgroup_id {
        bail!(
            "it is attached to another cgroup (id {}, not {cgroup_id}); run `socklb-agent cleanup` \
             to detach it first",
            info.cgroup_id
        );
    }
    let ours = program.info()?.tag();
    let theirs = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == info.prog_id)
        .map(|p| p.tag());
    if theirs == Some(ours) {
        return Ok(LinkAction::Adopted);
    }
    bpf_sys::link_update(&link, program.fd()?)?;
    Ok(LinkAction::Replaced)
}

/// Detaches everything and removes the pinned maps (what `socklb-agent cleanup` does).
/// Connections already made keep working; new ones go where the application asked again.
pub fn uninstall(pin_path: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_path.exists() {
        return Ok(removed);
    }
    let links_dir = pin_path.join("links");
    // Unpinning the connect hook first stops new assignments before the counters go.
    for name in PROGRAMS.iter().rev() {
        let p = links_dir.join(name);
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
    }
    if links_dir.exists() {
        fs::remove_dir(&links_dir).with_context(|| format!("removing {}", links_dir.display()))?;
    }
    for name in map_names::ALL.iter().chain([&LAYOUT_FILE]) {
        let p = pin_path.join(name);
        // symlink_metadata: LAYOUT is a symlink to nothing.
        if fs::symlink_metadata(&p).is_ok() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
    }
    fs::remove_dir(pin_path).with_context(|| {
        format!(
            "removing {} (does it hold files socklb did not make?)",
            pin_path.display()
        )
    })?;
    Ok(removed)
}

/// A pinned link and the program it runs, for `socklbctl prog show`.
pub struct AttachedProgram {
    pub name: &'static str,
    pub link: bpf_sys::CgroupLinkInfo,
    pub program: Option<aya::programs::ProgramInfo>,
}

pub fn attached_programs(pin_path: &Path) -> Result<Vec<AttachedProgram>> {
    let mut out = Vec::new();
    for name in PROGRAMS {
        let path = pin_path.join("links").join(name);
        if !path.exists() {
            continue;
        }
        let link =
            bpf_sys::obj_get(&path).with_context(|| format!("opening {}", path.display()))?;
        let info = bpf_sys::link_info(&link)?;
        let program = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == info.prog_id);
        out.push(AttachedProgram {
            name,
            link: info,
            program,
        });
    }
    Ok(out)
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the BPF object"))
        };
        Ok(Maps {
            services: take(map_names::SERVICES)?.try_into()?,
            slots: take(map_names::SLOTS)?.try_into()?,
            backends: take(map_names::BACKENDS)?.try_into()?,
            names: take(map_names::SERVICE_NAMES)?.try_into()?,
            counts: take(map_names::CONN_COUNTS)?.try_into()?,
            stats: take(map_names::SERVICE_STATS)?.try_into()?,
            maglev: take(map_names::MAGLEV)?.try_into()?,
            affinity: take(map_names::AFFINITY)?.try_into()?,
            settings: take(map_names::SETTINGS)?.try_into()?,
            enabled_netns: take(map_names::ENABLED_NETNS)?.try_into()?,
            rebalance_stats: take(map_names::REBALANCE_STATS)?.try_into()?,
            count_underflows: take(map_names::COUNT_UNDERFLOWS)?.try_into()?,
            events: take(map_names::EVENTS)?.try_into()?,
            sockets: map_data(take(map_names::SOCKETS)?)?,
        })
    }

    /// Opens the maps an agent pinned, e.g. for socklbctl (works while the agent is stopped).
    pub fn open_pinned(pin_path: &Path) -> Result<Self> {
        check_layout(pin_path)?;
        let open = |name: &str| -> Result<Map> {
            let path = pin_path.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening {} (is socklb installed at this pin path?)",
                    path.display()
                )
            })?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Maps {
            services: open(map_names::SERVICES)?.try_into()?,
            slots: open(map_names::SLOTS)?.try_into()?,
            backends: open(map_names::BACKENDS)?.try_into()?,
            names: open(map_names::SERVICE_NAMES)?.try_into()?,
            counts: open(map_names::CONN_COUNTS)?.try_into()?,
            stats: open(map_names::SERVICE_STATS)?.try_into()?,
            maglev: open(map_names::MAGLEV)?.try_into()?,
            affinity: open(map_names::AFFINITY)?.try_into()?,
            settings: open(map_names::SETTINGS)?.try_into()?,
            enabled_netns: open(map_names::ENABLED_NETNS)?.try_into()?,
            rebalance_stats: open(map_names::REBALANCE_STATS)?.try_into()?,
            count_underflows: open(map_names::COUNT_UNDERFLOWS)?.try_into()?,
            events: open(map_names::EVENTS)?.try_into()?,
            sockets: map_data(open(map_names::SOCKETS)?)?,
        })
    }

    /// Reads everything the agent writes, to adopt it after a restart.
    pub fn read_programmed(&self) -> Result<Programmed> {
        Ok(Programmed::adopt(
            self.services.iter().collect::<Result<Vec<_>, _>>()?,
            self.names.iter().collect::<Result<Vec<_>, _>>()?,
            self.slots.iter().collect::<Result<Vec<_>, _>>()?,
            self.backends.iter().collect::<Result<Vec<_>, _>>()?,
            self.maglev.iter().collect::<Result<Vec<_>, _>>()?,
        ))
    }

    /// Live connections of a backend. The programs never take a count below zero (they
    /// refuse and record it in `COUNT_UNDERFLOWS`), so this is the map's value as it is.
    pub fn connections(&self, backend_id: u32) -> u64 {
        self.counts.get(&backend_id, 0).unwrap_or(0)
    }

    /// Changes to the assignments the programs started and finished so far, over all CPUs
    /// (see `Events`).
    pub fn events(&self) -> Result<Events> {
        let sum = |i: u32| -> Result<u64> { Ok(self.events.get(&i, 0)?.iter().sum()) };
        // Started first: a change that starts after this read shows as started > finished in
        // a later look, never as a finished change that was not started.
        let started = sum(0)?;
        let finished = sum(1)?;
        Ok(Events { started, finished })
    }

    /// Backend id -> how often its count was refused a decrement below zero.
    pub fn underflows(&self) -> std::collections::BTreeMap<u32, u64> {
        self.count_underflows
            .iter()
            .filter_map(Result::ok)
            .collect()
    }

    pub fn stats(&self, service_id: u32) -> ServiceStats {
        self.stats.get(&service_id, 0).unwrap_or_default()
    }

    pub fn rebalance_stats(&self, service_id: u32) -> RebalanceStats {
        self.rebalance_stats.get(&service_id, 0).unwrap_or_default()
    }
}

impl MapWriter for Maps {
    fn write(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::PutName(id, n) => self.names.insert(id, &**n, 0)?,
            Op::PutBackend(id, b) => self.backends.insert(id, b, 0)?,
            Op::PutSlot(k, id) => self.slots.insert(k, id, 0)?,
            Op::PutMaglev(k, id) => self.maglev.insert(k, id, 0)?,
            Op::PutService(k, s) => self.services.insert(k, s, 0)?,
            Op::ResetStats(id) => self.stats.set(*id, &ServiceStats::default(), 0)?,
            Op::ResetCount(id) => {
                // Only for an id no socket holds: its count is 0 unless an earlier run went
                // wrong, and a new pod must start from 0 whatever happened.
                // Its underflow record stays: it reports what went wrong before.
                self.counts.set(*id, &0, 0)?;
            }
            Op::DeleteService(k) => self.services.remove(k)?,
            Op::DeleteSlot(k) => self.slots.remove(k)?,
            Op::DeleteMaglev(k) => self.maglev.remove(k)?,
            Op::DeleteBackend(id) => self.backends.remove(id)?,
            Op::DeleteName(id) => self.names.remove(id)?,
        }
        Ok(())
    }
}

fn map_data(map: Map) -> Result<MapData> {
    match map {
        Map::SkStorage(data) => Ok(data),
        _ => bail!("the SOCKETS map is not socket-local storage"),
    }
}

fn fs_magic(path: &Path) -> Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills the zeroed struct; c is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64)
}

/// Mounts bpffs at /sys/fs/bpf if the pin path lives there and nothing is mounted yet (as on
/// a fresh node or container host; kubelet setups usually mount it already).
fn ensure_bpffs(pin_path: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    let probe = pin_path.ancestors().find(|p| p.exists()).unwrap_or(root);
    if fs_magic(probe)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if !pin_path.starts_with(root) {
        bail!(
            "{} is not on a BPF filesystem (mount bpffs there, or use a pin path under /sys/fs/bpf)",
            pin_path.display()
        );
    }
    let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}
