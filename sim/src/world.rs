//! A deterministic world: one hub, several agents, clients and echo targets,
//! built only from the core state machines (`Hub`, `Agent`, `Tunnel`,
//! `MemoryRegistry`), a simulated network and a virtual clock, all driven by
//! one seed. A swarm fault profile (drawn from the seed) injects link latency
//! and jitter, tunnel resets, target refusals, client resets, half-closes and
//! slow readers. Invariants are checked after every step; after the chaos
//! phase every fault heals and new flows must succeed within a bound.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nowconnect_core::agent::{Agent, AgentConfig, AgentOutput};
use nowconnect_core::hub::{Hub, HubConfig, HubOutput};
use nowconnect_core::mux::FlowEvent;
use nowconnect_core::registry::MemoryRegistry;
use nowconnect_core::rng::Rng;
use nowconnect_core::routing::{Mode, Route};
use nowconnect_core::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
use nowconnect_core::{Cid, ErrorCode, WsMessage};

/// Which faults a run injects and how often (drawn per seed: swarm testing).
#[derive(Clone, Debug)]
pub struct FaultProfile {
    pub latency_min: Duration,
    pub latency_max: Duration,
    /// Chance per chaos tick (10 ms) that a tunnel is cut.
    pub tunnel_reset: f64,
    /// Chance that a target refuses a connection.
    pub target_refuse: f64,
    /// Chance per client send that the client resets its connection.
    pub client_reset: f64,
    /// Chance that a client half-closes early (FIN before all its data).
    pub client_half_close: f64,
    /// Chance that a client reads slowly (drains in bursts).
    pub slow_reader: f64,
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
        let target_refuse = pick(0.3);
        let client_reset = pick(0.05);
        let client_half_close = pick(0.3);
        let slow_reader = pick(0.5);
        let latency_max = Duration::from_micros(50 + rng.below(20_000));
        FaultProfile {
            latency_min: Duration::from_micros(20),
            latency_max,
            tunnel_reset,
            target_refuse,
            client_reset,
            client_half_close,
            slow_reader,
        }
    }

    fn healed(&self) -> Self {
        FaultProfile {
            latency_min: self.latency_min,
            latency_max: self.latency_max,
            tunnel_reset: 0.0,
            target_refuse: 0.0,
            client_reset: 0.0,
            client_half_close: 0.0,
            slow_reader: 0.0,
        }
    }
}

/// Counts of what a run did, printed by the tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub events: u64,
    pub flows_started: u64,
    pub flows_completed: u64,
    pub flows_reset: BTreeMap<&'static str, u64>,
    pub flows_refused: BTreeMap<&'static str, u64>,
    pub tunnel_resets: u64,
    pub target_refusals: u64,
    pub client_resets: u64,
    pub half_closes: u64,
    pub slow_readers: u64,
    pub bytes_echoed: u64,
    pub trace_hash: u64,
}

#[derive(Debug)]
enum Event {
    Deliver {
        link: u64,
        to_hub: bool,
        msg: WsMessage,
    },
    HubDialDone {
        agent: usize,
        attempt: u64,
    },
    TargetDialDone {
        agent: usize,
        link: u64,
        cid: Cid,
        ok: bool,
    },
    ClientStart {
        client: u64,
    },
    ClientStep {
        client: u64,
    },
    ChaosTick,
}

#[derive(Debug, PartialEq, Eq)]
enum ClientState {
    Waiting,
    Open { link: u64, cid: Cid },
    Done,
}

#[derive(Debug)]
struct Client {
    state: ClientState,
    data: Vec<u8>,
    sent: usize,
    received: Vec<u8>,
    fin_sent: bool,
    fin_received: bool,
    slow: bool,
    unconsumed: usize,
    ended: Option<ErrorCode>,
}

#[derive(Debug, Default)]
struct Target {
    connected: bool,
    buf: Vec<u8>,
    inbox: usize,
    fin: bool,
    fin_sent: bool,
}

struct SimAgent {
    agent: Agent,
    link: Option<(u64, u64, Tunnel)>, // (link, attempt, agent-side tunnel)
    targets: BTreeMap<Cid, Target>,
}

pub struct World {
    origin: Instant,
    now: Instant,
    rng: Rng,
    faults: FaultProfile,
    hub: Hub,
    registry: MemoryRegistry,
    hub_tunnels: BTreeMap<u64, Tunnel>,
    agents: Vec<SimAgent>,
    clients: BTreeMap<u64, Client>,
    by_flow: BTreeMap<(u64, Cid), u64>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    next_event: usize,
    seq: u64,
    last_delivery: BTreeMap<(u64, bool), Instant>,
    next_link: u64,
    next_client: u64,
    tunnel_cfg: TunnelConfig,
    pub outcome: Outcome,
}

/// A broken invariant, with the time and what was seen.
#[derive(Debug)]
pub struct Violation(pub String);

const CHUNK: usize = 8 * 1024;

impl World {
    /// `origin` is an arbitrary instant; only offsets from it matter.
    pub fn new(seed: u64, origin: Instant, agents: usize) -> World {
        Self::with_bug(seed, origin, agents, nowconnect_core::mux::PlantedBug::None)
    }

    /// A world whose tunnels carry a deliberate bug (see `PlantedBug`).
    pub fn with_bug(
        seed: u64,
        origin: Instant,
        agents: usize,
        bug: nowconnect_core::mux::PlantedBug,
    ) -> World {
        let mut rng = Rng::new(seed);
        let faults = FaultProfile::swarm(&mut rng);
        let tunnel_cfg = TunnelConfig {
            window: 16 * 1024 + rng.below(64 * 1024) as u32,
            max_flows: 64,
            dedup_capacity: 64,
            planted_bug: bug,
            ..TunnelConfig::default()
        };
        let hub = Hub::new(
            origin,
            HubConfig {
                replica_id: "hub-a".into(),
                mode: Mode::Off,
                ..HubConfig::default()
            },
            rng.next_u64(),
        );
        let mut w = World {
            origin,
            now: origin,
            faults,
            hub,
            registry: MemoryRegistry::new(),
            hub_tunnels: BTreeMap::new(),
            agents: Vec::new(),
            clients: BTreeMap::new(),
            by_flow: BTreeMap::new(),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            seq: 0,
            last_delivery: BTreeMap::new(),
            next_link: 1,
            next_client: 1,
            tunnel_cfg,
            outcome: Outcome {
                trace_hash: 0xcbf2_9ce4_8422_2325,
                ..Outcome::default()
            },
            rng,
        };
        for i in 0..agents {
            let mut connectors = BTreeMap::new();
            connectors.insert("echo".to_string(), "target:7".to_string());
            let cfg = AgentConfig {
                agent_id: format!("agent-{i}"),
                hubs: vec!["sim://hub-a/tunnel".into()],
                connectors,
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                ..AgentConfig::default()
            };
            let seed = w.rng.next_u64();
            w.agents.push(SimAgent {
                agent: Agent::new(origin, cfg, seed),
                link: None,
                targets: BTreeMap::new(),
            });
        }
        w.schedule(Duration::from_millis(10), Event::ChaosTick);
        w
    }

    pub fn faults(&self) -> &FaultProfile {
        &self.faults
    }

    fn schedule(&mut self, after: Duration, ev: Event) {
        let at = self.now + after;
        self.schedule_at(at, ev);
    }

    fn schedule_at(&mut self, at: Instant, ev: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.seq += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((at, self.seq, id)));
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = (self.faults.latency_min, self.faults.latency_max);
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros(self.rng.below(span.max(1)))
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.below(1_000_000) as f64) < p * 1_000_000.0
    }

    fn trace(&mut self, tag: u64, a: u64, b: u64) {
        // FNV-1a over (time, tag, a, b): the same seed gives the same hash.
        let t = self.now.duration_since(self.origin).as_nanos() as u64;
        for v in [t, tag, a, b] {
            for byte in v.to_le_bytes() {
                self.outcome.trace_hash ^= u64::from(byte);
                self.outcome.trace_hash = self.outcome.trace_hash.wrapping_mul(0x100_0000_01b3);
            }
        }
    }

    /// Start `n` client flows spread over the next `within`.
    pub fn start_clients(&mut self, n: usize, within: Duration) {
        for _ in 0..n {
            let id = self.next_client;
            self.next_client += 1;
            let len = 1 + self.rng.below(64 * 1024) as usize;
            let data: Vec<u8> = (0..len).map(|_| self.rng.below(256) as u8).collect();
            let slow = self.chance(self.faults.slow_reader);
            if slow {
                self.outcome.slow_readers += 1;
            }
            self.clients.insert(
                id,
                Client {
                    state: ClientState::Waiting,
                    data,
                    sent: 0,
                    received: Vec::new(),
                    fin_sent: false,
                    fin_received: false,
                    slow,
                    unconsumed: 0,
                    ended: None,
                },
            );
            let at = Duration::from_micros(self.rng.below(within.as_micros() as u64 + 1));
            self.schedule(at, Event::ClientStart { client: id });
        }
    }

    /// Run until `deadline`, checking invariants after every step.
    pub fn run_until(&mut self, deadline: Instant) -> Result<(), Violation> {
        loop {
            let next_ev = self.queue.peek().map(|Reverse((at, _, _))| *at);
            let next_timer = self.next_timer();
            let next = match (next_ev, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => return Ok(()),
                },
            };
            if next > deadline {
                self.now = deadline;
                return Ok(());
            }
            self.now = next.max(self.now);
            if next_ev == Some(next) {
                let Reverse((_, _, id)) = self.queue.pop().expect("peeked");
                let ev = self.events.remove(&id).expect("event body");
                self.outcome.events += 1;
                self.handle(ev);
            } else {
                self.fire_timers();
            }
            self.pump();
            self.check()?;
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let mut t = self.hub.poll_timeout();
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        };
        for tun in self.hub_tunnels.values() {
            take(tun.poll_timeout().map(|(at, _)| at));
        }
        for a in &self.agents {
            take(a.agent.poll_timeout());
            if let Some((_, _, tun)) = &a.link {
                take(tun.poll_timeout().map(|(at, _)| at));
            }
        }
        t
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        self.hub.handle_timeout(now);
        for tun in self.hub_tunnels.values_mut() {
            tun.handle_timeout(now);
        }
        for a in &mut self.agents {
            a.agent.handle_timeout(now);
            if let Some((_, _, tun)) = &mut a.link {
                tun.handle_timeout(now);
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = self.now;
        match ev {
            Event::Deliver { link, to_hub, msg } => {
                self.trace(1, link, u64::from(to_hub));
                if to_hub {
                    if let Some(t) = self.hub_tunnels.get_mut(&link) {
                        t.handle_message(now, &msg);
                    }
                } else if let Some(a) = self
                    .agents
                    .iter_mut()
                    .find(|a| a.link.as_ref().is_some_and(|l| l.0 == link))
                {
                    a.link.as_mut().expect("found").2.handle_message(now, &msg);
                }
            }
            Event::HubDialDone { agent, attempt } => {
                self.trace(2, agent as u64, attempt);
                let a = &mut self.agents[agent];
                if a.agent.state() != &(nowconnect_core::agent::HubLinkState::Dialing { attempt }) {
                    return;
                }
                let link = self.next_link;
                self.next_link += 1;
                let connectors = a.agent.connectors();
                let id = a.agent.agent_id().to_string();
                a.link = Some((
                    link,
                    attempt,
                    Tunnel::agent(now, self.tunnel_cfg.clone(), &id, &connectors),
                ));
                self.hub_tunnels
                    .insert(link, Tunnel::hub(now, self.tunnel_cfg.clone()));
            }
            Event::TargetDialDone {
                agent,
                link,
                cid,
                ok,
            } => {
                self.trace(3, cid, u64::from(ok));
                let a = &mut self.agents[agent];
                if a.link.as_ref().map(|l| l.0) != Some(link) || !a.targets.contains_key(&cid) {
                    return;
                }
                if ok {
                    if a.agent.target_connected(now, cid) {
                        let t = a.targets.get_mut(&cid).expect("target");
                        t.connected = true;
                        // What arrived before the connect is written now.
                        let n = std::mem::take(&mut t.inbox);
                        if n > 0 {
                            a.link.as_mut().expect("link").2.consumed(cid, n);
                        }
                        Self::echo(a, cid);
                    }
                } else {
                    a.agent.target_failed(now, cid, "connection refused");
                }
            }
            Event::ClientStart { client } => {
                self.trace(4, client, 0);
                self.outcome.flows_started += 1;
                self.hub.client_connected(now, client, "echo");
            }
            Event::ClientStep { client } => {
                self.trace(5, client, 0);
                self.client_step(client);
            }
            Event::ChaosTick => {
                if self.chance(self.faults.tunnel_reset) && !self.hub_tunnels.is_empty() {
                    let links: Vec<u64> = self.hub_tunnels.keys().copied().collect();
                    let link = links[self.rng.below(links.len() as u64) as usize];
                    self.trace(6, link, 0);
                    self.outcome.tunnel_resets += 1;
                    self.cut(link);
                }
                self.schedule(Duration::from_millis(10), Event::ChaosTick);
            }
        }
    }

    /// The network between hub and agent on `link` fails: both sides learn it.
    fn cut(&mut self, link: u64) {
        if let Some(t) = self.hub_tunnels.get_mut(&link) {
            t.on_disconnected("simulated connection reset");
        }
        if let Some(a) = self
            .agents
            .iter_mut()
            .find(|a| a.link.as_ref().is_some_and(|l| l.0 == link))
        {
            a.link
                .as_mut()
                .expect("found")
                .2
                .on_disconnected("simulated connection reset");
        }
    }

    fn client_step(&mut self, id: u64) {
        let Some(ClientState::Open { .. }) = self.clients.get(&id).map(|c| &c.state) else {
            return;
        };
        let delay = Duration::from_micros(100 + self.rng.below(2000));
        self.schedule(delay, Event::ClientStep { client: id });
        let c = self.clients.get_mut(&id).expect("client");
        let ClientState::Open { link, cid } = c.state else {
            return;
        };
        let Some(tun) = self.hub_tunnels.get_mut(&link) else {
            return;
        };
        // A slow reader drains what it has, in bursts.
        if c.unconsumed > 0 {
            let n = c.unconsumed;
            c.unconsumed = 0;
            tun.consumed(cid, n);
        }
        if c.fin_sent {
            return;
        }
        if self.faults.client_reset > 0.0
            && (self.rng.below(1_000_000) as f64) < self.faults.client_reset * 1e6
        {
            self.outcome.client_resets += 1;
            tun.reset_flow(cid, ErrorCode::ConnectionReset, "client reset");
            c.ended = Some(ErrorCode::ConnectionReset);
            c.state = ClientState::Done;
            self.by_flow.remove(&(link, cid));
            *self.outcome.flows_reset.entry("client_reset").or_default() += 1;
            return;
        }
        let credit = tun.send_credit(cid) as usize;
        let n = (c.data.len() - c.sent).min(credit).min(CHUNK);
        if n > 0 {
            let chunk = Bytes::copy_from_slice(&c.data[c.sent..c.sent + n]);
            if tun.send_data(cid, chunk).is_ok() {
                c.sent += n;
            }
        }
        let early = self.faults.client_half_close > 0.0
            && c.sent > 0
            && (self.rng.below(1_000_000) as f64) < self.faults.client_half_close * 1e6 / 8.0;
        if c.sent == c.data.len() || early {
            if early && c.sent < c.data.len() {
                self.outcome.half_closes += 1;
                c.data.truncate(c.sent);
            }
            if tun.send_fin(cid).is_ok() {
                c.fin_sent = true;
            }
        }
    }

    /// Echo what a target holds back to the hub, as far as credit allows.
    fn echo(a: &mut SimAgent, cid: Cid) {
        let Some((_, _, tun)) = a.link.as_mut() else {
            return;
        };
        let Some(t) = a.targets.get_mut(&cid) else {
            return;
        };
        if !t.connected {
            return;
        }
        while !t.buf.is_empty() {
            let credit = tun.send_credit(cid) as usize;
            let n = t.buf.len().min(credit).min(CHUNK);
            if n == 0 {
                break;
            }
            let chunk: Vec<u8> = t.buf.drain(..n).collect();
            if tun.send_data(cid, Bytes::from(chunk)).is_err() {
                break;
            }
        }
        if t.fin && t.buf.is_empty() && !t.fin_sent {
            t.fin_sent = true;
            let _ = tun.send_fin(cid);
        }
    }

    /// Drain every state machine until nothing moves.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            moved |= self.pump_hub();
            moved |= self.pump_hub_tunnels();
            moved |= self.pump_agents();
            if !moved {
                return;
            }
        }
        panic!("the world did not settle after 10,000 rounds");
    }

    fn pump_hub(&mut self) -> bool {
        let now = self.now;
        let mut moved = false;
        while let Some(o) = self.hub.poll_output() {
            moved = true;
            match o {
                HubOutput::Registry { op, call } => {
                    let r = self.registry.apply(now, &call);
                    self.hub.registry_reply(now, op, r);
                }
                HubOutput::AcceptTunnel { tunnel, epoch } => {
                    if let Some(t) = self.hub_tunnels.get_mut(&tunnel) {
                        t.accept(now, epoch);
                    }
                }
                HubOutput::CloseTunnel {
                    tunnel,
                    code,
                    reason,
                } => {
                    if let Some(t) = self.hub_tunnels.get_mut(&tunnel) {
                        t.close(code, &reason);
                    }
                }
                HubOutput::Route { client, route } => {
                    let Some(c) = self.clients.get_mut(&client) else {
                        continue;
                    };
                    match route {
                        Route::Local { tunnel, .. } => match self
                            .hub_tunnels
                            .get_mut(&tunnel)
                            .map(|t| t.open_flow("echo"))
                        {
                            Some(Ok(cid)) => {
                                c.state = ClientState::Open { link: tunnel, cid };
                                self.by_flow.insert((tunnel, cid), client);
                                self.hub.flow_started(tunnel);
                                self.schedule(Duration::ZERO, Event::ClientStep { client });
                            }
                            _ => {
                                c.state = ClientState::Done;
                                c.ended = Some(ErrorCode::LinkLost);
                                *self.outcome.flows_refused.entry("open_failed").or_default() += 1;
                            }
                        },
                        Route::Mesh { .. } => unreachable!("mode off never routes to the mesh"),
                        Route::Refuse { code, .. } => {
                            c.state = ClientState::Done;
                            c.ended = Some(code);
                            *self.outcome.flows_refused.entry(code.as_str()).or_default() += 1;
                        }
                    }
                }
                HubOutput::Peers(_) => {}
            }
        }
        moved
    }

    fn pump_hub_tunnels(&mut self) -> bool {
        let now = self.now;
        let mut moved = false;
        let links: Vec<u64> = self.hub_tunnels.keys().copied().collect();
        for link in links {
            let (out, evs) = drain(self.hub_tunnels.get_mut(&link).expect("link"));
            moved |= !out.is_empty() || !evs.is_empty();
            for m in out {
                self.send(link, false, m);
            }
            for e in evs {
                match e {
                    TunnelEvent::Hello {
                        agent_id,
                        connectors,
                    } => self
                        .hub
                        .tunnel_hello(now, link, &agent_id, &connectors, None),
                    TunnelEvent::Flow(fe) => self.client_event(link, fe),
                    TunnelEvent::Closed { .. } => {
                        self.hub_tunnels.remove(&link);
                        self.hub.tunnel_closed(now, link);
                    }
                    TunnelEvent::Established { .. }
                    | TunnelEvent::Open { .. }
                    | TunnelEvent::Rtt(_) => {}
                }
            }
        }
        moved
    }

    fn client_event(&mut self, link: u64, fe: FlowEvent) {
        let cid = match &fe {
            FlowEvent::Data { cid, .. }
            | FlowEvent::Fin { cid }
            | FlowEvent::Reset { cid, .. }
            | FlowEvent::Writable { cid, .. }
            | FlowEvent::Closed { cid } => *cid,
        };
        let Some(&id) = self.by_flow.get(&(link, cid)) else {
            return;
        };
        let c = self.clients.get_mut(&id).expect("client");
        match fe {
            FlowEvent::Data { payload, .. } => {
                c.received.extend_from_slice(&payload);
                self.outcome.bytes_echoed += payload.len() as u64;
                if c.slow {
                    c.unconsumed += payload.len();
                } else if let Some(t) = self.hub_tunnels.get_mut(&link) {
                    t.consumed(cid, payload.len());
                }
            }
            FlowEvent::Fin { .. } => c.fin_received = true,
            FlowEvent::Reset { code, .. } => {
                c.ended = Some(code);
                c.state = ClientState::Done;
                self.by_flow.remove(&(link, cid));
                self.hub.flow_ended(link);
                *self.outcome.flows_reset.entry(code.as_str()).or_default() += 1;
            }
            FlowEvent::Writable { .. } => {
                self.schedule(Duration::ZERO, Event::ClientStep { client: id })
            }
            FlowEvent::Closed { .. } => {
                c.state = ClientState::Done;
                self.by_flow.remove(&(link, cid));
                self.hub.flow_ended(link);
                self.outcome.flows_completed += 1;
            }
        }
    }

    fn pump_agents(&mut self) -> bool {
        let now = self.now;
        let mut moved = false;
        for i in 0..self.agents.len() {
            let mut outs = Vec::new();
            while let Some(o) = self.agents[i].agent.poll_output() {
                outs.push(o);
            }
            moved |= !outs.is_empty();
            for o in outs {
                match o {
                    AgentOutput::DialHub { attempt, .. } => {
                        let d = self.latency() * 2;
                        self.schedule(d, Event::HubDialDone { agent: i, attempt });
                    }
                    AgentOutput::AbortHub { .. } => {
                        if let Some((link, _, _)) = &self.agents[i].link {
                            let link = *link;
                            self.cut(link);
                        }
                    }
                    AgentOutput::DialTarget { cid, .. } => {
                        let ok = !self.chance(self.faults.target_refuse);
                        if !ok {
                            self.outcome.target_refusals += 1;
                        }
                        let d = self.latency();
                        if let Some((link, _, _)) = &self.agents[i].link {
                            let link = *link;
                            self.schedule(
                                d,
                                Event::TargetDialDone {
                                    agent: i,
                                    link,
                                    cid,
                                    ok,
                                },
                            );
                        }
                    }
                    AgentOutput::ResetFlow { cid, code, reason } => {
                        let a = &mut self.agents[i];
                        a.targets.remove(&cid);
                        if let Some((_, _, t)) = &mut a.link {
                            t.reset_flow(cid, code, &reason);
                        }
                    }
                }
            }
            let Some((link, attempt, _)) =
                self.agents[i].link.as_ref().map(|(l, a, _)| (*l, *a, ()))
            else {
                continue;
            };
            let (out, evs) = drain(&mut self.agents[i].link.as_mut().expect("link").2);
            moved |= !out.is_empty() || !evs.is_empty();
            for m in out {
                self.send(link, true, m);
            }
            for e in evs {
                let a = &mut self.agents[i];
                match e {
                    TunnelEvent::Established { .. } => a.agent.hub_established(now, attempt),
                    TunnelEvent::Open { cid, connector } => {
                        a.targets.insert(cid, Target::default());
                        a.agent.flow_opened(now, cid, &connector);
                    }
                    TunnelEvent::Flow(fe) => match fe {
                        FlowEvent::Data { cid, payload } => {
                            if let Some(t) = a.targets.get_mut(&cid) {
                                t.buf.extend_from_slice(&payload);
                                if t.connected {
                                    a.link
                                        .as_mut()
                                        .expect("link")
                                        .2
                                        .consumed(cid, payload.len());
                                } else {
                                    t.inbox += payload.len();
                                }
                                Self::echo(a, cid);
                            }
                        }
                        FlowEvent::Fin { cid } => {
                            if let Some(t) = a.targets.get_mut(&cid) {
                                t.fin = true;
                            }
                            Self::echo(a, cid);
                        }
                        FlowEvent::Writable { cid, .. } => Self::echo(a, cid),
                        FlowEvent::Reset { cid, .. } | FlowEvent::Closed { cid } => {
                            a.targets.remove(&cid);
                            a.agent.flow_gone(cid);
                        }
                    },
                    TunnelEvent::Closed { .. } => {
                        a.link = None;
                        a.targets.clear();
                        a.agent.hub_lost(now, attempt);
                        break;
                    }
                    TunnelEvent::Hello { .. } | TunnelEvent::Rtt(_) => {}
                }
            }
        }
        moved
    }

    /// Put a message on the wire; TCP keeps each direction in order.
    fn send(&mut self, link: u64, to_hub: bool, msg: WsMessage) {
        let lat = self.latency();
        let key = (link, to_hub);
        let at = (self.now + lat).max(self.last_delivery.get(&key).copied().unwrap_or(self.now));
        self.last_delivery.insert(key, at);
        self.schedule_at(at, Event::Deliver { link, to_hub, msg });
    }

    /// The invariants, after every step.
    fn check(&self) -> Result<(), Violation> {
        // No malformed input is injected, so no flow may end for a protocol
        // violation: that would be a bug in an endpoint.
        for code in ["credit_overrun", "sequence_gap", "protocol_error"] {
            if let Some(n) = self.outcome.flows_reset.get(code) {
                return Err(Violation(format!(
                    "{n} flow(s) reset for `{code}` though every peer is correct"
                )));
            }
        }
        for (id, c) in &self.clients {
            if !c.data.starts_with(&c.received) {
                return Err(Violation(format!(
                    "client {id}: received bytes are not a prefix of what it sent ({} of {} bytes)",
                    c.received.len(),
                    c.data.len()
                )));
            }
            if c.fin_received && c.ended.is_none() && c.received.len() != c.sent {
                return Err(Violation(format!(
                    "client {id}: FIN after {} bytes echoed, {} sent: a silent gap",
                    c.received.len(),
                    c.sent
                )));
            }
        }
        let bound = self.tunnel_cfg.max_flows;
        let tunnels = self.hub_tunnels.values().chain(
            self.agents
                .iter()
                .filter_map(|a| a.link.as_ref().map(|l| &l.2)),
        );
        for t in tunnels {
            if t.flow_count() > bound || t.mux().dedup().len() > bound {
                return Err(Violation(format!(
                    "a tunnel exceeds its bounds: {} flows",
                    t.flow_count()
                )));
            }
            for cid in t.mux().cids() {
                let f = t.mux().flow(cid).expect("listed");
                if f.recv_window() > u64::from(self.tunnel_cfg.window) {
                    return Err(Violation(format!(
                        "flow {cid}: receive window above the advertised window"
                    )));
                }
            }
            if let Some((at, why)) = t.poll_timeout()
                && at < self.now
            {
                return Err(Violation(format!(
                    "a tunnel asks to be woken in the past ({why:?})"
                )));
            }
        }
        if let Some(at) = self.hub.poll_timeout()
            && at < self.now
        {
            return Err(Violation("the hub asks to be woken in the past".into()));
        }
        Ok(())
    }

    /// Heal every fault (the liveness phase).
    pub fn heal(&mut self) {
        self.faults = self.faults.healed();
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    /// Clients not finished yet.
    pub fn open_clients(&self) -> usize {
        self.clients
            .values()
            .filter(|c| c.state != ClientState::Done)
            .count()
    }

    /// Clients started after `first_id` that completed with every byte echoed.
    pub fn completed_since(&self, first_id: u64) -> (usize, usize) {
        let fresh: Vec<&Client> = self.clients.range(first_id..).map(|(_, c)| c).collect();
        let ok = fresh
            .iter()
            .filter(|c| c.state == ClientState::Done && c.ended.is_none() && c.received == c.data)
            .count();
        (ok, fresh.len())
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client
    }
}

/// Everything a tunnel wants sent and everything it has to report.
fn drain(t: &mut Tunnel) -> (Vec<WsMessage>, Vec<TunnelEvent>) {
    (
        std::iter::from_fn(|| t.poll_transmit()).collect(),
        std::iter::from_fn(|| t.poll_event()).collect(),
    )
}
