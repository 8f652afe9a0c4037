//! The crate's integration tests: one binary (link time on 2 cores), one
//! module per subject.

mod certs;
mod common;
mod crl_mosquitto;
mod hardening;
mod overlap;
mod rotation;
