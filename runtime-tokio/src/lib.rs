//! # nowconnect-tokio
//!
//! The tokio runtime of NowConnect: drives the sans-IO core
//! (`nowconnect-core`) with tokio sockets, tokio-tungstenite / axum
//! WebSockets and rustls, and hosts the `nowconnect` binary.
#![forbid(unsafe_code)]

pub mod agent;
pub mod hub;
pub mod io;
pub mod perf;
pub mod perf_agents;
pub mod quickstart;

pub use nowconnect_shared::{config, driver, jwt, logging, metrics, nofile, redact, registry, tls};
