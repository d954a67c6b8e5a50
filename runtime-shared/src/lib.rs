//! # nowconnect-shared
//!
//! The runtime-neutral half of every NowConnect adapter, written once:
//! configuration files and their errors, JWT verification and issuing,
//! keeping secrets out of logs ([`redact`]),
//! Prometheus metric names, logging setup and TLS material loading, and the
//! hub itself (control loop, tunnels, clients, mesh, drain, reload) over a
//! small runtime trait ([`hub::HubRt`]). Nothing here depends on an async
//! runtime; the tokio and async-std adapters both build on it. The Redis
//! registry is compiled in with the feature naming the adapter's runtime
//! (`redis-tokio`, `redis-smol`).
#![forbid(unsafe_code)]

pub mod agent;
pub mod agent_http;
pub mod agent_status;
pub mod config;
pub mod driver;
pub mod http;
pub mod http_wire;
pub mod hub;
pub mod jwt;
pub mod keyfiles;
pub mod logging;
pub mod mesh;
pub mod mesh_ingress;
pub mod metrics;
pub mod nofile;
pub mod proxy_protocol;
pub mod redact;
#[cfg(any(feature = "redis-tokio", feature = "redis-smol"))]
pub mod registry;
pub mod rt;
pub mod tls;
pub mod token_renewal;
pub mod tung;
