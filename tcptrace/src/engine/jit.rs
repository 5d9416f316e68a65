//! Names of JIT-compiled code, as runtimes write them to perf maps
//! (`/tmp/perf-PID.map` in the process's own root, which blazesym reads).
//!
//! A perf map gives one string per code range, in the runtime's own
//! format: V8 (Node `--perf-basic-prof`) writes
//! `JS:~checkout /srv/app/pool.js:7:26`, CPython 3.12 `-X perf` writes
//! `py::checkout:/srv/app/pool.py`, a Java perf-map agent writes
//! `Lcom/example/Pool;::checkout`. [`parse`] splits what it recognises
//! into function, file and line, so a JavaScript frame reads like a C one
//! and the leak line can say `checkout (pool.js:7)`; anything else is kept
//! whole as the function's name.

/// A perf-map name taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitName {
    /// The function (`(anonymous)` for V8's unnamed functions).
    pub function: String,
    /// The script or source file, if the runtime names it.
    pub file: Option<String>,
    /// The line the function starts at (V8 names the definition, not the
    /// line executing), if the runtime names it.
    pub line: Option<u32>,
}

/// V8's code kinds that are JavaScript functions; the rest (`Builtin:`,
/// `BytecodeHandler:`, `Stub:`, `RegExp:`) are the engine's own code.
const V8_FUNCTION_KINDS: &[&str] = &["JS:", "LazyCompile:", "Function:", "Script:"];

/// V8's tier markers before a function's name: `~` interpreted (or
/// baseline), `^` Sparkplug, `+` Maglev, `*` TurboFan.
const V8_TIERS: &[char] = &['~', '^', '+', '*'];

/// `name` taken apart when it is a format [`parse`] knows; else the whole
/// string as the function.
pub fn parse(name: &str) -> JitName {
    parse_v8(name)
        .or_else(|| parse_python(name))
        .unwrap_or_else(|| JitName {
            function: name.to_string(),
            file: None,
            line: None,
        })
}

/// `JS:~name file:line:col` (Node >= 18), `LazyCompile:*name file:line:col`
/// (older V8). Function names hold no spaces except a getter's or setter's
/// `get `/`set ` prefix, so the location is what follows the last space.
fn parse_v8(name: &str) -> Option<JitName> {
    let rest = V8_FUNCTION_KINDS
        .iter()
        .find_map(|kind| name.strip_prefix(kind))?;
    let rest = rest.trim_start_matches(V8_TIERS);
    let (function, location) = match rest.rsplit_once(' ') {
        Some((f, loc)) => (f, Some(loc)),
        None => (rest, None),
    };
    let function = if function.is_empty() {
        "(anonymous)".to_string()
    } else {
        function.to_string()
    };
    let (file, line) = match location {
        Some(loc) => match file_line_column(loc) {
            Some((file, line)) => (Some(file.to_string()), Some(line)),
            None => (Some(loc.to_string()), None),
        },
        None => (None, None),
    };
    Some(JitName {
        function,
        file,
        line,
    })
}

/// `file:line:col` as (file, line).
fn file_line_column(loc: &str) -> Option<(&str, u32)> {
    let (rest, col) = loc.rsplit_once(':')?;
    col.parse::<u32>().ok()?;
    let (file, line) = rest.rsplit_once(':')?;
    Some((file, line.parse().ok()?)).filter(|(f, _)| !f.is_empty())
}

/// `py::name:/path/file.py` (CPython >= 3.12 with `-X perf`).
fn parse_python(name: &str) -> Option<JitName> {
    let rest = name.strip_prefix("py::")?;
    let (function, file) = rest.split_once(':')?;
    Some(JitName {
        function: function.to_string(),
        file: Some(file.to_string()).filter(|f| !f.is_empty()),
        line: None,
    })
}

/// Whether a JIT frame (named `function`, in `file`) is the runtime's or
/// its standard library's code rather than the program's: Node's own
/// modules (`node:net`, `internal/...`), V8's builtins, CPython's standard
/// library, the JDK's classes.
pub fn is_runtime(function: &str, file: Option<&str>) -> bool {
    const RUNTIME_FILES: &[&str] = &["node:", "internal/", "native ", "<frozen "];
    const RUNTIME_FUNCTIONS: &[&str] = &[
        "Builtin:",
        "BytecodeHandler:",
        "Stub:",
        "RegExp:",
        "Ljava/",
        "Ljdk/",
        "Lsun/",
    ];
    if RUNTIME_FUNCTIONS.iter().any(|p| function.starts_with(p)) {
        return true;
    }
    file.is_some_and(|f| RUNTIME_FILES.iter().any(|p| f.starts_with(p)) || is_python_stdlib(f))
}

/// `/usr/lib/python3.12/socket.py`, `/usr/local/lib/python3.12/...`, but
/// not a virtualenv's `site-packages` (the program's dependencies count
/// as its code, as Go's do not; there is no module cache to tell them by).
fn is_python_stdlib(file: &str) -> bool {
    file.split_once("/lib/python3")
        .is_some_and(|(_, rest)| !rest.contains("-packages/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jit(function: &str, file: Option<&str>, line: Option<u32>) -> JitName {
        JitName {
            function: function.into(),
            file: file.map(Into::into),
            line,
        }
    }

    #[test]
    fn v8_names_split_into_function_file_and_line() {
        let cases = [
            (
                "JS:~checkoutAndQuery /srv/app/pool.js:7:26",
                jit("checkoutAndQuery", Some("/srv/app/pool.js"), Some(7)),
            ),
            (
                "JS:*Socket._write node:net:969:35",
                jit("Socket._write", Some("node:net"), Some(969)),
            ),
            (
                "LazyCompile:^query file:///srv/app/db.mjs:12:3",
                jit("query", Some("file:///srv/app/db.mjs"), Some(12)),
            ),
            // An arrow function has no name.
            (
                "JS:~ /srv/app/pool.js:12:14",
                jit("(anonymous)", Some("/srv/app/pool.js"), Some(12)),
            ),
            // A getter keeps its prefix.
            (
                "JS:+get size /srv/app/pool.js:3:9",
                jit("get size", Some("/srv/app/pool.js"), Some(3)),
            ),
            // A location without line and column stays the file.
            (
                "Script:~ evalmachine.<anonymous>",
                jit("(anonymous)", Some("evalmachine.<anonymous>"), None),
            ),
        ];
        for (name, want) in cases {
            assert_eq!(parse(name), want, "{name}");
        }
    }

    #[test]
    fn python_names_split_into_function_and_file() {
        assert_eq!(
            parse("py::checkout:/srv/app/pool.py"),
            jit("checkout", Some("/srv/app/pool.py"), None)
        );
    }

    #[test]
    fn other_names_stay_whole() {
        for name in [
            "Lcom/example/Pool;::checkout",
            "Builtin:ArgumentsAdaptorTrampoline",
            "",
            "JS",
            "py:",
        ] {
            assert_eq!(parse(name), jit(name, None, None), "{name}");
        }
    }

    #[test]
    fn runtime_code_is_told_from_the_programs() {
        assert!(is_runtime("internalConnect", Some("node:net")));
        assert!(is_runtime("handleWriteReq", Some("internal/stream_base")));
        assert!(is_runtime("Builtin:CallFunction", None));
        assert!(is_runtime("Ljava/net/Socket;::connect", None));
        assert!(is_runtime(
            "create_connection",
            Some("/usr/lib/python3.12/socket.py")
        ));
        assert!(is_runtime(
            "_find_and_load",
            Some("<frozen importlib._bootstrap>")
        ));
        assert!(!is_runtime("checkout", Some("/srv/app/pool.js")));
        assert!(!is_runtime(
            "execute",
            Some("/srv/venv/lib/python3.12/site-packages/pymysql/cursors.py")
        ));
        assert!(!is_runtime("Lcom/example/Pool;::checkout", None));
    }
}
