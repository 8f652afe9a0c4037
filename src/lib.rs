//! Library side of the `cityplane` binary: the operator client and the
//! auditor's compliance page, shared with integration tests and benchmarks.

pub mod client;
/// The auditor's compliance page, rendered from the controller's report.
pub mod compliance_html;
