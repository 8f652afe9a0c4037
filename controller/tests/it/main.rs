//! The crate's integration tests: one binary (link time on 2 cores), one
//! module per subject.

mod backlog;
mod bad_input;
mod commit_order;
mod common;
mod converge;
mod durability;
mod external;
mod guards;
mod input_hardening;
mod internal_links;
mod registry;
mod shards;
mod store_engines;
mod store_torture;
