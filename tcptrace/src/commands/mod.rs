//! The command line ([`cli`], [`config`]) and the commands: `run` (the
//! agent, [`run`]), `leaks` and `timewait` ([`snapshot`]). Thin: each
//! parses, builds the parts and hands over.

pub mod cli;
pub mod config;
pub mod run;
pub mod snapshot;
