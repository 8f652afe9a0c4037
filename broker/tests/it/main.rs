//! The crate's integration tests: one binary (link time on 2 cores), one
//! module per subject.

mod backlog;
mod common;
mod device_sessions;
mod device_tap;
mod edge_subscriptions;
mod fetch;
mod frame_props;
mod hardening;
mod identity;
mod limits;
mod log_floods;
mod malformed;
mod mosquitto_clients;
mod pki_hardening;
mod revocation;
mod rotation;
mod scopes;
mod tls_hardening;
mod topic_rules;
