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

use super::{CHUNKS_IN_FLIGHT, LinkCmd, Permits, send_open};

/// The socket side's handle on one flow.
pub struct FlowEnd {
    pub cid: Cid,
    pub connector: String,
    pub rx: Receiver<Delivery>,
    pub permits: Permits,
    pub cmd: Sender<LinkCmd>,
}

/// A flow on another link task: the owner hub joins a mesh flow and a flow
/// on the agent's tunnel, and each link hands what arrives for its side
/// straight to the other link, with no task in between.
#[derive(Clone, Debug)]
pub struct Peer {
    pub cmd: Sender<LinkCmd>,
    pub cid: Cid,
}

impl Peer {
    /// Send `msg` to the flow on the other link; `false` when that link is
    /// gone.
    fn send(&self, msg: PeerMsg) -> bool {
        let cid = self.cid;
        let cmd = match msg {
            PeerMsg::Data(payload) => LinkCmd::Data { cid, payload },
            PeerMsg::Fin => LinkCmd::Fin { cid },
            PeerMsg::Reset { code, reason } => LinkCmd::Reset { cid, code, reason },
            PeerMsg::Consumed(n) => LinkCmd::Consumed { cid, n },
        };
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

/// The flows of one link as the runtime sees them: the core's
/// [`FlowRelay`] (which decides what goes where, and the credit between
/// bridged flows), and the channel to each local flow's socket task.
pub struct FlowPipes {
    relay: FlowRelay<Peer>,
    locals: BTreeMap<Cid, Local>,
    cmd_tx: Sender<LinkCmd>,
    metrics: Arc<Metrics>,
    bridged_ends: usize,
}

impl Drop for FlowPipes {
    /// The link is gone: joined flows on other links are reset, local
    /// sockets are told.
    fn drop(&mut self) {
        self.relay
            .link_lost("the other side of the bridged flow went away");
        self.carry_out_without_link();
    }
}

impl FlowPipes {
    pub fn new(cmd_tx: Sender<LinkCmd>, metrics: Arc<Metrics>) -> Self {
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

    pub fn is_empty(&self) -> bool {
        self.relay.is_empty()
    }

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
        self.count_open(connector);
        self.carry_out(link);
        self.locals.insert(
            cid,
            Local {
                tx,
                permits: permits.clone(),
            },
        );
        FlowEnd {
            cid,
            connector: connector.to_string(),
            rx,
            permits,
            cmd: self.cmd_tx.clone(),
        }
    }

    /// Register a mesh open to be bridged to the agent's tunnel: held until
    /// its [`LinkCmd::Join`] (then accepted) or a reset from the bridge
    /// (then refused with the tunnel's reason).
    pub fn hold_open(&mut self, link: &mut impl OpenLink, cid: Cid, connector: &str) {
        self.relay.hold_open(cid, connector);
        self.count_open(connector);
        self.carry_out(link);
    }

    /// Register the tunnel side of a bridged flow, joined to `peer` at once.
    pub fn attach_joined(
        &mut self,
        link: &mut impl OpenLink,
        cid: Cid,
        connector: &str,
        peer: Peer,
    ) {
        self.relay.attach_joined(cid, connector, peer);
        self.count_open(connector);
        self.carry_out(link);
    }

    /// End a flow from this side: the core resets it, and its consumer (a
    /// socket, or a joined flow on another link) hears it.
    pub fn fail(&mut self, link: &mut impl OpenLink, cid: Cid, code: ErrorCode, reason: &str) {
        self.relay.fail(link, cid, code, reason);
        self.carry_out(link);
    }

    /// A flow-level command (`Data`, `Fin`, `Reset`, `Consumed`, `Join`);
    /// returns the command back when it is not one.
    pub fn on_cmd(&mut self, link: &mut impl OpenLink, cmd: LinkCmd) -> Option<LinkCmd> {
        match cmd {
            LinkCmd::Data { cid, payload } => self.relay.data(link, cid, payload),
            LinkCmd::Fin { cid } => self.relay.fin(link, cid),
            // From the flow's own consumer (socket task or joined peer):
            // nothing to tell it back.
            LinkCmd::Reset { cid, code, reason } => self.relay.reset(link, cid, code, &reason),
            LinkCmd::Consumed { cid, n } => self.relay.consumed(link, cid, n),
            LinkCmd::Join { cid, peer } => self.relay.join(cid, peer),
            other => return Some(other),
        }
        self.carry_out(link);
        None
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
    fn perform(&mut self, o: RelayOutput<Peer>) -> Option<Cid> {
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
                if bridged {
                    self.bridged_ends += 1;
                }
                if let Some(l) = self.locals.remove(&cid) {
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
pub async fn bridge(mesh: Peer, tunnel_cmd: Sender<LinkCmd>, connector: String) -> bool {
    let rx = send_open(Some(tunnel_cmd.clone()), |reply| LinkCmd::OpenJoined {
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
            let joined = mesh.cmd.try_send(LinkCmd::Join {
                cid: mesh.cid,
                peer: tunnel.clone(),
            });
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
