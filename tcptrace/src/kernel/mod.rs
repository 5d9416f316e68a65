//! The kernel edge: what the kernel offers ([`support`], [`btf`],
//! [`tracefs`]), the program's configuration ([`layout`]), loading and
//! attaching it ([`probe`]), and reading its maps ([`maps`], [`mapped`],
//! [`cwtable`], [`lastuse_map`], [`progstats`], [`stage`]).
//!
//! Above the pure core and the host edge (it asks [`crate::host::privileges`]
//! why a load failed); below the outputs, which expose its counters.

pub mod btf;
pub mod cwtable;
pub mod lastuse_map;
pub mod layout;
pub mod mapped;
pub mod maps;
pub mod probe;
pub mod progstats;
pub mod stage;
pub mod support;
pub mod tracefs;
