//! The few bpf(2) commands aya does not expose for a pinned link: open it, read which program
//! and cgroup it holds, and swap its program atomically (used when an upgraded agent adopts
//! links pinned by an older build, so no connect goes unbalanced during the swap).

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed, 128-byte bpf_attr big enough for the commands used here.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
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
