//! cityplane's fleet on an external, clustered broker (RabbitMQ's MQTT
//! plugin): start a cluster on loopback from the project PKI
//! ([`rabbit`]), and provision its users and permissions from the PKI's
//! records ([`provision`]), through its management API ([`mgmt`]).
//! See docs/DEPLOYMENT.md for what holds there and what does not.

pub mod mgmt;
pub mod provision;
pub mod rabbit;
