//! Another tool's BPF program on the same cgroup, for the tests: a sock_ops program that
//! switches off every socket's TCP callbacks once it is established
//! (`bpf_sock_ops_cb_flags_set(ctx, 0)` in ACTIVE_ESTABLISHED_CB), as a program that sets its
//! own flags without keeping others' does. socklb must still uncount each connection exactly
//! once. Eight instructions, loaded and attached with bpf(2) directly (a bpf_link: closing it
//! detaches the program).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SOCK_OPS: u64 = 13;
const BPF_CGROUP_SOCK_OPS: u64 = 3;
const BPF_FUNC_SOCK_OPS_CB_FLAGS_SET: i32 = 59;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: i32 = 4;

/// One BPF instruction: opcode, registers (dst low nibble, src high), offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst | (src << 4)) << 8)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

fn program() -> [u64; 8] {
    [
        insn(0xbf, 6, 1, 0, 0),                                  // r6 = r1 (ctx)
        insn(0x61, 2, 1, 0, 0),                                  // r2 = ctx->op
        insn(0x55, 2, 0, 3, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB), // if r2 != 4 goto +3
        insn(0xbf, 1, 6, 0, 0),                                  // r1 = ctx
        insn(0xb7, 2, 0, 0, 0),                                  // r2 = 0: no callbacks
        insn(0x85, 0, 0, 0, BPF_FUNC_SOCK_OPS_CB_FLAGS_SET),     // call
        insn(0xb7, 0, 0, 0, 1),                                  // r0 = 1
        insn(0x95, 0, 0, 0, 0),                                  // exit
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<OwnedFd> {
    // SAFETY: a zeroed 128-byte bpf_attr, filled for `cmd`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The program, attached to `cgroup` while this lives.
pub struct ClearsCallbacks {
    _link: OwnedFd,
}

impl ClearsCallbacks {
    pub fn attach(cgroup: &Path) -> Result<ClearsCallbacks> {
        let insns = program();
        let license = c"GPL";
        let mut attr = [0u64; 16];
        attr[0] = BPF_PROG_TYPE_SOCK_OPS | ((insns.len() as u64) << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        let prog = bpf(BPF_PROG_LOAD, &mut attr).context("loading the sock_ops program")?;
        let dir = File::open(cgroup)?;
        let mut attr = [0u64; 16];
        attr[0] = prog.as_raw_fd() as u64 | ((dir.as_raw_fd() as u64) << 32);
        attr[1] = BPF_CGROUP_SOCK_OPS;
        let link = bpf(BPF_LINK_CREATE, &mut attr).context("attaching it")?;
        Ok(ClearsCallbacks { _link: link })
    }
}
