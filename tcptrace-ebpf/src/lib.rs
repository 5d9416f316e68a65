//! Host-side stub: the kernel program lives in `main.rs` and is built for
//! `bpfel-unknown-none` by the agent's build script. This library target only
//! exists so that the agent can name this crate as a build dependency.
#![no_std]
