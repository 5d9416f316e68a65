//! Outputs: event lines ([`format`](mod@format), [`jsonline`]) and where they go
//! ([`sinks`], [`syslog`]); the metrics exposition ([`metrics`]) and its
//! HTTP endpoint ([`metrics_server`]); the leak and TIME_WAIT snapshot that
//! the state file carries and `tcptrace leaks` renders ([`report`],
//! [`statefile`]).

pub mod flame;
pub mod format;
pub mod jsonline;
pub mod metrics;
pub mod metrics_server;
pub mod report;
pub mod sinks;
pub mod statefile;
pub mod syslog;
