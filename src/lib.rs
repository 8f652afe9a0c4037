//! Library side of the `cityplane` binary: the operator client, shared with
//! integration tests and benchmarks.

pub mod client;
