//! `--config FILE`: every agent option read from a TOML file, command-line
//! flags winning over it.
//!
//! The file's keys are the long option names (`leak-after` or `leak_after`);
//! values are strings, numbers, booleans (for flags such as `ipv4`) or arrays
//! (for repeatable options such as `output`). Each setting is turned into
//! the arguments it stands for and checked by the same clap parser as the
//! command line, so the file accepts exactly what the flags accept, and an
//! error names the file, the line and the reason.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory as _, FromArgMatches as _};
use toml::{Spanned, Value};

use crate::commands::cli::Cli;

/// A config file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the offending key or value, when there is one.
    pub line: Option<usize>,
    /// What is wrong and, where it helps, what to write instead.
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One key of the file, as the arguments it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The option's long name (`leak-after`).
    pub name: String,
    /// The clap id of the option it sets.
    pub id: String,
    /// Its line in the file.
    pub line: usize,
    /// `--name value...` as on a command line.
    pub args: Vec<String>,
}

/// Options a file may not set: they are about the command line itself.
const NOT_IN_FILE: &[&str] = &["help", "version", "config"];

/// Reads and checks `path`: every setting is a known option with a valid
/// value, and the settings together are valid.
pub fn load(path: &Path) -> Result<Vec<Setting>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        line: None,
        reason: format!("cannot read the config file: {e}"),
    })?;
    parse(path, &text)
}

/// As [`load`], from the file's text.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Setting>, ConfigError> {
    let err = |line: Option<usize>, reason: String| ConfigError {
        path: path.to_path_buf(),
        line,
        reason,
    };
    // Counted in bytes: an offset inside a char (or past the end) cannot
    // panic here.
    let line_of = |offset: usize| {
        let before = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
        before.iter().filter(|&&b| b == b'\n').count() + 1
    };
    let table: BTreeMap<Spanned<String>, Spanned<Value>> = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(s.start));
        err(line, format!("not valid TOML: {}", e.message().trim()))
    })?;
    let command = Cli::command();
    let mut settings: Vec<Setting> = Vec::new();
    let mut keys: Vec<_> = table.iter().collect();
    // In file order, so that the first error is the first in the file.
    keys.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in keys {
        let line = line_of(key.span().start);
        let name = key.get_ref().replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()))
            .filter(|_| !NOT_IN_FILE.contains(&name.as_str()))
            .ok_or_else(|| {
                err(
                    Some(line),
                    format!(
                        "unknown option {:?}; keys are the long options of `tcptrace --help` \
                         (e.g. leak-after, output, port)",
                        key.get_ref()
                    ),
                )
            })?;
        if let Some(first) = settings.iter().find(|s| s.name == name) {
            return Err(err(
                Some(line),
                format!("{name} is already set on line {}", first.line),
            ));
        }
        let flag = format!("--{name}");
        let takes_value = !matches!(arg.get_action(), ArgAction::SetTrue);
        let value_optional = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let scalar = |v: &Value| -> Result<String, String> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Integer(i) => Ok(i.to_string()),
                Value::Float(f) => Ok(f.to_string()),
                // An on/off option (`last-use = false`): its parser
                // takes true and false as well as on and off.
                Value::Boolean(b) => Ok(b.to_string()),
                other => Err(format!(
                    "{name} takes a string or a number, not {}",
                    other.type_str()
                )),
            }
        };
        let args: Result<Vec<String>, String> = match value.get_ref() {
            Value::Boolean(b) if !takes_value || value_optional => {
                Ok(if *b { vec![flag.clone()] } else { Vec::new() })
            }
            _ if !takes_value => Err(format!("{name} is a switch: write {name} = true")),
            Value::Array(items) if repeatable => items
                .iter()
                .map(|v| scalar(v).map(|s| format!("{flag}={s}")))
                .collect(),
            Value::Array(_) => Err(format!("{name} takes one value, not a list")),
            v => scalar(v).map(|s| vec![format!("{flag}={s}")]),
        };
        let args = args.map_err(|reason| err(Some(line_of(value.span().start)), reason))?;
        // The same parser as the command line judges the value.
        let argv = std::iter::once("tcptrace".to_string()).chain(args.iter().cloned());
        if let Err(e) = command.clone().try_get_matches_from(argv) {
            return Err(err(Some(line_of(value.span().start)), clap_reason(&e)));
        }
        settings.push(Setting {
            name,
            id: arg.get_id().to_string(),
            line,
            args,
        });
    }
    // Together (e.g. ipv4 and ipv6 both set).
    let argv = std::iter::once("tcptrace".to_string())
        .chain(settings.iter().flat_map(|s| s.args.iter().cloned()));
    command
        .try_get_matches_from(argv)
        .map_err(|e| err(None, clap_reason(&e)))?;
    Ok(settings)
}

/// Whether options `a` and `b` exclude each other (declared on either).
fn conflict(command: &clap::Command, a: &str, b: &str) -> bool {
    let declared = |x: &str, y: &str| {
        command
            .get_arguments()
            .find(|arg| arg.get_id() == x)
            .is_some_and(|arg| {
                command
                    .get_arg_conflicts_with(arg)
                    .iter()
                    .any(|c| c.get_id() == y)
            })
    };
    declared(a, b) || declared(b, a)
}

/// The first line of a clap error, without its `error: ` prefix.
pub fn clap_reason(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid value").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Why the command line could not become a [`Cli`].
#[derive(Debug)]
pub enum ArgsError {
    /// Bad flags, `--help` or `--version`: clap prints and exits.
    Clap(clap::Error),
    /// A bad `--config` file.
    Config(ConfigError),
}

/// Parses the command line, merging in the `--config` file if one is named:
/// a setting in the file applies unless the same option is on the command
/// line.
pub fn parse_args(args: Vec<OsString>) -> Result<Cli, ArgsError> {
    let command = Cli::command();
    let matches = command
        .clone()
        .try_get_matches_from(&args)
        .map_err(ArgsError::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(ArgsError::Clap)?;
    let Some(path) = cli.config.clone() else {
        return Ok(cli);
    };
    let settings = load(&path).map_err(ArgsError::Config)?;
    let mut merged: Vec<OsString> = args.iter().take(1).cloned().collect();
    let on_command_line = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    for s in &settings {
        // The flag wins over the file's value, and over the file's choice of
        // an exclusive alternative (`-6` on the command line, `ipv4` in the file).
        let overridden = on_command_line(&s.id)
            || command
                .get_arguments()
                .filter(|c| on_command_line(c.get_id().as_str()))
                .any(|c| conflict(&command, c.get_id().as_str(), &s.id));
        if !overridden {
            merged.extend(s.args.iter().map(OsString::from));
        }
    }
    merged.extend(args.iter().skip(1).cloned());
    let matches = command.try_get_matches_from(merged).map_err(|e| {
        ArgsError::Config(ConfigError {
            path: path.clone(),
            line: None,
            reason: format!("with the command line: {}", clap_reason(&e)),
        })
    })?;
    Cli::from_arg_matches(&matches).map_err(ArgsError::Clap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(text: &str) -> Result<Vec<Setting>, ConfigError> {
        parse(Path::new("t.toml"), text)
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn every_kind_of_option_is_read() {
        let settings = check(
            "# a comment\n\
             leak-after = \"10s\"\n\
             leak_lines_per_group = 3\n\
             port = [80, 443]\n\
             output = [\"stdout\", \"tcp://127.0.0.1:9000\"]\n\
             ipv6 = true\n\
             events = \"leak,summary\"\n\
             metrics = true\n",
        )
        .expect("valid");
        assert_eq!(settings.len(), 7);
        assert_eq!(settings[0].args, ["--leak-after=10s"]);
        assert_eq!(settings[0].line, 2);
        assert_eq!(settings[2].args, ["--port=80", "--port=443"]);
        assert_eq!(settings[6].args, ["--metrics"]);
    }

    #[test]
    fn an_on_off_option_takes_a_boolean_or_a_word() {
        let settings = check("last-use = false\nlast_use_gap = \"50ms\"\n").expect("valid");
        assert_eq!(settings[0].args, ["--last-use=false"]);
        let settings = check("last-use = \"off\"\n").expect("valid");
        assert_eq!(settings[0].args, ["--last-use=off"]);
        assert!(check("last-use = \"maybe\"\n").is_err());
    }

    #[test]
    fn errors_name_the_line_and_the_reason() {
        for (text, line, needle) in [
            (
                "leak-after = \"10s\"\nbogus = 1\n",
                Some(2),
                "unknown option \"bogus\"",
            ),
            ("\n\nport = 70000\n", Some(3), "70000"),
            ("leak-after = \"soon\"\n", Some(1), "soon"),
            ("ipv4 = \"yes\"\n", Some(1), "switch"),
            ("format = [\"json\"]\n", Some(1), "one value"),
            (
                "output = \"carrier-pigeon://x\"\n",
                Some(1),
                "unknown output",
            ),
            (
                "port = 1\n[metrics]\naddr = 1\n",
                Some(2),
                "string or a number",
            ),
            ("leak-after = 10s\n", Some(1), "not valid TOML"),
            ("ipv4 = true\nipv6 = true\n", None, "cannot be used with"),
            (
                "leak-after = \"1s\"\nleak_after = \"2s\"\n",
                Some(2),
                "already set on line 1",
            ),
            ("config = \"x.toml\"\n", Some(1), "unknown option"),
        ] {
            let e = check(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn errors_after_text_of_several_bytes_per_char_name_their_line() {
        // The line is counted in bytes up to the error's offset: no offset
        // can split a char there and panic (defensive; the fuzz target
        // found none).
        for (text, line) in [
            (
                "leak-after = \"10s\" # \u{e9}t\u{e9}\nport = \"\u{fc}\"\n",
                2,
            ),
            ("# \u{1f600}\n\u{1f600} = 1\n", 2),
            ("\u{e9}\u{e9}\u{e9}", 1),
        ] {
            let e = check(text).expect_err(text);
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("tcptrace-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "leak-after = \"10s\"\nport = [80, 443]\nqueue-size = 100\nipv4 = true\n",
        )
        .expect("write");
        let path = file.to_string_lossy().to_string();
        let cli = parse_args(args(&["tcptrace", "--config", &path, "--port", "22", "-6"]));
        let _ = std::fs::remove_dir_all(&dir);
        let cli = cli.map_err(|e| format!("{e:?}")).expect("parsed");
        assert_eq!(cli.ports, [22], "the flag replaces the file's list");
        assert_eq!(cli.leak_after, Duration::from_secs(10), "the file applies");
        assert_eq!(cli.queue_size, 100);
        assert!(
            cli.ipv6 && !cli.ipv4,
            "-6 on the command line wins over ipv4 in the file"
        );
    }

    #[test]
    fn a_missing_file_is_a_config_error() {
        match parse_args(args(&["tcptrace", "--config", "/nonexistent/t.toml"])) {
            Err(ArgsError::Config(e)) => assert!(e.reason.contains("cannot read")),
            other => panic!("{other:?}"),
        }
    }
}
