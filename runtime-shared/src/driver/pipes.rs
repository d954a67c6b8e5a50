//! [`FlowPipes`]: a link's flows piped to sockets or joined to flows on
//! another link, as the core's [`FlowRelay`] decides, and the owner-side
//! mesh [`bridge`].

use std::collections::BTreeMap;
use std::sync::Arc;

use async_channel::{Receiver, Sender};
use nowconnect_core::mux::{FlowEvent, FlowLink};
use nowconnect_core::relay::{Delivery, FlowRelay, PeerMsg, RelayOutput};
use nowconnect_core::{Cid, ErrorCode};

use crate::metrics::{Metrics, labels};

use super::{
    CHUNKS_IN_FLIGHT, FlowTx, LinkCmd, LinkKind, MeshCmd, Permits, TunnelCmd, TunnelTx, send_open,
};

/// The socket side's handle on one flow.
pub struct FlowEnd {
    pub cid: Cid,
    pub connector: String,
    pub rx: Receiver<Delivery>,
    pub permits: Permits,
    /// Where the socket's flow commands go.
    pub cmd: FlowTx,
}

/// A flow on another link task, of kind `K`: the owner hub joins a mesh
/// flow and a flow on the agent's tunnel, and each link hands what arrives
/// for its side straight to the other link, with no task in between. The
/// mesh side's peer is a `Peer<TunnelCmd>`, the tunnel side's a
/// `Peer<MeshCmd>`.
#[derive(Debug)]
pub struct Peer<K> {
    pub cmd: Sender<LinkCmd<K>>,
    pub cid: Cid,
}

impl<K> Clone for Peer<K> {
    fn clone(&self) -> Self {
        Peer {
            cmd: self.cmd.clone(),
            cid: self.cid,
        }
    }
}

impl<K> Peer<K> {
    /// Send `msg` to the flow on the other link; `false` when that link is
    /// gone.
    fn send(&self, msg: PeerMsg) -> bool {
        let cmd = LinkCmd::Flow { cid: self.cid, msg };
        self.cmd.try_send(cmd).is_ok()
    }

    /// Reset the flow on the other link (nothing to do if it is gone).
    pub(super) fn reset(&self, code: ErrorCode, reason: impl Into<String>) {
        let reason = reason.into();
        self.send(PeerMsg::Reset { code, reason });
    }
}

/// A local flow's socket task: where its deliveries go, and its reader
/// permits.
struct Local {
    tx: Sender<Delivery>,
    permits: Permits,
}

/// The flows of one link of kind `K` as the runtime sees them: the core's
/// [`FlowRelay`] (which decides what goes where, and the credit between
/// bridged flows, joined to flows on links of the other kind), and the
/// channel to each local flow's socket task.
pub struct FlowPipes<K: LinkKind> {
    relay: FlowRelay<Peer<K::Other>>,
    locals: BTreeMap<Cid, Local>,
    cmd_tx: Sender<LinkCmd<K>>,
    metrics: Arc<Metrics>,
    bridged_ends: usize,
}

impl<K: LinkKind> Drop for FlowPipes<K> {
    /// The link is gone: joined flows on other links are reset, local
    /// sockets are told.
    fn drop(&mut self) {
        self.relay
            .link_lost("the other side of the bridged flow went away");
        self.carry_out_without_link();
    }
}

impl<K: LinkKind> FlowPipes<K> {
    pub fn new(cmd_tx: Sender<LinkCmd<K>>, metrics: Arc<Metrics>) -> Self {
        FlowPipes {
            relay: FlowRelay::new(),
            locals: BTreeMap::new(),
            cmd_tx,
            metrics,
            bridged_ends: 0,
        }
    }

    /// Bridged tunnel-side flows that ended since the last call.
    pub fn take_bridged_ends(&mut self) -> usize {
        std::mem::take(&mut self.bridged_ends)
    }

    /// Bridged tunnel-side flows still open.
    pub fn bridged_open(&self) -> usize {
        self.relay.bridged_open()
    }

    pub fn len(&self) -> usize {
        self.relay.len()
    }

    /// The connector flow `cid` was attached for, while it is open.
    pub fn connector(&self, cid: Cid) -> Option<&str> {
        self.relay.connector(cid)
    }

    pub fn is_empty(&self) -> bool {
        self.relay.is_empty()
    }

    /// `nowconnect_flows_active` counts a flow once in the cluster: where
    /// its client's socket is (a local flow, here or on the entry hub's mesh
    /// link). The owner hub's two halves of a bridged flow (the held mesh
    /// open and the joined tunnel flow) are not counted again.
    fn count_open(&self, connector: &str) {
        self.metrics
            .flows_active
            .get_or_create(&labels(&[("connector", connector)]))
            .inc();
    }

    /// Register a flow the core already knows (opened here or by the peer).
    pub fn attach(&mut self, link: &mut impl OpenLink, cid: Cid, connector: &str) -> FlowEnd {
        let (tx, rx) = async_channel::unbounded();
        let permits = Permits::new(CHUNKS_IN_FLIGHT);
        self.relay.attach(cid, connector);
        self.locals.insert(
            cid,
            Local {
                tx,
                permits: permits.clone(),
            },
        );
        self.count_open(connector);
        self.carry_out(link);
        FlowEnd {
            cid,
            connector: connector.to_string(),
            rx,
            permits,
            cmd: K::flow_tx(self.cmd_tx.clone()),
        }
    }

    /// Register a mesh open to be bridged to the agent's tunnel: held until
    /// its [`MeshCmd::Join`] (then accepted) or a reset from the bridge
    /// (then refused with the tunnel's reason).
    pub fn hold_open(&mut self, link: &mut impl OpenLink, cid: Cid, connector: &str) {
        self.relay.hold_open(cid, connector);
        self.carry_out(link);
    }

    /// Register the tunnel side of a bridged flow, joined to `peer` at once.
    pub fn attach_joined(
        &mut self,
        link: &mut impl OpenLink,
        cid: Cid,
        connector: &str,
        peer: Peer<K::Other>,
    ) {
        self.relay.attach_joined(cid, connector, peer);
        self.carry_out(link);
    }

    /// End a flow from this side: the core resets it, and its consumer (a
    /// socket, or a joined flow on another link) hears it.
    pub fn fail(&mut self, link: &mut impl OpenLink, cid: Cid, code: ErrorCode, reason: &str) {
        self.relay.fail(link, cid, code, reason);
        self.carry_out(link);
    }

    /// A command to flow `cid` ([`LinkCmd::Flow`]), from its socket or
    /// from the flow it is joined to.
    pub fn on_flow(&mut self, link: &mut impl OpenLink, cid: Cid, msg: PeerMsg) {
        match msg {
            PeerMsg::Data(payload) => self.relay.data(link, cid, payload),
            PeerMsg::Fin => self.relay.fin(link, cid),
            // From the flow's own consumer (socket task or joined peer):
            // nothing to tell it back.
            PeerMsg::Reset { code, reason } => self.relay.reset(link, cid, code, &reason),
            PeerMsg::Consumed(n) => self.relay.consumed(link, cid, n),
        }
        self.carry_out(link);
    }

    /// The held flow `cid` is joined to `peer` from now on
    /// ([`MeshCmd::Join`]).
    pub fn join(&mut self, link: &mut impl OpenLink, cid: Cid, peer: Peer<K::Other>) {
        self.relay.join(cid, peer);
        self.carry_out(link);
    }

    pub fn on_event(&mut self, link: &mut impl OpenLink, fe: FlowEvent) {
        self.relay.handle_event(link, fe);
        self.carry_out(link);
    }

    /// Carry out what the relay decided, in order.
    fn carry_out(&mut self, link: &mut impl OpenLink) {
        while let Some(o) = self.relay.poll_output() {
            match o {
                RelayOutput::AcceptOpen { cid } => {
                    link.accept_open(cid);
                    self.relay.accepted(link, cid);
                }
                RelayOutput::RefuseOpen { cid, code, reason } => {
                    link.refuse_open(cid, code, &reason)
                }
                o => {
                    if let Some(gone) = self.perform(o) {
                        self.relay.peer_gone(link, gone);
                    }
                }
            }
        }
    }

    /// [`Self::carry_out`] once the link is gone: a lost link's flows only
    /// tell their consumers.
    fn carry_out_without_link(&mut self) {
        while let Some(o) = self.relay.poll_output() {
            let _ = self.perform(o);
        }
    }

    /// One output; the cid whose joined peer link is gone, if so.
    fn perform(&mut self, o: RelayOutput<Peer<K::Other>>) -> Option<Cid> {
        match o {
            RelayOutput::Deliver { cid, delivery } => {
                if let Some(l) = self.locals.get(&cid) {
                    let _ = l.tx.try_send(delivery);
                }
            }
            RelayOutput::ChunkTaken { cid } => {
                if let Some(l) = self.locals.get(&cid) {
                    l.permits.release();
                }
            }
            RelayOutput::ToPeer { cid, peer, msg } => {
                if !peer.send(msg) {
                    return Some(cid);
                }
            }
            // The link's own answers: [`Self::carry_out`] gives them to the
            // link; once it is gone, the open went with it.
            RelayOutput::AcceptOpen { .. } | RelayOutput::RefuseOpen { .. } => {}
            RelayOutput::Ended {
                cid,
                connector,
                bridged,
                reset,
            } => {
                if bridged {
                    self.bridged_ends += 1;
                }
                if let Some(l) = self.locals.remove(&cid) {
                    // Only a local flow was counted open, and its reset is
                    // counted once, here (not again by the owner hub's
                    // bridged halves).
                    self.metrics
                        .flows_active
                        .get_or_create(&labels(&[("connector", &connector)]))
                        .dec();
                    if let Some(code) = reset {
                        self.metrics
                            .flow_resets
                            .get_or_create(&labels(&[("code", code.as_str())]))
                            .inc();
                    }
                    // Wake a reader waiting for a permit so it notices the
                    // flow is over.
                    l.permits.close();
                }
            }
        }
        None
    }
}

/// A link that takes mesh opens (a mesh link), or none (an agent tunnel:
/// it never holds one, so never gets the calls).
pub trait OpenLink: FlowLink {
    fn accept_open(&mut self, _cid: Cid) {}
    fn refuse_open(&mut self, _cid: Cid, _code: ErrorCode, _reason: &str) {}
}

impl OpenLink for nowconnect_core::mesh_link::MeshLink {
    fn accept_open(&mut self, cid: Cid) {
        nowconnect_core::mesh_link::MeshLink::accept_open(self, cid)
    }
    fn refuse_open(&mut self, cid: Cid, code: ErrorCode, reason: &str) {
        nowconnect_core::mesh_link::MeshLink::refuse_open(self, cid, code, reason)
    }
}

impl OpenLink for nowconnect_core::tunnel::Tunnel {}

/// Owner side of the mesh: open a flow on the agent's tunnel joined to the
/// held mesh flow `mesh`, then join the mesh flow to it. From then on the
/// two link tasks hand each other what arrives, with no task in between.
/// Returns whether the tunnel flow opened: the tunnel task then reports its
/// end ([`FlowPipes::take_bridged_ends`]); otherwise the caller does.
pub async fn bridge(mesh: Peer<MeshCmd>, tunnel_cmd: TunnelTx, connector: String) -> bool {
    let rx = send_open(Some(tunnel_cmd.clone()), |reply| TunnelCmd::OpenJoined {
        connector,
        peer: mesh.clone(),
        reply,
    });
    match rx.recv().await {
        Ok(Ok(cid)) => {
            let tunnel = Peer {
                cmd: tunnel_cmd,
                cid,
            };
            let joined = mesh.cmd.try_send(LinkCmd::Link(MeshCmd::Join {
                cid: mesh.cid,
                peer: tunnel.clone(),
            }));
            if joined.is_err() {
                tunnel.reset(ErrorCode::LinkLost, "the mesh link went away");
            }
            true
        }
        Ok(Err(refused)) => {
            mesh.reset(refused.code, refused.reason);
            false
        }
        Err(_) => {
            mesh.reset(ErrorCode::LinkLost, "the agent tunnel went away");
            false
        }
    }
}
