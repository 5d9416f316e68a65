//! tcptrace: every TCP state change on a Linux host, from an eBPF
//! tracepoint to one line per transition.
//!
//! The crate is a pure middle with the kernel at one edge and stdout at the
//! other: [`decode`] turns ring-buffer bytes into records, [`tracker`] keeps
//! per-socket state (durations, owners), [`filter`] and [`output`] choose
//! and format lines; [`pipeline`] chains them. [`tracefs`], [`btf`],
//! [`layout`], [`probe`] and [`agent`] deal with the kernel and the process.

pub mod agent;

pub mod btf;
pub mod cli;
pub mod clock;
pub mod closewait;
pub mod config;
pub mod cwtable;
pub mod decode;
pub mod events;
pub mod filter;
pub mod groups;
pub mod inventory;
pub mod jit;
pub mod jsonline;
pub mod lastuse;
pub mod layout;
pub mod leak;
pub mod mapped;
pub mod maps;
pub mod metrics;
pub mod metrics_server;
pub mod nshelper;

pub mod output;
pub mod pipeline;
pub mod portspace;
pub mod privileges;
pub mod probe;
pub mod procfs;
pub mod progstats;
pub mod reorder;
pub mod report;
pub mod report_cmd;
pub mod sinks;
pub mod sockdiag;
pub mod stage;
pub mod state;
pub mod support;
pub mod symbolize;
pub mod syslog;
pub mod timewait;
pub mod tracefs;
pub mod tracker;
pub mod unwind;
