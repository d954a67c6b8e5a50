//! # nowconnect-sim
//!
//! Deterministic simulation of NowConnect's core state machines: no sockets,
//! no real time. A [`Pair`] joins two endpoints (tunnel or mesh link sides)
//! by two in-memory FIFO wires and a virtual clock that jumps to the next
//! deadline; tests decide which message is delivered when, and may inject
//! faults (duplicates, stalls, disconnects) between steps. A [`world::World`]
//! runs a hub, agents, clients and targets under a seeded fault profile.
#![forbid(unsafe_code)]

pub mod fuzz;
pub mod pair;
pub mod world;

pub use pair::{Dir, Endpoint, Pair, VirtualClock};
