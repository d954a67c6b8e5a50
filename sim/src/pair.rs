//! Two endpoints, two wires, one virtual clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nowconnect_core::WsMessage;
use nowconnect_core::mesh_link::MeshLink;
use nowconnect_core::tunnel::Tunnel;

/// What the pair needs from a link endpoint.
pub trait Endpoint {
    fn handle_message(&mut self, now: Instant, msg: &WsMessage);
    fn poll_transmit(&mut self) -> Option<WsMessage>;
    fn handle_timeout(&mut self, now: Instant);
    fn next_timeout(&self) -> Option<Instant>;
}

impl Endpoint for Tunnel {
    fn handle_message(&mut self, now: Instant, msg: &WsMessage) {
        Tunnel::handle_message(self, now, msg)
    }
    fn poll_transmit(&mut self) -> Option<WsMessage> {
        Tunnel::poll_transmit(self)
    }
    fn handle_timeout(&mut self, now: Instant) {
        Tunnel::handle_timeout(self, now)
    }
    fn next_timeout(&self) -> Option<Instant> {
        self.poll_timeout().map(|(at, _)| at)
    }
}

impl Endpoint for MeshLink {
    fn handle_message(&mut self, now: Instant, msg: &WsMessage) {
        MeshLink::handle_message(self, now, msg)
    }
    fn poll_transmit(&mut self) -> Option<WsMessage> {
        MeshLink::poll_transmit(self)
    }
    fn handle_timeout(&mut self, now: Instant) {
        MeshLink::handle_timeout(self, now)
    }
    fn next_timeout(&self) -> Option<Instant> {
        self.poll_timeout().map(|(at, _)| at)
    }
}

/// A clock that only moves when told to.
#[derive(Clone, Copy, Debug)]
pub struct VirtualClock {
    now: Instant,
}

impl VirtualClock {
    /// `origin` is an arbitrary instant; only durations added to it matter.
    pub fn new(origin: Instant) -> Self {
        VirtualClock { now: origin }
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub fn advance_to(&mut self, at: Instant) {
        if at > self.now {
            self.now = at;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    AToB,
    BToA,
}

pub struct Pair<A: Endpoint, B: Endpoint> {
    pub a: A,
    pub b: B,
    pub clock: VirtualClock,
    pub a_to_b: VecDeque<WsMessage>,
    pub b_to_a: VecDeque<WsMessage>,
    pub delivered: u64,
}

impl<A: Endpoint, B: Endpoint> Pair<A, B> {
    pub fn new(a: A, b: B, clock: VirtualClock) -> Self {
        let mut p = Pair {
            a,
            b,
            clock,
            a_to_b: VecDeque::new(),
            b_to_a: VecDeque::new(),
            delivered: 0,
        };
        p.collect();
        p
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Move everything both sides want to send onto the wires.
    pub fn collect(&mut self) {
        while let Some(m) = self.a.poll_transmit() {
            self.a_to_b.push_back(m);
        }
        while let Some(m) = self.b.poll_transmit() {
            self.b_to_a.push_back(m);
        }
    }

    pub fn wire(&mut self, dir: Dir) -> &mut VecDeque<WsMessage> {
        match dir {
            Dir::AToB => &mut self.a_to_b,
            Dir::BToA => &mut self.b_to_a,
        }
    }

    /// Deliver the oldest message in `dir`. Returns false if the wire is empty.
    pub fn deliver_one(&mut self, dir: Dir) -> bool {
        let now = self.clock.now();
        let Some(m) = self.wire(dir).pop_front() else {
            return false;
        };
        self.delivered += 1;
        match dir {
            Dir::AToB => self.b.handle_message(now, &m),
            Dir::BToA => self.a.handle_message(now, &m),
        }
        self.collect();
        true
    }

    /// Deliver until both wires are empty, bounded by `max_steps`.
    /// Returns false if the bound was hit (a livelock).
    pub fn run_until_idle(&mut self, max_steps: usize) -> bool {
        for _ in 0..max_steps {
            self.collect();
            if !self.deliver_one(Dir::AToB) && !self.deliver_one(Dir::BToA) {
                return true;
            }
        }
        false
    }

    pub fn next_timeout(&self) -> Option<Instant> {
        match (self.a.next_timeout(), self.b.next_timeout()) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        }
    }

    /// Jump the clock to the next deadline of either side and fire it.
    pub fn step_timers(&mut self) -> Option<Instant> {
        let at = self.next_timeout()?;
        self.clock.advance_to(at);
        let now = self.clock.now();
        self.a.handle_timeout(now);
        self.b.handle_timeout(now);
        self.collect();
        Some(at)
    }

    /// Move the clock by `d`, firing every deadline on the way in order.
    pub fn advance(&mut self, d: Duration) {
        let end = self.clock.now() + d;
        while let Some(at) = self.next_timeout() {
            if at > end {
                break;
            }
            self.step_timers();
            self.run_until_idle(100_000);
        }
        self.clock.advance_to(end);
    }
}
