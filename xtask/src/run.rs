//! Process helpers shared by the commands.
//!
//! Why a module of its own: every external step (rustc, rustup, apt-get,
//! cargo, the agent) must print what it runs and, when it fails, say which
//! command failed and how, instead of a bare "No such file or directory".
//! The agent itself needs more: it is stopped with Ctrl-C, so xtask must
//! survive the SIGINT the terminal sends to the whole process group and
//! pass the agent's exit code through.

use std::ffi::OsStr;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

use anyhow::{bail, Context as _, Result};

use crate::say;

/// True when the effective user is root (who may load BPF programs and
/// install Debian packages).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks `name` up in the directories of PATH, like the shell would.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// A regular file with an execute bit.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The command line of `cmd` as one could paste it into a shell (quoted
/// where needed), for progress and error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio, printing it first; fails unless it exits 0.
pub fn checked(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    say!("running `{line}`");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({})", explain(status));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio, printing it first, and returns its exit
/// code (a failing status is not an error here: the caller passes it on).
pub fn status(cmd: &mut Command) -> Result<i32> {
    let line = describe(cmd);
    say!("running `{line}`");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    Ok(exit_code(status))
}

/// Runs `cmd` quietly and returns its output whatever its exit status; only
/// a command that cannot be started at all is an error.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs `cmd` quietly and returns its stdout; fails (with its stderr) unless
/// it exits 0.
pub fn capture_stdout(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            explain(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non UTF-8", describe(cmd)))
}

/// Runs a long-lived child (the agent, or xtask again under sudo) in the
/// foreground and returns the exit code to end with.
///
/// While it runs, xtask ignores SIGINT and SIGTERM: Ctrl-C reaches the whole
/// foreground process group, and the child handles it (the agent detaches
/// its programs and exits 0); xtask must stay to report the child's exit
/// code. The child gets xtask's original dispositions back before `exec`.
pub fn foreground(cmd: &mut Command) -> Result<i32> {
    let line = describe(cmd);
    say!("running `{line}`");
    let guard = IgnoreTermSignals::install()?;
    let restore = guard.previous;
    // SAFETY: the closure runs between fork and exec and only calls
    // `signal`, which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for (sig, handler) in restore {
                libc::signal(sig, handler);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}` failed"))?;
    drop(guard);
    let code = exit_code(status);
    if code != 0 {
        say!("`{line}` exited: {}", explain(status));
    }
    Ok(code)
}

/// The shell's convention: the exit code, or 128 + the signal number for a
/// child killed by a signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

/// "exit status 3", "killed by signal 9", for messages.
fn explain(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// SIGINT and SIGTERM set to "ignore" for as long as the guard lives;
/// dropping it restores the previous dispositions.
struct IgnoreTermSignals {
    previous: [(libc::c_int, libc::sighandler_t); 2],
}

impl IgnoreTermSignals {
    fn install() -> Result<Self> {
        let mut previous = [
            (libc::SIGINT, libc::SIG_DFL),
            (libc::SIGTERM, libc::SIG_DFL),
        ];
        for (sig, old) in previous.iter_mut() {
            // SAFETY: setting SIG_IGN installs no Rust code as a handler.
            let prev = unsafe { libc::signal(*sig, libc::SIG_IGN) };
            if prev == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("cannot ignore signal {sig}"));
            }
            *old = prev;
        }
        Ok(Self { previous })
    }
}

impl Drop for IgnoreTermSignals {
    fn drop(&mut self) {
        for (sig, handler) in self.previous {
            // SAFETY: restores a disposition that was in place before.
            unsafe { libc::signal(sig, handler) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_commands_shell_style() {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "--features", "llvm-22", "a b", "it's", ""]);
        assert_eq!(
            describe(&cmd),
            r"cargo install --features llvm-22 'a b' 'it'\''s' ''"
        );
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let status = Command::new("sh")
            .args(["-c", "exit 3"])
            .status()
            .expect("sh runs");
        assert_eq!(exit_code(status), 3);
        let status = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .expect("sh runs");
        assert_eq!(exit_code(status), 128 + 9);
    }

    #[test]
    fn foreground_child_gets_default_signals_back() {
        // The child must not inherit "ignore": a SIGTERM to it still ends it.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "kill -TERM $$; sleep 5"]);
        let code = foreground(&mut cmd).expect("sh runs");
        assert_eq!(code, 128 + libc::SIGTERM);
    }
}
