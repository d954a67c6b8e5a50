//! # nowconnect-shared
//!
//! The runtime-neutral half of every NowConnect adapter, written once:
//! configuration files and their errors, JWT verification and issuing,
//! Prometheus metric names, logging setup and TLS material loading. Nothing
//! here depends on an async runtime; the tokio and async-std adapters both
//! build on it.
#![forbid(unsafe_code)]

pub mod config;
pub mod driver;
pub mod jwt;
pub mod logging;
pub mod metrics;
pub mod tls;
pub mod tung;
