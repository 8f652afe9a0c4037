//! Support code shared by cityplane's tests and benchmarks: child processes
//! and their /proc figures, mosquitto next to our broker, a throwaway
//! PostgreSQL for the store, a description of
//! the machine, a minimal HTTP client (the dashboard's), benchmark output, loop-mounted ext4 images and TLS clients
//! of the project PKI, and certificates `cityplane certs` would refuse to
//! issue (forged with the project CA's key, as an attacker holding it would).
//!
//! A dev-dependency only: nothing here is part of a shipped binary.

pub mod bench;
pub mod forge;
pub mod http;
pub mod loopdev;
pub mod machine;
pub mod mosquitto;
pub mod postgres;
pub mod process;
pub mod tls;
