//! # nowconnect-core
//!
//! The sans-IO heart of NowConnect: frames and their two codecs, flows with
//! sequence numbers and per-flow credit, duplicate suppression, epoch fencing,
//! the mesh link, the routing decision, and the hub and agent state machines.
//!
//! Nothing here touches a socket, a clock or a thread. Every state machine
//! takes `now` as a parameter, reports what to do through `poll_*` methods,
//! and says when it next wants to be woken (`poll_timeout`). Runtimes
//! (`nowconnect-tokio`, `nowconnect-async-std`) and the simulator drive it.
#![forbid(unsafe_code)]

pub mod admission;
pub mod agent;
pub mod agent_node;
pub mod backoff;
pub mod client_timeouts;
pub mod codec;
pub mod dedup;
pub mod flow;
pub mod frame;
pub mod hub;
pub mod hub_node;
pub mod mesh_link;
pub mod mux;
pub mod payload;
pub mod registry;
pub mod relay;
pub mod renewal;
pub mod rng;
pub mod routing;
pub mod tenant;
pub mod timer;
pub mod tunnel;

pub use codec::{Codec, CodecError, WsMessage};
pub use frame::{Cid, Epoch, ErrorCode, Frame, FrameType, Limits, MeshHeader, Seq};
pub use payload::Payload;
