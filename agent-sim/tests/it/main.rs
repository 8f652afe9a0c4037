//! The crate's integration tests: one binary (link time on 2 cores), one
//! module per subject.

mod common;
mod contract;
mod faults;
mod firmware;
mod mosquitto;
mod nodes;
mod releases;
mod rotation;
mod scenarios;
