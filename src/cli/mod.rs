//! The command implementations of the `multifeed` binary.

pub mod commands;
pub mod config;
pub mod demo;
pub mod ndjson;
pub mod net;
pub mod output;
pub mod progress;
pub mod remote;
pub mod report;
pub mod signal;
pub mod store;
