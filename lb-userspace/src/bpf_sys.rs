//! The few bpf(2) commands aya does not expose: for a pinned link, open it, read which program
//! and cgroup it holds, and swap its program atomically (used when an upgraded agent adopts
//! links pinned by an older build, so no connect goes unbalanced during the swap); a map
//! iterator (aya's iterator links take no map); a cgroup link for the setsockopt hook, and
//! pinning it (aya 0.16 cannot turn that link into a pinnable one); and a test run of a
//! program (how the agent repairs a count in the kernel). Also the clock the programs read.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u64 = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_SETSOCKOPT.
pub const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// CLOCK_MONOTONIC in nanoseconds: what `bpf_ktime_get_ns()` returns in the programs.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed, 128-byte bpf_attr big enough for the commands used here.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Pins a BPF object (BPF_OBJ_PIN).
pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64; // pathname
    attr[1] = fd.as_fd().as_raw_fd() as u64; // bpf_fd, file_flags 0
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Attaches `prog` to a cgroup with a bpf_link (BPF_LINK_CREATE).
pub fn cgroup_link_create(
    prog: impl AsFd,
    cgroup: impl AsFd,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = prog.as_fd().as_raw_fd() as u64 | ((cgroup.as_fd().as_raw_fd() as u64) << 32);
    attr[1] = u64::from(attach_type); // flags 0
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: a new descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens a pinned BPF object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64; // pathname
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What a cgroup bpf_link holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn link_info(link: impl AsFd) -> io::Result<CgroupLinkInfo> {
    // struct bpf_link_info { u32 type, id, prog_id; union (8-aligned, at byte 16) {
    //   struct { u64 cgroup_id; u32 attach_type; } cgroup; ... } }
    let mut info = [0u64; 32];
    let mut attr = [0u64; 16];
    attr[0] = link.as_fd().as_raw_fd() as u64 | ((size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(CgroupLinkInfo {
        link_id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        cgroup_id: info[2],
        attach_type: info[3] as u32,
    })
}

/// Replaces the program of `link` with `prog` in one step (BPF_LINK_UPDATE).
pub fn link_update(link: impl AsFd, prog: impl AsFd) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_fd().as_raw_fd() as u64 | ((prog.as_fd().as_raw_fd() as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Attaches an iterator program to a map (`bpf_iter_link_info.map.map_fd`); each
/// `iter_create` on the link then walks the map once.
pub fn iter_link_create(prog: impl AsFd, map: impl AsFd) -> io::Result<OwnedFd> {
    let info = [map.as_fd().as_raw_fd() as u64, 0];
    let mut attr = [0u64; 16];
    attr[0] = prog.as_fd().as_raw_fd() as u64; // prog_fd, target_fd 0
    attr[1] = BPF_TRACE_ITER; // attach_type, flags 0
    attr[2] = info.as_ptr() as u64; // iter_info
    attr[3] = size_of_val(&info) as u64; // iter_info_len
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: a new descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A readable file that runs the iterator of `link` once, to its end.
pub fn iter_create(link: impl AsFd) -> io::Result<std::fs::File> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_fd().as_raw_fd() as u64; // link_fd, flags 0
    let fd = bpf(BPF_ITER_CREATE, &mut attr)?;
    // SAFETY: a new descriptor from the kernel.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
}

/// Runs `prog` once on `data` (BPF_PROG_TEST_RUN); returns its return value.
pub fn prog_test_run(prog: impl AsFd, data: &[u8]) -> io::Result<u32> {
    let mut attr = [0u64; 16];
    attr[0] = prog.as_fd().as_raw_fd() as u64; // prog_fd; retval comes back above it
    attr[1] = data.len() as u64; // data_size_in, data_size_out 0
    attr[2] = data.as_ptr() as u64; // data_in
    attr[4] = 1; // repeat
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr[0] >> 32) as u32)
}
