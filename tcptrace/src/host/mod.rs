//! The host edge: /proc ([`procfs`]), the kernel's socket lists
//! ([`sockdiag`], [`inventory`], [`portspace`]), network namespaces
//! ([`nshelper`]), the agent's own capabilities ([`privileges`]), and
//! turning a leak's addresses into code ([`enrich`], [`symbolize`],
//! [`unwind`]).
//!
//! Reads the host; builds the pure core's values from what it read.

pub mod enrich;
pub mod inventory;
pub mod names;
pub mod nshelper;
pub mod owners;
pub mod portspace;
pub mod privileges;
pub mod procfs;
pub mod sockdiag;
pub mod symbolize;
pub mod unwind;
