//! The cityplane controller: desired vs reported state, reconciled
//! level-triggered and stored durably in sled.
//!
//! - [`delta`]: desired-state arithmetic (merge by priority, delta).
//! - [`reconcile`]: the pure decision for one device.
//! - [`fleet`]: in-memory fleet state and its transitions (no I/O).
//! - [`shard`]: which controller acts on which device (pure: hash, rendezvous).
//! - [`rollout`]: rollouts' spec, records and pure decisions (waves, gates, abort).
//! - [`window`]: maintenance windows in a named time zone.
//! - [`store`]: sled behind a small interface, durable commits.
//! - [`runtime`]: the event loop wired to the broker.
//! - [`window`]: maintenance windows (when a rollout may start devices).

pub mod audit;
pub mod delta;
pub mod fleet;
pub mod input;
pub mod model;
pub mod orgs;
pub mod reconcile;
pub mod reported;
pub mod rollout;
pub mod runtime;
pub mod secrets;
pub mod shard;
pub mod signin;
pub mod store;
pub mod window;

pub use runtime::{Controller, ControllerConfig, ControllerError, OperatorApi, Refusal, StoreUrl};
