//! [`FlowPipes`]: a link's flows piped to sockets or joined to flows on
//! another link, and the owner-side mesh [`bridge`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use async_channel::{Receiver, Sender};
use bytes::Bytes;
use nowconnect_core::mux::{FlowEvent, FlowLink};
use nowconnect_core::{Cid, ErrorCode, Payload};

use crate::metrics::{Metrics, labels};

use super::{CHUNKS_IN_FLIGHT, LinkCmd, Permits, send_open};

/// What a flow's socket task receives from the tunnel.
#[derive(Debug)]
pub enum FlowMsg {
    Data(Bytes),
    Fin,
    Reset { code: ErrorCode, reason: String },
}

/// The socket side's handle on one flow.
pub struct FlowEnd {
    pub cid: Cid,
    pub connector: String,
    pub rx: Receiver<FlowMsg>,
    pub permits: Permits,
    pub cmd: Sender<LinkCmd>,
}

/// A flow on another link task: the owner hub joins a mesh flow and a flow
/// on the agent's tunnel, and each link hands what arrives for its side
/// straight to the other link, with no task in between.
#[derive(Clone)]
pub struct Peer {
    pub cmd: Sender<LinkCmd>,
    pub cid: Cid,
}

impl Peer {
    /// Reset the flow on the other link (nothing to do if it is gone).
    pub(super) fn reset(&self, code: ErrorCode, reason: impl Into<String>) {
        let _ = self.cmd.try_send(LinkCmd::Reset {
            cid: self.cid,
            code,
            reason: reason.into(),
        });
    }
}

/// Where what the core delivers for a flow goes.
enum Sink {
    /// A flow socket's task, and its reader permits.
    Socket {
        tx: Sender<FlowMsg>,
        permits: Permits,
    },
    /// A flow to be joined to a peer: what arrives waits here, and what the
    /// core took from the peer is credited to it once joined.
    Held { queue: Vec<FlowMsg>, taken: usize },
    /// A flow on another link: deliveries go there as commands, and what the
    /// core takes of its data is credited back to it at once (the credit of
    /// this flow's receive window bounds what waits on either side).
    Joined(Peer),
}

struct FlowSlot {
    sink: Sink,
    pending: VecDeque<Payload>,
    fin_pending: bool,
    connector: String,
    /// The tunnel side of a bridged mesh flow: its end is reported through
    /// [`FlowPipes::take_bridged_ends`].
    bridged: bool,
}

/// The flows of one link as the runtime sees them: a channel to each flow's
/// socket task (or the joined flow on another link), the chunks handed over
/// that the core has not taken yet, and the reader permits.
pub struct FlowPipes {
    flows: BTreeMap<Cid, FlowSlot>,
    cmd_tx: Sender<LinkCmd>,
    metrics: Arc<Metrics>,
    bridged_ends: usize,
}

impl Drop for FlowPipes {
    /// The link is gone: joined flows on other links are reset.
    fn drop(&mut self) {
        for slot in self.flows.values() {
            if let Sink::Joined(p) = &slot.sink {
                p.reset(
                    ErrorCode::LinkLost,
                    "the other side of the bridged flow went away",
                );
            }
        }
    }
}

impl FlowPipes {
    pub fn new(cmd_tx: Sender<LinkCmd>, metrics: Arc<Metrics>) -> Self {
        FlowPipes {
            flows: BTreeMap::new(),
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
        self.flows.values().filter(|s| s.bridged).count()
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Register a flow the core already knows (opened here or by the peer).
    pub fn attach(&mut self, cid: Cid, connector: &str) -> FlowEnd {
        let (tx, rx) = async_channel::unbounded();
        let permits = Permits::new(CHUNKS_IN_FLIGHT);
        self.insert(
            cid,
            connector,
            Sink::Socket {
                tx,
                permits: permits.clone(),
            },
            false,
        );
        FlowEnd {
            cid,
            connector: connector.to_string(),
            rx,
            permits,
            cmd: self.cmd_tx.clone(),
        }
    }

    /// Register a flow that will be joined to a flow on another link
    /// ([`LinkCmd::Join`]); until then what arrives for it is held.
    pub fn hold(&mut self, cid: Cid, connector: &str) {
        let sink = Sink::Held {
            queue: Vec::new(),
            taken: 0,
        };
        self.insert(cid, connector, sink, false);
    }

    /// Register the tunnel side of a bridged flow, joined to `peer` at once.
    pub fn attach_joined(&mut self, cid: Cid, connector: &str, peer: Peer) {
        self.insert(cid, connector, Sink::Joined(peer), true);
    }

    fn insert(&mut self, cid: Cid, connector: &str, sink: Sink, bridged: bool) {
        self.flows.insert(
            cid,
            FlowSlot {
                sink,
                pending: VecDeque::new(),
                fin_pending: false,
                connector: connector.to_string(),
                bridged,
            },
        );
        self.metrics
            .flows_active
            .get_or_create(&labels(&[("connector", connector)]))
            .inc();
    }

    /// Drop a held flow the link refused (no reset to send: the link's
    /// refusal says it). Whether it was here.
    pub fn forget(&mut self, cid: Cid) -> bool {
        self.detach(cid).is_some()
    }

    fn detach(&mut self, cid: Cid) -> Option<FlowSlot> {
        let slot = self.flows.remove(&cid)?;
        self.metrics
            .flows_active
            .get_or_create(&labels(&[("connector", &slot.connector)]))
            .dec();
        if slot.bridged {
            self.bridged_ends += 1;
        }
        if let Sink::Socket { permits, .. } = &slot.sink {
            // Wake a reader waiting for a permit so it notices the flow is over.
            permits.close();
        }
        Some(slot)
    }

    /// End a flow from this side: the core resets it, and a joined flow on
    /// another link is reset too.
    pub fn fail(&mut self, link: &mut impl FlowLink, cid: Cid, code: ErrorCode, reason: &str) {
        if let Some(slot) = self.detach(cid) {
            link.reset_flow(cid, code, reason);
            self.count_reset(code);
            if let Sink::Joined(p) = slot.sink {
                p.reset(code, reason);
            }
        }
    }

    fn count_reset(&self, code: ErrorCode) {
        self.metrics
            .flow_resets
            .get_or_create(&labels(&[("code", code.as_str())]))
            .inc();
    }

    /// Hand a delivery to the flow's consumer; `false` when a joined peer
    /// link is gone (the caller then fails the flow).
    fn deliver(slot: &mut FlowSlot, msg: FlowMsg) -> bool {
        match &mut slot.sink {
            Sink::Socket { tx, .. } => {
                let _ = tx.try_send(msg);
                true
            }
            Sink::Held { queue, .. } => {
                queue.push(msg);
                true
            }
            Sink::Joined(p) => p.cmd.try_send(Self::as_cmd(p.cid, msg)).is_ok(),
        }
    }

    fn as_cmd(cid: Cid, msg: FlowMsg) -> LinkCmd {
        match msg {
            FlowMsg::Data(payload) => LinkCmd::Data {
                cid,
                payload: payload.into(),
            },
            FlowMsg::Fin => LinkCmd::Fin { cid },
            FlowMsg::Reset { code, reason } => LinkCmd::Reset { cid, code, reason },
        }
    }

    /// Join a held flow to `peer`: what waited goes to it, then what the
    /// core took of the peer's data is credited. A flow that ended while
    /// held resets the peer's.
    fn join(&mut self, link: &mut impl FlowLink, cid: Cid, peer: Peer) {
        let Some(slot) = self.flows.get_mut(&cid) else {
            peer.reset(
                ErrorCode::ConnectionReset,
                "the mesh flow ended before it was bridged",
            );
            return;
        };
        let held = std::mem::replace(&mut slot.sink, Sink::Joined(peer.clone()));
        let Sink::Held { queue, taken } = held else {
            slot.sink = held;
            return;
        };
        let mut ok = true;
        for m in queue {
            ok &= peer.cmd.try_send(Self::as_cmd(peer.cid, m)).is_ok();
        }
        if taken > 0 {
            ok &= peer
                .cmd
                .try_send(LinkCmd::Consumed {
                    cid: peer.cid,
                    n: taken,
                })
                .is_ok();
        }
        if !ok {
            self.fail(link, cid, ErrorCode::LinkLost, "the agent tunnel went away");
        }
    }

    /// A flow-level command (`Data`, `Fin`, `Reset`, `Consumed`); returns the
    /// command back when it is not one.
    pub fn on_cmd(&mut self, link: &mut impl FlowLink, cmd: LinkCmd) -> Option<LinkCmd> {
        match cmd {
            LinkCmd::Data { cid, payload } => {
                if let Some(slot) = self.flows.get_mut(&cid) {
                    slot.pending.push_back(payload);
                    self.push_pending(link, cid);
                }
            }
            LinkCmd::Fin { cid } => {
                if let Some(slot) = self.flows.get_mut(&cid) {
                    slot.fin_pending = true;
                    self.push_pending(link, cid);
                }
            }
            LinkCmd::Reset { cid, code, reason } => {
                // From the flow's own consumer (socket task or joined peer):
                // nothing to tell it back.
                if self.detach(cid).is_some() {
                    link.reset_flow(cid, code, &reason);
                    self.count_reset(code);
                }
            }
            LinkCmd::Consumed { cid, n } => link.consumed(cid, n),
            LinkCmd::Join { cid, peer } => self.join(link, cid, peer),
            other => return Some(other),
        }
        None
    }

    /// Hand queued chunks to the core as far as its credit allows; release a
    /// reader permit per chunk fully taken; send FIN once all data is in.
    fn push_pending(&mut self, link: &mut impl FlowLink, cid: Cid) {
        let Some(slot) = self.flows.get_mut(&cid) else {
            return;
        };
        while let Some(front) = slot.pending.front_mut() {
            let credit = link.send_credit(cid) as usize;
            if credit == 0 {
                link.note_blocked(cid);
                return;
            }
            let take = credit.min(front.len());
            let chunk = front.split_to(take);
            if let Err(e) = link.send_data(cid, chunk) {
                tracing::warn!(cid, error = %e, "send on flow failed");
                return;
            }
            let done = front.is_empty();
            if done {
                slot.pending.pop_front();
            }
            match &mut slot.sink {
                Sink::Socket { permits, .. } => {
                    if done {
                        permits.release();
                    }
                }
                Sink::Held { taken, .. } => *taken += take,
                Sink::Joined(p) => {
                    let _ = p.cmd.try_send(LinkCmd::Consumed {
                        cid: p.cid,
                        n: take,
                    });
                }
            }
        }
        if slot.fin_pending {
            slot.fin_pending = false;
            let _ = link.send_fin(cid);
        }
    }

    pub fn on_event(&mut self, link: &mut impl FlowLink, fe: FlowEvent) {
        let (cid, msg) = match fe {
            FlowEvent::Data { cid, payload } => (cid, FlowMsg::Data(payload)),
            FlowEvent::Fin { cid } => (cid, FlowMsg::Fin),
            FlowEvent::Reset { cid, code, reason } => {
                if let Some(mut slot) = self.detach(cid) {
                    self.count_reset(code);
                    Self::deliver(&mut slot, FlowMsg::Reset { code, reason });
                }
                return;
            }
            FlowEvent::Writable { cid, .. } => return self.push_pending(link, cid),
            FlowEvent::Closed { cid } => {
                self.detach(cid);
                return;
            }
        };
        if let Some(slot) = self.flows.get_mut(&cid)
            && !Self::deliver(slot, msg)
        {
            self.fail(
                link,
                cid,
                ErrorCode::LinkLost,
                "the other side of the bridged flow went away",
            );
        }
    }
}

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
