//! A deterministic world: one to three hubs joined by a mesh, agents,
//! clients and echo targets, built only from the core state machines
//! (`HubNode` around `Hub`, `Agent`, `Tunnel`, `MeshLink`, `MemoryRegistry`;
//! a hub's tunnels report to its `HubNode` as in the runtimes), a simulated
//! network, a simulated Redis and a virtual clock, all driven by one seed.
//!
//! A swarm fault profile (drawn from the seed) injects link latency and
//! jitter, tunnel and mesh resets, symmetric and asymmetric partitions
//! (hub–hub, agent–hub, hub–Redis), hub crashes and restarts, agent restarts,
//! Redis outages, slow Redis replies, Redis failovers that lose data, target
//! refusals, client resets, half-closes, slow readers and malformed frames.
//! Agent tokens expire within the run and are renewed by REAUTH, late or
//! wrongly at times, and revoked at a hub (`auth.rs`).
//! Invariants are checked after every step; after the chaos phase every fault
//! heals and new flows must succeed within a bound.

mod auth;
mod bridges;
mod faults;
mod invariants;
mod net;
mod nodes;
mod outcome;
mod redis;
mod workload;

pub use faults::FaultProfile;
pub use invariants::Violation;
pub use outcome::Outcome;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use nowconnect_core::agent::{AgentConfig, AttemptId, HubLinkState};
use nowconnect_core::agent_node::{AgentCommand, AgentNode};
use nowconnect_core::flow::SendError;
use nowconnect_core::hub::{Hub, HubConfig, HubOutput, TunnelId};
use nowconnect_core::hub_node::{HubNode, NodeOutput, RefusalStage};
use nowconnect_core::mesh_link::{MeshEvent, MeshLink, MeshLinkConfig};
use nowconnect_core::mux::{FlowEvent, FlowLink, GROWTH_BUDGET_WINDOWS, PlantedBug};
use nowconnect_core::payload::HEADROOM;
use nowconnect_core::registry::{MemoryRegistry, RegistryError, RegistryOp, RegistryReply};
use nowconnect_core::relay::{FlowRelay, RelayOutput};
use nowconnect_core::rng::Rng;
use nowconnect_core::routing::{Mode, Route};
use nowconnect_core::tenant::{AgentCredential, DEFAULT_TENANT, qualify, split};
use nowconnect_core::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
use nowconnect_core::{Cid, Codec, Epoch, ErrorCode, Payload, WsMessage};

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
        attempt: AttemptId,
        hub: usize,
        /// The token the agent presents.
        token: usize,
    },
    /// The issuer writes agent `agent`'s next token (void if another was
    /// written since it was planned).
    TokenIssued {
        agent: usize,
        issue: u64,
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
    /// Owner hub: a held mesh open's bridge reaches the agent's tunnel task
    /// (the runtime's bridge hands its open over a channel).
    BridgeOpen {
        hub: usize,
        mesh: FlowAddr,
        tunnel: EpId,
        connector: String,
    },
    /// Owner hub: the tunnel flow's id reaches the mesh link task: join.
    BridgeJoin {
        mesh: FlowAddr,
        tunnel: FlowAddr,
    },
    /// A draining hub's node says the drain is over (`complete`: nothing
    /// was left; otherwise its grace period ended): it exits.
    HubDrainEnd {
        hub: usize,
        incarnation: u64,
        complete: bool,
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

/// Where a bridged flow's other side is: the endpoint, the connection of
/// it (an outbound mesh link reconnects on the same endpoint, and a late
/// message for an old connection's flow must not reach a new flow with the
/// same cid, as the runtime's per-connection command channel ensures), and
/// the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowAddr {
    ep: EpId,
    conn: u64,
    cid: Cid,
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
    attempt: AttemptId,
    /// Outbound mesh link: the hub it dials; its replica id once established.
    mesh_to: Option<usize>,
    mesh_up: Option<String>,
    /// Hub tunnel: the agent that said HELLO on it (tenant-qualified).
    agent_id: Option<String>,
    /// Hub link: its bridged flows, as the shipped relay keeps them.
    relay: FlowRelay<FlowAddr>,
    /// Which connection of the endpoint this is (see [`FlowAddr`]).
    conn: u64,
}

enum EpEvent {
    T(TunnelEvent),
    M(MeshEvent),
}

struct SimHub {
    /// The shipped hub node: the same inputs and outputs as the runtimes'.
    node: HubNode,
    cfg: HubConfig,
    alive: bool,
    /// Its listeners take clients (until a drain closes them).
    listening: bool,
    incarnation: u64,
    /// Tokens revoked at this hub (its revocation list).
    revoked: auth::Revoked,
}

struct SimAgent {
    node: AgentNode,
    cfg: AgentConfig,
    /// Who it is: tenant, id and the connectors it may announce (what the
    /// issuer means its tokens to say).
    credential: AgentCredential,
    /// Its token file and renewal.
    auth: auth::AgentAuth,
    /// Announces a connector outside its token's scope: every hub must
    /// refuse its HELLO, so it never carries a flow.
    rogue: bool,
    incarnation: u64,
    /// Its tunnel endpoints by dial attempt (the node knows which is the
    /// current one and which is draining).
    eps: BTreeMap<AttemptId, EpId>,
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
    /// Every token the issuer minted, by id.
    tokens: Vec<auth::Token>,
    /// What each hub tunnel may carry, by the world's own account.
    tunnel_auth: BTreeMap<EpId, auth::TunnelAuth>,
    violation: Option<String>,
    /// `NC_SIM_DEBUG=1`: print what happens, with simulated time.
    debug: bool,
    pub outcome: Outcome,
}

const CHUNK: usize = 8 * 1024;
/// The second tenant of every world.
const OTHER_TENANT: &str = "acme";
const TICK: Duration = Duration::from_millis(10);
/// A hub's client connection limit (the shipped default): a world never
/// has as many clients, so none is refused for it.
const MAX_CLIENTS: usize = 20_000;

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
        // Some worlds give each agent only a few flows: clients and bridged
        // mesh opens then meet a full tunnel.
        let agent_flows = if rng.below(4) == 0 {
            2 + rng.below(4) as usize
        } else {
            64
        };
        let tunnel_cfg = TunnelConfig {
            window,
            max_flows: agent_flows,
            dedup_capacity: agent_flows,
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
            tokens: Vec::new(),
            tunnel_auth: BTreeMap::new(),
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
                node: HubNode::new(Hub::new(origin, cfg.clone(), seed), MAX_CLIENTS),
                cfg,
                alive: true,
                listening: true,
                incarnation: 0,
                revoked: auth::Revoked::new(),
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
            let seed = w.rng.next_u64();
            // Where there are several hubs, about half the agents are
            // multi-homed: a tunnel on each of two (or three) hubs at once.
            let ha_connections = if hubs >= 2 && seed & 1 == 0 {
                2 + u8::from(hubs >= 3 && seed & 2 == 0)
            } else {
                1
            };
            let cfg = AgentConfig {
                agent_id,
                hubs: (0..hubs).map(|h| format!("sim://{h}")).collect(),
                connectors,
                backoff_base: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                hub_connect_timeout: Duration::from_secs(1),
                target_connect_timeout: Duration::from_secs(1),
                ha_connections,
                ..AgentConfig::default()
            };
            w.outcome.agents_multi_homed += u64::from(ha_connections > 1);
            let auth = w.first_token(&credential);
            w.agents.push(SimAgent {
                node: AgentNode::new(origin, cfg.clone(), seed),
                cfg,
                credential,
                auth,
                rogue: is_rogue,
                incarnation: 0,
                eps: BTreeMap::new(),
            });
            w.schedule_issue(i);
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
            self.add_ep(Node::Hub(h), None, Link::Mesh(link), AttemptId(0), Some(to));
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
            take(h.node.poll_timeout());
        }
        for e in self.eps.values() {
            take(match &e.link {
                Link::Tunnel(t) => t.poll_timeout().map(|(at, _)| at),
                Link::Mesh(m) => m.poll_timeout().map(|(at, _)| at),
            });
        }
        for (i, a) in self.agents.iter().enumerate() {
            take(a.node.poll_timeout());
            take(self.renewal_deadline(i));
        }
        t
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        for h in self.hubs.iter_mut().filter(|h| h.alive) {
            h.node.handle_timeout(now);
        }
        for e in self.eps.values_mut() {
            match &mut e.link {
                Link::Tunnel(t) => t.handle_timeout(now),
                Link::Mesh(m) => m.handle_timeout(now),
            }
        }
        for a in &mut self.agents {
            a.node.handle_timeout(now);
        }
        for i in 0..self.agents.len() {
            self.renew(i);
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
                token,
            } => {
                self.trace(2, agent as u64, attempt.0);
                let a = &self.agents[agent];
                // The dial's own slot must still be waiting for it (the
                // node's `state()` is slot 0's alone).
                if a.incarnation != incarnation || !a.node.is_dialing(attempt) {
                    return;
                }
                let id = a.node.agent_id().to_string();
                let connectors = a.node.connectors();
                if !self.hubs[hub].alive {
                    self.agents[agent].node.hub_failed(now, attempt);
                    return;
                }
                let (an, hn) = (Node::Agent(agent), Node::Hub(hub));
                if self.held_until(an, hn).is_some() || self.held_until(hn, an).is_some() {
                    return; // the handshake never completes; the agent times out
                }
                // The upgrade: an expired or revoked token is refused.
                let Some(token_now) = self.upgrade(hub, token) else {
                    self.agents[agent].node.hub_failed(now, attempt);
                    return;
                };
                if self.agents[agent].node.hub_connected(now, attempt).is_err() {
                    return;
                }
                let hub_side = self.next_ep;
                let agent_side = hub_side + 1;
                let t = Tunnel::hub(now, self.tunnel_cfg.clone());
                self.add_ep(hn, Some(agent_side), Link::Tunnel(t), AttemptId(0), None);
                // What the hub learnt from the token at the upgrade.
                self.hubs[hub].node.tunnel_connected(
                    now,
                    TunnelId(hub_side),
                    token_now.credential,
                    token_now.exp,
                );
                self.tunnel_authed(hub, hub_side, agent, token);
                let node = &self.agents[agent].node;
                let (slot, slots) = (node.slot_of(attempt), node.slots());
                let t =
                    Tunnel::agent_slot(now, self.tunnel_cfg.clone(), &id, &connectors, slot, slots);
                self.add_ep(an, Some(hub_side), Link::Tunnel(t), attempt, None);
                self.agents[agent].eps.insert(attempt, agent_side);
                let exp = self.times(token).exp;
                self.agents[agent].auth.presented.insert(agent_side, exp);
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
                let inb = self.add_ep(tnode, Some(ep), Link::Mesh(inbound), AttemptId(0), None);
                let e = self.eps.get_mut(&ep).expect("checked");
                e.peer = Some(inb);
                if let Link::Mesh(l) = &mut e.link {
                    l.on_connected(now, Codec::V2);
                }
            }
            Event::TargetDialDone { ep, cid, ok } => {
                self.trace(4, cid.0, u64::from(ok));
                let Some(Node::Agent(i)) = self.eps.get(&ep).map(|e| e.node) else {
                    return;
                };
                if !self.targets.contains_key(&(ep, cid)) {
                    return;
                }
                let attempt = self.eps.get(&ep).map_or(AttemptId(0), |e| e.attempt);
                if !ok {
                    self.agents[i]
                        .node
                        .target_failed(now, attempt, cid, "connection refused");
                    return;
                }
                if self.agents[i].node.target_connected(now, attempt, cid) {
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
                    h.node.hub_mut().registry_reply(now, op, result);
                }
            }
            Event::ClientStart { client } => {
                self.trace(7, client, 0);
                self.client_start(client);
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
                h.listening = true;
                h.node = HubNode::new(Hub::new(now, h.cfg.clone(), seed), MAX_CLIENTS);
                self.start_mesh_links(hub);
            }
            Event::BridgeOpen {
                hub,
                mesh,
                tunnel,
                connector,
            } => self.bridge_open(hub, mesh, tunnel, &connector),
            Event::BridgeJoin { mesh, tunnel } => self.bridge_join(mesh, tunnel),
            Event::HubDrainEnd {
                hub,
                incarnation,
                complete,
            } => {
                if self.hubs[hub].alive && self.hubs[hub].incarnation == incarnation {
                    self.trace(16, hub as u64, u64::from(complete));
                    self.drain_over(hub, complete);
                }
            }
            Event::TokenIssued { agent, issue } => self.token_issued(agent, issue),
            Event::ChaosTick => {
                self.chaos_tick();
                self.schedule(TICK, Event::ChaosTick);
            }
        }
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    /// The state of every hub and agent, for failure messages.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for (i, h) in self.hubs.iter().enumerate() {
            let agents: Vec<String> = h
                .node
                .hub()
                .agents()
                .map(|(a, e, _)| format!("{a}@{}", e.0))
                .collect();
            out.push(format!(
                "hub {i}: alive={} mode={} registry_healthy={} mesh_up={} agents={agents:?}",
                h.alive,
                h.node.hub().mode().as_str(),
                h.node.hub().registry_healthy(),
                h.node.hub().mesh_links_up()
            ));
        }
        for (i, a) in self.agents.iter().enumerate() {
            out.push(format!(
                "agent {i}: slots {:?} tunnels={:?}",
                a.node.slot_states().collect::<Vec<_>>(),
                a.node.links().collect::<Vec<_>>()
            ));
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
