//! # nowconnect-async-std
//!
//! The second runtime of NowConnect: the same sans-IO core
//! (`nowconnect-core`) and the same runtime-neutral plumbing
//! (`nowconnect-shared`: configuration, JWT, metrics, flow pipes, WebSocket
//! writer) driven by async-std sockets, async-tungstenite and futures-rustls.
//! It holds only what is specific to async-std: sockets, tasks, timers and
//! signals. async-std is discontinued upstream; see `docs/runtimes.md` for the
//! situation and the upgrade path (smol shares its reactor).
#![forbid(unsafe_code)]

pub mod agent;
pub mod hub;
pub mod net;
