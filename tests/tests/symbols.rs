//! Stacks and symbols from where programs really keep them: servers built
//! as distributions and release profiles build them (`-O2`, no frame
//! pointers: unwound from CFI), in C, C++ and Rust; a stripped server whose
//! debug information lives in a separate file (`.gnu_debuglink`); and a
//! frame inside a shared library mapped at a random base; and JavaScript
//! named from a Node client's perf map inside its own root. The leak's
//! stack must name the function that accepted the connection, and main;
//! the Node client's, the script's function that used it last.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use tcptrace_tests::{
    endpoint, fixture, fixture_cmd, free_port, functions, leaks_on_port, metric_value, peer_bin,
    peer_cmd, run_to_end, scrape, ss_close_wait, ss_users, Agent, Peer, Redis, TempDir,
};

/// Runs `cmd`, failing the test with its output if it fails.
fn run(cmd: &mut Command) {
    let (code, out, err) = run_to_end(cmd);
    assert_eq!(code, Some(0), "{cmd:?} failed:\n{out}\n{err}");
}

/// Moves `bin`'s debug information into `debug` and strips `bin`, whose
/// `.gnu_debuglink` then names `debug` (by its file name, with its CRC).
fn strip_into(bin: &Path, debug: &Path) {
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(bin)
        .arg(debug));
    run(Command::new("strip").arg("--strip-all").arg(bin));
    run(Command::new("objcopy")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(bin));
}

/// Binary `built`, copied into `dir` and stripped, its debug information
/// in `NAME.debug` beside it (found by the link's name in the binary's own
/// directory).
fn stripped_with_debuglink(dir: &Path, built: &Path) -> PathBuf {
    let bin = dir.join("leaky_server");
    std::fs::copy(built, &bin).expect("copy the fixture");
    strip_into(&bin, &dir.join("leaky_server.debug"));
    // Nothing left to read in the binary itself.
    let (_, out, err) = run_to_end(Command::new("nm").arg(&bin));
    assert!(
        out.trim().is_empty() && err.contains("no symbols"),
        "the binary still has symbols:\n{out}\n{err}"
    );
    bin
}

/// Runs server `bin` (with `args`; it prints "listening PORT", then
/// "leaked fd FD" once a client hung up) under an agent, has one client
/// connect and hang up, and returns the agent, the server and its leak.
fn leak_of(bin: &Path, args: &[&str]) -> (Agent, Peer, Value) {
    leak_under(&[], bin, args)
}

/// [`leak_of`] under an agent started with `agent_args` too.
fn leak_under(agent_args: &[&str], bin: &Path, args: &[&str]) -> (Agent, Peer, Value) {
    let mut all = vec!["--events", "leak"];
    if !agent_args.contains(&"--leak-after") {
        all.extend(["--leak-after", "500ms"]);
    }
    all.extend_from_slice(agent_args);
    let agent = Agent::start(&all);
    let mut server = Peer::spawn(fixture_cmd(bin, None, args));
    let port: u16 = server.expect("listening").parse().expect("port");
    let target = endpoint("127.0.0.1", port);
    let mut client = Peer::spawn(peer_cmd(
        peer_bin!(),
        None,
        &["client", target.as_str(), "--exit", "--count", "1"],
    ));
    client.expect("done");
    server.expect("leaked fd");
    let events = agent.wait_for("a leak on the server port", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    let leak = leaks_on_port(&events, port)[0].clone();
    (agent, server, leak)
}

/// The origin's `accept_orders` frame names its file and line (from
/// DWARF, wherever the agent found it).
fn assert_accept_orders_has_its_line(leak: &Value) {
    let frame = leak["origin"]["stack"]
        .as_array()
        .and_then(|s| s.iter().find(|f| f["function"] == "accept_orders"))
        .unwrap_or_else(|| panic!("no accept_orders frame in {leak}"));
    assert!(
        frame["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("leaky_server.c"))
            && frame["line"].as_u64().is_some(),
        "{frame}"
    );
}

#[test]
fn a_stripped_binary_is_named_from_its_separate_debug_file() {
    let dir = TempDir::new("debuglink");
    let bin = stripped_with_debuglink(&dir.0, &fixture("leaky_server"));
    let (agent, server, leak) = leak_of(&bin, &["127.0.0.1", "0", "1"]);
    let leak = &leak;
    assert_eq!(leak["owner"][0]["pid"], server.pid(), "{leak}");
    let opened = functions(&leak["origin"]["stack"]);
    for f in ["accept_orders", "main"] {
        assert!(
            opened.iter().any(|g| g == f),
            "origin stack {opened:?} lacks {f}\n{leak}"
        );
    }
    // Lines come from the debug file's DWARF too.
    assert_accept_orders_has_its_line(leak);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// A debug file installed where distributions install them
/// (`/usr/lib/debug/.build-id/XX/REST.debug`, by the binary's build id),
/// removed on drop with the directory if this made it. blazesym looks
/// there for the file a binary's `.gnu_debuglink` names (as Debian's and
/// Fedora's stripped binaries have), not for binaries without a link.
struct InstalledDebugFile {
    file: PathBuf,
    made_dir: Option<PathBuf>,
}

impl InstalledDebugFile {
    fn install(debug: &Path, build_id: &str) -> Self {
        let dir = Path::new("/usr/lib/debug/.build-id").join(&build_id[..2]);
        let made_dir = (!dir.exists()).then(|| dir.clone());
        std::fs::create_dir_all(&dir).expect("create /usr/lib/debug/.build-id/XX");
        let file = dir.join(format!("{}.debug", &build_id[2..]));
        std::fs::copy(debug, &file).expect("install the debug file");
        Self { file, made_dir }
    }
}

impl Drop for InstalledDebugFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        if let Some(dir) = &self.made_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_stripped_binary_is_named_from_its_debug_file_under_usr_lib_debug() {
    let dir = TempDir::new("build-id");
    // A build id of this run's own, so no other binary's lookup finds it.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let build_id = format!("{:08x}{nanos:08x}7463707472616365", std::process::id());
    let built = compile(
        &dir.0,
        "built",
        "cc",
        &["-O2", "-g", &format!("-Wl,--build-id=0x{build_id}")],
        &source("leaky_server.c"),
    );
    let bin = dir.0.join("leaky_server");
    std::fs::copy(&built, &bin).expect("copy the build");
    // As Debian's dh_strip does: the debug file is named by the build id,
    // and the stripped binary's link names that file.
    let debug = dir.0.join(format!("{}.debug", &build_id[2..]));
    strip_into(&bin, &debug);
    let (_, notes, _) = run_to_end(Command::new("readelf").arg("-n").arg(&bin));
    assert!(notes.contains(&build_id), "{notes}");
    let _installed = InstalledDebugFile::install(&debug, &build_id);
    // Only /usr/lib/debug/.build-id/ has it now, not the binary's directory.
    std::fs::remove_file(&debug).expect("remove the build's debug file");

    let leak = whole_leak(
        &[],
        &bin,
        &["accept_orders", "main"],
        "cfi",
        "stripped, debug file by build id",
    );
    assert_accept_orders_has_its_line(&leak);
}

/// The fixture of `tests/fixtures/shared_lib`: `server` linked against
/// `libaccept.so`, both built into `dir` (the library found by rpath).
fn server_with_library(dir: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/shared_lib");
    let flags = ["-g", "-fno-omit-frame-pointer", "-Wall"];
    run(Command::new("cc")
        .args(["-shared", "-fPIC"])
        .args(flags)
        .arg("-o")
        .arg(dir.join("libaccept.so"))
        .arg(src.join("libaccept.c")));
    let bin = dir.join("server");
    run(Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(src.join("server.c"))
        .arg(format!("-L{}", dir.display()))
        .arg("-laccept")
        .arg(format!("-Wl,-rpath,{}", dir.display())));
    bin
}

#[test]
fn a_frame_in_a_shared_library_is_named_with_the_programs() {
    let dir = TempDir::new("shared-lib");
    let bin = server_with_library(&dir.0);
    let (agent, _server, leak) = leak_of(&bin, &["127.0.0.1", "1"]);
    let leak = &leak;
    let stack = leak["origin"]["stack"].as_array().expect("an origin stack");
    let frame = |name: &str| {
        stack
            .iter()
            .find(|f| f["function"] == name)
            .unwrap_or_else(|| panic!("origin stack lacks {name}\n{leak}"))
    };
    // The library's frame, from the library, at its own source line.
    let in_lib = frame("lib_accept_one");
    assert!(
        in_lib["module"]
            .as_str()
            .is_some_and(|m| m.ends_with("libaccept.so")),
        "{in_lib}"
    );
    assert!(
        in_lib["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("libaccept.c")),
        "{in_lib}"
    );
    // Then the program's own callers.
    for name in ["serve", "main"] {
        assert!(
            frame(name)["module"]
                .as_str()
                .is_some_and(|m| m.ends_with("/server")),
            "{leak}"
        );
    }
    assert_eq!(leak["origin"]["truncated"], false, "{leak}");
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// `tests/fixtures/FILE`.
fn source(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(file)
}

/// Compiles `src` with `compiler` and `flags` into `dir/name`.
fn compile(dir: &Path, name: &str, compiler: &str, flags: &[&str], src: &Path) -> PathBuf {
    let bin = dir.join(name);
    let mut cmd = Command::new(compiler);
    cmd.args(flags).arg("-o").arg(&bin).arg(src);
    if compiler == "cc" {
        cmd.arg(format!("-I{}", source("").display()));
    }
    run(&mut cmd);
    bin
}

/// `leaky_server.c` built as distributions build C: `-O2 -g`, no frame
/// pointers.
fn o2g_server(dir: &Path) -> PathBuf {
    compile(dir, "o2g", "cc", &["-O2", "-g"], &source("leaky_server.c"))
}

/// Whether `bin` keeps frame pointers in `function`: its code sets up
/// `rbp` as `push %rbp; mov %rsp,%rbp`.
fn has_frame_pointer(bin: &Path, function: &str) -> bool {
    let (_, out, _) = run_to_end(
        Command::new("objdump")
            .arg("-d")
            .arg(format!("--disassemble={function}"))
            .arg(bin),
    );
    out.contains("mov    %rsp,%rbp")
}

/// The leak's origin stack must hold `wanted` (each a function name, or
/// its tail after `::`), be whole, and have been unwound by `unwind`.
fn assert_whole_origin(leak: &Value, wanted: &[&str], unwind: &str, what: &str) {
    let opened = functions(&leak["origin"]["stack"]);
    for f in wanted {
        assert!(
            opened.iter().any(|g| g == f
                || g.ends_with(&format!("::{f}"))
                || g.contains(&format!("::{f}("))),
            "{what}: origin stack {opened:?} lacks {f}\n{leak}"
        );
    }
    assert_eq!(leak["origin"]["truncated"], false, "{what}: {leak}");
    assert_eq!(leak["origin"]["unwind"], unwind, "{what}: {leak}");
}

/// Runs server `bin` under an agent started with `agent_args` too (see
/// [`leak_under`]), and checks its leak as [`assert_whole_origin`] does,
/// held by the server. Returns the leak, the agent stopped.
fn whole_leak(agent_args: &[&str], bin: &Path, wanted: &[&str], unwind: &str, what: &str) -> Value {
    let (agent, server, leak) = leak_under(agent_args, bin, &["127.0.0.1", "0", "1"]);
    assert_eq!(leak["owner"][0]["pid"], server.pid(), "{what}: {leak}");
    assert_whole_origin(&leak, wanted, unwind, what);
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{what}");
    leak
}

#[test]
fn c_servers_built_as_distributions_build_them_leak_with_whole_stacks() {
    let dir = TempDir::new("unwind-c");
    let src = source("leaky_server.c");
    let o2g = o2g_server(&dir.0);
    // Without frame pointers, the kernel's walk would end in libc.
    assert!(!has_frame_pointer(&o2g, "accept_orders"), "-O2 kept rbp");
    let builds = [
        ("-O2 -g", o2g.clone()),
        // Names from the symbol table alone; CFI is in .eh_frame, which
        // the build keeps without -g.
        ("-O2", compile(&dir.0, "o2", "cc", &["-O2"], &src)),
        (
            "stripped -O2 -g with a debug link",
            stripped_with_debuglink(&dir.0, &o2g),
        ),
        // Frame pointers in the program's own code, none in glibc's
        // accept() wrapper: the frame-pointer walk skips the wrapper's
        // caller, the CFI unwind does not.
        (
            "-O2 -fno-omit-frame-pointer",
            compile(
                &dir.0,
                "o2fp",
                "cc",
                &["-O2", "-g", "-fno-omit-frame-pointer"],
                &src,
            ),
        ),
    ];
    for (what, bin) in builds {
        whole_leak(&[], &bin, &["accept_orders", "main"], "cfi", what);
    }
}

#[test]
fn a_cpp_server_built_o2_leaks_with_its_method_and_main() {
    let dir = TempDir::new("unwind-cpp");
    let bin = compile(
        &dir.0,
        "leaky_server_cpp",
        "g++",
        &["-O2", "-g"],
        &source("unwind/leaky_server.cpp"),
    );
    let leak = whole_leak(&[], &bin, &["accept_loop", "main"], "cfi", "C++ -O2 -g");
    let frame = leak["origin"]["stack"]
        .as_array()
        .and_then(|s| {
            s.iter().find(|f| {
                f["function"]
                    .as_str()
                    .is_some_and(|n| n.contains("OrderServer::accept_loop"))
            })
        })
        .unwrap_or_else(|| panic!("no demangled OrderServer::accept_loop frame\n{leak}"));
    assert!(
        frame["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("leaky_server.cpp")),
        "{frame}"
    );
}

#[test]
fn a_rust_release_server_leaks_with_its_function_and_main() {
    let dir = TempDir::new("unwind-rust");
    // What `cargo build --release` gives (opt-level 3, no frame pointers),
    // with line tables.
    let bin = compile(
        &dir.0,
        "leaky_server_rs",
        "rustc",
        &[
            "-C",
            "opt-level=3",
            "-C",
            "debuginfo=line-tables-only",
            "--edition",
            "2021",
        ],
        &source("unwind/leaky_server.rs"),
    );
    whole_leak(&[], &bin, &["accept_loop", "main"], "cfi", "Rust --release");
}

#[test]
fn without_stack_copies_frame_pointers_walk_alone() {
    // The -O0 frame-pointer fixture: whole by frame pointers, so copies
    // off lose nothing there; the walk says so.
    whole_leak(
        &["--stack-copy", "off"],
        &fixture("leaky_server"),
        &["accept_orders", "main"],
        "fp",
        "--stack-copy off",
    );
}

/// Node running `tests/fixtures/SCRIPT` (with `args`) with a perf map, as
/// a container runs it: in PID and mount namespaces of its own, with a
/// private /tmp, so its perf map is `/tmp/perf-1.map` inside its own root
/// and nowhere on the host's /tmp. The script is copied into a private
/// /mnt first (the checkout the tests run from may itself be under /tmp),
/// and node runs in the private /tmp, where V8's code log
/// (`isolate-*-v8.log`, which `--perf-basic-prof` writes too) goes with
/// the namespace.
fn node_in_its_own_root(script: &str, args: &[&str]) -> Peer {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(script);
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "sh",
        "-c",
        "mount -t tmpfs tcptrace-test /mnt && cp \"$0\" /mnt/ \
         && mount -t tmpfs tcptrace-test /tmp && cd /tmp && script=\"/mnt/${0##*/}\" \
         && exec node --perf-basic-prof --interpreted-frames-native-stack \"$script\" \"$@\"",
    ])
    .arg(&script)
    .args(args);
    Peer::spawn(cmd)
}

/// The leak of a Node process that sees itself as `own_pid` (pid 1 of its
/// namespace): owned by it, as `ss` sees it too, and whose last use names
/// the script's `function` at `file:line` from the perf map (a JIT frame),
/// in the stack and in the leak line.
fn assert_named_from_perf_map(leak: &Value, own_pid: u64, function: &str, file: &str, line: u64) {
    let owner = leak["owner"][0]["pid"].as_u64().expect("owner pid");
    assert_eq!(ns_pid(owner), Some(own_pid), "{leak}");
    assert_eq!(leak["owner"][0]["comm"], "node", "{leak}");
    let lport = leak["lport"].as_u64().expect("lport");
    let ss = ss_close_wait(None)
        .into_iter()
        .find(|l| l.contains(&format!(":{lport} ")))
        .unwrap_or_else(|| panic!("ss does not show local port {lport} in CLOSE_WAIT"));
    let fd = leak["owner"][0]["fd"].as_i64().expect("owner fd");
    assert!(
        ss_users(&ss).contains(&(owner as u32, fd as i32)),
        "ss says {ss}, the agent {leak}"
    );
    assert_eq!(own_pid, 1, "node runs as its namespace's init");
    assert!(
        !Path::new("/tmp/perf-1.map").exists(),
        "the perf map belongs in node's own /tmp"
    );

    let used = &leak["last_use"]["stack"];
    let frame = used
        .as_array()
        .and_then(|s| s.iter().find(|f| f["function"] == function))
        .unwrap_or_else(|| panic!("no {function} in {:?}\n{leak}", functions(used)));
    assert_eq!(frame["jit"], true, "{frame}");
    assert_eq!(frame["file"], format!("/mnt/{file}"), "{frame}");
    assert_eq!(frame["line"], line, "{frame}");
    assert_eq!(leak["last_use"]["truncated"], false, "{leak}");
    let message = leak["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("last used by {function} ({file}:{line})")),
        "{message}"
    );
    // Node's own modules are named too, and are not the program's code.
    assert!(
        functions(used).iter().any(|f| f == "Socket._write"),
        "{:?}",
        functions(used)
    );
}

/// Leaks named quickly, and checkouts after 200 ms idle: the Node
/// fixtures' idle gaps.
const LAST_USE_QUICKLY: &[&str] = &[
    "--leak-after",
    "500ms",
    "--events",
    "leak",
    "--last-use-gap",
    "200ms",
];

/// The innermost `PID` of `NSpid:` in /proc/`pid`/status: the pid the
/// process sees itself as.
fn ns_pid(pid: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

#[test]
fn a_node_client_in_a_container_names_its_javascript_function_from_its_perf_map() {
    let redis = Redis::start(0);
    let agent = Agent::start(LAST_USE_QUICKLY);
    let port = redis.port.to_string();
    let mut node = node_in_its_own_root("pooled_client.js", &["127.0.0.1", &port, "400"]);
    let own_pid: u64 = node.expect("pid").parse().expect("pid");
    let lport: u16 = node.expect("connected").parse().expect("local port");
    node.expect("queried");
    node.expect("peer closed");
    let events = agent.wait_for("the Node client's leak", |ev| {
        !leaks_on_port(ev, lport).is_empty()
    });
    let leak = leaks_on_port(&events, lport)[0].clone();
    assert_eq!(leak["rport"], redis.port, "{leak}");
    assert_named_from_perf_map(&leak, own_pid, "checkoutAndQuery", "pooled_client.js", 20);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn a_node_server_in_a_container_names_its_javascript_function_from_its_perf_map() {
    let agent = Agent::start(LAST_USE_QUICKLY);
    let mut node = node_in_its_own_root("leaky_server.js", &["127.0.0.1", "300"]);
    let own_pid: u64 = node.expect("pid").parse().expect("pid");
    let port: u16 = node.expect("listening").parse().expect("port");
    // The client half-closes after its request and reads the answer.
    let mut client = Peer::spawn(peer_cmd(
        peer_bin!(),
        None,
        &["client", endpoint("127.0.0.1", port).as_str(), "--shutdown"],
    ));
    client.expect("shut");
    node.expect("answered");
    let events = agent.wait_for("the Node server's leak", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    let leak = leaks_on_port(&events, port)[0].clone();
    assert_eq!(leak["origin"]["syscall"], "accept", "{leak}");
    assert_named_from_perf_map(&leak, own_pid, "greetCustomer", "leaky_server.js", 15);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn the_unwound_stacks_of_closed_connections_are_forgotten_and_a_leaks_kept() {
    let dir = TempDir::new("capture-sweep");
    let bin = o2g_server(&dir.0);
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    // The leak is reported after two sweeps of the origin table (every
    // 5 s; the first spares what came since the one before): its capture,
    // of a connection still open, survived them.
    let (agent, server, leak) = leak_under(
        &["--leak-after", "11s", "--metrics", &metrics],
        &bin,
        &["127.0.0.1", "0", "1"],
    );
    assert_eq!(leak["owner"][0]["pid"], server.pid(), "{leak}");
    assert_whole_origin(&leak, &["accept_orders", "main"], "cfi", "after the sweeps");

    // Healthy connections, opened and closed at once: each a connect() and
    // an accept() whose stacks were copied and unwound.
    const HEALTHY: usize = 100;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    for _ in 0..HEALTHY {
        let conn = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        drop(conn);
        drop(accepted);
    }
    // Scraped once a second: each scrape is a connection of its own (the
    // agent's accept() and this process's connect() have stacks too).
    let closed = r#"tcptrace_unwound_captures_evicted_total{reason="closed"}"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        thread::sleep(Duration::from_secs(1));
        let text = scrape(metrics_port);
        if metric_value(&text, closed).unwrap_or(0.0) >= (2 * HEALTHY) as f64 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connections' stacks were not forgotten:\n{text}"
        );
    };
    // Few captures are left (the leak's, and recent scrapes').
    let kept = metric_value(&text, "tcptrace_unwound_captures").expect("the captures gauge");
    assert!(
        kept <= HEALTHY as f64 / 2.0,
        "{kept} captures kept:\n{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            r#"tcptrace_unwound_captures_evicted_total{reason="evicted"}"#
        ),
        Some(0.0),
        "{text}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}
