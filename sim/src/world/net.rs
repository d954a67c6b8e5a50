//! The simulated network: endpoints, latency and jitter, partitions
//! holding messages back, and delivery in order per link.

use super::*;

impl World {
    pub(super) fn add_ep(
        &mut self,
        node: Node,
        peer: Option<EpId>,
        link: Link,
        attempt: AttemptId,
        mesh_to: Option<usize>,
    ) -> EpId {
        let id = self.next_ep;
        self.next_ep += 1;
        self.eps.insert(
            id,
            Ep {
                node,
                peer,
                link,
                attempt,
                mesh_to,
                mesh_up: None,
                agent_id: None,
                relay: FlowRelay::new(),
                conn: 0,
            },
        );
        id
    }

    pub(super) fn schedule(&mut self, after: Duration, ev: Event) {
        let at = self.now + after;
        self.schedule_at(at, ev);
    }

    pub(super) fn schedule_at(&mut self, at: Instant, ev: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.seq += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((at, self.seq, id)));
    }

    pub(super) fn latency(&mut self) -> Duration {
        let (lo, hi) = (self.faults.latency_min, self.faults.latency_max);
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(self.rng.below(span.max(1)))
    }

    pub(super) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.below(1_000_000) as f64) < p * 1_000_000.0
    }

    pub(super) fn trace(&mut self, tag: u64, a: u64, b: u64) {
        // FNV-1a over (time, tag, a, b): the same seed gives the same hash.
        let t = self.now.duration_since(self.origin).as_nanos() as u64;
        for v in [t, tag, a, b] {
            for byte in v.to_le_bytes() {
                self.outcome.trace_hash ^= u64::from(byte);
                self.outcome.trace_hash = self.outcome.trace_hash.wrapping_mul(0x100_0000_01b3);
            }
        }
    }

    /// Until when messages from `a` to `b` are held, if they are.
    pub(super) fn held_until(&self, a: Node, b: Node) -> Option<Instant> {
        self.partitions
            .get(&(a, b))
            .copied()
            .filter(|until| *until > self.now)
    }

    /// An endpoint's process is gone: the peer sees the connection end.
    pub(super) fn remove_ep(&mut self, id: EpId) {
        let Some(e) = self.eps.remove(&id) else {
            return;
        };
        self.outcome.windows_grown += e.link.mux().stats.windows_grown;
        if let Some(p) = e.peer {
            self.send_close(id, e.node, p);
        }
        self.client_of.retain(|(ep, _), _| *ep != id);
        self.targets.retain(|(ep, _), _| *ep != id);
        // What this endpoint's flows already handed to the other side of a
        // bridge is there (in that side's relay) and still goes; the flows
        // still open here reset their other sides, as the runtime's relay
        // does when its link task ends.
        let mut relay = e.relay;
        relay.link_lost("the other side of the bridged flow went away");
        self.carry_out_relay(id, e.node, &mut relay);
        self.last_delivery.remove(&id);
        self.tunnel_auth.remove(&id);
    }

    pub(super) fn send_close(&mut self, from: EpId, from_node: Node, to: EpId) {
        self.deliver(from, from_node, to, None);
    }

    /// Put a message on the wire from `from`; TCP keeps each direction in
    /// order, and a partition holds it back until it heals.
    pub(super) fn send(&mut self, from: EpId, msg: WsMessage) {
        let Some(e) = self.eps.get(&from) else {
            return;
        };
        let (node, Some(to)) = (e.node, e.peer) else {
            return;
        };
        self.check_to_agent(from, &msg);
        if self.chance(self.faults.malformed) {
            self.outcome.malformed_frames += 1;
            let bad = match self.rng.below(3) {
                0 => WsMessage::Binary(Bytes::from_static(&[0xee, 1, 2, 3])),
                1 => WsMessage::Binary(Bytes::new()),
                _ => WsMessage::Text("{\"type\":".into()),
            };
            self.deliver(from, node, to, Some(bad));
        }
        self.deliver(from, node, to, Some(msg));
    }

    pub(super) fn deliver(
        &mut self,
        from: EpId,
        from_node: Node,
        to: EpId,
        msg: Option<WsMessage>,
    ) {
        let Some(to_node) = self.eps.get(&to).map(|e| e.node) else {
            return;
        };
        let lat = self.latency();
        let mut at = self.now + lat;
        if let Some(heal) = self.held_until(from_node, to_node) {
            at = at.max(heal + lat);
        }
        let at = at.max(self.last_delivery.get(&from).copied().unwrap_or(self.now));
        self.last_delivery.insert(from, at);
        self.schedule_at(at, Event::Deliver { from, to, msg });
    }

    pub(super) fn flow_link(&mut self, ep: EpId) -> Option<&mut dyn FlowLink> {
        self.eps.get_mut(&ep).map(|e| e.link.flow_link())
    }

    pub(super) fn pump_eps(&mut self) -> bool {
        let mut moved = false;
        let ids: Vec<EpId> = self.eps.keys().copied().collect();
        for id in ids {
            let Some(e) = self.eps.get_mut(&id) else {
                continue;
            };
            let (out, evs) = drain(&mut e.link);
            let node = e.node;
            moved |= !out.is_empty() || !evs.is_empty();
            for m in out {
                self.send(id, m);
            }
            for ev in evs {
                match (node, ev) {
                    (Node::Hub(h), EpEvent::T(te)) => self.hub_tunnel_event(h, id, te),
                    (Node::Hub(h), EpEvent::M(me)) => self.mesh_event(h, id, me),
                    (Node::Agent(i), EpEvent::T(te)) => self.agent_tunnel_event(i, id, te),
                    _ => {}
                }
            }
        }
        moved
    }
}
