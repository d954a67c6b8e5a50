//! A deterministic world: one to three hubs joined by a mesh, agents,
//! clients and echo targets, built only from the core state machines (`Hub`,
//! `Agent`, `Tunnel`, `MeshLink`, `MemoryRegistry`), a simulated network, a
//! simulated Redis and a virtual clock, all driven by one seed.
//!
//! A swarm fault profile (drawn from the seed) injects link latency and
//! jitter, tunnel and mesh resets, symmetric and asymmetric partitions
//! (hub–hub, agent–hub, hub–Redis), hub crashes and restarts, agent restarts,
//! Redis outages, slow Redis replies, Redis failovers that lose data, target
//! refusals, client resets, half-closes, slow readers and malformed frames.
//! Invariants are checked after every step; after the chaos phase every fault
//! heals and new flows must succeed within a bound.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use nowconnect_core::agent::{Agent, AgentConfig, AgentOutput, HubLinkState};
use nowconnect_core::hub::{Hub, HubConfig, HubOutput};
use nowconnect_core::mesh_link::{MeshEvent, MeshLink, MeshLinkConfig};
use nowconnect_core::mux::{FlowEvent, FlowLink, GROWTH_BUDGET_WINDOWS, PlantedBug};
use nowconnect_core::payload::HEADROOM;
use nowconnect_core::registry::{MemoryRegistry, RegistryError, RegistryOp, RegistryReply};
use nowconnect_core::rng::Rng;
use nowconnect_core::routing::{Mode, Route};
use nowconnect_core::tenant::{AgentCredential, DEFAULT_TENANT, qualify, split};
use nowconnect_core::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
use nowconnect_core::{Cid, Codec, Epoch, ErrorCode, Payload, WsMessage};

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
        }
    }
}

/// Counts of what a run did, printed by the tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub hubs: u64,
    pub events: u64,
    pub flows_started: u64,
    pub flows_completed: u64,
    /// Flows that crossed the mesh (origin hub other than the owner).
    pub flows_via_mesh: u64,
    pub flows_reset: BTreeMap<&'static str, u64>,
    pub flows_refused: BTreeMap<&'static str, u64>,
    pub tunnel_resets: u64,
    pub mesh_resets: u64,
    pub partitions: u64,
    pub hub_crashes: u64,
    pub hub_drains: u64,
    pub agent_restarts: u64,
    pub redis_outages: u64,
    pub redis_failovers: u64,
    pub redis_slow_replies: u64,
    pub malformed_frames: u64,
    /// Mesh opens the owner refused for a stale epoch (fencing at work).
    pub stale_epoch_refusals: u64,
    pub target_refusals: u64,
    pub client_resets: u64,
    pub half_closes: u64,
    pub slow_readers: u64,
    /// Times a flow's receive window doubled (`core/src/flow.rs`).
    pub windows_grown: u64,
    pub bytes_echoed: u64,
    /// HELLOs a hub refused because the token does not admit them.
    pub hellos_refused: u64,
    /// Flows of clients of the second tenant (`acme`), whose agents reuse
    /// the default tenant's agent ids and connector name.
    pub flows_other_tenant: u64,
    pub trace_hash: u64,
}

impl Outcome {
    /// Add another run's counts to these (the trace hash is not summed).
    pub fn add(&mut self, o: &Outcome) {
        self.hubs += o.hubs;
        self.events += o.events;
        self.flows_started += o.flows_started;
        self.flows_completed += o.flows_completed;
        self.flows_via_mesh += o.flows_via_mesh;
        for (k, v) in &o.flows_reset {
            *self.flows_reset.entry(k).or_default() += v;
        }
        for (k, v) in &o.flows_refused {
            *self.flows_refused.entry(k).or_default() += v;
        }
        self.tunnel_resets += o.tunnel_resets;
        self.mesh_resets += o.mesh_resets;
        self.partitions += o.partitions;
        self.hub_crashes += o.hub_crashes;
        self.hub_drains += o.hub_drains;
        self.agent_restarts += o.agent_restarts;
        self.redis_outages += o.redis_outages;
        self.redis_failovers += o.redis_failovers;
        self.redis_slow_replies += o.redis_slow_replies;
        self.malformed_frames += o.malformed_frames;
        self.stale_epoch_refusals += o.stale_epoch_refusals;
        self.hellos_refused += o.hellos_refused;
        self.flows_other_tenant += o.flows_other_tenant;
        self.target_refusals += o.target_refusals;
        self.client_resets += o.client_resets;
        self.half_closes += o.half_closes;
        self.slow_readers += o.slow_readers;
        self.windows_grown += o.windows_grown;
        self.bytes_echoed += o.bytes_echoed;
    }
}

/// Where chaos decisions come from: the seeded RNG, or fuzzer bytes (one
/// byte per chaos tick picks the fault; no more faults once they run out).
enum Chaos {
    Seeded,
    Bytes { data: Vec<u8>, pos: usize },
}

type EpId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Hub(usize),
    Agent(usize),
    Redis,
}

#[derive(Debug)]
enum Event {
    /// A message (or, with `None`, the connection's end) reaches `to`.
    Deliver {
        from: EpId,
        to: EpId,
        msg: Option<WsMessage>,
    },
    HubDialDone {
        agent: usize,
        incarnation: u64,
        attempt: u64,
        hub: usize,
    },
    MeshDialDone {
        ep: EpId,
    },
    TargetDialDone {
        ep: EpId,
        cid: Cid,
        ok: bool,
    },
    RegistryArrive {
        hub: usize,
        incarnation: u64,
        op: u64,
        call: RegistryOp,
    },
    RegistryReply {
        hub: usize,
        incarnation: u64,
        op: u64,
        result: Result<RegistryReply, RegistryError>,
    },
    ClientStart {
        client: u64,
    },
    ClientStep {
        client: u64,
    },
    HubRestart {
        hub: usize,
    },
    /// A draining hub's grace period is over: it exits.
    HubDrainEnd {
        hub: usize,
        incarnation: u64,
    },
    ChaosTick,
}

#[derive(Debug, PartialEq, Eq)]
enum ClientState {
    Waiting,
    Open { ep: EpId, cid: Cid },
    Done,
}

#[derive(Debug)]
struct Client {
    hub: usize,
    /// The tenant of the listener it connected to.
    tenant: &'static str,
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

/// One direction of an owner-side bridge between a mesh flow and a flow on
/// the agent's tunnel: bytes that arrived on this side and wait for credit
/// on `other`. The source is credited only once bytes are handed over.
#[derive(Debug)]
struct Half {
    other: (EpId, Cid),
    buf: Vec<u8>,
    fin: bool,
    fin_sent: bool,
    /// The flow on this side's link is over.
    closed: bool,
}

enum Link {
    Tunnel(Tunnel),
    Mesh(MeshLink),
}

impl Link {
    fn mux(&self) -> &nowconnect_core::mux::FlowMux {
        match self {
            Link::Tunnel(t) => t.mux(),
            Link::Mesh(m) => m.mux(),
        }
    }
}

/// One end of a connection, owned by a node.
struct Ep {
    node: Node,
    /// The other end, while the connection exists.
    peer: Option<EpId>,
    link: Link,
    /// Agent tunnel: the dial attempt it belongs to.
    attempt: u64,
    /// Outbound mesh link: the hub it dials; its replica id once established.
    mesh_to: Option<usize>,
    mesh_up: Option<String>,
    /// Hub tunnel: the agent that said HELLO on it (tenant-qualified).
    agent_id: Option<String>,
    /// Hub tunnel: what the agent's token says it is (checked at HELLO).
    credential: Option<AgentCredential>,
}

enum EpEvent {
    T(TunnelEvent),
    M(MeshEvent),
}

struct SimHub {
    hub: Hub,
    cfg: HubConfig,
    alive: bool,
    incarnation: u64,
}

struct SimAgent {
    agent: Agent,
    cfg: AgentConfig,
    /// What its token says: tenant, id and the connectors it may announce.
    credential: AgentCredential,
    /// Announces a connector outside its token's scope: every hub must
    /// refuse its HELLO, so it never carries a flow.
    rogue: bool,
    incarnation: u64,
    ep: Option<EpId>,
    /// The tunnel whose hub said DRAIN, kept for its flows.
    draining: Option<EpId>,
}

pub struct World {
    origin: Instant,
    now: Instant,
    rng: Rng,
    chaos: Chaos,
    faults: FaultProfile,
    bug: PlantedBug,
    hubs: Vec<SimHub>,
    agents: Vec<SimAgent>,
    eps: BTreeMap<EpId, Ep>,
    registry: MemoryRegistry,
    /// What a lagging replica holds (a copy taken now and then).
    replica: MemoryRegistry,
    redis_down_until: Option<Instant>,
    /// Directional partitions: messages from .0 to .1 are held until then.
    partitions: BTreeMap<(Node, Node), Instant>,
    clients: BTreeMap<u64, Client>,
    /// Which client uses a flow (hub tunnel or outbound mesh link side).
    client_of: BTreeMap<(EpId, Cid), u64>,
    targets: BTreeMap<(EpId, Cid), Target>,
    bridges: BTreeMap<(EpId, Cid), Half>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    next_event: usize,
    seq: u64,
    last_delivery: BTreeMap<EpId, Instant>,
    next_ep: EpId,
    next_client: u64,
    tunnel_cfg: TunnelConfig,
    mesh_cfg: MeshLinkConfig,
    /// Highest epoch the registry has handed out per agent (must only grow).
    max_epoch: BTreeMap<String, Epoch>,
    /// Which hub accepted an agent's tunnel under an epoch (one per epoch).
    owner_of: BTreeMap<(String, Epoch), usize>,
    violation: Option<String>,
    /// `NC_SIM_DEBUG=1`: print what happens, with simulated time.
    debug: bool,
    pub outcome: Outcome,
}

/// A broken invariant, with what was seen.
#[derive(Debug)]
pub struct Violation(pub String);

const CHUNK: usize = 8 * 1024;
/// The second tenant of every world.
const OTHER_TENANT: &str = "acme";
const TICK: Duration = Duration::from_millis(10);

impl World {
    /// `origin` is an arbitrary instant; only offsets from it matter.
    pub fn new(seed: u64, origin: Instant, agents: usize) -> World {
        Self::with_bug(seed, origin, agents, PlantedBug::None)
    }

    /// A world whose tunnels, mesh links and hubs carry a deliberate bug
    /// (see `PlantedBug`).
    pub fn with_bug(seed: u64, origin: Instant, agents: usize, bug: PlantedBug) -> World {
        Self::build(seed, origin, agents, bug, Chaos::Seeded)
    }

    /// A world whose chaos (which fault, each tick) is read from `data`, as
    /// the `world` fuzz target drives it; the first 8 bytes are the seed.
    pub fn from_fuzz_bytes(origin: Instant, data: &[u8]) -> World {
        let mut seed = [0u8; 8];
        let n = data.len().min(8);
        seed[..n].copy_from_slice(&data[..n]);
        let seed = u64::from_le_bytes(seed);
        let agents = 1 + (seed % 3) as usize;
        let chaos = Chaos::Bytes {
            data: data[n..].to_vec(),
            pos: 0,
        };
        Self::build(seed, origin, agents, PlantedBug::None, chaos)
    }

    fn build(seed: u64, origin: Instant, agents: usize, bug: PlantedBug, chaos: Chaos) -> World {
        let mut rng = Rng::new(seed);
        let faults = FaultProfile::swarm(&mut rng);
        let hubs = 1 + rng.below(3) as usize;
        let window = 16 * 1024 + rng.below(64 * 1024) as u32;
        let tunnel_cfg = TunnelConfig {
            window,
            max_flows: 64,
            dedup_capacity: 64,
            ping_interval: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(1),
            planted_bug: bug,
            ..TunnelConfig::default()
        };
        let mesh_cfg = MeshLinkConfig {
            window,
            max_flows: 64,
            dedup_capacity: 64,
            send_queue_depth: 64,
            max_inflight_bytes: 256 * 1024,
            ping_interval: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(1),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            planted_bug: bug,
            ..MeshLinkConfig::default()
        };
        // One hub alone runs with or without the registry; a cluster is active.
        let mode = if hubs > 1 || rng.below(2) == 0 {
            Mode::Active
        } else {
            Mode::Off
        };
        let mut w = World {
            origin,
            now: origin,
            chaos,
            faults,
            bug,
            hubs: Vec::new(),
            agents: Vec::new(),
            eps: BTreeMap::new(),
            registry: MemoryRegistry::with_server_clock(origin),
            replica: MemoryRegistry::with_server_clock(origin),
            redis_down_until: None,
            partitions: BTreeMap::new(),
            clients: BTreeMap::new(),
            client_of: BTreeMap::new(),
            targets: BTreeMap::new(),
            bridges: BTreeMap::new(),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_event: 0,
            seq: 0,
            last_delivery: BTreeMap::new(),
            next_ep: 1,
            next_client: 1,
            tunnel_cfg,
            mesh_cfg,
            max_epoch: BTreeMap::new(),
            owner_of: BTreeMap::new(),
            violation: None,
            debug: std::env::var_os("NC_SIM_DEBUG").is_some(),
            outcome: Outcome {
                hubs: hubs as u64,
                trace_hash: 0xcbf2_9ce4_8422_2325,
                ..Outcome::default()
            },
            rng,
        };
        for h in 0..hubs {
            let cfg = HubConfig {
                replica_id: format!("hub-{h}"),
                mode,
                lease: Duration::from_secs(3),
                renew_interval: Duration::from_secs(1),
                registry_timeout: Duration::from_millis(300),
                health_interval: Duration::from_millis(250),
                planted_bug: bug,
                ..HubConfig::default()
            };
            let seed = w.rng.next_u64();
            w.hubs.push(SimHub {
                hub: Hub::new(origin, cfg.clone(), seed),
                cfg,
                alive: true,
                incarnation: 0,
            });
        }
        for h in 0..hubs {
            w.start_mesh_links(h);
        }
        // Two tenants whose agents share ids and the connector name `echo`
        // (names are unique only within a tenant), and, when there are
        // several agents, a rogue one whose token does not list `echo`.
        let rogue = agents > 1;
        for i in 0..agents + usize::from(rogue) {
            let is_rogue = i == agents;
            let tenant = if i % 2 == 1 {
                OTHER_TENANT
            } else {
                DEFAULT_TENANT
            };
            let agent_id = if is_rogue {
                "rogue".to_string()
            } else {
                format!("agent-{}", i / 2)
            };
            let scope = if is_rogue { "ldap" } else { "echo" };
            let credential = AgentCredential {
                tenant: tenant.to_string(),
                agent_id: agent_id.clone(),
                scope: Some(vec![scope.to_string()]),
            };
            let mut connectors = BTreeMap::new();
            connectors.insert("echo".to_string(), "target:7".to_string());
            let cfg = AgentConfig {
                agent_id,
                hubs: (0..hubs).map(|h| format!("sim://{h}")).collect(),
                connectors,
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                hub_connect_timeout: Duration::from_secs(1),
                target_connect_timeout: Duration::from_secs(1),
                ..AgentConfig::default()
            };
            let seed = w.rng.next_u64();
            w.agents.push(SimAgent {
                agent: Agent::new(origin, cfg.clone(), seed),
                cfg,
                credential,
                rogue: is_rogue,
                incarnation: 0,
                ep: None,
                draining: None,
            });
        }
        w.schedule(TICK, Event::ChaosTick);
        w
    }

    pub fn faults(&self) -> &FaultProfile {
        &self.faults
    }

    /// Outbound mesh links from hub `h` to every other hub.
    fn start_mesh_links(&mut self, h: usize) {
        for to in 0..self.hubs.len() {
            if to == h {
                continue;
            }
            let rng = Rng::new(self.rng.next_u64());
            let name = self.hubs[h].cfg.replica_id.clone();
            let link = MeshLink::outbound(self.now, self.mesh_cfg.clone(), &name, rng);
            self.add_ep(Node::Hub(h), None, Link::Mesh(link), 0, Some(to));
        }
    }

    fn add_ep(
        &mut self,
        node: Node,
        peer: Option<EpId>,
        link: Link,
        attempt: u64,
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
                credential: None,
            },
        );
        id
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

    fn fail(&mut self, why: String) {
        if self.violation.is_none() {
            self.violation = Some(why);
        }
    }

    /// Until when messages from `a` to `b` are held, if they are.
    fn held_until(&self, a: Node, b: Node) -> Option<Instant> {
        self.partitions
            .get(&(a, b))
            .copied()
            .filter(|until| *until > self.now)
    }

    /// Start `n` client flows spread over the next `within`, each on a hub
    /// picked at random.
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
            let hub = self.rng.below(self.hubs.len() as u64) as usize;
            // A listener of the second tenant exists only if it has agents.
            let tenant = if self
                .agents
                .iter()
                .any(|a| !a.rogue && a.credential.tenant == OTHER_TENANT)
                && self.rng.below(2) == 1
            {
                OTHER_TENANT
            } else {
                DEFAULT_TENANT
            };
            if tenant == OTHER_TENANT {
                self.outcome.flows_other_tenant += 1;
            }
            self.clients.insert(
                id,
                Client {
                    hub,
                    tenant,
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
        let mut t: Option<Instant> = None;
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for h in self.hubs.iter().filter(|h| h.alive) {
            take(h.hub.poll_timeout());
        }
        for e in self.eps.values() {
            take(match &e.link {
                Link::Tunnel(t) => t.poll_timeout().map(|(at, _)| at),
                Link::Mesh(m) => m.poll_timeout().map(|(at, _)| at),
            });
        }
        for a in &self.agents {
            take(a.agent.poll_timeout());
        }
        t
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        for h in self.hubs.iter_mut().filter(|h| h.alive) {
            h.hub.handle_timeout(now);
        }
        for e in self.eps.values_mut() {
            match &mut e.link {
                Link::Tunnel(t) => t.handle_timeout(now),
                Link::Mesh(m) => m.handle_timeout(now),
            }
        }
        for a in &mut self.agents {
            a.agent.handle_timeout(now);
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = self.now;
        match ev {
            Event::Deliver { from, to, msg } => {
                self.trace(1, to, u64::from(msg.is_some()));
                let Some(e) = self.eps.get_mut(&to) else {
                    return;
                };
                // Bytes of an earlier connection (an outbound mesh link
                // reconnects on the same endpoint) never reach a later one.
                if e.peer != Some(from) {
                    return;
                }
                match (&mut e.link, msg) {
                    (Link::Tunnel(t), Some(m)) => t.handle_message(now, &m),
                    (Link::Mesh(l), Some(m)) => l.handle_message(now, &m),
                    (Link::Tunnel(t), None) => {
                        e.peer = None;
                        t.on_disconnected("connection closed by the peer");
                    }
                    (Link::Mesh(l), None) => {
                        e.peer = None;
                        l.on_disconnected(now, "connection closed by the peer");
                    }
                }
            }
            Event::HubDialDone {
                agent,
                incarnation,
                attempt,
                hub,
            } => {
                self.trace(2, agent as u64, attempt);
                let a = &self.agents[agent];
                if a.incarnation != incarnation
                    || a.agent.state() != &(HubLinkState::Dialing { attempt })
                {
                    return;
                }
                let id = a.agent.agent_id().to_string();
                let connectors = a.agent.connectors();
                if !self.hubs[hub].alive {
                    self.agents[agent].agent.hub_lost(now, attempt);
                    return;
                }
                let (an, hn) = (Node::Agent(agent), Node::Hub(hub));
                if self.held_until(an, hn).is_some() || self.held_until(hn, an).is_some() {
                    return; // the handshake never completes; the agent times out
                }
                let hub_side = self.next_ep;
                let agent_side = hub_side + 1;
                let t = Tunnel::hub(now, self.tunnel_cfg.clone());
                self.add_ep(hn, Some(agent_side), Link::Tunnel(t), 0, None);
                // What the hub learnt from the token at the upgrade.
                let credential = self.agents[agent].credential.clone();
                if let Some(e) = self.eps.get_mut(&hub_side) {
                    e.credential = Some(credential);
                }
                let t = Tunnel::agent(now, self.tunnel_cfg.clone(), &id, &connectors);
                self.add_ep(an, Some(hub_side), Link::Tunnel(t), attempt, None);
                self.agents[agent].ep = Some(agent_side);
            }
            Event::MeshDialDone { ep } => {
                self.trace(3, ep, 0);
                let Some(e) = self.eps.get(&ep) else {
                    return;
                };
                let (Node::Hub(from), Some(to)) = (e.node, e.mesh_to) else {
                    return;
                };
                let Link::Mesh(l) = &e.link else {
                    return;
                };
                if l.state() != nowconnect_core::mesh_link::LinkState::Connecting
                    || e.peer.is_some()
                {
                    return;
                }
                if !self.hubs[to].alive {
                    if let Some(Link::Mesh(l)) = self.eps.get_mut(&ep).map(|e| &mut e.link) {
                        l.on_disconnected(now, "connection refused");
                    }
                    return;
                }
                let (fnode, tnode) = (Node::Hub(from), Node::Hub(to));
                if self.held_until(fnode, tnode).is_some()
                    || self.held_until(tnode, fnode).is_some()
                {
                    return; // times out in the link's handshake timer
                }
                let rng = Rng::new(self.rng.next_u64());
                let name = self.hubs[to].cfg.replica_id.clone();
                let inbound = MeshLink::inbound(now, self.mesh_cfg.clone(), &name, Codec::V2, rng);
                let inb = self.add_ep(tnode, Some(ep), Link::Mesh(inbound), 0, None);
                let e = self.eps.get_mut(&ep).expect("checked");
                e.peer = Some(inb);
                if let Link::Mesh(l) = &mut e.link {
                    l.on_connected(now, Codec::V2);
                }
            }
            Event::TargetDialDone { ep, cid, ok } => {
                self.trace(4, cid, u64::from(ok));
                let Some(Node::Agent(i)) = self.eps.get(&ep).map(|e| e.node) else {
                    return;
                };
                if !self.targets.contains_key(&(ep, cid)) {
                    return;
                }
                let attempt = self.eps.get(&ep).map_or(0, |e| e.attempt);
                if !ok {
                    self.agents[i]
                        .agent
                        .target_failed(now, attempt, cid, "connection refused");
                    return;
                }
                if self.agents[i].agent.target_connected(now, attempt, cid) {
                    let t = self.targets.get_mut(&(ep, cid)).expect("target");
                    t.connected = true;
                    // What arrived before the connect is written now.
                    let n = std::mem::take(&mut t.inbox);
                    if n > 0
                        && let Some(l) = self.flow_link(ep)
                    {
                        l.consumed(cid, n);
                    }
                    self.echo(ep, cid);
                }
            }
            Event::RegistryArrive {
                hub,
                incarnation,
                op,
                call,
            } => {
                self.trace(5, hub as u64, op);
                self.registry_arrive(hub, incarnation, op, call);
            }
            Event::RegistryReply {
                hub,
                incarnation,
                op,
                result,
            } => {
                self.trace(6, hub as u64, op);
                self.log(format_args!("hub {hub}: registry reply {op}: {result:?}"));
                let h = &mut self.hubs[hub];
                if h.alive && h.incarnation == incarnation {
                    h.hub.registry_reply(now, op, result);
                }
            }
            Event::ClientStart { client } => {
                self.trace(7, client, 0);
                self.outcome.flows_started += 1;
                let (hub, tenant) = (self.clients[&client].hub, self.clients[&client].tenant);
                if self.hubs[hub].alive {
                    let listener = qualify(tenant, "echo");
                    self.hubs[hub].hub.client_connected(now, client, &listener);
                } else {
                    let c = self.clients.get_mut(&client).expect("client");
                    c.state = ClientState::Done;
                    c.ended = Some(ErrorCode::Refused);
                    *self.outcome.flows_refused.entry("hub_down").or_default() += 1;
                }
            }
            Event::ClientStep { client } => {
                self.trace(8, client, 0);
                self.client_step(client);
            }
            Event::HubRestart { hub } => {
                if self.hubs[hub].alive {
                    return; // brought back already (by healing)
                }
                self.trace(9, hub as u64, 0);
                self.log(format_args!("hub {hub} restarts"));
                let seed = self.rng.next_u64();
                let h = &mut self.hubs[hub];
                h.alive = true;
                h.hub = Hub::new(now, h.cfg.clone(), seed);
                self.start_mesh_links(hub);
            }
            Event::HubDrainEnd { hub, incarnation } => {
                if self.hubs[hub].alive && self.hubs[hub].incarnation == incarnation {
                    self.trace(16, hub as u64, 0);
                    self.stop_hub(hub, "drain_grace_over");
                }
            }
            Event::ChaosTick => {
                self.chaos_tick();
                self.schedule(TICK, Event::ChaosTick);
            }
        }
    }

    /// Which faults start this tick.
    fn chaos_tick(&mut self) {
        // A lagging replica: what a failover would find.
        if self.rng.below(30) == 0 {
            self.replica = self.registry.clone();
        }
        let rolls: [bool; 8] = match &mut self.chaos {
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
                ]
            }
            Chaos::Bytes { data, pos } => {
                let Some(&b) = data.get(*pos) else {
                    return;
                };
                *pos += 1;
                let mut r = [false; 8];
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
        ] = rolls;
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
    fn cut_random(&mut self, pick: impl Fn(&Ep) -> bool) -> bool {
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

    fn disconnect(&mut self, id: EpId, reason: &str) {
        let now = self.now;
        if let Some(e) = self.eps.get_mut(&id) {
            e.peer = None;
            match &mut e.link {
                Link::Tunnel(t) => t.on_disconnected(reason),
                Link::Mesh(l) => l.on_disconnected(now, reason),
            }
        }
    }

    fn start_partition(&mut self) {
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
    fn crash_hub(&mut self) {
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
        self.stop_hub(h, "hub_crash");
    }

    /// A hub gets SIGTERM: it drains (its agents are told to move, its flows
    /// go on) and exits when the grace period (0.3–1.5 s) is over.
    fn drain_hub(&mut self) {
        let live: Vec<usize> = (0..self.hubs.len())
            .filter(|h| self.hubs[*h].alive && !self.hubs[*h].hub.is_draining())
            .collect();
        if live.is_empty() {
            return;
        }
        let h = live[self.rng.below(live.len() as u64) as usize];
        self.trace(17, h as u64, 0);
        self.log(format_args!("hub {h} drains"));
        self.outcome.hub_drains += 1;
        let now = self.now;
        self.hubs[h].hub.drain(now);
        let grace = Duration::from_millis(300 + self.rng.below(1200));
        let incarnation = self.hubs[h].incarnation;
        self.schedule(
            grace,
            Event::HubDrainEnd {
                hub: h,
                incarnation,
            },
        );
    }

    /// Hub `h` is gone (crash, or exit after a drain): its connections end,
    /// its clients with it (counted as `why`); it restarts after a while.
    fn stop_hub(&mut self, h: usize, why: &'static str) {
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

    fn restart_agent(&mut self) {
        if self.agents.is_empty() {
            return;
        }
        let i = self.rng.below(self.agents.len() as u64) as usize;
        self.trace(15, i as u64, 0);
        self.outcome.agent_restarts += 1;
        for ep in [self.agents[i].ep.take(), self.agents[i].draining.take()]
            .into_iter()
            .flatten()
        {
            self.remove_ep(ep);
        }
        let seed = self.rng.next_u64();
        let a = &mut self.agents[i];
        a.incarnation += 1;
        a.agent = Agent::new(self.now, a.cfg.clone(), seed);
    }

    /// An endpoint's process is gone: the peer sees the connection end.
    fn remove_ep(&mut self, id: EpId) {
        let Some(e) = self.eps.remove(&id) else {
            return;
        };
        self.outcome.windows_grown += e.link.mux().stats.windows_grown;
        if let Some(p) = e.peer {
            self.send_close(id, e.node, p);
        }
        self.client_of.retain(|(ep, _), _| *ep != id);
        self.targets.retain(|(ep, _), _| *ep != id);
        // A bridge half whose flow finished may still hold bytes (or the
        // FIN) for the other side: they have left this endpoint's link, as
        // the runtime's joined links hand them over, and still go once the
        // other side has credit. Its other halves were reset with the link.
        self.bridges
            .retain(|(ep, _), h| *ep != id || (h.closed && (!h.buf.is_empty() || !h.fin_sent)));
        self.last_delivery.remove(&id);
    }

    fn send_close(&mut self, from: EpId, from_node: Node, to: EpId) {
        self.deliver(from, from_node, to, None);
    }

    /// Put a message on the wire from `from`; TCP keeps each direction in
    /// order, and a partition holds it back until it heals.
    fn send(&mut self, from: EpId, msg: WsMessage) {
        let Some(e) = self.eps.get(&from) else {
            return;
        };
        let (node, Some(to)) = (e.node, e.peer) else {
            return;
        };
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

    fn deliver(&mut self, from: EpId, from_node: Node, to: EpId, msg: Option<WsMessage>) {
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

    /// A registry call from hub `hub` reaches Redis (or does not).
    fn registry_arrive(&mut self, hub: usize, incarnation: u64, op: u64, call: RegistryOp) {
        let now = self.now;
        let result = if self.redis_down_until.is_some_and(|t| t > now) {
            Err(RegistryError::Unavailable("connection refused".into()))
        } else {
            let r = self.registry.apply(now, &call);
            if let (RegistryOp::Claim { agent_id, .. }, Ok(RegistryReply::Claimed(e))) = (&call, &r)
            {
                let prev = self.max_epoch.get(agent_id).copied().unwrap_or(Epoch(0));
                if *e <= prev {
                    self.fail(format!(
                        "registry handed out epoch {} for `{agent_id}` after epoch {}: epochs must only grow",
                        e.0, prev.0
                    ));
                }
                self.max_epoch.insert(agent_id.clone(), (*e).max(prev));
            }
            r
        };
        if self.held_until(Node::Redis, Node::Hub(hub)).is_some() {
            return; // the reply is lost; the hub times the call out
        }
        let mut d = self.latency();
        if self.chance(self.faults.redis_slow) {
            self.outcome.redis_slow_replies += 1;
            let t = self.hubs[hub].cfg.registry_timeout.as_micros() as u64;
            d += Duration::from_micros(self.rng.below(2 * t));
        }
        self.schedule(
            d,
            Event::RegistryReply {
                hub,
                incarnation,
                op,
                result,
            },
        );
    }

    fn flow_link(&mut self, ep: EpId) -> Option<&mut dyn FlowLink> {
        self.eps.get_mut(&ep).map(|e| match &mut e.link {
            Link::Tunnel(t) => t as &mut dyn FlowLink,
            Link::Mesh(m) => m as &mut dyn FlowLink,
        })
    }

    fn client_step(&mut self, id: u64) {
        let Some(ClientState::Open { ep, cid }) = self.clients.get(&id).map(|c| &c.state) else {
            return;
        };
        let (ep, cid) = (*ep, *cid);
        let delay = Duration::from_micros(100 + self.rng.below(2000));
        self.schedule(delay, Event::ClientStep { client: id });
        let reset_now = self.chance(self.faults.client_reset);
        let early_roll = self.chance(self.faults.client_half_close / 8.0);
        let Some(e) = self.eps.get_mut(&ep) else {
            return;
        };
        let link: &mut dyn FlowLink = match &mut e.link {
            Link::Tunnel(t) => t,
            Link::Mesh(m) => m,
        };
        let c = self.clients.get_mut(&id).expect("client");
        // A slow reader drains what it has, in bursts.
        if c.unconsumed > 0 {
            let n = c.unconsumed;
            c.unconsumed = 0;
            link.consumed(cid, n);
        }
        if c.fin_sent {
            return;
        }
        if reset_now {
            self.outcome.client_resets += 1;
            link.reset_flow(cid, ErrorCode::ConnectionReset, "client reset");
            c.ended = Some(ErrorCode::ConnectionReset);
            c.state = ClientState::Done;
            self.client_of.remove(&(ep, cid));
            *self.outcome.flows_reset.entry("client_reset").or_default() += 1;
            let hub = c.hub;
            self.flow_ended(hub, ep);
            return;
        }
        let credit = link.send_credit(cid) as usize;
        let n = (c.data.len() - c.sent).min(credit).min(CHUNK);
        if n > 0 {
            let chunk = read_with_room(&c.data[c.sent..c.sent + n]);
            if link.send_data(cid, chunk).is_ok() {
                c.sent += n;
            }
        } else if c.sent < c.data.len() {
            link.note_blocked(cid);
        }
        let early = early_roll && c.sent > 0;
        if c.sent == c.data.len() || early {
            if early && c.sent < c.data.len() {
                self.outcome.half_closes += 1;
                c.data.truncate(c.sent);
            }
            if link.send_fin(cid).is_ok() {
                c.fin_sent = true;
            }
        }
    }

    fn flow_ended(&mut self, hub: usize, ep: EpId) {
        if self
            .eps
            .get(&ep)
            .is_some_and(|e| matches!(e.link, Link::Tunnel(_)))
        {
            self.hubs[hub].hub.flow_ended(ep);
        }
    }

    /// Echo what a target holds back to the hub, as far as credit allows.
    fn echo(&mut self, ep: EpId, cid: Cid) {
        let Some(Ep {
            link: Link::Tunnel(tun),
            ..
        }) = self.eps.get_mut(&ep)
        else {
            return;
        };
        let Some(t) = self.targets.get_mut(&(ep, cid)) else {
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
            if tun.send_data(cid, read_with_room(&chunk)).is_err() {
                break;
            }
        }
        if t.fin && t.buf.is_empty() && !t.fin_sent {
            t.fin_sent = true;
            let _ = tun.send_fin(cid);
        }
    }

    /// Move what a bridge half holds to its other side, as far as credit
    /// allows, crediting the source for what was handed over.
    fn forward(&mut self, from: (EpId, Cid)) {
        let Some(half) = self.bridges.get_mut(&from) else {
            return;
        };
        let (to_ep, to_cid) = half.other;
        let mut moved = 0;
        if let Some(e) = self.eps.get_mut(&to_ep) {
            let link: &mut dyn FlowLink = match &mut e.link {
                Link::Tunnel(t) => t,
                Link::Mesh(m) => m,
            };
            while !half.buf.is_empty() {
                let n = half
                    .buf
                    .len()
                    .min(link.send_credit(to_cid) as usize)
                    .min(CHUNK);
                if n == 0 {
                    link.note_blocked(to_cid);
                    break;
                }
                let chunk: Vec<u8> = half.buf[..n].to_vec();
                // Bridged bytes were decoded from a frame: no room in front
                // of them, as on a real owner hub.
                if link.send_data(to_cid, Bytes::from(chunk).into()).is_err() {
                    break;
                }
                half.buf.drain(..n);
                moved += n;
            }
            if half.fin && half.buf.is_empty() && !half.fin_sent && link.send_fin(to_cid).is_ok() {
                half.fin_sent = true;
            }
        }
        if moved > 0
            && let Some(l) = self.flow_link(from.0)
        {
            l.consumed(from.1, moved);
        }
    }

    fn bridge_event(&mut self, ep: EpId, fe: FlowEvent) {
        match fe {
            FlowEvent::Data { cid, payload } => {
                if let Some(h) = self.bridges.get_mut(&(ep, cid)) {
                    h.buf.extend_from_slice(&payload);
                    self.forward((ep, cid));
                }
            }
            FlowEvent::Fin { cid } => {
                if let Some(h) = self.bridges.get_mut(&(ep, cid)) {
                    h.fin = true;
                    self.forward((ep, cid));
                }
            }
            FlowEvent::Writable { cid, .. } => {
                // This side may send again: move what the other half holds.
                if let Some(other) = self.bridges.get(&(ep, cid)).map(|h| h.other) {
                    self.forward(other);
                }
            }
            FlowEvent::Reset { cid, code, reason } => {
                if let Some(h) = self.bridges.remove(&(ep, cid)) {
                    self.bridges.remove(&h.other);
                    if let Some(l) = self.flow_link(h.other.0) {
                        l.reset_flow(h.other.1, code, &reason);
                    }
                    self.end_bridged_tunnel_flow(ep, h.other.0);
                }
            }
            FlowEvent::Closed { cid } => {
                // Done on this side. The half going the other way may still
                // hold bytes for this side, so the pair goes once both are.
                let Some(h) = self.bridges.get_mut(&(ep, cid)) else {
                    return;
                };
                h.closed = true;
                let other = h.other;
                if self.bridges.get(&other).is_none_or(|o| o.closed) {
                    self.bridges.remove(&(ep, cid));
                    self.bridges.remove(&other);
                }
                self.end_bridged_tunnel_flow(ep, ep);
            }
        }
    }

    /// The hub's load count for the tunnel side of a bridge.
    fn end_bridged_tunnel_flow(&mut self, a: EpId, b: EpId) {
        let sides = if a == b { vec![a] } else { vec![a, b] };
        for ep in sides {
            if let Some(Ep {
                node: Node::Hub(hub),
                link: Link::Tunnel(_),
                ..
            }) = self.eps.get(&ep)
            {
                let hub = *hub;
                self.hubs[hub].hub.flow_ended(ep);
            }
        }
    }

    /// Drain every state machine until nothing moves.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            moved |= self.pump_hubs();
            moved |= self.pump_eps();
            moved |= self.pump_agents();
            if !moved {
                return;
            }
        }
        panic!("the world did not settle after 10,000 rounds");
    }

    fn pump_hubs(&mut self) -> bool {
        let mut moved = false;
        for h in 0..self.hubs.len() {
            if !self.hubs[h].alive {
                continue;
            }
            while let Some(o) = self.hubs[h].hub.poll_output() {
                moved = true;
                self.hub_output(h, o);
            }
        }
        moved
    }

    fn log(&self, what: std::fmt::Arguments) {
        if self.debug {
            eprintln!("[{:>12?}] {what}", self.now.duration_since(self.origin));
        }
    }

    fn hub_output(&mut self, h: usize, o: HubOutput) {
        let now = self.now;
        self.log(format_args!("hub {h}: {o:?}"));
        match o {
            HubOutput::Registry { op, call } => {
                let incarnation = self.hubs[h].incarnation;
                if self.held_until(Node::Hub(h), Node::Redis).is_some() {
                    return; // lost on the way; the hub times the call out
                }
                let d = self.latency();
                self.schedule(
                    d,
                    Event::RegistryArrive {
                        hub: h,
                        incarnation,
                        op,
                        call,
                    },
                );
            }
            HubOutput::AcceptTunnel { tunnel, epoch } => {
                let agent = match self.eps.get_mut(&tunnel) {
                    Some(Ep {
                        link: Link::Tunnel(t),
                        agent_id,
                        ..
                    }) => {
                        t.accept(now, epoch);
                        agent_id.clone()
                    }
                    _ => None,
                };
                if agent.as_deref() == Some("rogue") {
                    self.fail(format!(
                        "hub {h} accepted the tunnel of an agent whose token does not list its connector"
                    ));
                }
                if let Some(agent) = agent {
                    match self.owner_of.get(&(agent.clone(), epoch)) {
                        Some(&other) if other != h => self.fail(format!(
                            "hubs {other} and {h} both own `{agent}` under epoch {}",
                            epoch.0
                        )),
                        _ => {
                            self.owner_of.insert((agent, epoch), h);
                        }
                    }
                }
            }
            HubOutput::CloseTunnel {
                tunnel,
                code,
                reason,
            } => {
                if let Some(Link::Tunnel(t)) = self.eps.get_mut(&tunnel).map(|e| &mut e.link) {
                    t.close(code, &reason);
                }
            }
            HubOutput::Route { client, route } => self.route(h, client, route),
            // The sim's mesh is configured, not discovered.
            HubOutput::Peers(_) | HubOutput::PeerDeparted { .. } => {}
            HubOutput::DrainTunnel { tunnel } => {
                if let Some(Link::Tunnel(t)) = self.eps.get_mut(&tunnel).map(|e| &mut e.link) {
                    t.send_drain();
                }
            }
        }
    }

    fn route(&mut self, h: usize, client: u64, route: Route) {
        // A flow never crosses tenants: the agent chosen must be one of the
        // client's listener's tenant.
        let tenant = self.clients[&client].tenant;
        let chosen = match &route {
            Route::Local { tunnel, .. } => self.eps.get(tunnel).and_then(|e| e.agent_id.clone()),
            Route::Mesh { agent_id, .. } => Some(agent_id.clone()),
            Route::Refuse { .. } => None,
        };
        if let Some(agent) = chosen
            && split(&agent).0 != tenant
        {
            return self.fail(format!(
                "hub {h} routed a client of tenant `{tenant}` to agent `{agent}`"
            ));
        }
        let connector = qualify(tenant, "echo");
        let opened = match &route {
            Route::Local { tunnel, .. } => match self.eps.get_mut(tunnel).map(|e| &mut e.link) {
                Some(Link::Tunnel(t)) => t.open_flow("echo").ok().map(|cid| (*tunnel, cid)),
                _ => None,
            },
            Route::Mesh {
                replica_id,
                agent_id,
                epoch,
            } => {
                let link = self.eps.iter_mut().find(|(_, e)| {
                    e.node == Node::Hub(h) && e.mesh_up.as_deref() == Some(replica_id.as_str())
                });
                match link {
                    Some((
                        id,
                        Ep {
                            link: Link::Mesh(m),
                            ..
                        },
                    )) => m
                        .open_flow(&connector, agent_id, *epoch)
                        .ok()
                        .map(|cid| (*id, cid)),
                    _ => None,
                }
            }
            Route::Refuse { code, .. } => {
                let c = self.clients.get_mut(&client).expect("client");
                c.state = ClientState::Done;
                c.ended = Some(*code);
                *self.outcome.flows_refused.entry(code.as_str()).or_default() += 1;
                return;
            }
        };
        let c = self.clients.get_mut(&client).expect("client");
        match opened {
            Some((ep, cid)) => {
                c.state = ClientState::Open { ep, cid };
                self.client_of.insert((ep, cid), client);
                if let Route::Local { tunnel, .. } = route {
                    self.hubs[h].hub.flow_started(tunnel);
                } else {
                    self.outcome.flows_via_mesh += 1;
                }
                self.schedule(Duration::ZERO, Event::ClientStep { client });
            }
            None => {
                c.state = ClientState::Done;
                c.ended = Some(ErrorCode::LinkLost);
                *self.outcome.flows_refused.entry("open_failed").or_default() += 1;
            }
        }
    }

    fn pump_eps(&mut self) -> bool {
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

    fn hub_tunnel_event(&mut self, h: usize, ep: EpId, e: TunnelEvent) {
        let now = self.now;
        match e {
            TunnelEvent::Hello {
                agent_id,
                connectors,
            } => {
                let Some(credential) = self.eps.get(&ep).and_then(|e| e.credential.clone()) else {
                    return self.fail(format!("hub {h}: a HELLO on tunnel {ep} without a token"));
                };
                match self.hubs[h]
                    .hub
                    .tunnel_hello_as(now, ep, &credential, &agent_id, &connectors)
                {
                    Ok(()) => {
                        if let Some(e) = self.eps.get_mut(&ep) {
                            e.agent_id = Some(qualify(&credential.tenant, &agent_id));
                        }
                    }
                    Err(_) => self.outcome.hellos_refused += 1,
                }
            }
            TunnelEvent::Flow(fe) => self.hub_flow_event(ep, fe),
            TunnelEvent::Closed { .. } => {
                self.hubs[h].hub.tunnel_closed(now, ep);
                self.remove_ep(ep);
            }
            TunnelEvent::Established { .. }
            | TunnelEvent::Open { .. }
            | TunnelEvent::Rtt(_)
            | TunnelEvent::Drain
            | TunnelEvent::Reauth { .. } => {}
        }
    }

    /// A flow event at a hub: for a client, or for one side of a bridge.
    fn hub_flow_event(&mut self, ep: EpId, fe: FlowEvent) {
        let cid = flow_cid(&fe);
        if self.bridges.contains_key(&(ep, cid)) {
            self.bridge_event(ep, fe);
        } else {
            self.client_event(ep, fe);
        }
    }

    fn mesh_event(&mut self, h: usize, ep: EpId, me: MeshEvent) {
        if matches!(
            me,
            MeshEvent::Established { .. } | MeshEvent::Down { .. } | MeshEvent::Connect
        ) {
            self.log(format_args!("hub {h} mesh ep {ep}: {me:?}"));
        }
        match me {
            MeshEvent::Connect => {
                let d = self.latency() * 2;
                self.schedule(d, Event::MeshDialDone { ep });
            }
            MeshEvent::Established { peer_replica } => {
                let e = self.eps.get_mut(&ep).expect("ep");
                if e.mesh_to.is_some() {
                    self.hubs[h].hub.mesh_link_up(&peer_replica, true);
                    e.mesh_up = Some(peer_replica);
                }
            }
            MeshEvent::Open {
                cid,
                connector,
                agent_id,
                epoch,
            } => self.owner_open(h, ep, cid, &connector, &agent_id, epoch),
            MeshEvent::OpenAccepted { .. } | MeshEvent::Rtt(_) => {}
            MeshEvent::Flow(fe) => self.hub_flow_event(ep, fe),
            MeshEvent::StaleEpoch { .. } => self.hubs[h].hub.count_epoch_mismatch(),
            MeshEvent::Down { .. } => {
                let e = self.eps.get_mut(&ep).expect("ep");
                if let Some(name) = e.mesh_up.take() {
                    self.hubs[h].hub.mesh_link_up(&name, false);
                }
                if e.mesh_to.is_some() {
                    // Outbound: it reconnects by itself; the old socket ends.
                    if let Some(p) = e.peer.take() {
                        self.send_close(ep, Node::Hub(h), p);
                    }
                } else {
                    self.remove_ep(ep);
                }
            }
        }
    }

    /// Owner side of a mesh open: fencing, then a bridge to the agent's tunnel.
    fn owner_open(
        &mut self,
        h: usize,
        ep: EpId,
        cid: Cid,
        connector: &str,
        agent_id: &str,
        epoch: Epoch,
    ) {
        let checked = self.hubs[h].hub.check_mesh_open(agent_id, connector, epoch);
        let Some(Ep {
            link: Link::Mesh(mesh),
            ..
        }) = self.eps.get_mut(&ep)
        else {
            return;
        };
        let tunnel = match checked {
            Ok(t) => t,
            Err((code, reason)) => {
                if code == ErrorCode::StaleEpoch {
                    self.outcome.stale_epoch_refusals += 1;
                }
                mesh.refuse_open(cid, code, &reason);
                return;
            }
        };
        if split(connector).0 != split(agent_id).0 {
            self.fail(format!(
                "hub {h} bridged a mesh open for `{connector}` to agent `{agent_id}` of another tenant"
            ));
        }
        // The independent check: what this hub owns, under which epoch.
        let owned = self.hubs[h].hub.owned_tunnel(agent_id);
        if owned != Some((tunnel, epoch)) {
            let cur = owned.map_or(0, |(_, e)| e.0);
            self.fail(format!(
                "hub {h} let a mesh flow under stale epoch {} reach the tunnel of `{agent_id}` (current epoch {cur})",
                epoch.0
            ));
        }
        let opened = match self.eps.get_mut(&tunnel).map(|e| &mut e.link) {
            // The tunnel carries bare names: the agent knows its tenant.
            Some(Link::Tunnel(t)) => t.open_flow(split(connector).1).ok(),
            _ => None,
        };
        let Some(Ep {
            link: Link::Mesh(mesh),
            ..
        }) = self.eps.get_mut(&ep)
        else {
            return;
        };
        match opened {
            Some(tcid) => {
                mesh.accept_open(cid);
                self.hubs[h].hub.flow_started(tunnel);
                for (a, b) in [((ep, cid), (tunnel, tcid)), ((tunnel, tcid), (ep, cid))] {
                    self.bridges.insert(
                        a,
                        Half {
                            other: b,
                            buf: Vec::new(),
                            fin: false,
                            fin_sent: false,
                            closed: false,
                        },
                    );
                }
            }
            None => mesh.refuse_open(
                cid,
                ErrorCode::LimitExceeded,
                "the agent's tunnel took no new flow",
            ),
        }
    }

    fn client_event(&mut self, ep: EpId, fe: FlowEvent) {
        let cid = flow_cid(&fe);
        let Some(&id) = self.client_of.get(&(ep, cid)) else {
            return;
        };
        let c = self.clients.get_mut(&id).expect("client");
        let hub = c.hub;
        match fe {
            FlowEvent::Data { payload, .. } => {
                c.received.extend_from_slice(&payload);
                self.outcome.bytes_echoed += payload.len() as u64;
                if c.slow {
                    c.unconsumed += payload.len();
                } else if let Some(l) = self.flow_link(ep) {
                    l.consumed(cid, payload.len());
                }
            }
            FlowEvent::Fin { .. } => c.fin_received = true,
            FlowEvent::Reset { code, .. } => {
                c.ended = Some(code);
                c.state = ClientState::Done;
                self.client_of.remove(&(ep, cid));
                *self.outcome.flows_reset.entry(code.as_str()).or_default() += 1;
                self.flow_ended(hub, ep);
            }
            FlowEvent::Writable { .. } => {
                self.schedule(Duration::ZERO, Event::ClientStep { client: id })
            }
            FlowEvent::Closed { .. } => {
                c.state = ClientState::Done;
                self.client_of.remove(&(ep, cid));
                self.outcome.flows_completed += 1;
                self.flow_ended(hub, ep);
            }
        }
    }

    fn pump_agents(&mut self) -> bool {
        let mut moved = false;
        for i in 0..self.agents.len() {
            while let Some(o) = self.agents[i].agent.poll_output() {
                moved = true;
                match o {
                    AgentOutput::DialHub { attempt, url } => {
                        let hub = url
                            .trim_start_matches("sim://")
                            .parse()
                            .expect("sim hub url");
                        let d = self.latency() * 2;
                        let incarnation = self.agents[i].incarnation;
                        self.schedule(
                            d,
                            Event::HubDialDone {
                                agent: i,
                                incarnation,
                                attempt,
                                hub,
                            },
                        );
                    }
                    AgentOutput::AbortHub { .. } => {
                        if let Some(ep) = self.agents[i].ep {
                            self.disconnect(ep, "hub attempt timed out");
                        }
                    }
                    AgentOutput::DialTarget { attempt, cid, .. } => {
                        let ok = !self.chance(self.faults.target_refuse);
                        if !ok {
                            self.outcome.target_refusals += 1;
                        }
                        let d = self.latency();
                        if let Some(ep) = self.agent_ep(i, attempt) {
                            self.schedule(d, Event::TargetDialDone { ep, cid, ok });
                        }
                    }
                    AgentOutput::ResetFlow {
                        attempt,
                        cid,
                        code,
                        reason,
                    } => {
                        if let Some(ep) = self.agent_ep(i, attempt) {
                            self.targets.remove(&(ep, cid));
                            if let Some(l) = self.flow_link(ep) {
                                l.reset_flow(cid, code, &reason);
                            }
                        }
                    }
                }
            }
        }
        moved
    }

    /// Agent `i`'s tunnel endpoint of `attempt` (current or draining).
    fn agent_ep(&self, i: usize, attempt: u64) -> Option<EpId> {
        [self.agents[i].ep, self.agents[i].draining]
            .into_iter()
            .flatten()
            .find(|ep| self.eps.get(ep).is_some_and(|e| e.attempt == attempt))
    }

    fn agent_tunnel_event(&mut self, i: usize, ep: EpId, e: TunnelEvent) {
        let now = self.now;
        let attempt = self.eps.get(&ep).map_or(0, |e| e.attempt);
        let current = self.agents[i].ep == Some(ep);
        let draining = self.agents[i].draining == Some(ep);
        match e {
            TunnelEvent::Drain if current => {
                // As the runtimes do: one draining tunnel at a time; a newer
                // drain ends the older one.
                if let Some(old) = self.agents[i].draining.take() {
                    if let Some(Link::Tunnel(t)) = self.eps.get_mut(&old).map(|e| &mut e.link) {
                        t.close(ErrorCode::Shutdown, "a newer hub is draining too");
                    }
                    let old_attempt = self.eps.get(&old).map_or(0, |e| e.attempt);
                    self.agents[i].agent.hub_lost(now, old_attempt);
                }
                self.agents[i].agent.hub_draining(now, attempt);
                self.agents[i].draining = Some(ep);
                self.agents[i].ep = None;
            }
            TunnelEvent::Established { .. } if current => {
                self.agents[i].agent.hub_established(now, attempt)
            }
            TunnelEvent::Open { cid, connector } if current || draining => {
                self.targets.insert((ep, cid), Target::default());
                self.agents[i]
                    .agent
                    .flow_opened(now, attempt, cid, &connector);
            }
            TunnelEvent::Flow(fe) => match fe {
                FlowEvent::Data { cid, payload } => {
                    let Some(t) = self.targets.get_mut(&(ep, cid)) else {
                        return;
                    };
                    t.buf.extend_from_slice(&payload);
                    if t.connected {
                        if let Some(l) = self.flow_link(ep) {
                            l.consumed(cid, payload.len());
                        }
                    } else {
                        t.inbox += payload.len();
                    }
                    self.echo(ep, cid);
                }
                FlowEvent::Fin { cid } => {
                    if let Some(t) = self.targets.get_mut(&(ep, cid)) {
                        t.fin = true;
                    }
                    self.echo(ep, cid);
                }
                FlowEvent::Writable { cid, .. } => self.echo(ep, cid),
                FlowEvent::Reset { cid, .. } | FlowEvent::Closed { cid } => {
                    self.targets.remove(&(ep, cid));
                    if current || draining {
                        self.agents[i].agent.flow_gone(attempt, cid);
                    }
                }
            },
            TunnelEvent::Closed { .. } => {
                if current {
                    self.agents[i].ep = None;
                    self.agents[i].agent.hub_lost(now, attempt);
                }
                if draining {
                    self.agents[i].draining = None;
                    self.agents[i].agent.hub_lost(now, attempt);
                }
                self.remove_ep(ep);
            }
            _ => {}
        }
    }

    /// The invariants, after every step.
    fn check(&self) -> Result<(), Violation> {
        if let Some(v) = &self.violation {
            return Err(Violation(v.clone()));
        }
        // Every peer speaks the protocol correctly (malformed frames are
        // rejected whole), so no flow may end for a credit or sequence
        // violation: that would be a bug in an endpoint.
        let mut codes = vec!["credit_overrun", "sequence_gap"];
        if self.outcome.malformed_frames == 0 {
            codes.push("protocol_error");
        }
        for code in codes {
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
        for e in self.eps.values() {
            let (flows, dedup, mux, wake, bound, window, max_window) = match &e.link {
                Link::Tunnel(t) => (
                    t.flow_count(),
                    t.mux().dedup().len(),
                    t.mux(),
                    t.poll_timeout().map(|(at, w)| (at, format!("{w:?}"))),
                    self.tunnel_cfg.max_flows,
                    self.tunnel_cfg.window,
                    self.tunnel_cfg.max_window,
                ),
                Link::Mesh(m) => {
                    if m.queue_len() > 2 * self.mesh_cfg.send_queue_depth + 2
                        || m.inflight_bytes() > self.mesh_cfg.max_inflight_bytes
                    {
                        return Err(Violation(format!(
                            "a mesh link exceeds its bounds: queue {}, inflight {} bytes",
                            m.queue_len(),
                            m.inflight_bytes()
                        )));
                    }
                    (
                        m.flow_count(),
                        m.mux().dedup().len(),
                        m.mux(),
                        m.poll_timeout().map(|(at, w)| (at, format!("{w:?}"))),
                        self.mesh_cfg.max_flows,
                        self.mesh_cfg.window,
                        self.mesh_cfg.max_window,
                    )
                }
            };
            if flows > bound || dedup > bound {
                return Err(Violation(format!(
                    "a link exceeds its bounds: {flows} flows, {dedup} remembered closed flows"
                )));
            }
            // Windows grow (see `core/src/flow.rs`) within their maximum
            // and the link's growth budget; what a peer may still send never
            // exceeds the window as it stands.
            let mut growth = 0;
            for cid in mux.cids() {
                let f = mux.flow(cid).expect("listed");
                if f.recv_window() > u64::from(f.local_window()) {
                    return Err(Violation(format!(
                        "flow {cid}: receive window above the flow's window"
                    )));
                }
                if f.local_window() < window || f.local_window() > max_window {
                    return Err(Violation(format!(
                        "flow {cid}: window {} outside {window}..={max_window}",
                        f.local_window()
                    )));
                }
                growth += u64::from(f.local_window() - window);
            }
            if growth != mux.window_growth()
                || growth > GROWTH_BUDGET_WINDOWS * u64::from(max_window)
            {
                return Err(Violation(format!(
                    "window growth {growth} (link counts {}) beyond the budget",
                    mux.window_growth()
                )));
            }
            if let Some((at, why)) = wake
                && at < self.now
            {
                return Err(Violation(format!(
                    "a link asks to be woken in the past ({why})"
                )));
            }
        }
        for (i, h) in self.hubs.iter().enumerate().filter(|(_, h)| h.alive) {
            if let Some(at) = h.hub.poll_timeout()
                && at < self.now
            {
                return Err(Violation(format!("hub {i} asks to be woken in the past")));
            }
        }
        for (i, a) in self.agents.iter().enumerate() {
            if let Some(at) = a.agent.poll_timeout()
                && at < self.now
            {
                return Err(Violation(format!("agent {i} asks to be woken in the past")));
            }
        }
        Ok(())
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
        // A drain in progress ends now (the hub exits and comes back).
        for h in 0..self.hubs.len() {
            if self.hubs[h].alive && self.hubs[h].hub.is_draining() {
                self.stop_hub(h, "drain_grace_over");
            }
        }
        for h in 0..self.hubs.len() {
            if !self.hubs[h].alive {
                self.schedule(Duration::ZERO, Event::HubRestart { hub: h });
            }
        }
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

    /// How the clients started after `first_id` ended (or where they are):
    /// the reason a liveness check failed.
    pub fn client_summary(&self, first_id: u64) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for c in self.clients.range(first_id..).map(|(_, c)| c) {
            let k = match (&c.state, c.ended) {
                (ClientState::Done, None) if c.received == c.data => "completed".to_string(),
                (ClientState::Done, None) => "closed short".to_string(),
                (ClientState::Done, Some(code)) => format!("ended: {}", code.as_str()),
                (ClientState::Waiting, _) => format!("waiting for a route at hub {}", c.hub),
                (ClientState::Open { .. }, _) => format!(
                    "open at hub {} ({} of {} bytes sent, {} echoed)",
                    c.hub,
                    c.sent,
                    c.data.len(),
                    c.received.len()
                ),
            };
            *m.entry(k).or_default() += 1;
        }
        m
    }

    /// The state of every hub and agent, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for (i, h) in self.hubs.iter().enumerate() {
            let agents: Vec<String> = h
                .hub
                .agents()
                .map(|(a, e, _)| format!("{a}@{}", e.0))
                .collect();
            out.push(format!(
                "hub {i}: alive={} mode={} registry_healthy={} mesh_up={} agents={agents:?}",
                h.alive,
                h.hub.mode().as_str(),
                h.hub.registry_healthy(),
                h.hub.mesh_links_up()
            ));
        }
        for (i, a) in self.agents.iter().enumerate() {
            out.push(format!("agent {i}: {:?} ep={:?}", a.agent.state(), a.ep));
        }
        for (id, e) in &self.eps {
            let state = match &e.link {
                Link::Tunnel(t) => format!("{:?}", t.state()),
                Link::Mesh(m) => m.state().as_str().to_string(),
            };
            out.push(format!("ep {id} {:?} peer={:?} {state}", e.node, e.peer));
        }
        out.join("; ")
    }

    /// What happened so far, with the counters of the links still up.
    pub fn outcome(&self) -> Outcome {
        let mut o = self.outcome.clone();
        for e in self.eps.values() {
            o.windows_grown += e.link.mux().stats.windows_grown;
        }
        o
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client
    }

    /// The planted bug this world carries.
    pub fn bug(&self) -> PlantedBug {
        self.bug
    }
}

fn flow_cid(fe: &FlowEvent) -> Cid {
    match fe {
        FlowEvent::Data { cid, .. }
        | FlowEvent::Fin { cid }
        | FlowEvent::Reset { cid, .. }
        | FlowEvent::Writable { cid, .. }
        | FlowEvent::Closed { cid } => *cid,
    }
}

/// Everything a link wants sent and everything it has to report.
fn drain(l: &mut Link) -> (Vec<WsMessage>, Vec<EpEvent>) {
    match l {
        Link::Tunnel(t) => (
            std::iter::from_fn(|| t.poll_transmit()).collect(),
            std::iter::from_fn(|| t.poll_event())
                .map(EpEvent::T)
                .collect(),
        ),
        Link::Mesh(m) => (
            std::iter::from_fn(|| m.poll_transmit()).collect(),
            std::iter::from_fn(|| m.poll_event())
                .map(EpEvent::M)
                .collect(),
        ),
    }
}

/// Bytes as a runtime's flow reader hands them over: read behind
/// [`HEADROOM`] free bytes, where the frame's header is written.
fn read_with_room(data: &[u8]) -> Payload {
    let mut buf = BytesMut::with_capacity(HEADROOM + data.len());
    buf.put_bytes(0, HEADROOM);
    buf.put_slice(data);
    Payload::with_room(buf, HEADROOM)
}
