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

use blazesym::symbolize::source::{Process, Source};
use blazesym::symbolize::{CodeInfo, Input, Reason, Sym, Symbolized, Symbolizer as Blaze};
use blazesym::Pid;
use serde::{Serialize, Serializer};

/// One stack frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// Absolute address in the process. Serialized as a hex string
    /// ("0x7f..."): that is how addresses are read and compared with
    /// /proc/PID/maps, and JSON numbers above 2^53 lose precision in many
    /// consumers.
    #[serde(serialize_with = "hex")]
    pub addr: u64,
    /// Function name (demangled), if known.
    pub function: Option<String>,
    /// Offset of `addr` from the function start.
    pub offset: Option<u64>,
    /// Source file (directory and file as recorded in DWARF), if debug info
    /// exists.
    pub file: Option<String>,
    /// Source line.
    pub line: Option<u32>,
    /// The file the code was loaded from (the executable or a shared
    /// library), as /proc/PID/maps names it, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Code a runtime compiled at run time (V8's JavaScript, CPython 3.12's
    /// perf trampolines, Java's JIT), named from the process's perf map
    /// (see [`crate::jit`]); its `file` and `line` come from that name.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub jit: bool,
    /// Functions the compiler inlined at `addr`, innermost first (each
    /// with the line it is at); [`expand_inlined`] makes them frames of
    /// their own, which is how stacks are shown.
    #[serde(skip)]
    pub inlined: Vec<Frame>,
}

fn hex<S: Serializer>(addr: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{addr:#x}"))
}

impl Frame {
    /// A frame that only knows its address.
    fn raw(addr: u64) -> Self {
        Self {
            addr,
            function: None,
            offset: None,
            file: None,
            line: None,
            module: None,
            jit: false,
            inlined: Vec::new(),
        }
    }

    /// Builds a frame from blazesym's symbol for `addr`.
    fn from_sym(addr: u64, sym: &Sym<'_>) -> Self {
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
            let name = crate::jit::parse(&sym.name);
            return Self {
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
                Self {
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
        Self {
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

    /// Whether this frame is the program's own code, not a library's: a
    /// named function outside shared libraries (libc's syscall wrappers,
    /// an interpreter's .so), outside a language's standard library and
    /// downloaded dependencies (Go's GOROOT and module cache, Rust's
    /// std and registry sources, vendored code), and not a Go runtime or
    /// standard package (for Go binaries without file names).
    /// A JIT frame is the program's unless it is the runtime's own code
    /// ([`crate::jit::is_runtime`]).
    pub fn is_application(&self) -> bool {
        let Some(function) = &self.function else {
            return false;
        };
        if self.jit {
            return !crate::jit::is_runtime(function, self.file.as_deref());
        }
        if self.module.as_deref().is_some_and(is_shared_library) {
            return false;
        }
        if self
            .file
            .as_deref()
            .is_some_and(|f| LIBRARY_PATHS.iter().any(|p| f.contains(p)) || is_goroot(f))
        {
            return false;
        }
        !GO_LIBRARY_PREFIXES.iter().any(|p| function.starts_with(p))
    }

    /// `function (file.c:42)`: [`Frame::display`] without the offset, for
    /// naming a frame in a sentence.
    pub fn display_short(&self) -> String {
        let Some(function) = &self.function else {
            return format!("{:#x}", self.addr);
        };
        match (&self.file, self.line) {
            (Some(file), Some(line)) => {
                format!(
                    "{function} ({}:{line})",
                    file.rsplit('/').next().unwrap_or(file)
                )
            }
            (Some(file), None) => {
                format!("{function} ({})", file.rsplit('/').next().unwrap_or(file))
            }
            _ => function.clone(),
        }
    }

    /// `function+0x1f (file.c:42)`, or the raw address when unknown.
    ///
    /// Only the file's base name is shown: DWARF paths are often long
    /// build-machine paths, and the full one stays in `file`.
    pub fn display(&self) -> String {
        let Some(function) = &self.function else {
            return format!("{:#x}", self.addr);
        };
        let mut s = function.clone();
        if let Some(off) = self.offset {
            s.push_str(&format!("+{off:#x}"));
        }
        if let Some(file) = &self.file {
            let base = file.rsplit('/').next().unwrap_or(file);
            match self.line {
                Some(line) => s.push_str(&format!(" ({base}:{line})")),
                None => s.push_str(&format!(" ({base})")),
            }
        }
        s
    }
}

/// Source paths of library code: Go's module cache, Debian's Go sources,
/// vendored code, Rust's std (remapped to /rustc/HASH) and crates.
const LIBRARY_PATHS: &[&str] = &[
    "/pkg/mod/",
    "/gocode/src/",
    "/vendor/",
    "/rustc/",
    "/.cargo/registry/",
    "/.rustup/",
];

/// Go's runtime and standard packages by function name.
const GO_LIBRARY_PREFIXES: &[&str] = &[
    "runtime.",
    "syscall.",
    "internal/",
    "net.",
    "net/",
    "database/sql.",
    "io.",
    "bufio.",
    "os.",
    "sync.",
    "context.",
    "crypto/",
];

/// A file of Go's standard library: under a GOROOT (`.../go/src/` or
/// Debian's `/usr/lib/go-1.NN/src/`).
fn is_goroot(file: &str) -> bool {
    file.contains("/go/src/")
        || file.split_once("/go-1.").is_some_and(|(_, rest)| {
            rest.split_once('/')
                .is_some_and(|(_, r)| r.starts_with("src/"))
        })
}

/// `libc.so.6`, `libpython3.11.so.1.0`, `ld-linux-x86-64.so.2`.
fn is_shared_library(module: &str) -> bool {
    let base = module.rsplit('/').next().unwrap_or(module);
    base.contains(".so")
}

/// Where a thread's stack begins: a walk that reached one of these saw
/// the whole stack (glibc's and musl's process and thread entries, the
/// kernel's clone, Go's goroutine and thread roots).
const STACK_ROOTS: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "__libc_start_main_impl",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "__clone_internal",
    "libc_start_main_stage2",
    "runtime.goexit",
    "runtime.mstart",
    "runtime.rt0_go",
];

/// Frames a kernel stack walk gives at most (`PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_FRAMES: usize = 127;

/// Whether a walked stack stops short of its thread's entry: its outermost
/// named frame is none of [`STACK_ROOTS`] (a frame-pointer walk broken by
/// code built without them, an interpreter's frames), or the walk hit the
/// kernel's depth limit. An empty stack is not called truncated: there is
/// none.
pub fn is_truncated(frames: &[Frame]) -> bool {
    let Some(outermost) = frames.iter().rev().find_map(|f| f.function.as_deref()) else {
        return !frames.is_empty();
    };
    frames.len() >= MAX_STACK_FRAMES || !STACK_ROOTS.contains(&outermost)
}

/// One frame per function: each frame's inlined calls, innermost first,
/// then the frame itself (they share its address; only the real
/// function's frame has an offset).
pub fn expand_inlined(frames: Vec<Frame>) -> Vec<Frame> {
    let mut out = Vec::with_capacity(frames.len());
    for mut frame in frames {
        // An alias inlined into itself (glibc's `__GI___libc_read` shows
        // so) says nothing twice.
        frame.inlined.dedup_by(|a, b| a.function == b.function);
        out.extend(
            frame
                .inlined
                .drain(..)
                .filter(|f| f.function != frame.function),
        );
        out.push(frame);
    }
    out
}

/// Where in `frames` the program's own code starts: the innermost frame
/// that [`Frame::is_application`] calls so. In a stack with JIT frames
/// (Node, Java, CPython 3.12 `-X perf`) the runtime's native frames are
/// the engine (libuv's write, V8's call stubs), not the program, so the
/// innermost JIT frame of the program's own comes first.
pub fn application_position(frames: &[Frame]) -> Option<usize> {
    let program_jit = frames.iter().position(|f| f.jit && f.is_application());
    program_jit.or_else(|| frames.iter().position(Frame::is_application))
}

/// The frame [`application_position`] finds, else the innermost with a
/// name.
pub fn application_frame(frames: &[Frame]) -> Option<&Frame> {
    application_position(frames)
        .map(|i| &frames[i])
        .or_else(|| frames.iter().find(|f| f.function.is_some()))
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
                    Symbolized::Sym(sym) => Frame::from_sym(addr, sym),
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
    fn the_application_frame_skips_libc_go_runtime_and_dependencies() {
        let f = |function: &str, file: Option<&str>, module: Option<&str>| Frame {
            addr: 1,
            function: Some(function.into()),
            offset: None,
            file: file.map(str::to_string),
            line: None,
            module: module.map(str::to_string),
            jit: false,
            inlined: Vec::new(),
        };
        let go = [
            f(
                "internal/poll.(*FD).Write",
                Some("/usr/lib/go-1.19/src/internal/poll/fd_unix.go"),
                None,
            ),
            f(
                "net.(*conn).Write",
                Some("/usr/lib/go-1.19/src/net/net.go"),
                None,
            ),
            f(
                "github.com/go-sql-driver/mysql.(*mysqlConn).writePacket",
                Some("/usr/share/gocode/src/github.com/go-sql-driver/mysql/packets.go"),
                None,
            ),
            f("database/sql.(*DB).begin", None, None),
            f(
                "main.update",
                Some("/tmp/story/main.go"),
                Some("/tmp/story/svc"),
            ),
            f(
                "main.main",
                Some("/tmp/story/main.go"),
                Some("/tmp/story/svc"),
            ),
        ];
        assert_eq!(
            application_frame(&go).and_then(|f| f.function.as_deref()),
            Some("main.update")
        );
        let modcache = f(
            "github.com/lib/pq.(*conn).send",
            Some("/root/go/pkg/mod/github.com/lib/pq@v1.10.9/conn.go"),
            None,
        );
        assert!(!modcache.is_application());
        let c = [
            f(
                "__libc_write",
                Some("write.c"),
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ),
            f("send_request", Some("last_use.c"), Some("/tmp/last_use")),
        ];
        assert_eq!(
            application_frame(&c).and_then(|f| f.function.as_deref()),
            Some("send_request")
        );
        // Nothing of the program's own: the innermost named frame.
        let interp = [
            Frame::raw(9),
            f(
                "_PyEval_EvalFrameDefault",
                None,
                Some("/usr/lib/libpython3.11.so.1.0"),
            ),
        ];
        assert_eq!(
            application_frame(&interp).and_then(|f| f.function.as_deref()),
            Some("_PyEval_EvalFrameDefault")
        );
        assert!(application_frame(&[Frame::raw(1)]).is_none());
        assert!(is_goroot("/usr/local/go/src/net/fd.go"));
        assert!(!is_goroot("/home/me/go-1.2/app/main.go"));
    }

    #[test]
    fn in_a_jit_runtime_the_programs_script_comes_before_the_engine() {
        let native = |function: &str, module: &str| Frame {
            function: Some(function.into()),
            module: Some(module.into()),
            ..Frame::raw(1)
        };
        let js = |function: &str, file: &str, line: u32| Frame {
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(line),
            jit: true,
            ..Frame::raw(2)
        };
        // Node's write, as the last-use walk sees it.
        let node = [
            native("__GI___libc_write", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
            native("node::LibuvStreamWrap::DoTryWrite", "/usr/bin/node"),
            native(
                "Builtins_CEntry_Return1_ArgvOnStack_BuiltinExit",
                "/usr/bin/node",
            ),
            js("handleWriteReq", "node:internal/stream_base_commons", 46),
            js("Socket._write", "node:net", 969),
            js("checkoutAndQuery", "/srv/app/pool.js", 7),
            js("(anonymous)", "/srv/app/pool.js", 12),
            native("uv_run", "/usr/bin/node"),
            native("main", "/usr/bin/node"),
        ];
        assert_eq!(application_position(&node), Some(5));
        assert_eq!(
            application_frame(&node)
                .map(Frame::display_short)
                .as_deref(),
            Some("checkoutAndQuery (pool.js:7)")
        );
        // Only the runtime's scripts: the native rule holds.
        let internal = [
            native("uv__tcp_connect", "/usr/bin/node"),
            js("internalConnect", "node:net", 1038),
        ];
        assert_eq!(application_position(&internal), Some(0));
        // A JIT frame says so in JSON; a native one says nothing.
        let json = serde_json::to_value(&node[5]).expect("serialize");
        assert_eq!(json["jit"], true);
        assert_eq!(
            serde_json::to_value(&node[0])
                .expect("serialize")
                .get("jit"),
            None
        );
    }

    #[test]
    fn inlined_calls_become_frames_of_their_own() {
        let at = |function: &str, file: &str, line: u32| Frame {
            addr: 7,
            function: Some(function.into()),
            offset: None,
            file: Some(file.into()),
            line: Some(line),
            module: None,
            jit: false,
            inlined: Vec::new(),
        };
        let mut update = at("main.update", "/srv/main.go", 54);
        update.offset = Some(0x4a);
        update.inlined = vec![
            at(
                "database/sql.(*DB).BeginTx",
                "/usr/lib/go-1.19/src/database/sql/sql.go",
                1863,
            ),
            at(
                "database/sql.(*DB).Begin",
                "/usr/lib/go-1.19/src/database/sql/sql.go",
                1895,
            ),
        ];
        let mut main = at("main.main", "/srv/main.go", 70);
        main.addr = 8;
        let frames = expand_inlined(vec![update, main]);
        let names: Vec<_> = frames
            .iter()
            .filter_map(|f| f.function.as_deref())
            .collect();
        assert_eq!(
            names,
            [
                "database/sql.(*DB).BeginTx",
                "database/sql.(*DB).Begin",
                "main.update",
                "main.main"
            ]
        );
        assert_eq!(frames[2].display(), "main.update+0x4a (main.go:54)");
        assert!(frames.iter().all(|f| f.inlined.is_empty()));
        // An alias inlined into itself is one frame.
        let mut read = at("__GI___libc_read", "read.c", 26);
        read.inlined = vec![at("__GI___libc_read", "read.c", 26)];
        assert_eq!(expand_inlined(vec![read]).len(), 1);
        assert_eq!(
            application_frame(&frames).map(Frame::display_short),
            Some("main.update (main.go:54)".to_string())
        );
    }

    #[test]
    fn a_stack_is_whole_when_it_reaches_its_threads_entry() {
        let f = |function: &str| Frame {
            function: Some(function.into()),
            ..Frame::raw(1)
        };
        let whole = [
            f("__libc_connect"),
            f("open_conn"),
            f("main"),
            f("__libc_start_call_main"),
        ];
        assert!(!is_truncated(&whole));
        let go = [
            f("syscall.read"),
            f("main.update"),
            f("main.main"),
            f("runtime.main"),
            f("runtime.goexit"),
        ];
        assert!(!is_truncated(&go));
        let thread = [f("recv"), f("worker"), f("start_thread"), f("clone3")];
        assert!(!is_truncated(&thread));
        // No frame pointers: libc's wrapper alone, or a raw address past it.
        assert!(is_truncated(&[f("__libc_send")]));
        assert!(is_truncated(&[f("__libc_accept"), Frame::raw(0x1234)]));
        assert!(is_truncated(&[Frame::raw(0x1234)]));
        // The kernel's depth limit.
        let deep: Vec<Frame> = (0..MAX_STACK_FRAMES)
            .map(|_| f("recurse"))
            .chain([f("_start")])
            .collect();
        assert!(is_truncated(&deep));
        assert!(!is_truncated(&[]));
    }

    #[test]
    fn display_without_file_or_line() {
        let mut f = Frame::raw(0x10);
        f.function = Some("main".into());
        f.offset = Some(0x1f);
        assert_eq!(f.display(), "main+0x1f");
        f.file = Some("/build/src/net.c".into());
        assert_eq!(f.display(), "main+0x1f (net.c)");
        f.line = Some(42);
        assert_eq!(f.display(), "main+0x1f (net.c:42)");
    }

    #[test]
    fn serializes_addr_as_hex() {
        let mut out = Vec::new();
        let mut ser = serde_json::Serializer::new(&mut out);
        Frame::raw(0x7fff_0000_1234)
            .serialize(&mut ser)
            .expect("serialize");
        let json = String::from_utf8(out).expect("utf8");
        assert!(json.contains(r#""addr":"0x7fff00001234""#), "{json}");
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
