//! Checks, and installs when missing, what building and testing need.
//!
//! Why: the agent's build script compiles the eBPF crate with
//! `-Z build-std=core`, which needs the `rust-src` component, and links it
//! with `bpf-linker`, which reads rustc's LLVM bitcode and so must be built
//! against the *same LLVM major* as rustc (a plain `cargo install bpf-linker`
//! picks its default, newer LLVM and fails with unreadable-bitcode errors).
//! A fresh Debian machine has neither, and the integration tests also call
//! `ip`, `ss`, `unshare`, `setpriv`, `mount` and `umount`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::apt::Apt;
use crate::{run, say, workspace};

/// The bpf-linker release installed: the newest one, with an `llvm-22`
/// feature, verified with rustc 1.95 (LLVM 22). Pinned so that a new release
/// (other features, newer rustc needed) cannot break a fresh machine.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the nested cargo needs to find: the verified bpf-linker.
#[derive(Debug)]
pub struct BuildTools {
    bpf_linker: PathBuf,
}

impl BuildTools {
    /// PATH with the verified bpf-linker's directory first, so that the
    /// build uses it even when it sits in ~/.cargo/bin outside PATH, or when
    /// another (mismatched) bpf-linker comes earlier on PATH.
    pub fn path_env(&self) -> Result<OsString> {
        let dir = self.bpf_linker.parent().map(Path::to_path_buf);
        prepend_path(dir)
    }
}

/// Makes sure `rust-src` and a `bpf-linker` matching rustc's LLVM are there,
/// installing them when not.
pub fn ensure_build_tools(apt: &mut Apt) -> Result<BuildTools> {
    ensure_rust_src()?;
    let bpf_linker = ensure_bpf_linker(apt)?;
    Ok(BuildTools { bpf_linker })
}

/// The rustc cargo would use (RUSTC when set).
fn rustc() -> Command {
    Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
}

fn ensure_rust_src() -> Result<()> {
    let core = rust_src_core()?;
    if core.is_dir() {
        say!("rust-src: found");
        return Ok(());
    }
    say!("installing the rust-src component (the BPF target builds `core` from source)");
    if run::find_in_path("rustup").is_none() {
        bail!(
            "the rust-src component is missing ({} does not exist) and rustup is not \
             installed; install Rust with rustup, or the Rust sources for this toolchain",
            core.display()
        );
    }
    run::checked(Command::new("rustup").args(["component", "add", "rust-src"]))
        .context("installing rust-src failed; run `rustup component add rust-src` yourself")?;
    let core = rust_src_core()?;
    if !core.is_dir() {
        bail!(
            "rustup installed rust-src, but {} still does not exist; is rustc from \
             another toolchain than rustup's default?",
            core.display()
        );
    }
    Ok(())
}

/// `$(rustc --print sysroot)/lib/rustlib/src/rust/library/core`.
fn rust_src_core() -> Result<PathBuf> {
    let sysroot = run::capture_stdout(rustc().args(["--print", "sysroot"]))
        .context("cannot find rustc's sysroot; is Rust installed (rustup)?")?;
    Ok(Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core"))
}

/// Returns a working bpf-linker linked against rustc's LLVM major,
/// installing one (and the Debian LLVM it links against) when none is.
fn ensure_bpf_linker(apt: &mut Apt) -> Result<PathBuf> {
    let version = run::capture_stdout(rustc().arg("-vV")).context("cannot run `rustc -vV`")?;
    let major = llvm_major(&version)
        .with_context(|| format!("no `LLVM version:` line in `rustc -vV`:\n{version}"))?;
    if let Some(found) = find_good_bpf_linker(major) {
        say!("bpf-linker: {} (LLVM {major}, like rustc)", found.display());
        return Ok(found);
    }
    install_bpf_linker(apt, major)?;
    let installed = find_good_bpf_linker(major).with_context(|| {
        format!(
            "bpf-linker was installed but none linked against LLVM {major} is found on \
             PATH or in {}; check `cargo install` above",
            install_bin_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    say!(
        "bpf-linker: installed {} (LLVM {major})",
        installed.display()
    );
    Ok(installed)
}

/// The first bpf-linker (PATH, then cargo's install directories) that runs
/// and links libLLVM of `major`; says why each other one was passed over.
fn find_good_bpf_linker(major: u32) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(install_bin_dirs());
    let mut seen = BTreeSet::new();
    for dir in dirs {
        let candidate = dir.join("bpf-linker");
        if !run::is_executable(&candidate) {
            continue;
        }
        let key = std::fs::canonicalize(&candidate).unwrap_or_else(|_| candidate.clone());
        if !seen.insert(key) {
            continue;
        }
        match check_bpf_linker(&candidate, major) {
            Ok(()) => return Some(candidate),
            Err(why) => say!("bpf-linker: {} is not usable: {why}", candidate.display()),
        }
    }
    None
}

/// Ok when `path --version` runs and `ldd path` shows libLLVM of `major`.
fn check_bpf_linker(path: &Path, major: u32) -> std::result::Result<(), String> {
    let out = run::capture(Command::new(path).arg("--version")).map_err(|e| format!("{e:#}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{} --version` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let ldd = run::capture(Command::new("ldd").arg(path)).map_err(|e| format!("{e:#}"))?;
    let majors = ldd_llvm_majors(&String::from_utf8_lossy(&ldd.stdout));
    if majors.contains(&major) {
        Ok(())
    } else if majors.is_empty() {
        Err(format!(
            "ldd shows no libLLVM (rustc uses LLVM {major}; a statically linked LLVM \
             cannot be checked)"
        ))
    } else {
        Err(format!(
            "it links LLVM {majors:?} but rustc uses LLVM {major} (bpf-linker must read \
             rustc's bitcode)"
        ))
    }
}

/// Builds bpf-linker against Debian's LLVM `major` with `cargo install`.
fn install_bpf_linker(apt: &mut Apt, major: u32) -> Result<()> {
    say!(
        "bpf-linker for LLVM {major} is needed; first making sure Debian's LLVM {major} \
         (llvm-{major}-dev, libpolly-{major}-dev) is installed"
    );
    apt.ensure_installed(&[format!("llvm-{major}-dev"), format!("libpolly-{major}-dev")])
        .with_context(|| format!("bpf-linker must be built against LLVM {major}, rustc's LLVM"))?;
    let prefix = PathBuf::from(format!("/usr/lib/llvm-{major}"));
    if !prefix.join("bin/llvm-config").is_file() {
        bail!(
            "{} is missing although llvm-{major}-dev is installed",
            prefix.join("bin/llvm-config").display()
        );
    }
    say!(
        "installing bpf-linker {BPF_LINKER_VERSION} (built against LLVM {major}) with cargo \
         install; this takes a minute or two ..."
    );
    let mut cmd = Command::new(workspace::cargo_program());
    cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--force")
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", prepend_path(Some(prefix.join("bin")))?)
        .current_dir(workspace::root());
    run::checked(&mut cmd).with_context(|| {
        format!(
            "building bpf-linker against LLVM {major} failed; the compiler errors are above \
             (llvm-sys needs {}/bin/llvm-config and a C compiler)",
            prefix.display()
        )
    })?;
    Ok(())
}

/// Where `cargo install` puts binaries: CARGO_INSTALL_ROOT/bin, then
/// CARGO_HOME/bin (default ~/.cargo/bin).
fn install_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(root) = std::env::var_os("CARGO_INSTALL_ROOT") {
        dirs.push(PathBuf::from(root).join("bin"));
    }
    if let Some(home) = home_dir_var("CARGO_HOME", ".cargo") {
        dirs.push(home.join("bin"));
    }
    dirs
}

/// `$NAME`, or `$HOME/<default>` when NAME is unset (how cargo and rustup
/// find CARGO_HOME and RUSTUP_HOME); None when neither can be known.
pub fn home_dir_var(name: &str, default: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(default)))
}

/// The current PATH with `dir` in front.
fn prepend_path(dir: Option<PathBuf>) -> Result<OsString> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let dirs = dir.into_iter().chain(std::env::split_paths(&current));
    std::env::join_paths(dirs).context("cannot build a PATH (a directory contains ':')")
}

/// The LLVM major version from `rustc -vV` (`LLVM version: 22.1.2` -> 22).
pub fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|line| line.trim().strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|major| major.trim().parse().ok())
}

/// The LLVM majors of the libLLVM libraries that `ldd` output shows resolved:
/// `libLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x...)` -> 22,
/// also `libLLVM-17.so` and `libLLVM.so.22`. A `=> not found` line counts
/// for nothing.
pub fn ldd_llvm_majors(ldd: &str) -> Vec<u32> {
    let mut majors = Vec::new();
    for line in ldd.lines() {
        let line = line.trim();
        let (name, target) = match line.split_once("=>") {
            Some((name, target)) => (name.trim(), target.trim()),
            None => (line.split_whitespace().next().unwrap_or(""), ""),
        };
        if target.starts_with("not found") {
            continue;
        }
        let Some(rest) = Path::new(name)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("libLLVM"))
        else {
            continue;
        };
        let digits = rest
            .strip_prefix(".so.")
            .or_else(|| rest.strip_prefix('-'))
            .map(|r| {
                r.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            });
        if let Some(major) = digits.and_then(|d| d.parse().ok()) {
            if !majors.contains(&major) {
                majors.push(major);
            }
        }
    }
    majors
}

/// The commands the integration tests run, and the Debian package of each.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("unshare", "util-linux"),
    ("setpriv", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("cc", "gcc"),
    // The C++ server of the unwinding tests.
    ("g++", "g++"),
    // Whether a fixture kept frame pointers.
    ("objdump", "binutils"),
    // A stripped fixture with a separate debug file (symbols.rs).
    ("objcopy", "binutils"),
    ("strip", "binutils"),
    ("nm", "binutils"),
    ("readelf", "binutils"),
    ("redis-server", "redis-server"),
    ("rsyslogd", "rsyslog"),
    ("systemd-analyze", "systemd"),
    ("promtool", "prometheus"),
    ("bpftool", "bpftool"),
    ("strace", "strace"),
    ("go", "golang-go"),
    ("mariadbd", "mariadb-server"),
    ("mariadb-install-db", "mariadb-server"),
    ("haproxy", "haproxy"),
    // A JIT runtime with a perf map (symbols.rs).
    ("node", "nodejs"),
    // A real container holding a leak (containers.rs); runc as its runtime
    // where crun refuses hybrid cgroup hosts.
    ("podman", "podman"),
    ("runc", "runc"),
];

/// Makes sure every command of [`TEST_TOOLS`] exists, and the libraries
/// the pool story's fixtures use (Debian's Go MySQL driver, built in GOPATH
/// mode without a module proxy, and the system Python's PyMySQL and
/// SQLAlchemy), installing the packages of the missing ones.
pub fn ensure_test_tools(apt: &mut Apt) -> Result<()> {
    /// True when the system Python (not a pyenv or venv one) imports `module`.
    fn system_python_has(module: &str) -> bool {
        Command::new("/usr/bin/python3")
            .args(["-c", &format!("import {module}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
    /// Whether a library is there.
    type Present = fn() -> bool;
    /// Libraries without a command: what each is, its package, its check.
    const LIBRARIES: &[(&str, &str, Present)] = &[
        (
            "the Go MySQL driver",
            "golang-github-go-sql-driver-mysql-dev",
            || {
                Path::new("/usr/share/gocode/src/github.com/go-sql-driver/mysql/driver.go")
                    .is_file()
            },
        ),
        ("PyMySQL", "python3-pymysql", || {
            system_python_has("pymysql")
        }),
        ("SQLAlchemy", "python3-sqlalchemy", || {
            system_python_has("sqlalchemy")
        }),
    ];
    let missing = || {
        let commands = TEST_TOOLS
            .iter()
            .filter(|(command, _)| find_command(command).is_none())
            .map(|(command, package)| (*command, *package));
        let libraries = LIBRARIES
            .iter()
            .filter(|(_, _, present)| !present())
            .map(|(what, package, _)| (*what, *package));
        commands.chain(libraries).collect::<Vec<_>>()
    };
    let mut packages: Vec<String> = Vec::new();
    for (_, package) in missing() {
        if !packages.iter().any(|p| p == package) {
            packages.push(package.to_string());
        }
    }
    if packages.is_empty() {
        say!(
            "test tools: found ({}, {})",
            TEST_TOOLS
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()
                .join(", "),
            LIBRARIES.iter().map(|l| l.0).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    say!("test tools missing; installing {}", packages.join(" "));
    apt.ensure_installed(&packages)
        .context("the integration tests need these commands and libraries")?;
    let still = missing();
    if !still.is_empty() {
        bail!(
            "{} still missing after installing {}; is /usr/sbin on PATH?",
            still
                .iter()
                .map(|(what, _)| *what)
                .collect::<Vec<_>>()
                .join(", "),
            packages.join(" ")
        );
    }
    Ok(())
}

/// Installs what `cargo xtask bench` uses when missing: iproute2 (the load
/// runs in a namespace of its own), libbpf-tools (tcpstates, the peer it
/// is compared with), redis-server and redis-tools (redis-benchmark and
/// redis-cli: the request/response workload). A missing tcpstates only
/// leaves its row out; a missing redis fails the redis workload, saying so.
pub fn ensure_bench_tools(apt: &mut Apt) {
    for (command, package) in [
        ("ip", "iproute2"),
        ("tcpstates", "libbpf-tools"),
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
        ("redis-cli", "redis-tools"),
    ] {
        if find_command(command).is_none() {
            if let Err(e) = apt.ensure_installed(&[package.to_string()]) {
                say!("could not install {package} ({e:#}); going on without {command}");
            }
        }
    }
}

/// A command on PATH, or in the sbin directories a non-login root shell
/// may leave out of PATH.
fn find_command(name: &str) -> Option<PathBuf> {
    run::find_in_path(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| run::is_executable(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_vv() {
        let vv = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\n\
                  commit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860\n\
                  host: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("LLVM version: 9.0\n"), Some(9));
        assert_eq!(llvm_major("rustc 1.95.0\nrelease: 1.95.0\n"), None);
        assert_eq!(llvm_major("LLVM version: unknown\n"), None);
    }

    #[test]
    fn ldd_shows_the_llvm_major() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd4b5f2000)\n\
                   \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f2f64200000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2f64000000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f2f6c8e4000)\n";
        assert_eq!(ldd_llvm_majors(ldd), [22]);
        assert_eq!(
            ldd_llvm_majors("\tlibLLVM-17.so => /usr/lib/llvm-17/lib/libLLVM-17.so (0x1)\n"),
            [17]
        );
        assert_eq!(
            ldd_llvm_majors("\tlibLLVM.so.23 => /x/libLLVM.so.23 (0x1)\n"),
            [23]
        );
    }

    #[test]
    fn ldd_without_a_usable_llvm() {
        assert!(ldd_llvm_majors("\tnot a dynamic executable\n").is_empty());
        assert!(ldd_llvm_majors("\tlibLLVM.so.22.1 => not found\n").is_empty());
        assert!(ldd_llvm_majors("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n").is_empty());
        assert!(ldd_llvm_majors("").is_empty());
    }

    #[test]
    fn prepended_dir_comes_first() {
        let path = prepend_path(Some(PathBuf::from("/opt/x/bin"))).expect("valid PATH");
        let first = std::env::split_paths(&path).next();
        assert_eq!(first.as_deref(), Some(Path::new("/opt/x/bin")));
    }
}
