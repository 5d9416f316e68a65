//! The state file: the current leaks and TIME_WAIT counts on disk, for
//! `tcptrace leaks` and `tcptrace timewait` (see [`crate::output::report`]).
//! Rewritten atomically (a temporary file renamed over it), so that a
//! reader never sees half of one. Failures are logged once: the trace
//! itself must not stop because /run is read-only.

use std::path::PathBuf;

use crate::output::report::Snapshot;

/// Where the snapshot goes (`none`: nowhere), and whether a failure was
/// said already.
pub struct StateFile {
    path: Option<PathBuf>,
    warned: bool,
}

impl StateFile {
    /// A state file at `path`; `none` or an empty path writes none.
    pub fn new(path: &str) -> Self {
        Self {
            path: (path != "none" && !path.is_empty()).then(|| path.into()),
            warned: false,
        }
    }

    /// Whether snapshots are written at all.
    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Replaces the file with `snapshot`; a failure is logged (once) and
    /// otherwise ignored.
    pub fn write(&mut self, snapshot: &Snapshot) {
        let Some(path) = &self.path else { return };
        let result = (|| -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec(snapshot).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&tmp, path)
        })();
        match result {
            Ok(()) => {}
            Err(e) if !self.warned => {
                self.warned = true;
                log::warn!(
                    "cannot write the leak state file {} ({e}); `tcptrace leaks` will take a live \
                     inventory instead; set --state-file to a writable path or `none`",
                    path.display()
                );
            }
            Err(_) => {}
        }
    }

    /// Removes the file: no agent, no snapshot (the commands then take a
    /// live inventory).
    pub fn remove(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            schema: crate::output::report::SNAPSHOT_SCHEMA,
            agent_pid: 1,
            taken_at: "2026-12-06T00:00:00Z".into(),
            leaks: Vec::new(),
            time_wait: Vec::new(),
        }
    }

    #[test]
    fn written_whole_and_removed() {
        let dir = std::env::temp_dir().join(format!("tcptrace-statefile-{}", std::process::id()));
        let path = dir.join("sub").join("leaks.json");
        let mut f = StateFile::new(path.to_str().expect("utf8 path"));
        assert!(f.enabled());
        f.write(&snapshot());
        let back: Snapshot =
            serde_json::from_slice(&std::fs::read(&path).expect("written")).expect("json");
        assert_eq!(back.agent_pid, 1);
        assert!(!path.with_extension("json.tmp").exists());
        f.remove();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn none_writes_nothing() {
        let mut f = StateFile::new("none");
        assert!(!f.enabled());
        f.write(&snapshot());
        assert!(!StateFile::new("").enabled());
    }
}
