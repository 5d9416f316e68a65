//! tcptrace: every TCP state change on a Linux host, from an eBPF
//! tracepoint to one line per transition, and the CLOSE_WAIT leaks and
//! TIME_WAIT pressure those lines reveal.
//!
//! The tree follows the data, edges outside and a pure middle:
//!
//! - [`kernel`]: loads and attaches the eBPF program, reads its maps.
//! - [`host`]: /proc, sock_diag, network namespaces, privileges,
//!   symbolizing and unwinding stacks.
//! - [`engine`]: the pure core, decode -> tracker -> detectors. No root, no
//!   kernel, no I/O.
//! - [`output`]: line formats, sinks, syslog, metrics, the state file.
//! - [`pipeline`]: one record through the core to its output lines.
//! - [`agent`]: the running agent's loop and its periodic duties.
//! - [`commands`]: the command line and each command, kept thin.
//!
//! Imports only point down this list's order of layers (engine, host,
//! kernel, output, pipeline, agent, commands); none goes in a circle.

pub mod agent;
pub mod commands;
pub mod engine;
pub mod host;
pub mod kernel;
pub mod output;
pub mod pipeline;
