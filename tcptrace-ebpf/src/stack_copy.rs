//! Copies of the top of a user stack, with the registers to unwind it,
//! for the agent to unwind from CFI (`tcptrace_common::UserStackHeader`).
//!
//! A frame-pointer walk (`bpf_get_stackid`) stops at the first function
//! built without frame pointers, which is most C, C++ and Rust release
//! code: glibc's `accept()` wrapper alone, say. The binaries' `.eh_frame`
//! still describes every frame, but reading it is no job for a BPF
//! program; the agent does it from the copy, as it arrives.
//!
//! Taken only where a stack is walked (an origin, a last-use checkout),
//! within the process's stack budget: never on a hot transition.

use core::ptr::addr_of_mut;

use aya_ebpf::{
    helpers::{bpf_get_current_task_btf, bpf_task_pt_regs, generated},
    macros::map,
    maps::PerCpuArray,
};
use tcptrace_common::{
    UserStackCopy, COPIES_LOST, COPIES_RING_BUSY, COPIES_SENT, COPIES_SHORT, COPY_COUNT_SLOTS,
    RECORD_USER_STACK, STACK_COPY_BYTES, STACK_COPY_PAGES,
};

use crate::config::config;
use crate::helpers::{bump, current_ids, read_kernel};
use crate::ring::EVENTS;

/// Where a copy is assembled: 16 KiB do not fit the 512-byte BPF stack.
#[map]
static STACK_COPY: PerCpuArray<UserStackCopy> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: see `tcptrace_common::COPIES_SENT` and the slots after it.
#[map]
static STACK_COPY_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COPY_COUNT_SLOTS, 0);

#[inline(always)]
fn count(slot: u32) {
    bump(&STACK_COPY_COUNTS, slot, 1);
}

/// Offsets in x86_64's `struct pt_regs` of the user registers a syscall
/// saved on entry.
const PT_REGS_BP: u64 = 32;
const PT_REGS_IP: u64 = 128;
const PT_REGS_SP: u64 = 152;

/// `bpf_ringbuf_query` flags.
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;

const PAGE: u64 = 4096;

/// Sends the current task's user registers and the top of its stack
/// (`KernelConfig::stack_copy_pages` pages at most) as the stack `what`
/// of socket `sk` at `ts_ns`, beside the frame-pointer walk
/// `fp_stack_id`. Nothing when copies are off, or while the ring is more
/// than half full: the state records come first (counted).
#[inline(always)]
pub fn copy_user_stack(what: u32, sk: u64, ts_ns: u64, fp_stack_id: i32) {
    let pages = config().stack_copy_pages;
    if pages == 0 {
        return;
    }
    if EVENTS.query(BPF_RB_AVAIL_DATA) > EVENTS.query(BPF_RB_RING_SIZE) / 2 {
        count(COPIES_RING_BUSY);
        return;
    }
    let Some(buf) = STACK_COPY.get_ptr_mut(0) else {
        return;
    };
    let Some((ip, sp, bp)) = user_regs() else {
        return;
    };
    let data = unsafe { addr_of_mut!((*buf).bytes) }.cast::<u8>();
    // The first piece runs from sp to its page's end, then whole pages:
    // each read is one page at most, so a page that is not resident ends
    // the copy there and keeps what came before.
    let first = PAGE - (sp & (PAGE - 1));
    let mut len: u64 = 0;
    if read_user(data, first, sp) {
        len = first;
        let mut i = 1;
        while i < STACK_COPY_PAGES {
            if i >= pages {
                break;
            }
            // `len` is `first + (i - 1) pages`: at most i pages, so the
            // page read here ends within the buffer.
            if len > (STACK_COPY_BYTES as u64) - PAGE {
                break;
            }
            if !read_user(unsafe { data.add(len as usize) }, PAGE, sp + len) {
                count(COPIES_SHORT);
                break;
            }
            len += PAGE;
            i += 1;
        }
    } else {
        count(COPIES_SHORT);
    }
    let (tgid, tid) = current_ids();
    unsafe {
        let h = addr_of_mut!((*buf).header);
        (*h).kind = RECORD_USER_STACK;
        (*h).what = what;
        (*h).tgid = tgid;
        (*h).tid = tid;
        (*h).skaddr = sk;
        (*h).ts_ns = ts_ns;
        (*h).ip = ip;
        (*h).sp = sp;
        (*h).bp = bp;
        (*h).fp_stack_id = fp_stack_id;
        (*h).len = len as u32;
    }
    let total = core::mem::size_of::<tcptrace_common::UserStackHeader>() as u64 + len;
    if total > core::mem::size_of::<UserStackCopy>() as u64 {
        return;
    }
    // SAFETY: `total` bytes of the per-CPU value, checked above.
    let record = unsafe { core::slice::from_raw_parts(buf.cast::<u8>(), total as usize) };
    if EVENTS.output::<[u8]>(record, 0).is_ok() {
        count(COPIES_SENT);
    } else {
        count(COPIES_LOST);
    }
}

/// Reads `size` (1 to a page) bytes of user memory at `src` into `dst`.
#[inline(always)]
fn read_user(dst: *mut u8, size: u64, src: u64) -> bool {
    if size == 0 || size > PAGE {
        return false;
    }
    // SAFETY: `dst` has `size` bytes of room (see the caller).
    unsafe {
        generated::bpf_probe_read_user(dst.cast(), size as u32, src as *const core::ffi::c_void)
            == 0
    }
}

/// The user `ip`, `sp` and `bp` the current task's system call saved.
#[inline(always)]
fn user_regs() -> Option<(u64, u64, u64)> {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
        Some((
            read_kernel::<u64>(regs + PT_REGS_IP)?,
            read_kernel::<u64>(regs + PT_REGS_SP)?,
            read_kernel::<u64>(regs + PT_REGS_BP)?,
        ))
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    {
        None
    }
}
