//! Unwinding user stacks from CFI: the kernel's copies of a stack's top
//! and registers ([`UserStackHeader`]) turned into return addresses with
//! the binaries' `.eh_frame` (or `.debug_frame`), by `framehop`.
//!
//! Why: the kernel's frame-pointer walk stops at the first function built
//! without frame pointers (most C, C++ and Rust release code: glibc's
//! `accept()` wrapper alone). The CFI that exceptions and debuggers use is
//! in every such binary.
//!
//! Host edge: reads `/proc/PID/maps` and the mapped files (through
//! `/proc/PID/map_files/`, which reaches a deleted or upgraded binary,
//! else through the process's own root). A module's unwind sections are
//! read once per build id (or file identity) and shared by every process
//! that maps it; each process has its own module list, read again when an
//! address falls outside it (a library loaded since).
//!
//! The stack bytes are the program's memory: they are unwound as they
//! arrive and dropped; only return addresses are kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};
use object::{Object, ObjectSection, ObjectSegment};
use tcptrace_common::UserStackHeader;

/// Frames kept of one stack, as the kernel's walk (`PERF_MAX_STACK_DEPTH`).
pub const MAX_FRAMES: usize = 127;

/// Stack ids at or above this name a stack unwound here ([`UnwoundStacks`]);
/// below it, one of the kernel's `STACKS` map.
pub const CFI_STACK: u32 = 1 << 31;

/// The return addresses of a stack, innermost first (the first is the
/// instruction pointer), as the kernel's walk gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwound {
    /// Addresses, innermost first.
    pub addrs: Vec<u64>,
    /// The unwinder reached the stack's end (the outermost frame has no
    /// caller), where it did not stop at a frame it could not unwind or
    /// at the end of the copy.
    pub complete: bool,
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Executable.
    pub exec: bool,
    /// Offset in the file.
    pub offset: u64,
    /// Device and inode of the file (0 for an anonymous mapping).
    pub dev_inode: (String, u64),
    /// Path, when the mapping has one (`[vdso]` and the like included).
    pub path: Option<String>,
}

/// Parses the text of `/proc/PID/maps`; lines that do not parse are skipped.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_map_line).collect()
}

fn parse_map_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().map(str::trim).filter(|p| !p.is_empty());
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        exec: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_inode: (dev.to_string(), inode.parse().ok()?),
        path: path.map(str::to_string),
    })
}

/// The unwind sections of one ELF file, shared by every process mapping it.
struct ModuleData {
    /// `(vaddr, file offset, file size)` of each `PT_LOAD` segment: where a
    /// mapping's file offset lies in the module's own addresses.
    segments: Vec<(u64, u64, u64)>,
    text_svma: Option<Range<u64>>,
    got_svma: Option<Range<u64>>,
    eh_frame: Option<(Range<u64>, Bytes)>,
    eh_frame_hdr: Option<(Range<u64>, Bytes)>,
    debug_frame: Option<Bytes>,
}

impl ModuleData {
    /// Reads the sections an unwinder needs (not the code, not the debug
    /// info: an unwind needs kilobytes of a file that may hold gigabytes).
    fn read(file: File) -> anyhow::Result<(Option<Vec<u8>>, Self)> {
        let cache = object::ReadCache::new(file);
        let elf = object::File::parse(&cache)?;
        let range = |s: &object::Section<'_, '_, _>| s.address()..s.address() + s.size();
        let section = |name: &str| {
            let s = elf.section_by_name(name)?;
            Some((range(&s), Bytes::copy_from_slice(s.data().ok()?)))
        };
        let eh_frame = section(".eh_frame");
        // `.debug_frame` only where `.eh_frame` is missing: it says the
        // same, and a stripped build keeps the latter.
        let debug_frame = if eh_frame.is_none() {
            section(".debug_frame").map(|(_, data)| data)
        } else {
            None
        };
        let data = Self {
            segments: elf
                .segments()
                .map(|s| {
                    let (offset, size) = s.file_range();
                    (s.address(), offset, size)
                })
                .collect(),
            text_svma: elf.section_by_name(".text").map(|s| range(&s)),
            got_svma: elf.section_by_name(".got").map(|s| range(&s)),
            eh_frame_hdr: section(".eh_frame_hdr"),
            eh_frame,
            debug_frame,
        };
        let build_id = elf.build_id().ok().flatten().map(<[u8]>::to_vec);
        Ok((build_id, data))
    }

    /// Whether it can unwind anything.
    fn has_cfi(&self) -> bool {
        self.eh_frame.is_some() || self.debug_frame.is_some()
    }

    /// Where the module's address 0 lies in a process that maps file
    /// offset `offset` at `start`.
    fn base_avma(&self, start: u64, offset: u64) -> Option<u64> {
        // A segment's mapping starts at its file offset rounded down to a
        // page, which may lie inside the segment before it (lld packs a
        // read-only segment and the code into one page of the file, at
        // addresses a page apart): the segment that starts there first.
        let &(vaddr, file_offset, _) = self
            .segments
            .iter()
            .find(|&&(_, off, _)| off & !PAGE_MASK == offset)
            .or_else(|| {
                self.segments.iter().find(|&&(_, off, size)| {
                    off <= offset && offset < off.saturating_add(size.max(1))
                })
            })?;
        let svma = vaddr.wrapping_add(offset).wrapping_sub(file_offset);
        start.checked_sub(svma)
    }

    /// A framehop module for a mapping of this file at `range`.
    fn module(&self, name: &str, range: Range<u64>, base_avma: u64) -> Module<Bytes> {
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text_svma.clone(),
            got_svma: self.got_svma.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|(r, _)| r.clone()),
            eh_frame: self.eh_frame.as_ref().map(|(_, d)| d.clone()),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
            debug_frame: self.debug_frame.clone(),
            ..Default::default()
        };
        Module::new(name.to_string(), range, base_avma, info)
    }
}

/// What names one file's contents: its build id, else its device, inode
/// and mapped path.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum ModuleKey {
    BuildId(Vec<u8>),
    File(String, u64, String),
}

/// A process's unwinder, with the modules of its maps.
struct ProcUnwinder {
    start_time: u64,
    /// A pidfd of the process the maps were read from, while the kernel
    /// lets the agent open one: while it has not exited, its pid is its
    /// own, and the unwinder still fits it. One `poll()` per copy instead
    /// of reading `/proc/PID/stat`, which was most of a copy's unwinding
    /// time at high stack rates.
    pidfd: Option<std::os::fd::OwnedFd>,
    unwinder: UnwinderX86_64<Bytes>,
    /// Executable file mappings added, by start address.
    ranges: Vec<Range<u64>>,
    /// When the maps were last read.
    read_at: Instant,
}

impl ProcUnwinder {
    fn covers(&self, addr: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&addr))
    }
}

/// Processes whose unwinders are kept at once.
const MAX_PROCESSES: usize = 256;
/// Distinct modules whose sections are kept at once.
const MAX_MODULES: usize = 1024;
/// Low bits of an address within its page.
const PAGE_MASK: u64 = 0xfff;

/// A process's maps are read again at most this often.
const MAPS_REREAD: Duration = Duration::from_millis(500);

/// What [`StackUnwinder`] has done since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindCounts {
    /// Stack copies unwound.
    pub unwound: u64,
    /// Of those, how many reached the stack's end.
    pub complete: u64,
    /// Copies that could not be unwound (the process exited, no maps).
    pub failed: u64,
    /// Nanoseconds spent unwinding (module loading included).
    pub ns: u64,
    /// Stack bytes received.
    pub bytes: u64,
}

/// Unwinds the kernel's stack copies; see the module's doc.
pub struct StackUnwinder {
    modules: HashMap<ModuleKey, Arc<ModuleData>>,
    procs: HashMap<u32, ProcUnwinder>,
    cache: CacheX86_64,
    /// Files that could not be parsed, by device and inode, not tried
    /// again.
    unreadable: HashSet<(String, u64)>,
    /// Counts since start.
    pub counts: UnwindCounts,
}

impl Default for StackUnwinder {
    fn default() -> Self {
        Self::new()
    }
}

impl StackUnwinder {
    /// An unwinder with nothing loaded.
    pub fn new() -> Self {
        Self {
            modules: HashMap::new(),
            procs: HashMap::new(),
            cache: CacheX86_64::new(),
            unreadable: HashSet::new(),
            counts: UnwindCounts::default(),
        }
    }

    /// Unwinds one copy: `header` and the `stack` bytes from its `sp` up.
    /// `None` when the process is gone (its maps cannot be read).
    pub fn unwind(&mut self, header: &UserStackHeader, stack: &[u8]) -> Option<Unwound> {
        let began = Instant::now();
        let result = self.unwind_inner(header, stack);
        self.counts.ns += began.elapsed().as_nanos() as u64;
        self.counts.bytes += stack.len() as u64;
        match &result {
            Some(u) => {
                self.counts.unwound += 1;
                self.counts.complete += u64::from(u.complete);
            }
            None => self.counts.failed += 1,
        }
        result
    }

    fn unwind_inner(&mut self, header: &UserStackHeader, stack: &[u8]) -> Option<Unwound> {
        let pid = header.tgid;
        self.refresh(pid, header.ip, false)?;
        let first = self.walk(pid, header, stack)?;
        // A frame in none of the modules read: a library loaded since the
        // maps were read? Read them again once and retry.
        let stray = first
            .addrs
            .last()
            .filter(|_| !first.complete)
            .is_some_and(|&a| self.procs.get(&pid).is_some_and(|p| !p.covers(a)));
        if stray && self.refresh(pid, 0, true).is_some() {
            return self.walk(pid, header, stack);
        }
        Some(first)
    }

    fn walk(&mut self, pid: u32, h: &UserStackHeader, stack: &[u8]) -> Option<Unwound> {
        let proc_ = self.procs.get(&pid)?;
        let sp = h.sp;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
            let word = stack.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
            Ok(u64::from_ne_bytes(word.try_into().map_err(|_| ())?))
        };
        let mut frames = proc_.unwinder.iter_frames(
            h.ip,
            UnwindRegsX86_64::new(h.ip, h.sp, h.bp),
            &mut self.cache,
            &mut read_stack,
        );
        let mut addrs = Vec::new();
        let mut complete = false;
        while addrs.len() < MAX_FRAMES {
            match frames.next() {
                Ok(Some(frame)) => addrs.push(frame.address()),
                Ok(None) => {
                    complete = true;
                    break;
                }
                Err(e) => {
                    log::debug!(
                        "unwinding pid {pid}: stopped after {} frames ({e}; {} bytes of stack \
                         from {sp:#x})",
                        addrs.len(),
                        stack.len()
                    );
                    break;
                }
            }
        }
        Some(Unwound { addrs, complete })
    }

    /// Makes sure `pid` has an unwinder, reading its maps when it has none,
    /// when it is another process by that pid, when `ip` lies outside its
    /// modules, or when `force`d (each at most every [`MAPS_REREAD`]).
    fn refresh(&mut self, pid: u32, ip: u64, force: bool) -> Option<()> {
        let wanted = |p: &ProcUnwinder| {
            (force || (ip != 0 && !p.covers(ip))) && p.read_at.elapsed() >= MAPS_REREAD
        };
        // The same process as when its maps were read, by its pidfd.
        let current = self
            .procs
            .get(&pid)
            .is_some_and(|p| p.pidfd.as_ref().is_some_and(is_running) && !wanted(p));
        if current {
            return Some(());
        }
        // Opened before the maps are read: if it is still running after,
        // the maps were its own.
        let pidfd = open_pidfd(pid);
        let start_time = crate::host::symbolize::start_time(pid)?;
        let stale = match self.procs.get(&pid) {
            None => true,
            Some(p) if p.start_time != start_time => true,
            Some(p) => wanted(p),
        };
        if !stale {
            if let Some(p) = self.procs.get_mut(&pid) {
                p.pidfd = p.pidfd.take().or(pidfd);
            }
            return Some(());
        }
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        if self.procs.len() >= MAX_PROCESSES && !self.procs.contains_key(&pid) {
            self.procs
                .retain(|&p, u| crate::host::symbolize::start_time(p) == Some(u.start_time));
            if self.procs.len() >= MAX_PROCESSES {
                self.procs.clear();
            }
        }
        let mut unwinder = UnwinderX86_64::new();
        let mut ranges = Vec::new();
        for m in parse_maps(&maps).iter().filter(|m| m.exec) {
            let Some(path) = m.path.as_deref().filter(|p| p.starts_with('/')) else {
                continue;
            };
            let Some(data) = self.module_data(pid, m, path) else {
                continue;
            };
            let Some(base) = data.base_avma(m.start, m.offset) else {
                continue;
            };
            unwinder.add_module(data.module(path, m.start..m.end, base));
            ranges.push(m.start..m.end);
        }
        self.procs.insert(
            pid,
            ProcUnwinder {
                start_time,
                pidfd,
                unwinder,
                ranges,
                read_at: Instant::now(),
            },
        );
        Some(())
    }

    /// The sections of the file `m` maps, read once per build id.
    fn module_data(&mut self, pid: u32, m: &Mapping, path: &str) -> Option<Arc<ModuleData>> {
        let file_key = (m.dev_inode.0.clone(), m.dev_inode.1);
        if self.unreadable.contains(&file_key) {
            return None;
        }
        let by_file = ModuleKey::File(file_key.0.clone(), file_key.1, path.to_string());
        if let Some(data) = self.modules.get(&by_file) {
            return Some(data.clone());
        }
        // Not remembered as unreadable: the process may have exited
        // between its maps and its files (a client that connects and
        // quits), and the next process mapping the file is another chance.
        let Some(file) = open_mapped(pid, m, path) else {
            log::debug!("unwinding: cannot open {path} of pid {pid}");
            return None;
        };
        let (build_id, data) = match ModuleData::read(file) {
            Ok(read) => read,
            Err(e) => {
                log::debug!("unwinding: cannot read {path} of pid {pid}: {e}");
                self.unreadable.insert(file_key);
                return None;
            }
        };
        log::debug!(
            "unwinding: {path} of pid {pid}: eh_frame {}, eh_frame_hdr {}, debug_frame {}",
            data.eh_frame.is_some(),
            data.eh_frame_hdr.is_some(),
            data.debug_frame.is_some()
        );
        if self.modules.len() >= MAX_MODULES {
            self.modules.clear();
        }
        // Two processes may map one library through different paths or
        // mount namespaces: the build id makes them one entry.
        let data = match build_id.map(ModuleKey::BuildId) {
            Some(key) => self
                .modules
                .entry(key)
                .or_insert_with(|| Arc::new(data))
                .clone(),
            None => Arc::new(data),
        };
        self.modules.insert(by_file, data.clone());
        Some(data).filter(|d| d.has_cfi())
    }
}

/// A pidfd of process `pid`, `None` where the kernel has no
/// `pidfd_open` (Linux < 5.3) or the process is gone.
fn open_pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Whether the process of `pidfd` has not exited: a pidfd polls readable
/// once its process exits.
fn is_running(pidfd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

/// Opens the file behind mapping `m` of `pid`: through `map_files` (the
/// very file mapped, even deleted or replaced since), else by its path in
/// the process's own root.
fn open_mapped(pid: u32, m: &Mapping, path: &str) -> Option<File> {
    File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
        .or_else(|_| File::open(format!("/proc/{pid}/root{path}")))
        .ok()
}

/// Which of two walks of one stack to show: the CFI unwind `cfi` where it
/// reached the stack's end (`complete`), or saw at least as many frames as
/// the frame-pointer walk; the frame-pointer walk otherwise (a JIT's
/// frames, which have no CFI, or a copy cut short where frame pointers
/// went on). `fp` reads the frame-pointer walk, only when it is needed.
pub fn prefer_cfi(cfi: &[u64], complete: bool, fp: impl FnOnce() -> Option<Vec<u64>>) -> bool {
    complete || fp().is_none_or(|fp| cfi.len() >= fp.len())
}

/// Stacks unwound from copies, until their connection's leak asks for
/// them: each copy's stack by the (process, clock read) it was taken at,
/// the stacks themselves interned (a leaking call site is one stack
/// however often it leaks) and counted, both bounded.
///
/// A capture is kept while its connection may still leak: an origin's
/// (at `connect()`/`accept()`) until [`UnwoundStacks::sweep`] finds its
/// connection gone from the kernel's origin table, a last use's until the
/// same socket's next checkout replaces it. A stack goes with its last
/// capture, so the distinct stacks are those of live connections, not of
/// every connection the host ever made. Past `max_captures`, the oldest
/// goes first (counted).
pub struct UnwoundStacks {
    captures: HashMap<(u32, u64), Capture>,
    /// Captures in the order they came, for eviction; keys of captures
    /// removed since are skipped (and compacted away now and then).
    order: VecDeque<(u32, u64)>,
    /// The last-use capture of each socket, by its kernel address.
    last_use_of: HashMap<u64, (u32, u64)>,
    max_captures: usize,
    interned: HashMap<Arc<[u64]>, u32>,
    stacks: HashMap<u32, KeptStack>,
    next_id: u32,
    max_stacks: usize,
    /// Sweeps so far: a capture is only swept once a sweep has passed
    /// since it came (its origin slot may be written a moment after).
    sweeps: u64,
    /// Captures forgotten to make room (their leaks show the frame-pointer
    /// walk).
    pub evicted: u64,
    /// Captures forgotten because their connection closed.
    pub closed: u64,
    /// Stacks not kept: `max_stacks` distinct ones are.
    pub full: u64,
}

/// One kept capture.
#[derive(Clone, Copy, Debug)]
struct Capture {
    id: u32,
    /// An origin's (swept by liveness), else a last use's.
    origin: bool,
    /// The sweep count when it came.
    sweep: u64,
}

/// One interned stack and the captures that hold it.
#[derive(Debug)]
struct KeptStack {
    addrs: Arc<[u64]>,
    complete: bool,
    refs: u32,
}

/// What a copy was taken for (from its header's `what`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureOf {
    /// An origin at `connect()`/`accept()`.
    Origin,
    /// A last-use checkout of the socket at this kernel address.
    LastUse(u64),
}

impl UnwoundStacks {
    /// Room for `max_captures` captures of `max_stacks` distinct stacks.
    pub fn new(max_captures: usize, max_stacks: usize) -> Self {
        Self {
            captures: HashMap::new(),
            order: VecDeque::new(),
            last_use_of: HashMap::new(),
            max_captures: max_captures.max(1),
            interned: HashMap::new(),
            stacks: HashMap::new(),
            next_id: 0,
            max_stacks: max_stacks.clamp(1, (CFI_STACK - 1) as usize),
            sweeps: 0,
            evicted: 0,
            closed: 0,
            full: 0,
        }
    }

    /// Keeps the stack `u` of the capture `of` by process `pid` at `ts_ns`.
    pub fn insert(&mut self, pid: u32, ts_ns: u64, of: CaptureOf, u: Unwound) {
        let key = (pid, ts_ns);
        let Some(id) = self.intern(u) else {
            self.full += 1;
            return;
        };
        let capture = Capture {
            id,
            origin: of == CaptureOf::Origin,
            sweep: self.sweeps,
        };
        if let Some(old) = self.captures.insert(key, capture) {
            self.release(old.id);
        } else {
            self.order.push_back(key);
        }
        if let CaptureOf::LastUse(sk) = of {
            // The socket's previous checkout is no longer its last use.
            if let Some(prev) = self.last_use_of.insert(sk, key).filter(|&p| p != key) {
                self.remove(prev);
            }
        }
        while self.captures.len() > self.max_captures {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.remove(old) {
                self.evicted += 1;
            }
        }
        // Keys of captures removed otherwise stay in `order` until here.
        if self.order.len() > 2 * self.captures.len() + 1024 {
            let captures = &self.captures;
            self.order.retain(|k| captures.contains_key(k));
        }
    }

    /// The id of `u`'s stack, interned (one more reference), or `None`
    /// when `max_stacks` others are kept.
    fn intern(&mut self, u: Unwound) -> Option<u32> {
        let addrs: Arc<[u64]> = u.addrs.into();
        if let Some(&id) = self.interned.get(&addrs) {
            if let Some(kept) = self.stacks.get_mut(&id) {
                kept.refs += 1;
            }
            return Some(id);
        }
        if self.stacks.len() >= self.max_stacks {
            return None;
        }
        // Ids are not reused while the agent runs (a leak line may name
        // one), unless 2^31 stacks came and went.
        let mut id = CFI_STACK | self.next_id;
        while self.stacks.contains_key(&id) {
            self.next_id = (self.next_id + 1) & (CFI_STACK - 1);
            id = CFI_STACK | self.next_id;
        }
        self.next_id = (self.next_id + 1) & (CFI_STACK - 1);
        self.stacks.insert(
            id,
            KeptStack {
                addrs: addrs.clone(),
                complete: u.complete,
                refs: 1,
            },
        );
        self.interned.insert(addrs, id);
        Some(id)
    }

    /// Drops one reference to stack `id`, and the stack with its last.
    fn release(&mut self, id: u32) {
        let Some(kept) = self.stacks.get_mut(&id) else {
            return;
        };
        kept.refs -= 1;
        if kept.refs == 0 {
            if let Some(kept) = self.stacks.remove(&id) {
                self.interned.remove(&kept.addrs);
            }
        }
    }

    /// Forgets capture `key`; whether it was kept.
    fn remove(&mut self, key: (u32, u64)) -> bool {
        match self.captures.remove(&key) {
            Some(c) => {
                self.release(c.id);
                true
            }
            None => false,
        }
    }

    /// Forgets the origin captures whose connection is gone: not among
    /// `live`, the (process, clock read) of every origin the kernel's table
    /// holds now. A capture that came since the previous sweep is spared
    /// this once. Last-use captures are left alone.
    pub fn sweep(&mut self, live: &HashSet<(u32, u64)>) {
        let sweeps = self.sweeps;
        let gone: Vec<(u32, u64)> = self
            .captures
            .iter()
            .filter(|(key, c)| c.origin && c.sweep < sweeps && !live.contains(key))
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            if self.remove(key) {
                self.closed += 1;
            }
        }
        let captures = &self.captures;
        self.last_use_of.retain(|_, key| captures.contains_key(key));
        self.sweeps += 1;
    }

    /// The stack id of the capture by `pid` at `ts_ns`, if kept.
    pub fn capture(&self, pid: u32, ts_ns: u64) -> Option<u32> {
        self.captures.get(&(pid, ts_ns)).map(|c| c.id)
    }

    /// The addresses of stack `id` (one [`CFI_STACK`] gave), and whether
    /// the unwind reached the stack's end.
    pub fn stack(&self, id: u32) -> Option<(&[u64], bool)> {
        self.stacks.get(&id).map(|k| (&k.addrs[..], k.complete))
    }

    /// Stack id to show for a walk `fp_id` taken by `pid` at `ts_ns`: the
    /// CFI unwind of the same moment where [`prefer_cfi`] says so.
    /// `fp_of` reads a frame-pointer stack.
    pub fn choose(
        &self,
        pid: u32,
        ts_ns: u64,
        fp_id: Option<u32>,
        fp_of: impl Fn(u32) -> Option<Vec<u64>>,
    ) -> Option<u32> {
        let Some(cfi_id) = self.capture(pid, ts_ns) else {
            return fp_id;
        };
        let Some((addrs, complete)) = self.stack(cfi_id) else {
            return fp_id;
        };
        if prefer_cfi(addrs, complete, || fp_id.and_then(fp_of)) {
            Some(cfi_id)
        } else {
            fp_id
        }
    }

    /// Captures kept now.
    pub fn len(&self) -> usize {
        self.captures.len()
    }

    /// No capture kept.
    pub fn is_empty(&self) -> bool {
        self.captures.is_empty()
    }

    /// Distinct stacks kept now.
    pub fn stacks_kept(&self) -> usize {
        self.stacks.len()
    }
}

/// The agent's side of CFI unwinding: unwinds each copy as it comes out
/// of the ring and keeps its stack until a leak asks for it.
pub struct CfiStacks {
    /// The unwinder, with its module cache.
    pub unwinder: StackUnwinder,
    /// Stacks kept.
    pub unwound: UnwoundStacks,
    /// Copies whose record did not parse.
    pub malformed: u64,
}

impl CfiStacks {
    /// Room for `max_captures` captures of `max_stacks` distinct stacks.
    pub fn new(max_captures: usize, max_stacks: usize) -> Self {
        Self {
            unwinder: StackUnwinder::new(),
            unwound: UnwoundStacks::new(max_captures, max_stacks),
            malformed: 0,
        }
    }

    /// Takes `raw` when it is a stack copy (true): unwinds it at once and
    /// keeps the return addresses, none of the bytes. Other records are
    /// left for the pipeline (false).
    pub fn take(&mut self, raw: &[u8]) -> bool {
        if raw.get(..4) != Some(&tcptrace_common::RECORD_USER_STACK.to_ne_bytes()[..]) {
            return false;
        }
        let Some((header, stack)) = split_record(raw) else {
            self.malformed += 1;
            if self.malformed == 1 {
                log::warn!("dropping a malformed stack copy of {} bytes", raw.len());
            }
            return true;
        };
        if let Some(u) = self.unwinder.unwind(&header, stack) {
            let of = if header.what == tcptrace_common::STACK_OF_LAST_USE {
                CaptureOf::LastUse(header.skaddr)
            } else {
                CaptureOf::Origin
            };
            self.unwound.insert(header.tgid, header.ts_ns, of, u);
        }
        true
    }
}

/// What the agent's unwinding did since start, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// The unwinder's counts.
    pub counts: UnwindCounts,
    /// Captures kept now.
    pub captures: u64,
    /// Distinct stacks kept now.
    pub stacks: u64,
    /// Captures forgotten to make room.
    pub evicted: u64,
    /// Captures forgotten because their connection closed.
    pub closed: u64,
    /// Stacks not kept: the table of distinct stacks was full.
    pub full: u64,
    /// Copies whose record did not parse.
    pub malformed: u64,
}

impl CfiStacks {
    /// The counts, as metrics show them.
    pub fn stats(&self) -> UnwindStats {
        UnwindStats {
            counts: self.unwinder.counts,
            captures: self.unwound.len() as u64,
            stacks: self.unwound.stacks_kept() as u64,
            evicted: self.unwound.evicted,
            closed: self.unwound.closed,
            full: self.unwound.full,
            malformed: self.malformed,
        }
    }
}

/// How a stack id was walked: `cfi` or `fp`.
pub fn method(stack_id: Option<u32>) -> &'static str {
    match stack_id {
        Some(id) if id >= CFI_STACK => "cfi",
        _ => "fp",
    }
}

/// Splits a [`tcptrace_common::RECORD_USER_STACK`] record into its header
/// and its stack bytes; `None` when it is shorter than its header says.
pub fn split_record(raw: &[u8]) -> Option<(UserStackHeader, &[u8])> {
    let size = std::mem::size_of::<UserStackHeader>();
    let head = raw.get(..size)?;
    // SAFETY: `head` holds `size` bytes; the header is plain integers, any
    // bit pattern valid; read unaligned (the ring's records are 8-aligned,
    // a test's slice may not be).
    let header = unsafe { head.as_ptr().cast::<UserStackHeader>().read_unaligned() };
    let stack = raw.get(size..size + header.len as usize)?;
    Some((header, stack))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let text = "\
55d0c4a00000-55d0c4a01000 r--p 00000000 08:01 1311 /usr/bin/leaky server
55d0c4a01000-55d0c4a02000 r-xp 00001000 08:01 1311 /usr/bin/leaky server
7ffd1c9e0000-7ffd1ca01000 rw-p 00000000 00:00 0                          [stack]
7f1e2c000000-7f1e2c021000 rw-p 00000000 00:00 0 
garbage
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 4);
        assert_eq!(
            maps[1],
            Mapping {
                start: 0x55d0_c4a0_1000,
                end: 0x55d0_c4a0_2000,
                exec: true,
                offset: 0x1000,
                dev_inode: ("08:01".into(), 1311),
                path: Some("/usr/bin/leaky server".into()),
            }
        );
        assert!(!maps[0].exec);
        assert_eq!(maps[2].path.as_deref(), Some("[stack]"));
        assert_eq!(maps[3].path, None);
    }

    #[test]
    fn the_base_address_follows_the_segment_that_holds_the_offset() {
        let with = |segments| ModuleData {
            segments,
            text_svma: None,
            got_svma: None,
            eh_frame: None,
            eh_frame_hdr: None,
            debug_frame: None,
        };
        // A PIE: headers at 0, code at vaddr 0x1000 from offset 0x1000.
        let pie = with(vec![(0, 0, 0x800), (0x1000, 0x1000, 0x5000)]);
        assert_eq!(
            pie.base_avma(0x5555_0000_1000, 0x1000),
            Some(0x5555_0000_0000)
        );
        assert_eq!(
            pie.base_avma(0x5555_0000_3000, 0x3000),
            Some(0x5555_0000_0000)
        );
        assert_eq!(pie.base_avma(0x1000, 0x9_0000), None);
        // A non-PIE whose code segment does not start on a page of its file.
        let fixed = with(vec![(0x40_0000, 0, 0x800), (0x40_1120, 0x1120, 0x100)]);
        assert_eq!(fixed.base_avma(0x40_1000, 0x1000), Some(0));
        // rustc's (lld's) PIE layout: the code segment shares its first
        // page of the file with the read-only one, a page higher in memory.
        let rust = with(vec![(0, 0, 0x145d0), (0x155d0, 0x145d0, 0x417a0)]);
        assert_eq!(
            rust.base_avma(0x5555_0001_5000, 0x14000),
            Some(0x5555_0000_0000)
        );
    }

    fn unwound(addrs: &[u64], complete: bool) -> Unwound {
        Unwound {
            addrs: addrs.to_vec(),
            complete,
        }
    }

    #[test]
    fn cfi_wins_when_whole_or_at_least_as_deep() {
        let fp = [1, 2];
        let fp_walk = || Some(fp.to_vec());
        assert!(prefer_cfi(&[1], true, fp_walk));
        assert!(prefer_cfi(&[1, 3], false, fp_walk));
        assert!(!prefer_cfi(&[1], false, fp_walk));
        assert!(prefer_cfi(&[1], false, || None));
        // A whole unwind needs no frame-pointer walk read.
        assert!(prefer_cfi(&[1], true, || panic!(
            "read the frame-pointer walk"
        )));
    }

    #[test]
    fn captures_are_interned_bounded_and_evicted_oldest_first() {
        let mut t = UnwoundStacks::new(2, 2);
        t.insert(7, 100, CaptureOf::Origin, unwound(&[1, 2, 3], true));
        t.insert(7, 200, CaptureOf::Origin, unwound(&[1, 2, 3], true));
        let id = t.capture(7, 100).expect("kept");
        assert!(id >= CFI_STACK);
        assert_eq!(t.capture(7, 200), Some(id), "one call site, one stack");
        assert_eq!(t.stack(id), Some((&[1, 2, 3][..], true)));
        t.insert(8, 300, CaptureOf::Origin, unwound(&[9], false));
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted, 1);
        assert_eq!(t.capture(7, 100), None, "the oldest capture went first");
        t.insert(8, 400, CaptureOf::Origin, unwound(&[4, 5], false));
        assert_eq!(t.full, 1, "a third distinct stack finds no room");
        assert_eq!(t.capture(8, 400), None);
        assert_eq!(t.stack(5), None);
        assert_eq!(method(Some(id)), "cfi");
        assert_eq!(method(Some(5)), "fp");
        assert_eq!(method(None), "fp");
    }

    #[test]
    fn a_sweep_forgets_the_origins_of_closed_connections_and_their_stacks() {
        let mut t = UnwoundStacks::new(16, 16);
        t.insert(7, 100, CaptureOf::Origin, unwound(&[1, 2], true));
        t.insert(7, 200, CaptureOf::Origin, unwound(&[3, 4], true));
        let closed_id = t.capture(7, 200).expect("kept");
        // Came before any sweep: spared by the first, whatever it says.
        t.sweep(&HashSet::new());
        assert_eq!(t.len(), 2);
        // (7, 100) lives on; (7, 200) closed, and its stack goes with it.
        t.sweep(&HashSet::from([(7, 100)]));
        assert_eq!(t.len(), 1);
        assert_eq!(t.closed, 1);
        assert!(t.capture(7, 100).is_some());
        assert_eq!(t.capture(7, 200), None);
        assert_eq!(t.stack(closed_id), None);
        assert_eq!(t.stacks_kept(), 1);
        // The same stack again gets an id of its own: a leak line that
        // named the old one is not confused with it.
        t.insert(9, 300, CaptureOf::Origin, unwound(&[3, 4], true));
        let again = t.capture(9, 300).expect("kept");
        assert_ne!(again, closed_id);
        assert_eq!(t.stack(again), Some((&[3, 4][..], true)));
    }

    #[test]
    fn a_sockets_next_checkout_replaces_its_last_use() {
        let mut t = UnwoundStacks::new(16, 16);
        let sk = 0xffff_8881_0000_1000;
        t.insert(5, 10, CaptureOf::LastUse(sk), unwound(&[1], true));
        t.insert(5, 20, CaptureOf::LastUse(sk), unwound(&[2], true));
        t.insert(5, 30, CaptureOf::LastUse(sk + 64), unwound(&[1], true));
        assert_eq!(t.capture(5, 10), None, "superseded by the checkout at 20");
        assert!(t.capture(5, 20).is_some());
        assert!(t.capture(5, 30).is_some());
        assert_eq!(t.len(), 2);
        assert_eq!(t.stacks_kept(), 2);
        // Sweeps leave last uses alone: their sockets may have no origin.
        t.sweep(&HashSet::new());
        t.sweep(&HashSet::new());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn eviction_keeps_its_queue_bounded_when_sweeps_remove_most() {
        let mut t = UnwoundStacks::new(4, 16);
        for round in 0..100u64 {
            for i in 0..50u64 {
                t.insert(
                    1,
                    round * 100 + i,
                    CaptureOf::Origin,
                    unwound(&[i % 3], true),
                );
            }
            t.sweep(&HashSet::new());
        }
        assert!(t.len() <= 4);
        assert!(t.order.len() <= 2 * t.len() + 1024 + 1);
        assert!(t.stacks_kept() <= 3);
    }

    #[test]
    fn the_choice_keeps_the_frame_pointer_walk_where_it_saw_more() {
        let mut t = UnwoundStacks::new(8, 8);
        t.insert(1, 10, CaptureOf::Origin, unwound(&[1], false));
        t.insert(1, 20, CaptureOf::Origin, unwound(&[1, 2, 3], true));
        let fp = |_: u32| Some(vec![1, 5]);
        assert_eq!(t.choose(1, 10, Some(4), fp), Some(4));
        assert_eq!(t.choose(1, 20, Some(4), fp), t.capture(1, 20));
        assert_eq!(t.choose(1, 30, Some(4), fp), Some(4), "no capture");
        assert_eq!(t.choose(1, 20, None, fp), t.capture(1, 20));
    }

    #[test]
    fn a_record_shorter_than_its_header_says_is_refused() {
        let header = UserStackHeader {
            kind: tcptrace_common::RECORD_USER_STACK,
            len: 16,
            sp: 0x1000,
            ..Default::default()
        };
        let mut raw = Vec::new();
        // SAFETY: plain integers.
        raw.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (&header as *const UserStackHeader).cast::<u8>(),
                std::mem::size_of::<UserStackHeader>(),
            )
        });
        raw.extend_from_slice(&[7; 16]);
        let (h, stack) = split_record(&raw).expect("whole");
        assert_eq!((h.sp, stack.len()), (0x1000, 16));
        assert!(split_record(&raw[..raw.len() - 1]).is_none());
        assert!(split_record(&raw[..10]).is_none());
    }

    /// A function of this test binary, built with frame pointers or not:
    /// unwinding a copy of this thread's own stack from inside it must
    /// reach the test harness's frames.
    #[inline(never)]
    fn own_stack() -> (UserStackHeader, Vec<u8>) {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers, as a system call's entry saves them.
        unsafe {
            std::arch::asm!(
                "lea {}, [rip]",
                "mov {}, rsp",
                "mov {}, rbp",
                out(reg) ip,
                out(reg) sp,
                out(reg) bp,
            );
        }
        // As the kernel copies it: 16 KiB at most, within the mapping.
        let maps = std::fs::read_to_string("/proc/self/maps").expect("own maps");
        let end = parse_maps(&maps)
            .into_iter()
            .find(|m| (m.start..m.end).contains(&sp))
            .expect("the stack's mapping")
            .end;
        let len = (end - sp).min(tcptrace_common::STACK_COPY_BYTES as u64) as usize;
        // SAFETY: `len` bytes from sp lie in the stack's mapping.
        let bytes = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
        let header = UserStackHeader {
            kind: tcptrace_common::RECORD_USER_STACK,
            tgid: std::process::id(),
            ip,
            sp,
            bp,
            len: len as u32,
            ..Default::default()
        };
        (header, bytes)
    }

    #[test]
    fn unwinds_a_copy_of_its_own_stack() {
        let (header, bytes) = own_stack();
        let mut unwinder = StackUnwinder::new();
        let u = unwinder.unwind(&header, &bytes).expect("own process");
        assert!(u.addrs.len() >= 3, "{u:?}");
        assert_eq!(unwinder.counts.unwound, 1);
        assert_eq!(unwinder.counts.bytes, bytes.len() as u64);
        // The second copy of a running process reuses its unwinder.
        let again = unwinder.unwind(&header, &bytes).expect("own process");
        assert_eq!(again, u);
        assert!(unwinder.procs[&std::process::id()].pidfd.is_some());
    }

    #[test]
    fn a_pidfd_tells_a_running_process_from_an_exited_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let pidfd = open_pidfd(child.id()).expect("a pidfd of the child");
        assert!(is_running(&pidfd));
        child.kill().expect("kill the child");
        child.wait().expect("reap the child");
        // Exited (and reaped, its pid free for another): no longer running.
        assert!(!is_running(&pidfd));
        assert!(open_pidfd(u32::MAX).is_none());
    }
}
