//! [`FlowRelay`]: the flows of one link (an agent tunnel or a mesh link) as
//! its driver sees them, and the bridge between a mesh flow and a tunnel
//! flow on an owner hub.
//!
//! Each flow has a consumer:
//! - a **local** one (a client or target socket): deliveries leave as
//!   [`RelayOutput::Deliver`], and each chunk the consumer handed in leaves
//!   as [`RelayOutput::ChunkTaken`] once the link took all of it (the
//!   socket reader's permit);
//! - a **joined** flow on another link (a bridge): deliveries leave as
//!   [`RelayOutput::ToPeer`], and every byte the link takes of the peer's
//!   data is credited back to it at once ([`PeerMsg::Consumed`]);
//! - **held** for a join: an owner hub holds a mesh open until the agent's
//!   tunnel took the flow. What arrives meanwhile waits, what the link took
//!   of the peer's data is counted, and the open is accepted on the join
//!   ([`RelayOutput::AcceptOpen`]) or refused with the tunnel's reason when
//!   the peer resets it first ([`RelayOutput::RefuseOpen`]).
//!
//! The relay is driven by one link's task (each link keeps its own task, so
//! the data path stays parallel): the driver feeds it what the link's core
//! emits ([`FlowRelay::handle_event`]) and what its consumers send
//! ([`FlowRelay::data`], [`FlowRelay::fin`], [`FlowRelay::reset`],
//! [`FlowRelay::join`]), then drains [`FlowRelay::poll_output`] and carries
//! out each output in order. The simulation drives the same type.
//!
//! Bounds: what waits here for a flow is bounded by the sender's credit.
//! Data from a peer is only what that peer's link delivered, which its
//! receive window bounds, and it is credited back only as this link takes it;
//! a local consumer hands in a chunk per reader permit.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::mux::{FlowEvent, FlowLink};
use crate::{Cid, ErrorCode, Payload};

/// What one side of a bridged flow sends the other (the other link's task
/// feeds it to its relay with [`FlowRelay::data`], [`FlowRelay::fin`],
/// [`FlowRelay::reset`] or [`FlowRelay::credit`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    Data(Payload),
    Fin,
    Reset {
        code: ErrorCode,
        reason: String,
    },
    /// The other link took `n` bytes of this side's deliveries.
    Consumed(usize),
}

/// What a local consumer (a socket) must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Write these bytes, then report them with [`FlowRelay::consumed`].
    Data(Bytes),
    /// The peer finished sending: shut down the write half.
    Fin,
    /// The flow is over with an error: close the socket now.
    Reset { code: ErrorCode, reason: String },
}

/// What the driver carries out, in order, after each input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayOutput<P> {
    /// To the local consumer of `cid`.
    Deliver { cid: Cid, delivery: Delivery },
    /// The link took the whole of a chunk the local consumer of `cid`
    /// handed in: it may read another.
    ChunkTaken { cid: Cid },
    /// To the joined flow on another link (`peer` names it). When it cannot
    /// be delivered (that link is gone), the driver calls
    /// [`FlowRelay::peer_gone`].
    ToPeer { cid: Cid, peer: P, msg: PeerMsg },
    /// A held mesh open is joined to its tunnel flow: accept it now, then
    /// call [`FlowRelay::accepted`].
    AcceptOpen { cid: Cid },
    /// A held mesh open whose tunnel flow did not open: refuse it with the
    /// tunnel's reason (no reset of its own follows).
    RefuseOpen {
        cid: Cid,
        code: ErrorCode,
        reason: String,
    },
    /// The flow left the relay. `bridged`: it was the tunnel side of a
    /// bridge (the hub's flow count on the tunnel goes down with it).
    Ended {
        cid: Cid,
        connector: String,
        bridged: bool,
        /// How it ended: `None` in order, or the reset's code.
        reset: Option<ErrorCode>,
    },
}

#[derive(Debug)]
enum Sink<P> {
    Local,
    /// A mesh open waiting for its tunnel flow: accepted on the join.
    Held {
        queue: Vec<PeerMsg>,
        /// Bytes of the peer's data the link took before the join.
        taken: usize,
    },
    Joined(P),
}

#[derive(Debug)]
struct Slot<P> {
    sink: Sink<P>,
    pending: VecDeque<Payload>,
    fin_pending: bool,
    connector: String,
    bridged: bool,
}

/// The flows of one link: see the module documentation.
#[derive(Debug)]
pub struct FlowRelay<P> {
    flows: BTreeMap<Cid, Slot<P>>,
    out: VecDeque<RelayOutput<P>>,
}

impl<P> Default for FlowRelay<P> {
    fn default() -> Self {
        FlowRelay {
            flows: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }
}

impl<P: Clone> FlowRelay<P> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn contains(&self, cid: Cid) -> bool {
        self.flows.contains_key(&cid)
    }

    /// The connector flow `cid` was attached for, while it is open.
    pub fn connector(&self, cid: Cid) -> Option<&str> {
        self.flows.get(&cid).map(|s| s.connector.as_str())
    }

    /// Tunnel sides of bridges still open.
    pub fn bridged_open(&self) -> usize {
        self.flows.values().filter(|s| s.bridged).count()
    }

    /// Whether `cid` is a mesh open held for its tunnel flow.
    pub fn is_held_open(&self, cid: Cid) -> bool {
        matches!(
            self.flows.get(&cid).map(|s| &s.sink),
            Some(Sink::Held { .. })
        )
    }

    pub fn poll_output(&mut self) -> Option<RelayOutput<P>> {
        self.out.pop_front()
    }

    /// A flow the link already knows, with a local consumer.
    pub fn attach(&mut self, cid: Cid, connector: &str) {
        self.insert(cid, connector, Sink::Local, false);
    }

    /// A mesh open to be bridged to the agent's tunnel: held until
    /// [`Self::join`] (accepted then) or a reset from the bridge (refused).
    pub fn hold_open(&mut self, cid: Cid, connector: &str) {
        let sink = Sink::Held {
            queue: Vec::new(),
            taken: 0,
        };
        self.insert(cid, connector, sink, false);
    }

    /// The tunnel side of a bridge, joined to `peer` (the held mesh flow)
    /// at once.
    pub fn attach_joined(&mut self, cid: Cid, connector: &str, peer: P) {
        self.insert(cid, connector, Sink::Joined(peer), true);
    }

    fn insert(&mut self, cid: Cid, connector: &str, sink: Sink<P>, bridged: bool) {
        let slot = Slot {
            sink,
            pending: VecDeque::new(),
            fin_pending: false,
            connector: connector.to_string(),
            bridged,
        };
        if let Some(old) = self.flows.insert(cid, slot) {
            // The link allots each cid once; a reused one replaces a flow the
            // link already forgot. Its consumer still hears that it ended.
            let reason = "the link reused the flow's id";
            self.tell_reset(cid, &old, ErrorCode::ConnectionReset, reason);
            self.ended(cid, old, Some(ErrorCode::ConnectionReset));
        }
    }

    fn ended(&mut self, cid: Cid, slot: Slot<P>, reset: Option<ErrorCode>) {
        self.out.push_back(RelayOutput::Ended {
            cid,
            connector: slot.connector,
            bridged: slot.bridged,
            reset,
        });
    }

    fn detach(&mut self, cid: Cid) -> Option<Slot<P>> {
        self.flows.remove(&cid)
    }

    /// Join the held flow `cid` to `peer`: a held open is accepted, what
    /// waited goes to the peer, then the credit for what the link took of
    /// its data. A flow that ended while held resets the peer's.
    pub fn join(&mut self, cid: Cid, peer: P) {
        let Some(slot) = self.flows.get_mut(&cid) else {
            self.out.push_back(RelayOutput::ToPeer {
                cid,
                peer,
                msg: PeerMsg::Reset {
                    code: ErrorCode::ConnectionReset,
                    reason: "the mesh flow ended before it was bridged".into(),
                },
            });
            return;
        };
        let held = std::mem::replace(&mut slot.sink, Sink::Joined(peer.clone()));
        let Sink::Held { queue, taken } = held else {
            // Joined twice: the first join stands, and the second peer's
            // flow is reset rather than left open with nobody to feed it.
            slot.sink = held;
            self.out.push_back(RelayOutput::ToPeer {
                cid,
                peer,
                msg: PeerMsg::Reset {
                    code: ErrorCode::ProtocolError,
                    reason: "the mesh flow is bridged already".into(),
                },
            });
            return;
        };
        self.out.push_back(RelayOutput::AcceptOpen { cid });
        for msg in queue {
            self.out.push_back(RelayOutput::ToPeer {
                cid,
                peer: peer.clone(),
                msg,
            });
        }
        if taken > 0 {
            self.out.push_back(RelayOutput::ToPeer {
                cid,
                peer,
                msg: PeerMsg::Consumed(taken),
            });
        }
    }

    /// The driver accepted the open ([`RelayOutput::AcceptOpen`]): what
    /// waited for the acceptance goes now (the peer's FIN, held back so
    /// that the link never saw the flow done while its client's bytes were
    /// still held here).
    pub fn accepted(&mut self, link: &mut (impl FlowLink + ?Sized), cid: Cid) {
        self.push_pending(link, cid);
    }

    /// Data for the link from the flow's consumer (a socket's chunk, or a
    /// joined peer's delivery): handed to the link as far as its credit
    /// allows, the rest waits for [`FlowEvent::Writable`].
    pub fn data(&mut self, link: &mut (impl FlowLink + ?Sized), cid: Cid, payload: Payload) {
        if let Some(slot) = self.flows.get_mut(&cid) {
            slot.pending.push_back(payload);
            self.push_pending(link, cid);
        }
    }

    /// The consumer finished sending: FIN once all its data is in.
    pub fn fin(&mut self, link: &mut (impl FlowLink + ?Sized), cid: Cid) {
        if let Some(slot) = self.flows.get_mut(&cid) {
            slot.fin_pending = true;
            self.push_pending(link, cid);
        }
    }

    /// The consumer ended the flow (a socket error, or a reset from the
    /// joined peer): the link resets it; nothing is told back. A held open
    /// is refused with that reason instead.
    pub fn reset(
        &mut self,
        link: &mut (impl FlowLink + ?Sized),
        cid: Cid,
        code: ErrorCode,
        reason: &str,
    ) {
        if let Some(slot) = self.end_on_link(link, cid, code, reason) {
            self.ended(cid, slot, Some(code));
        }
    }

    /// Take `cid` out and end it on the link: a held open is refused, any
    /// other flow reset.
    fn end_on_link(
        &mut self,
        link: &mut (impl FlowLink + ?Sized),
        cid: Cid,
        code: ErrorCode,
        reason: &str,
    ) -> Option<Slot<P>> {
        let slot = self.detach(cid)?;
        if matches!(slot.sink, Sink::Held { .. }) {
            self.out.push_back(RelayOutput::RefuseOpen {
                cid,
                code,
                reason: reason.to_string(),
            });
        } else {
            link.reset_flow(cid, code, reason);
        }
        Some(slot)
    }

    /// The local consumer wrote `n` delivered bytes.
    pub fn consumed(&mut self, link: &mut (impl FlowLink + ?Sized), cid: Cid, n: usize) {
        link.consumed(cid, n);
    }

    /// What the joined peer sends ([`RelayOutput::ToPeer`] of the other
    /// link's relay).
    pub fn from_peer(&mut self, link: &mut (impl FlowLink + ?Sized), cid: Cid, msg: PeerMsg) {
        match msg {
            PeerMsg::Data(p) => self.data(link, cid, p),
            PeerMsg::Fin => self.fin(link, cid),
            PeerMsg::Reset { code, reason } => self.reset(link, cid, code, &reason),
            PeerMsg::Consumed(n) => self.consumed(link, cid, n),
        }
    }

    /// End a flow from this side: the link resets it, a joined peer is
    /// reset too, a local consumer is told.
    pub fn fail(
        &mut self,
        link: &mut (impl FlowLink + ?Sized),
        cid: Cid,
        code: ErrorCode,
        reason: &str,
    ) {
        if let Some(slot) = self.end_on_link(link, cid, code, reason) {
            self.tell_reset(cid, &slot, code, reason);
            self.ended(cid, slot, Some(code));
        }
    }

    /// A [`RelayOutput::ToPeer`] for `cid` found the other link gone: the
    /// flow fails here.
    pub fn peer_gone(&mut self, link: &mut (impl FlowLink + ?Sized), cid: Cid) {
        self.fail(
            link,
            cid,
            ErrorCode::LinkLost,
            "the other side of the bridged flow went away",
        );
    }

    /// The link is gone (or being replaced): every flow ends, and joined
    /// peers are reset. What the link's core still had to say about these
    /// flows is void.
    pub fn link_lost(&mut self, reason: &str) {
        let flows = std::mem::take(&mut self.flows);
        for (cid, slot) in flows {
            self.tell_reset(cid, &slot, ErrorCode::LinkLost, reason);
            self.ended(cid, slot, Some(ErrorCode::LinkLost));
        }
    }

    fn tell_reset(&mut self, cid: Cid, slot: &Slot<P>, code: ErrorCode, reason: &str) {
        let reason = reason.to_string();
        match &slot.sink {
            Sink::Local => self.out.push_back(RelayOutput::Deliver {
                cid,
                delivery: Delivery::Reset { code, reason },
            }),
            Sink::Joined(p) => self.out.push_back(RelayOutput::ToPeer {
                cid,
                peer: p.clone(),
                msg: PeerMsg::Reset { code, reason },
            }),
            Sink::Held { .. } => {}
        }
    }

    /// What the link's core emitted for one of its flows.
    pub fn handle_event(&mut self, link: &mut (impl FlowLink + ?Sized), fe: FlowEvent) {
        match fe {
            FlowEvent::Data { cid, payload } => self.deliver(cid, Delivery::Data(payload)),
            FlowEvent::Fin { cid } => self.deliver(cid, Delivery::Fin),
            FlowEvent::Reset { cid, code, reason } => {
                if let Some(slot) = self.detach(cid) {
                    self.tell_reset(cid, &slot, code, &reason);
                    self.ended(cid, slot, Some(code));
                }
            }
            FlowEvent::Writable { cid, .. } => self.push_pending(link, cid),
            FlowEvent::Closed { cid } => {
                if let Some(slot) = self.detach(cid) {
                    self.ended(cid, slot, None);
                }
            }
        }
    }

    fn deliver(&mut self, cid: Cid, delivery: Delivery) {
        let Some(slot) = self.flows.get_mut(&cid) else {
            return;
        };
        let to_peer = |d: Delivery| match d {
            Delivery::Data(b) => PeerMsg::Data(b.into()),
            Delivery::Fin => PeerMsg::Fin,
            Delivery::Reset { code, reason } => PeerMsg::Reset { code, reason },
        };
        match &mut slot.sink {
            Sink::Local => self.out.push_back(RelayOutput::Deliver { cid, delivery }),
            Sink::Held { queue, .. } => queue.push(to_peer(delivery)),
            Sink::Joined(p) => self.out.push_back(RelayOutput::ToPeer {
                cid,
                peer: p.clone(),
                msg: to_peer(delivery),
            }),
        }
    }

    /// Hand waiting data to the link as far as its credit allows; credit
    /// the consumer for what it took; FIN once all data is in.
    fn push_pending(&mut self, link: &mut (impl FlowLink + ?Sized), cid: Cid) {
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
            if link.send_data(cid, chunk).is_err() {
                // The link no longer has the flow: its own event ends it.
                return;
            }
            let done = front.is_empty();
            if done {
                slot.pending.pop_front();
            }
            match &mut slot.sink {
                Sink::Local => {
                    if done {
                        self.out.push_back(RelayOutput::ChunkTaken { cid });
                    }
                }
                Sink::Held { taken, .. } => *taken += take,
                Sink::Joined(p) => self.out.push_back(RelayOutput::ToPeer {
                    cid,
                    peer: p.clone(),
                    msg: PeerMsg::Consumed(take),
                }),
            }
        }
        // A held open sends no FIN before its join: with the peer's FIN in
        // too, the link would see the flow done and forget it, and what the
        // client sent meanwhile (held here) with it.
        if slot.fin_pending && !matches!(slot.sink, Sink::Held { .. }) {
            slot.fin_pending = false;
            let _ = link.send_fin(cid);
        }
    }
}
