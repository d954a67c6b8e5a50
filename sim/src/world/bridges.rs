//! Owner-side bridges between a mesh flow and a flow on the agent's tunnel,
//! driven through the shipped [`FlowRelay`] of each hub link as the
//! runtime's link tasks drive it: the relay decides what goes where and the
//! credit between the two flows; this file only carries its outputs from
//! one endpoint to the other, and models the runtime's hops between tasks
//! (the bridge's open reaches the tunnel task, its answer the mesh task, a
//! moment later) so that link loss, tunnel loss and a full tunnel can race
//! the bridge.

use std::collections::VecDeque;

use super::*;

impl Link {
    pub(super) fn flow_link(&mut self) -> &mut dyn FlowLink {
        match self {
            Link::Tunnel(t) => t,
            Link::Mesh(m) => m,
        }
    }
}

impl World {
    /// How long a hand-over between two of a hub's tasks takes.
    pub(super) fn hop(&mut self) -> Duration {
        Duration::from_micros(self.rng.below(500))
    }

    /// A flow event for a bridged (or held) flow of a hub link.
    pub(super) fn bridge_event(&mut self, ep: EpId, fe: FlowEvent) {
        if let Some(e) = self.eps.get_mut(&ep) {
            e.relay.handle_event(e.link.flow_link(), fe);
            self.carry_out(ep);
        }
    }

    /// The bridge's open reaches the agent's tunnel: a flow joined to the
    /// held mesh flow, or the mesh open refused with the tunnel's reason.
    pub(super) fn bridge_open(&mut self, h: usize, mesh: FlowAddr, tunnel: EpId, connector: &str) {
        // The tunnel carries bare names: the agent knows its tenant.
        let opened = match self.eps.get_mut(&tunnel) {
            Some(Ep {
                link: Link::Tunnel(t),
                ..
            }) => t.open_flow(split(connector).1).map_err(|e| {
                (
                    ErrorCode::LimitExceeded,
                    format!("the agent's tunnel took no new flow: {e}"),
                )
            }),
            _ => Err((ErrorCode::LinkLost, "the agent tunnel went away".into())),
        };
        match opened {
            Ok(tcid) => {
                self.outcome.bridges_opened += 1;
                let Some(e) = self.eps.get_mut(&tunnel) else {
                    return;
                };
                let addr = FlowAddr {
                    ep: tunnel,
                    conn: e.conn,
                    cid: tcid,
                };
                e.relay.attach_joined(tcid, connector, mesh);
                self.carry_out(tunnel);
                let hop = self.hop();
                self.schedule(hop, Event::BridgeJoin { mesh, tunnel: addr });
            }
            Err((code, reason)) => {
                self.outcome.bridges_refused += 1;
                self.hubs[h].node.flow_ended(TunnelId(tunnel));
                self.on_flow(mesh, |relay, link, cid| {
                    relay.reset(link, cid, code, &reason)
                });
            }
        }
    }

    /// The tunnel flow's id reaches the mesh link's task: the held flow is
    /// joined to it (and accepted), or, with the mesh connection gone, the
    /// tunnel flow is reset.
    pub(super) fn bridge_join(&mut self, mesh: FlowAddr, tunnel: FlowAddr) {
        let joined = self.on_flow(mesh, |relay, _, cid| relay.join(cid, tunnel));
        if !joined {
            self.outcome.bridges_lost_before_join += 1;
            self.on_flow(tunnel, |relay, link, cid| {
                relay.reset(link, cid, ErrorCode::LinkLost, "the mesh link went away")
            });
        }
    }

    /// Apply `f` to the relay of `to`'s connection, then carry out what it
    /// decided; `false` when that connection is gone.
    fn on_flow(
        &mut self,
        to: FlowAddr,
        f: impl FnOnce(&mut FlowRelay<FlowAddr>, &mut dyn FlowLink, Cid),
    ) -> bool {
        match self.eps.get_mut(&to.ep).filter(|e| e.conn == to.conn) {
            Some(e) => {
                f(&mut e.relay, e.link.flow_link(), to.cid);
                self.carry_out(to.ep);
                true
            }
            None => false,
        }
    }

    /// Carry out what endpoint `ep`'s relay decided, and what that sets off
    /// in the relays on the other sides, in order.
    pub(super) fn carry_out(&mut self, ep: EpId) {
        let mut work = VecDeque::from([ep]);
        while let Some(ep) = work.pop_front() {
            while let Some(e) = self.eps.get_mut(&ep) {
                let Some(o) = e.relay.poll_output() else {
                    break;
                };
                let node = e.node;
                self.relay_output(ep, node, o, &mut work);
            }
        }
    }

    /// [`Self::carry_out`] for the relay of an endpoint that is gone.
    pub(super) fn carry_out_relay(
        &mut self,
        ep: EpId,
        node: Node,
        relay: &mut FlowRelay<FlowAddr>,
    ) {
        let mut work = VecDeque::new();
        while let Some(o) = relay.poll_output() {
            self.relay_output(ep, node, o, &mut work);
        }
        while let Some(ep) = work.pop_front() {
            self.carry_out(ep);
        }
    }

    fn relay_output(
        &mut self,
        ep: EpId,
        node: Node,
        o: RelayOutput<FlowAddr>,
        work: &mut VecDeque<EpId>,
    ) {
        match o {
            RelayOutput::AcceptOpen { cid } => {
                if let Some(e) = self.eps.get_mut(&ep)
                    && let Link::Mesh(m) = &mut e.link
                {
                    m.accept_open(cid);
                    e.relay.accepted(e.link.flow_link(), cid);
                }
            }
            RelayOutput::RefuseOpen { cid, code, reason } => {
                if let Some(Ep {
                    link: Link::Mesh(m),
                    ..
                }) = self.eps.get_mut(&ep)
                {
                    m.refuse_open(cid, code, &reason);
                }
            }
            RelayOutput::ToPeer { cid, peer, msg } => {
                match self.eps.get_mut(&peer.ep).filter(|p| p.conn == peer.conn) {
                    Some(p) => {
                        p.relay.from_peer(p.link.flow_link(), peer.cid, msg);
                        work.push_back(peer.ep);
                    }
                    None => {
                        if let Some(e) = self.eps.get_mut(&ep) {
                            e.relay.peer_gone(e.link.flow_link(), cid);
                        }
                    }
                }
            }
            RelayOutput::Ended { bridged: true, .. } => {
                // The hub's count of flows on the agent's tunnel.
                if let Node::Hub(h) = node {
                    self.hubs[h].node.flow_ended(TunnelId(ep));
                }
            }
            // A hub link's relay holds bridged flows only: the simulated
            // clients are driven by the workload.
            RelayOutput::Ended { .. }
            | RelayOutput::Deliver { .. }
            | RelayOutput::ChunkTaken { .. } => {}
        }
    }
}
