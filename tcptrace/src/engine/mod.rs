//! The pure core: ring-buffer bytes to records ([`decode`], [`reorder`]),
//! per-socket state ([`tracker`]), what reaches the output ([`filter`],
//! [`events`]), CLOSE_WAIT leaks ([`closewait`], [`groups`], [`leak`],
//! [`lastuse`]) and TIME_WAIT port pressure ([`timewait`]).
//!
//! No root, no kernel, no I/O: everything here is fed values and returns
//! values, so it is unit-tested, fuzzed and benchmarked as a library. The
//! only outside fact it reads is the clock ([`clock`]). Nothing here imports
//! from the edges ([`crate::kernel`], [`crate::host`]) or the outputs.

pub mod clock;
pub mod closewait;
pub mod decode;
pub mod events;
pub mod filter;
pub mod frame;
pub mod groups;
pub mod identity;
pub mod jit;
pub mod lastuse;
pub mod leak;
pub mod reorder;
pub mod state;
pub mod timewait;
pub mod tracker;
