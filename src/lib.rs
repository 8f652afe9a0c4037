//! Library side of the `cityplane` binary: the operator client and the
//! auditor's compliance page, the RabbitMQ cluster tooling, shared with
//! integration tests and benchmarks.

pub mod client;
/// RabbitMQ as a clustered broker: `cluster up/down/status/sync`.
pub mod cluster;
/// The auditor's compliance page, rendered from the controller's report.
pub mod compliance_html;
