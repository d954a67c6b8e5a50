//! # nowconnect-tokio
//!
//! The tokio runtime of NowConnect: drives the sans-IO core
//! (`nowconnect-core`) with tokio sockets, tokio-tungstenite / axum
//! WebSockets and rustls, and hosts the `nowconnect` binary.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod driver;
pub mod hub;
pub mod jwt;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod quickstart;
pub mod registry;
pub mod tls;
