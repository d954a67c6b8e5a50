//! Faults: the swarm profile drawn per seed, and the chaos tick that
//! injects resets, partitions, crashes, drains, restarts, Redis losses and
//! token revocations;
//! healing at the end of the chaos phase.

use super::*;

/// Which faults a run injects and how often (drawn per seed: swarm testing).
/// Chances named "per tick" are rolled every 10 ms of chaos.
#[derive(Clone, Debug)]
pub struct FaultProfile {
    pub latency_min: Duration,
    pub latency_max: Duration,
    /// Per tick: an agent tunnel is cut.
    pub tunnel_reset: f64,
    /// Per tick: a mesh link is cut.
    pub mesh_reset: f64,
    /// Per tick: a partition starts (between two hubs, an agent and a hub,
    /// or a hub and Redis; one way or both).
    pub partition: f64,
    /// Per tick: a hub crashes (and restarts after a while).
    pub hub_crash: f64,
    /// Per tick: a hub drains (SIGTERM): tells its agents to move, exits
    /// after a grace period, restarts after a while.
    pub hub_drain: f64,
    /// Per tick: an agent process restarts.
    pub agent_restart: f64,
    /// Per tick: Redis goes down for a while.
    pub redis_outage: f64,
    /// Per tick: Redis fails over to a replica that lags or is empty.
    pub redis_failover: f64,
    /// Per registry call: the reply is slow (up to twice the hub's timeout).
    pub redis_slow: f64,
    /// Per message: a malformed frame is put on the wire before it.
    pub malformed: f64,
    /// Chance that a target refuses a connection.
    pub target_refuse: f64,
    /// Chance per client send that the client resets its connection.
    pub client_reset: f64,
    /// Chance that a client half-closes early (FIN before all its data).
    pub client_half_close: f64,
    /// Chance that a client reads slowly (drains in bursts).
    pub slow_reader: f64,
    /// Per token issued: the issuer writes the next one only after this
    /// one expired (the agent cannot renew in time).
    pub token_late: f64,
    /// Per token issued: it is for another agent or tenant, or narrower in
    /// scope (a hub refuses it as a renewal); put right shortly after.
    pub token_bad: f64,
    /// Per tick: a tunnel's token is revoked at its hub.
    pub revocation: f64,
}

impl FaultProfile {
    /// Each fault enabled with probability 1/2, with a random weight.
    pub fn swarm(rng: &mut Rng) -> Self {
        let mut pick = |max: f64| {
            if rng.below(2) == 0 {
                0.0
            } else {
                (rng.below(1000) as f64 / 1000.0) * max
            }
        };
        let tunnel_reset = pick(0.02);
        let mesh_reset = pick(0.02);
        let partition = pick(0.02);
        let hub_crash = pick(0.005);
        let hub_drain = pick(0.005);
        let agent_restart = pick(0.005);
        let redis_outage = pick(0.005);
        let redis_failover = pick(0.005);
        let redis_slow = pick(0.2);
        let malformed = pick(0.0005);
        let target_refuse = pick(0.3);
        let client_reset = pick(0.05);
        let client_half_close = pick(0.3);
        let slow_reader = pick(0.5);
        let token_late = pick(0.3);
        let token_bad = pick(0.4);
        let revocation = pick(0.01);
        let latency_max = Duration::from_micros(50 + rng.below(20_000));
        FaultProfile {
            latency_min: Duration::from_micros(20),
            latency_max,
            tunnel_reset,
            mesh_reset,
            partition,
            hub_crash,
            hub_drain,
            agent_restart,
            redis_outage,
            redis_failover,
            redis_slow,
            malformed,
            target_refuse,
            client_reset,
            client_half_close,
            slow_reader,
            token_late,
            token_bad,
            revocation,
        }
    }

    fn healed(&self) -> Self {
        FaultProfile {
            latency_min: self.latency_min,
            latency_max: self.latency_max,
            tunnel_reset: 0.0,
            mesh_reset: 0.0,
            partition: 0.0,
            hub_crash: 0.0,
            hub_drain: 0.0,
            agent_restart: 0.0,
            redis_outage: 0.0,
            redis_failover: 0.0,
            redis_slow: 0.0,
            malformed: 0.0,
            target_refuse: 0.0,
            client_reset: 0.0,
            client_half_close: 0.0,
            slow_reader: 0.0,
            token_late: 0.0,
            token_bad: 0.0,
            revocation: 0.0,
        }
    }
}

impl World {
    /// Which faults start this tick.
    pub(super) fn chaos_tick(&mut self) {
        // A lagging replica: what a failover would find.
        if self.rng.below(30) == 0 {
            self.replica = self.registry.clone();
        }
        let rolls: [bool; 9] = match &mut self.chaos {
            Chaos::Seeded => {
                let f = self.faults.clone();
                [
                    self.chance(f.tunnel_reset),
                    self.chance(f.mesh_reset),
                    self.chance(f.partition),
                    self.chance(f.hub_crash),
                    self.chance(f.agent_restart),
                    self.chance(f.redis_outage),
                    self.chance(f.redis_failover),
                    self.chance(f.hub_drain),
                    self.chance(f.revocation),
                ]
            }
            Chaos::Bytes { data, pos } => {
                let Some(&b) = data.get(*pos) else {
                    return;
                };
                *pos += 1;
                let mut r = [false; 9];
                if let Some(slot) = r.get_mut(usize::from(b & 0x0f)) {
                    *slot = true;
                }
                r
            }
        };
        let [
            tunnel,
            mesh,
            partition,
            crash,
            restart,
            outage,
            failover,
            drain,
            revoke,
        ] = rolls;
        if revoke {
            self.revoke_random();
        }
        if drain {
            self.drain_hub();
        }
        if tunnel
            && self
                .cut_random(|e| matches!(e.node, Node::Hub(_)) && matches!(e.link, Link::Tunnel(_)))
        {
            self.outcome.tunnel_resets += 1;
        }
        if mesh && self.cut_random(|e| e.mesh_to.is_some()) {
            self.outcome.mesh_resets += 1;
        }
        if partition {
            self.start_partition();
        }
        if crash {
            self.crash_hub();
        }
        if restart {
            self.restart_agent();
        }
        if outage {
            let d = Duration::from_millis(100 + self.rng.below(1900));
            self.redis_down_until = Some(self.now + d);
            self.outcome.redis_outages += 1;
            self.trace(10, d.as_millis() as u64, 0);
        }
        if failover {
            // Half the time the replica lags, half the time it is empty.
            if self.rng.below(2) == 0 {
                self.registry = self.replica.clone();
            } else {
                self.registry.lose_data();
            }
            self.outcome.redis_failovers += 1;
            self.trace(11, 0, 0);
        }
    }

    /// Cut one connection whose end matches `pick`; both ends learn it.
    pub(super) fn cut_random(&mut self, pick: impl Fn(&Ep) -> bool) -> bool {
        let ids: Vec<EpId> = self
            .eps
            .iter()
            .filter(|(_, e)| e.peer.is_some() && pick(e))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return false;
        }
        let ep = ids[self.rng.below(ids.len() as u64) as usize];
        self.trace(12, ep, 0);
        let peer = self.eps[&ep].peer;
        for id in [Some(ep), peer].into_iter().flatten() {
            self.disconnect(id, "simulated connection reset");
        }
        true
    }

    pub(super) fn disconnect(&mut self, id: EpId, reason: &str) {
        let now = self.now;
        if let Some(e) = self.eps.get_mut(&id) {
            e.peer = None;
            match &mut e.link {
                Link::Tunnel(t) => t.on_disconnected(reason),
                Link::Mesh(l) => l.on_disconnected(now, reason),
            }
        }
    }

    pub(super) fn start_partition(&mut self) {
        let hubs = self.hubs.len() as u64;
        let a = Node::Hub(self.rng.below(hubs) as usize);
        let b = match self.rng.below(3) {
            0 if hubs > 1 => {
                let Node::Hub(x) = a else { unreachable!() };
                Node::Hub(((x as u64 + 1 + self.rng.below(hubs - 1)) % hubs) as usize)
            }
            1 if !self.agents.is_empty() => {
                Node::Agent(self.rng.below(self.agents.len() as u64) as usize)
            }
            _ => Node::Redis,
        };
        let until = self.now + Duration::from_millis(100 + self.rng.below(2900));
        // One way or both.
        match self.rng.below(3) {
            0 => {
                self.partitions.insert((a, b), until);
            }
            1 => {
                self.partitions.insert((b, a), until);
            }
            _ => {
                self.partitions.insert((a, b), until);
                self.partitions.insert((b, a), until);
            }
        }
        self.outcome.partitions += 1;
        self.trace(13, until.duration_since(self.origin).as_millis() as u64, 0);
    }

    /// A hub process dies: its connections end, its clients with it.
    pub(super) fn crash_hub(&mut self) {
        let alive: Vec<usize> = (0..self.hubs.len())
            .filter(|h| self.hubs[*h].alive)
            .collect();
        if alive.is_empty() {
            return;
        }
        let h = alive[self.rng.below(alive.len() as u64) as usize];
        self.trace(14, h as u64, 0);
        self.log(format_args!("hub {h} crashes"));
        self.outcome.hub_crashes += 1;
        let name = self.hubs[h].cfg.replica_id.clone();
        for a in &self.agents {
            let hubs: Vec<Option<&str>> = a
                .node
                .slot_states()
                .map(|s| match s {
                    HubLinkState::Connected { attempt } => a.node.hub_of(*attempt),
                    _ => None,
                })
                .collect();
            let here = hubs.contains(&Some(name.as_str()));
            let elsewhere = hubs.iter().any(|r| r.is_some_and(|r| r != name));
            if a.node.slots() > 1 && here && elsewhere {
                self.outcome.crashes_survived_multi_homed += 1;
            }
        }
        self.stop_hub(h, "hub_crash");
    }

    /// A hub gets SIGTERM: it drains (its agents are told to move, its flows
    /// go on, its listeners close after a delay) and exits when its node
    /// says the drain is over: nothing left, or the grace period (0.3–1.5 s)
    /// ended.
    pub(super) fn drain_hub(&mut self) {
        let live: Vec<usize> = (0..self.hubs.len())
            .filter(|h| self.hubs[*h].alive && !self.hubs[*h].node.hub().is_draining())
            .collect();
        if live.is_empty() {
            return;
        }
        let h = live[self.rng.below(live.len() as u64) as usize];
        self.trace(17, h as u64, 0);
        self.log(format_args!("hub {h} drains"));
        self.outcome.hub_drains += 1;
        let now = self.now;
        let grace_ms = 300 + self.rng.below(1200);
        let delay = Duration::from_millis(self.rng.below(grace_ms / 3));
        self.hubs[h]
            .node
            .drain(now, delay, Duration::from_millis(grace_ms));
    }

    /// Hub `h`'s node says its drain is over: it exits. Over `complete`ly,
    /// no client of the hub may still have a flow open.
    pub(super) fn drain_over(&mut self, h: usize, complete: bool) {
        if complete {
            let open = self
                .clients
                .values()
                .filter(|c| c.hub == h && matches!(c.state, ClientState::Open { .. }))
                .count();
            if open > 0 {
                return self.fail(format!(
                    "hub {h} finished its drain with {open} client flows open"
                ));
            }
            self.outcome.hub_drains_complete += 1;
        }
        self.stop_hub(h, "drain_grace_over");
    }

    /// Hub `h` is gone (crash, or exit after a drain): its connections end,
    /// its clients with it (counted as `why`); it restarts after a while.
    pub(super) fn stop_hub(&mut self, h: usize, why: &'static str) {
        let hub = &mut self.hubs[h];
        hub.alive = false;
        hub.incarnation += 1;
        let mine: Vec<EpId> = self
            .eps
            .iter()
            .filter(|(_, e)| e.node == Node::Hub(h))
            .map(|(id, _)| *id)
            .collect();
        for id in mine {
            self.remove_ep(id);
        }
        for c in self.clients.values_mut() {
            if c.hub == h && c.state != ClientState::Done {
                c.state = ClientState::Done;
                c.ended = Some(ErrorCode::ConnectionReset);
                *self.outcome.flows_reset.entry(why).or_default() += 1;
            }
        }
        let d = Duration::from_millis(200 + self.rng.below(1800));
        self.schedule(d, Event::HubRestart { hub: h });
    }

    pub(super) fn restart_agent(&mut self) {
        if self.agents.is_empty() {
            return;
        }
        let i = self.rng.below(self.agents.len() as u64) as usize;
        self.trace(15, i as u64, 0);
        self.outcome.agent_restarts += 1;
        for ep in std::mem::take(&mut self.agents[i].eps).into_values() {
            self.remove_ep(ep);
        }
        let seed = self.rng.next_u64();
        let a = &mut self.agents[i];
        a.incarnation += 1;
        a.node = AgentNode::new(self.now, a.cfg.clone(), seed);
        self.restart_renewal(i);
    }

    /// Heal every fault (the liveness phase): no new faults, partitions and
    /// Redis outages end now, crashed hubs come back.
    pub fn heal(&mut self) {
        self.faults = self.faults.healed();
        self.chaos = Chaos::Bytes {
            data: Vec::new(),
            pos: 0,
        };
        self.partitions.clear();
        self.redis_down_until = None;
        // Every agent gets a fresh token for it now; the issuer is on time
        // from here on.
        self.reissue_tokens();
        // A drain in progress ends now (the hub exits and comes back).
        for h in 0..self.hubs.len() {
            if self.hubs[h].alive && self.hubs[h].node.hub().is_draining() {
                self.stop_hub(h, "drain_grace_over");
            }
        }
        for h in 0..self.hubs.len() {
            if !self.hubs[h].alive {
                self.schedule(Duration::ZERO, Event::HubRestart { hub: h });
            }
        }
    }
}
