//! Debian packages, installed on demand: a fresh machine has empty package
//! lists, so `apt-get update` runs once before the first install.

use std::process::Command;

use anyhow::{bail, Context as _};

use crate::cmd;

/// Installs missing Debian packages, updating the lists at most once.
#[derive(Default)]
pub struct Apt {
    updated: bool,
}

/// True when `dpkg` reports `pkg` installed.
pub fn installed(pkg: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

impl Apt {
    /// Makes sure every package of `pkgs` is installed; `why` says what for.
    pub fn ensure(&mut self, pkgs: &[&str], why: &str) -> anyhow::Result<()> {
        let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !cmd::is_root() {
            bail!(
                "Debian packages {} are needed ({why}); install them as root: \
                 apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {} ({why})", missing.join(" "));
        if !self.updated {
            cmd::run(Command::new("apt-get").arg("update"))
                .context("updating the Debian package lists")?;
            self.updated = true;
        }
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("installing {}", missing.join(" ")))
    }
}
