//! User-space stack addresses of a live process to functions and source
//! lines, with blazesym (ELF symbols, DWARF lines, demangled names).
//!
//! The addresses come from `bpf_get_stackid(.., BPF_F_USER_STACK)`: absolute
//! virtual addresses in the traced process. Turning them into names needs
//! that process's memory map (/proc/PID/maps), so the process must still be
//! alive: leaks are symbolized when found, while their holder still runs. A
//! process that exited gives raw addresses, never an error, because a leak
//! report without names is still worth printing.

use std::collections::HashMap;

use crate::engine::frame::Frame;
use blazesym::symbolize::source::{Process, Source};
use blazesym::symbolize::{CodeInfo, Input, Reason, Sym, Symbolized, Symbolizer as Blaze};
use blazesym::Pid;

/// Builds a frame from blazesym's symbol for `addr`.
fn frame_from_sym(addr: u64, sym: &Sym<'_>) -> Frame {
    // With inlining, `sym` names the outer (real, callable) function and
    // its `code_info` is the call site of the first inlined function;
    // each inlined function's `code_info` is where it is at `addr` (the
    // call site of the next, or `addr` itself for the innermost). The
    // outer frame keeps its own line (main.update at main.go:54, not
    // the line of database/sql's Begin that Go inlined into it); the
    // inlined calls become frames of their own ([`expand_inlined`]),
    // as `addr2line -i` shows them.
    let place = |code: Option<&CodeInfo<'_>>| {
        (
            code.map(|c| c.to_path().to_string_lossy().into_owned()),
            code.and_then(|c| c.line),
        )
    };
    let module = sym
        .module
        .as_ref()
        .map(|m| m.to_string_lossy().into_owned());
    if module.is_none() && sym.code_info.is_none() {
        // No file maps the code: blazesym named it from the process's
        // perf map, in the runtime's own format.
        let name = crate::engine::jit::parse(&sym.name);
        return Frame {
            addr,
            function: Some(name.function),
            offset: Some(sym.offset as u64),
            file: name.file,
            line: name.line,
            module: None,
            jit: true,
            inlined: Vec::new(),
        };
    }
    let (file, line) = place(sym.code_info.as_deref());
    let inlined = sym
        .inlined
        .iter()
        .rev()
        .map(|f| {
            let (file, line) = place(f.code_info.as_ref());
            Frame {
                addr,
                function: Some(f.name.to_string()),
                offset: None,
                file,
                line,
                module: module.clone(),
                jit: false,
                inlined: Vec::new(),
            }
        })
        .collect();
    Frame {
        addr,
        function: Some(sym.name.to_string()),
        offset: Some(sym.offset as u64),
        file,
        line,
        module,
        jit: false,
        inlined,
    }
}

/// Most processes whose frames are kept; the least recently used goes first.
const MAX_PROCESSES: usize = 64;
/// Most addresses kept per process, so one process with endless distinct
/// stacks cannot grow the cache without bound.
const MAX_ADDRS_PER_PROCESS: usize = 4096;

/// Cached frames of one process incarnation.
#[derive(Default)]
struct ProcCache {
    /// Value of `Symbolizer::tick` when last used, for LRU eviction.
    last_used: u64,
    frames: HashMap<u64, Frame>,
}

/// Symbolizes stacks of live processes, caching per (pid, process start
/// time) so a reused pid is not confused.
///
/// One blazesym symbolizer is kept for the agent's life: it caches parsed
/// ELF and DWARF per file, which is the expensive part and is shared by all
/// processes running the same binaries. On top of that, frames are cached
/// per process and address, so repeated leak reports of the same stack cost
/// one read of /proc/PID/stat.
///
/// Not `Send`: blazesym's caches hold `Rc`s. Keep it on one thread (the
/// task that reports leaks, not a `tokio::spawn`ed one, or a thread of its
/// own fed through a channel).
pub struct Symbolizer {
    blaze: Blaze,
    /// Keyed by (pid, start time in clock ticks since boot).
    cache: HashMap<(u32, u64), ProcCache>,
    /// Monotonic use counter for LRU.
    tick: u64,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Field 22 of /proc/PID/stat: the process start time, in clock ticks since
/// boot. Together with the pid it names one process incarnation.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// The start time (field 22) from the text of `/proc/PID/stat`; public for
/// the fuzz target of the /proc parsers.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: skip past
    // its last closing parenthesis; field 3 is then the first, so field 22
    // is the 20th.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a result may be cached. `IgnoredError` stands for a failure that
/// may pass (a file being replaced, the process exiting mid-read), so such
/// addresses are tried again next time; the other reasons describe the
/// address itself and stay true for the process's life.
fn cacheable(result: &Symbolized<'_>) -> bool {
    !matches!(result, Symbolized::Unknown(Reason::IgnoredError))
}

/// Whether `result` is of code no file maps: a name from a perf map, or
/// an address a perf map does not (yet) name. A runtime writes its perf
/// map as it compiles and reuses the addresses of code it frees, so such
/// names are looked up again each time rather than cached.
fn jit_address(result: &Symbolized<'_>) -> bool {
    match result {
        Symbolized::Sym(sym) => sym.module.is_none() && sym.code_info.is_none(),
        Symbolized::Unknown(reason) => {
            matches!(reason, Reason::MissingComponent | Reason::UnknownAddr)
        }
    }
}

impl Symbolizer {
    /// A symbolizer with empty caches.
    pub fn new() -> Self {
        Self {
            blaze: Blaze::new(),
            cache: HashMap::new(),
            tick: 0,
        }
    }

    /// Frames for `addrs` of process `pid`, one per address, in order.
    /// Never fails: a process that exited (or unreadable maps) gives frames
    /// with only `addr` set.
    ///
    /// Addresses are looked up as given. Frames above the innermost are
    /// return addresses (the instruction after a call), so their line may be
    /// the one after the call; a caller wanting the call's line can pass
    /// `addr - 1`.
    pub fn symbolize(&mut self, pid: u32, addrs: &[u64]) -> Vec<Frame> {
        let raw = || addrs.iter().map(|&a| Frame::raw(a)).collect();
        let Some(start) = start_time(pid) else {
            return raw();
        };
        let key = (pid, start);
        self.tick += 1;
        let tick = self.tick;

        let mut missing: Vec<u64> = match self.cache.get(&key) {
            Some(pc) => addrs
                .iter()
                .copied()
                .filter(|a| !pc.frames.contains_key(a))
                .collect(),
            None => addrs.to_vec(),
        };
        missing.sort_unstable();
        missing.dedup();

        let mut fresh: HashMap<u64, Frame> = HashMap::new();
        if !missing.is_empty() {
            let results = self.lookup(pid, &missing);
            // The pid may have been reused while blazesym read the maps:
            // then the names belong to another program, and neither
            // returning nor caching them would be right.
            if start_time(pid) != Some(start) {
                return raw();
            }
            let Some(results) = results else {
                return raw();
            };
            let pc = self.entry(key);
            for (&addr, result) in missing.iter().zip(&results) {
                let frame = match result {
                    Symbolized::Sym(sym) => frame_from_sym(addr, sym),
                    Symbolized::Unknown(_) => Frame::raw(addr),
                };
                if cacheable(result) && !jit_address(result) {
                    if pc.frames.len() >= MAX_ADDRS_PER_PROCESS {
                        // Crude but bounded; refilling costs one lookup.
                        pc.frames.clear();
                    }
                    pc.frames.insert(addr, frame.clone());
                }
                fresh.insert(addr, frame);
            }
        }

        let pc = self.entry(key);
        pc.last_used = tick;
        addrs
            .iter()
            .map(|a| {
                fresh
                    .get(a)
                    .or_else(|| pc.frames.get(a))
                    .cloned()
                    .unwrap_or_else(|| Frame::raw(*a))
            })
            .collect()
    }

    /// The cache of one process, made (evicting the least recently used
    /// process if full) when absent.
    fn entry(&mut self, key: (u32, u64)) -> &mut ProcCache {
        if !self.cache.contains_key(&key) && self.cache.len() >= MAX_PROCESSES {
            let oldest = self
                .cache
                .iter()
                .min_by_key(|(_, pc)| pc.last_used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.cache.remove(&oldest);
            }
        }
        self.cache.entry(key).or_default()
    }

    /// blazesym's results for `addrs`, one per address, owned so the
    /// borrow of `self.blaze` ends here; `None` when the maps could not be
    /// read at all (the process is gone).
    fn lookup(&self, pid: u32, addrs: &[u64]) -> Option<Vec<Symbolized<'static>>> {
        let symbolize = |map_files: bool| -> Option<Vec<Symbolized<'static>>> {
            let mut process = Process::new(Pid::from(pid));
            process.map_files = map_files;
            let src = Source::Process(process);
            let results = self.blaze.symbolize(&src, Input::AbsAddr(addrs)).ok()?;
            Some(
                results
                    .into_iter()
                    .map(|r| match r {
                        Symbolized::Sym(sym) => Symbolized::Sym(sym.into_owned()),
                        Symbolized::Unknown(reason) => Symbolized::Unknown(reason),
                    })
                    .collect(),
            )
        };
        // /proc/PID/map_files/ finds binaries in other mount namespaces
        // (containers) and deleted ones, but opening it may need
        // CAP_SYS_ADMIN; without it every address fails, so try the paths
        // named in /proc/PID/maps instead.
        match symbolize(true) {
            Some(r) if r.iter().any(cacheable) => Some(r),
            _ => symbolize(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address inside a function of this test binary.
    #[inline(never)]
    fn marker_fn() -> u64 {
        std::hint::black_box(marker_fn as *const () as usize as u64 + 1)
    }

    #[test]
    fn symbolizes_a_function_of_this_process() {
        let addr = marker_fn();
        let mut s = Symbolizer::new();
        let frames = s.symbolize(std::process::id(), &[addr]);
        assert_eq!(frames.len(), 1);
        let f = &frames[0];
        println!("{f:?}\n{}", f.display());
        assert_eq!(f.addr, addr);
        assert!(
            f.function
                .as_deref()
                .is_some_and(|n| n.contains("marker_fn")),
            "{f:?}"
        );
        assert!(
            f.file
                .as_deref()
                .is_some_and(|p| p.ends_with("symbolize.rs")),
            "{f:?}"
        );
        assert!(f.line.is_some(), "{f:?}");
        assert_eq!(f.offset, Some(1));
        let shown = f.display();
        assert!(shown.contains("marker_fn+0x1 (symbolize.rs:"), "{shown}");

        // The second time comes from the cache, and gives the same frame.
        assert_eq!(s.symbolize(std::process::id(), &[addr, addr]).len(), 2);
        assert_eq!(s.symbolize(std::process::id(), &[addr]), frames);
        assert_eq!(s.cache.len(), 1);
    }

    #[test]
    fn an_exited_process_gives_raw_addresses() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        let frames = Symbolizer::new().symbolize(pid, &[0x1234, 0x7f00_0000_5678]);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.function.is_none()));
        assert_eq!(frames[0], Frame::raw(0x1234));
        assert_eq!(frames[1].addr, 0x7f00_0000_5678);
        assert_eq!(frames[0].display(), "0x1234");
        assert_eq!(frames[1].display(), "0x7f0000005678");
    }

    #[test]
    fn start_time_skips_odd_command_names() {
        let stat = "42 (a) b ) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1 2";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn a_reused_pid_key_and_eviction_stay_bounded() {
        let mut s = Symbolizer::new();
        for i in 0..(MAX_PROCESSES as u64 + 5) {
            s.tick += 1;
            let tick = s.tick;
            s.entry((1, i)).last_used = tick;
        }
        assert_eq!(s.cache.len(), MAX_PROCESSES);
        // The oldest incarnations went first.
        assert!(!s.cache.contains_key(&(1, 0)));
        assert!(s.cache.contains_key(&(1, MAX_PROCESSES as u64 + 4)));
    }
}
