//! Installs Debian packages that the build or the tests need.
//!
//! Why a helper: the project must work on a fresh Debian machine whose apt
//! lists may be empty, so the first install of an xtask run needs an
//! `apt-get update` (and only then: it is slow, and nothing is refreshed when
//! everything is already installed). Installs run non-interactively, as root
//! (through sudo when xtask is not root and sudo exists), and are checked
//! afterwards with dpkg so that a silent failure is caught here rather than
//! as a confusing build error later.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{run, say};

/// One xtask invocation's view of apt: remembers whether the package lists
/// were already refreshed.
#[derive(Debug, Default)]
pub struct Apt {
    updated: bool,
}

impl Apt {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure every package in `packages` is installed, installing the
    /// missing ones with `apt-get install -y`.
    pub fn ensure_installed(&mut self, packages: &[String]) -> Result<()> {
        if run::find_in_path("dpkg-query").is_none() || run::find_in_path("apt-get").is_none() {
            bail!(
                "cannot install Debian packages {}: dpkg-query/apt-get not found \
                 (xtask supports Debian and derivatives); install them by hand",
                packages.join(" ")
            );
        }
        let mut missing = Vec::new();
        for pkg in packages {
            if !is_installed(pkg)? {
                missing.push(pkg.clone());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let list = missing.join(" ");
        say!("installing Debian packages: {list}");
        if !self.updated {
            say!("refreshing the apt package lists first");
            let mut cmd = privileged("apt-get", &list)?;
            cmd.arg("update");
            run::checked(&mut cmd)
                .context("apt-get update failed; check the network and /etc/apt/sources.list*")?;
            self.updated = true;
        }
        let mut cmd = privileged("apt-get", &list)?;
        cmd.args(["install", "-y"]).args(&missing);
        run::checked(&mut cmd).with_context(|| {
            format!(
                "installing {list} failed; try `apt-get update && apt-get install -y {list}` \
                 as root and read apt's message"
            )
        })?;
        for pkg in &missing {
            if !is_installed(pkg)? {
                bail!("apt-get install reported success but {pkg} is still not installed");
            }
        }
        Ok(())
    }
}

/// True when dpkg reports `pkg` as "install ok installed".
pub fn is_installed(pkg: &str) -> Result<bool> {
    let out = run::capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))?;
    // dpkg-query exits 1 for a package it has never heard of.
    Ok(out.status.success() && status_is_installed(&String::from_utf8_lossy(&out.stdout)))
}

fn status_is_installed(status: &str) -> bool {
    status.trim() == "install ok installed"
}

/// `program` run as root, non-interactively: directly when xtask is root,
/// through `sudo env DEBIAN_FRONTEND=noninteractive` otherwise.
fn privileged(program: &str, packages: &str) -> Result<Command> {
    let mut cmd = if run::is_root() {
        let mut cmd = Command::new(program);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    } else {
        let Some(sudo) = run::find_in_path("sudo") else {
            bail!(
                "Debian packages {packages} are missing and installing them needs root; \
                 run xtask as root, or run `apt-get install -y {packages}` as root first"
            );
        };
        let mut cmd = Command::new(sudo);
        cmd.args(["env", "DEBIAN_FRONTEND=noninteractive", program]);
        cmd
    };
    cmd.stdin(std::process::Stdio::null());
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_strings() {
        assert!(status_is_installed("install ok installed"));
        assert!(!status_is_installed("deinstall ok config-files"));
        assert!(!status_is_installed("unknown ok not-installed"));
        assert!(!status_is_installed(""));
    }
}
