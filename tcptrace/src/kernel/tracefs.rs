//! tracefs: find (or mount) it, and read tracepoint `format` files.
//!
//! Tracepoint field offsets change across kernel versions (the `protocol`
//! field of `inet_sock_set_state` grew from u8 to u16 around 5.6), so the
//! kernel program gets them from here at load time instead of constants.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where tracefs lives on current systems, and where we mount it.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The legacy location under debugfs.
pub const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Field name, without array brackets.
    pub name: String,
    /// Byte offset in the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// A parsed `format` file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    /// Every field, common ones included.
    pub fields: Vec<Field>,
}

/// tracefs problems, each with what to do about it.
#[derive(Debug)]
pub enum TracefsError {
    /// Neither location has tracefs and mounting failed.
    NotMounted {
        /// Why the mount failed.
        mount_error: std::io::Error,
    },
    /// The tracepoint's `format` file does not exist.
    TracepointMissing {
        /// `category:name`.
        tracepoint: String,
        /// Path looked at.
        path: PathBuf,
    },
    /// The `format` file could not be read.
    Read {
        /// Path read.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The `format` file lacks a field or has an unexpected one.
    Layout {
        /// `category:name`.
        tracepoint: String,
        /// What is wrong.
        problem: String,
    },
}

impl fmt::Display for TracefsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMounted { mount_error } => write!(
                f,
                "tracefs is not mounted (looked at {TRACEFS} and {DEBUGFS_TRACING}) and mounting it \
                 failed: {mount_error}; mount it with `mount -t tracefs nodev {TRACEFS}` (needs \
                 CAP_SYS_ADMIN), or in a container bind-mount the host's {TRACEFS}"
            ),
            Self::TracepointMissing { tracepoint, path } => write!(
                f,
                "tracepoint {tracepoint} not found ({} does not exist); it needs Linux >= 4.16 \
                 with CONFIG_TRACEPOINTS",
                path.display()
            ),
            Self::Read { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            Self::Layout {
                tracepoint,
                problem,
            } => write!(f, "unsupported layout of tracepoint {tracepoint}: {problem}"),
        }
    }
}

impl std::error::Error for TracefsError {}

fn has_events(dir: &Path) -> bool {
    dir.join("events").is_dir()
}

/// Returns the tracefs directory, mounting tracefs at [`TRACEFS`] when it is
/// not mounted anywhere (as `bpftrace` and `perf` do).
pub fn locate_or_mount() -> Result<PathBuf, TracefsError> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if has_events(Path::new(dir)) {
            return Ok(PathBuf::from(dir));
        }
    }
    mount_tracefs().map_err(|mount_error| TracefsError::NotMounted { mount_error })?;
    log::info!("mounted tracefs at {TRACEFS}");
    if has_events(Path::new(TRACEFS)) {
        Ok(PathBuf::from(TRACEFS))
    } else {
        Err(TracefsError::NotMounted {
            mount_error: std::io::Error::other("mounted, but it has no events directory"),
        })
    }
}

fn mount_tracefs() -> std::io::Result<()> {
    rustix::mount::mount(
        "nodev",
        "/sys/kernel/tracing",
        "tracefs",
        rustix::mount::MountFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Reads and parses `events/<category>/<name>/format`.
pub fn read_format(tracefs: &Path, category: &str, name: &str) -> Result<Format, TracefsError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            TracefsError::TracepointMissing {
                tracepoint: format!("{category}:{name}"),
                path: path.clone(),
            }
        } else {
            TracefsError::Read {
                path: path.clone(),
                error,
            }
        }
    })?;
    Ok(parse_format(&text))
}

/// Parses the text of a `format` file; lines that are not fields are skipped.
pub fn parse_format(text: &str) -> Format {
    let fields = text.lines().filter_map(parse_field_line).collect();
    Format { fields }
}

/// `\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;`
fn parse_field_line(line: &str) -> Option<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    for part in line.trim().split(';') {
        let part = part.trim();
        if let Some(d) = part.strip_prefix("field:") {
            decl = Some(d);
        } else if let Some(o) = part.strip_prefix("offset:") {
            offset = o.trim().parse().ok();
        } else if let Some(s) = part.strip_prefix("size:") {
            size = s.trim().parse().ok();
        }
    }
    let decl = decl?;
    // The name is the last identifier: drop array brackets, then take what
    // follows the last space or `*`.
    let decl = decl.split('[').next()?.trim_end();
    let name = decl.rsplit([' ', '*']).next()?.trim();
    if name.is_empty() {
        return None;
    }
    Some(Field {
        name: name.to_string(),
        offset: offset?,
        size: size?,
    })
}

impl Format {
    /// The named field.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of `name`, checking that its size is one of `sizes`.
    pub fn offset(&self, tracepoint: &str, name: &str, sizes: &[u32]) -> Result<u32, TracefsError> {
        let field = self.field(name).ok_or_else(|| TracefsError::Layout {
            tracepoint: tracepoint.to_string(),
            problem: format!("no field {name}"),
        })?;
        if !sizes.contains(&field.size) {
            return Err(TracefsError::Layout {
                tracepoint: tracepoint.to_string(),
                problem: format!(
                    "field {name} has size {}, expected one of {sizes:?}",
                    field.size
                ),
            });
        }
        Ok(field.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format of Linux 6.x.
    pub const INET_SOCK_SET_STATE_6X: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s\", REC->family
";

    #[test]
    fn parses_fields_of_a_real_format_file() {
        let f = parse_format(INET_SOCK_SET_STATE_6X);
        assert_eq!(f.fields.len(), 15);
        assert_eq!(
            f.field("skaddr"),
            Some(&Field {
                name: "skaddr".into(),
                offset: 8,
                size: 8
            })
        );
        assert_eq!(
            f.field("saddr_v6").map(|x| (x.offset, x.size)),
            Some((40, 16))
        );
        assert_eq!(f.offset("tp", "protocol", &[1, 2]).ok(), Some(30));
    }

    #[test]
    fn size_mismatch_and_missing_fields_are_errors() {
        let f = parse_format(INET_SOCK_SET_STATE_6X);
        let err = f.offset("sock:x", "protocol", &[1]).unwrap_err();
        assert!(
            err.to_string().contains("field protocol has size 2"),
            "{err}"
        );
        let err = f.offset("sock:x", "nope", &[1]).unwrap_err();
        assert!(err.to_string().contains("no field nope"), "{err}");
    }

    #[test]
    fn garbage_does_not_panic() {
        for text in [
            "",
            "field:",
            "field:;offset:x;size:",
            "\tfield:int ;offset:1;size:1;",
            "field:[;",
        ] {
            let _ = parse_format(text);
        }
        assert!(parse_format("field:int a;offset:1;").fields.is_empty());
    }
}
