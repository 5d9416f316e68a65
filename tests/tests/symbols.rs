//! Stacks and symbols from where programs really keep them: servers built
//! as distributions and release profiles build them (`-O2`, no frame
//! pointers: unwound from CFI), in C, C++ and Rust; a stripped server whose
//! debug information lives in a separate file (`.gnu_debuglink`); and a
//! frame inside a shared library mapped at a random base. The leak's stack
//! must name the function that accepted the connection, and main.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use tcptrace_tests::{
    endpoint, fixture, fixture_cmd, functions, leaks_on_port, peer_bin, peer_cmd, run_to_end,
    Agent, Peer, TempDir,
};

/// Runs `cmd`, failing the test with its output if it fails.
fn run(cmd: &mut Command) {
    let (code, out, err) = run_to_end(cmd);
    assert_eq!(code, Some(0), "{cmd:?} failed:\n{out}\n{err}");
}

/// Binary `built`, copied into `dir` and stripped, its debug information
/// in `NAME.debug` beside it (found by the link's name in the binary's own
/// directory).
fn stripped_with_debuglink(dir: &Path, built: &Path) -> PathBuf {
    let bin = dir.join("leaky_server");
    std::fs::copy(built, &bin).expect("copy the fixture");
    let debug = dir.join("leaky_server.debug");
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&bin)
        .arg(&debug));
    run(Command::new("strip").arg("--strip-all").arg(&bin));
    run(Command::new("objcopy")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&bin));
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
    let mut all = vec!["--leak-after", "500ms", "--events", "leak"];
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
    let frame = leak["origin"]["stack"]
        .as_array()
        .and_then(|s| s.iter().find(|f| f["function"] == "accept_orders"))
        .expect("the accept_orders frame");
    assert!(
        frame["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("leaky_server.c"))
            && frame["line"].as_u64().is_some(),
        "{frame}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
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
    let o2g = compile(&dir.0, "o2g", "cc", &["-O2", "-g"], &src);
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
