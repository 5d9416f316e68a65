//! One frame of a user stack, and what a stack says: which frame is the
//! program's own code ([`application_frame`]), whether the walk reached the
//! thread's entry ([`is_truncated`]), inlined calls as frames of their own
//! ([`expand_inlined`]). Pure: [`crate::host::symbolize`] fills frames in
//! from a live process.

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
    /// (see [`crate::engine::jit`]); its `file` and `line` come from that name.
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
    pub fn raw(addr: u64) -> Self {
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

    /// Whether this frame is the program's own code, not a library's: a
    /// named function outside shared libraries (libc's syscall wrappers,
    /// an interpreter's .so), outside a language's standard library and
    /// downloaded dependencies (Go's GOROOT and module cache, Rust's
    /// std and registry sources, vendored code), and not a Go runtime or
    /// standard package (for Go binaries without file names).
    /// A JIT frame is the program's unless it is the runtime's own code
    /// ([`crate::engine::jit::is_runtime`]).
    pub fn is_application(&self) -> bool {
        let Some(function) = &self.function else {
            return false;
        };
        if self.jit {
            return !crate::engine::jit::is_runtime(function, self.file.as_deref());
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
/// named frame is none of `STACK_ROOTS` (a frame-pointer walk broken by
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
