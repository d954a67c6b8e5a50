//! Driving a core link ([`Tunnel`](nowconnect_core::tunnel::Tunnel) or mesh link) and piping its flows to TCP
//! sockets or to flows on another link.
//!
//! One task per link owns the core link and a [`FlowPipes`]. One task per
//! flow socket runs [`run_flow_socket`]: its reader half sends what it reads
//! as [`PeerMsg::Data`], at most [`CHUNKS_IN_FLIGHT`] chunks ahead of what
//! the core has accepted (the core's per-flow credit is the real bound; this
//! only keeps the adapter's own buffer small); its writer half writes
//! [`Delivery::Data`] and reports [`PeerMsg::Consumed`] once written, which is
//! what grants the peer more credit. No protocol decision is made here.
//!
//! Nothing here depends on an async runtime: channels are `async-channel`,
//! sockets are `futures-io` halves, and the two concurrent halves of a flow
//! socket are joined with `futures-util` rather than spawned, so the tokio
//! and async-std adapters drive flows with the very same code.
//!
//! Here: the commands a link task takes ([`LinkCmd`], typed by the kind of
//! link: [`TunnelCmd`], [`MeshCmd`]) and what it sends
//! ([`Outgoing`]). Beside it: `pipes` ([`FlowPipes`], [`bridge`]), `tunnel`
//! ([`TunnelDriver`]), `writer` ([`InlineWriter`], [`LoopTimer`]), `socket`
//! (flow sockets and their timeouts). The agent's loop around them is
//! [`crate::agent`].

mod pipes;
mod socket;
mod tunnel;
mod writer;

use async_channel::{Receiver, Sender};
use nowconnect_core::{Cid, Epoch, ErrorCode, WsMessage};

/// Why a link could not open a flow: the core's [`SendError::refusal`](nowconnect_core::flow::SendError::refusal),
/// carried back to whoever asked for the open.
pub use nowconnect_core::flow::OpenRefused;
pub use nowconnect_core::relay::{Delivery, PeerMsg};
pub use pipes::{FlowEnd, FlowPipes, OpenLink, Peer, bridge};
pub use socket::{
    ActiveReader, ActiveWriter, Activity, ChunkReader, ClientTimeouts, FlowBytes, FlowWriter,
    ReadSize, run_client_socket, run_flow_socket,
};
pub use tunnel::TunnelDriver;
pub use writer::{InlineWriter, LoopTimer};

/// Largest read from a flow socket (and so the largest DATA payload a
/// runtime sends): 256 KiB moved 0.24x a direct loopback connection through
/// a hub against 0.18x with 64 KiB, in one `tunnel-bench` session
/// (`docs/performance.md`).
pub const READ_CHUNK: usize = 256 * 1024;

/// Chunks a flow's reader may have handed over and the core not yet taken.
pub const CHUNKS_IN_FLIGHT: usize = 2;

/// Where the answer to an open goes (a one-shot channel).
pub type Reply<T> = Sender<T>;

/// A one-shot channel for an open's answer.
pub fn reply_channel<T>() -> (Reply<T>, Receiver<T>) {
    async_channel::bounded(1)
}

/// Reader permits of one flow: a token per chunk the reader may hand over
/// ahead of the core. Closing the channel tells the reader the flow is over.
#[derive(Clone)]
pub struct Permits {
    give: Sender<()>,
    take: Receiver<()>,
}

impl Permits {
    pub fn new(n: usize) -> Self {
        let (give, take) = async_channel::bounded(n.max(1));
        for _ in 0..n {
            let _ = give.try_send(());
        }
        Permits { give, take }
    }

    /// Wait for a permit; `false` once the flow is over.
    pub async fn acquire(&self) -> bool {
        self.take.recv().await.is_ok()
    }

    pub fn release(&self) {
        let _ = self.give.try_send(());
    }

    pub fn close(&self) {
        self.give.close();
    }
}

/// Commands to a link task of kind `K` ([`TunnelCmd`] for a tunnel, hub
/// or agent side; [`MeshCmd`] for a mesh link), from flow tasks, from
/// flows on another link and from the control. A link task takes only
/// commands of its own kind: a tunnel's channel cannot carry a mesh open.
#[derive(Debug)]
pub enum LinkCmd<K> {
    /// To flow `cid` of this link, from its socket or from the flow it is
    /// joined to on another link: what [`FlowPipes::on_flow`] hands the
    /// core relay.
    Flow { cid: Cid, msg: PeerMsg },
    /// Close the link.
    Close { code: ErrorCode, reason: String },
    /// A command only this kind of link takes.
    Link(K),
}

/// Commands only a tunnel takes (the agent's tunnel gets flow commands
/// only; these come from the hub's control and bridges).
#[derive(Debug)]
pub enum TunnelCmd {
    /// Hub: ownership claimed; send WELCOME.
    /// WELCOME under `epoch`, naming this hub's replica.
    Accept { epoch: Epoch, replica_id: String },
    /// Hub: this hub is draining; send DRAIN (v2 tunnels).
    Drain,
    /// Hub: open a flow to this connector.
    OpenFlow {
        connector: String,
        reply: Reply<Result<FlowEnd, OpenRefused>>,
    },
    /// Owner hub: open a flow to this connector joined to a mesh flow; the
    /// answer is the new flow's cid.
    OpenJoined {
        connector: String,
        peer: Peer<MeshCmd>,
        reply: Reply<Result<Cid, OpenRefused>>,
    },
}

/// Commands only a mesh link takes.
#[derive(Debug)]
pub enum MeshCmd {
    /// Mesh origin: open a flow to `agent_id`'s `connector` under `epoch`.
    OpenFlow {
        connector: String,
        agent_id: String,
        epoch: Epoch,
        reply: Reply<Result<FlowEnd, OpenRefused>>,
    },
    /// Owner hub: the held flow `cid` (see [`FlowPipes::hold_open`]) is
    /// joined to `peer`, a flow on the agent's tunnel, from now on.
    Join { cid: Cid, peer: Peer<TunnelCmd> },
}

/// A kind of link, named by the commands only it takes.
pub trait LinkKind: Sized + Send + 'static {
    /// The kind of link its flows are joined to: a bridge joins a mesh
    /// flow and a tunnel flow.
    type Other: LinkKind;

    /// A flow socket's handle on this kind of link.
    fn flow_tx(link: Sender<LinkCmd<Self>>) -> FlowTx;

    /// A command left in the queue of a link that ended
    /// ([`end_commands`]). Dropping it drops an open's reply, so whoever
    /// waits for it hears that the link went away.
    fn abandon(cmd: Self, _reason: &str) {
        drop(cmd);
    }
}

impl LinkKind for TunnelCmd {
    type Other = MeshCmd;

    fn flow_tx(link: Sender<LinkCmd<Self>>) -> FlowTx {
        FlowTx::Tunnel(link)
    }
}

impl LinkKind for MeshCmd {
    type Other = TunnelCmd;

    fn flow_tx(link: Sender<LinkCmd<Self>>) -> FlowTx {
        FlowTx::Mesh(link)
    }

    /// A join resets the flow on the other link.
    fn abandon(cmd: Self, reason: &str) {
        if let MeshCmd::Join { peer, .. } = cmd {
            peer.reset(ErrorCode::LinkLost, reason);
        }
    }
}

/// Where a tunnel's commands go.
pub type TunnelTx = Sender<LinkCmd<TunnelCmd>>;

/// Where a mesh link's commands go.
pub type MeshTx = Sender<LinkCmd<MeshCmd>>;

/// A flow socket's way to its flow's link: flow commands only, whichever
/// kind of link carries the flow.
#[derive(Clone, Debug)]
pub enum FlowTx {
    Tunnel(TunnelTx),
    Mesh(MeshTx),
}

impl FlowTx {
    /// Send `msg` to flow `cid`; `false` when the link is gone.
    pub fn send(&self, cid: Cid, msg: PeerMsg) -> bool {
        match self {
            FlowTx::Tunnel(tx) => tx.try_send(LinkCmd::Flow { cid, msg }).is_ok(),
            FlowTx::Mesh(tx) => tx.try_send(LinkCmd::Flow { cid, msg }).is_ok(),
        }
    }
}

/// Send an open to `link` and return where its answer arrives. With no link
/// (it went away between the routing decision and now) the answer's channel
/// is closed at once, as it is when the link has ended or ends before it
/// answers ([`end_commands`]): the caller hears `link went away` and never
/// waits on an answer nobody can give.
pub fn send_open<K, T>(
    link: Option<Sender<LinkCmd<K>>>,
    open: impl FnOnce(Reply<T>) -> K,
) -> Receiver<T> {
    let (tx, rx) = reply_channel();
    if let Some(link) = link {
        let _ = link.try_send(LinkCmd::Link(open(tx)));
    }
    rx
}

/// The end of a link task: nothing sent to it may wait forever. Closes its
/// command channel (a later send fails at once) and empties it. An open's
/// reply is dropped, so whoever waits for it hears that the link went away
/// (a client is refused with `link_lost`; a bridge resets its mesh flow), and
/// a join resets the flow on the other link. Flow commands go with their
/// flows. Without this, a command queued in the instant the link closed
/// stayed in the channel as long as any sender lived, and its client waited
/// for an answer with neither data nor a close.
pub fn end_commands<K: LinkKind>(rx: &Receiver<LinkCmd<K>>, reason: &str) {
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        if let LinkCmd::Link(cmd) = cmd {
            K::abandon(cmd, reason);
        }
    }
}

/// What the WebSocket writer task sends.
#[derive(Debug)]
pub enum Outgoing {
    Frame(WsMessage),
    /// A close frame carrying the reason, then the end of the socket.
    Close {
        code: ErrorCode,
        reason: String,
    },
}

/// Link commands (flow opens, data, resets, closes) a link task (hub or
/// agent tunnel, mesh link) takes from its command queue in one go when a
/// command wakes it, before it looks at its socket and timers again: bounds
/// how long a burst of commands can hold off reading the link.
pub const CMD_BATCH: usize = 256;

/// Messages that may wait in a bounded link's writer queue; more wait in
/// the core, where they are bounded.
pub const WRITER_HIGH_WATER: usize = 256;

/// A WebSocket message from a tunnel, as a link loop (hub or agent) needs it.
pub enum WsIn {
    Frame(WsMessage),
    /// Ping, pong and the like.
    Other,
    /// The peer sent a close frame (its reason).
    Closed(String),
    Failed(String),
}
