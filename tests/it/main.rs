//! The crate's integration tests: one binary (link time on 2 cores), one
//! module per subject.

mod audit;
mod certs_hardening;
mod cluster;
mod common;
mod crash;
mod dashboard;
mod demo;
mod deployments;
mod disk_full;
mod firmware;
mod fleet;
mod governance;
mod incidents;
mod policy_cli;
mod postgres_store;
mod registry_cli;
mod rollouts;
mod rotation;
mod secrets;
mod standby;
mod tidy;
