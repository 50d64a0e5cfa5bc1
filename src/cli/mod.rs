//! The command implementations of the `multifeed` binary.

pub mod commands;
pub mod demo;
pub mod net;
pub mod output;
pub mod store;
