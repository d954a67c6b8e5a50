//! The hub's control state machine: which agent tunnels it holds and under
//! which epoch, their leases, the registry's health, and where each new
//! client connection goes.
//!
//! It performs no I/O. Registry calls leave as [`HubOutput::Registry`] with an
//! id, and their results come back through [`Hub::registry_reply`]; the hub
//! times them out itself. Tunnels and client connections are named by ids the
//! runtime chooses.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::frame::{Epoch, ErrorCode};
use crate::registry::{Owner, RegistryError, RegistryOp, RegistryReply, SlotLease};
use crate::rng::Rng;
use crate::routing::{LocalCandidate, Mode, RemoteView, Route, pick_local, route_remote};
use crate::tenant::{AgentCredential, qualify};
use crate::timer::Timers;

pub use crate::routing::TunnelId;

pub type ClientId = u64;
pub type OpId = u64;

/// How often a client's registry lookup is repeated while the registry names
/// this hub as the owner of an agent whose claim reply has not arrived yet.
const MAX_ROUTE_RETRIES: u8 = 8;

/// Slots per [`RegistryOp::RenewMany`]: a hub renews every tunnel it owns
/// once per renew interval, in calls of at most this many, so that one
/// call holds Redis (which runs a script alone) for well under a millisecond.
pub const RENEW_BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct HubConfig {
    pub replica_id: String,
    pub mode: Mode,
    /// Ownership and connector lease in the registry.
    pub lease: Duration,
    /// How often an owner renews (well inside `lease`).
    pub renew_interval: Duration,
    /// While draining: how often to look whether each agent told to move
    /// (DRAIN) is owned elsewhere yet, so its old tunnel stops taking flows
    /// and closes once idle.
    pub drain_check_interval: Duration,
    /// A registry call that takes longer fails, and marks the registry unhealthy.
    pub registry_timeout: Duration,
    /// How often to probe the registry while it is unhealthy, and sweep lapsed entries.
    pub health_interval: Duration,
    pub max_agents: usize,
    /// Client connections waiting for a registry answer.
    pub max_pending_routes: usize,
    /// The URL other hubs dial for this hub's mesh; announced in the
    /// registry when set, so peers find each other without configuration.
    pub mesh_url: Option<String>,
    /// Test-only (see `mux::PlantedBug`; only with the `planted-bugs`
    /// feature).
    #[cfg(feature = "planted-bugs")]
    #[doc(hidden)]
    pub planted_bug: crate::mux::PlantedBug,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            replica_id: "hub".into(),
            mode: Mode::Off,
            lease: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
            drain_check_interval: Duration::from_millis(100),
            registry_timeout: Duration::from_millis(500),
            health_interval: Duration::from_secs(1),
            max_agents: 1024,
            max_pending_routes: 4096,
            mesh_url: None,
            #[cfg(feature = "planted-bugs")]
            planted_bug: crate::mux::PlantedBug::None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubOutput {
    Registry {
        op: OpId,
        call: RegistryOp,
    },
    /// Send WELCOME on the tunnel: it is owned under `epoch`.
    AcceptTunnel {
        tunnel: TunnelId,
        epoch: Epoch,
    },
    /// Close the tunnel with this reason (refused, superseded, ownership lost).
    CloseTunnel {
        tunnel: TunnelId,
        code: ErrorCode,
        reason: String,
    },
    /// Where the client connection goes.
    Route {
        client: ClientId,
        route: Route,
    },
    /// The other replicas announced in the registry: (replica id, mesh URL).
    Peers(Vec<(String, String)>),
    /// Send DRAIN on the tunnel: this hub is shutting down, the agent should
    /// move to another hub now and keep this tunnel for its flows.
    DrainTunnel {
        tunnel: TunnelId,
    },
    /// A replica left the registry: it was missing from every listing for
    /// a whole lease (a live replica announces itself every renew interval,
    /// also after Redis lost its data). Its mesh links are no longer
    /// served; a replica id that comes back is admitted again.
    PeerDeparted {
        replica_id: String,
    },
    /// The registry took this replica's announcement for the first time:
    /// peers now admit its mesh links, so dialing them starts here (a dial
    /// before it is refused as not registered, a false security event).
    Announced,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum AgentState {
    Claiming {
        op: OpId,
    },
    Owned {
        epoch: Epoch,
    },
    /// Draining hub only: the agent moved to another hub (which now owns it)
    /// and this tunnel stays up for the flows it still carries. Takes no new
    /// flows and is not renewed.
    Superseded,
}

#[derive(Clone, Debug)]
struct AgentTunnel {
    /// The op of the claim its HELLO sent: with the tunnel id it names this
    /// tunnel's stay here, as the runtime may give the id to a later tunnel.
    hello: OpId,
    agent_id: String,
    /// Which of the agent's tunnels this is, and how many it holds.
    slot: u8,
    slots: u8,
    connectors: Vec<String>,
    state: AgentState,
    open_flows: usize,
    /// Whether the agent understands DRAIN (v2); a v1 agent moves only when
    /// its tunnel closes, so a drain does not wait for it.
    can_drain: bool,
}

#[derive(Clone, Debug)]
enum Pending {
    Claim {
        tunnel: TunnelId,
        agent_id: String,
        slot: u8,
    },
    Renew {
        tunnel: TunnelId,
        hello: OpId,
        epoch: Epoch,
    },
    /// A batched renewal: each slot's tunnel, the claim op of its HELLO and
    /// the epoch it owns, in the order of the call's slots.
    RenewMany {
        tunnels: Vec<(TunnelId, OpId, Epoch)>,
    },
    /// Ownership vanished (lease lapsed while the registry was away, or the
    /// registry lost its data) while the tunnel is still here: claim again.
    Reclaim {
        tunnel: TunnelId,
        hello: OpId,
        agent_id: String,
        slot: u8,
        old: Epoch,
    },
    /// Draining: does another hub hold a tunnel of this tunnel's agent yet?
    DrainCheck {
        tunnel: TunnelId,
        hello: OpId,
        epoch: Epoch,
    },
    Route {
        client: ClientId,
        connector: String,
        /// The listener's allowed agents, if it names them.
        pin: Option<Vec<String>>,
        /// Lookups repeated because a claim here was still landing.
        retries: u8,
    },
    Replicas,
    /// This replica's own announcement.
    Announce,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// One tunnel's renewal, on its own: only while draining, when it also
    /// looks whether the agent moved.
    Renew(TunnelId),
    OpDeadline(OpId),
    Health,
    Discovery,
    /// Every owned tunnel's renewal ([`RegistryOp::RenewMany`]).
    RenewAll,
}

/// Counters for `/metrics`, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubCounters {
    pub tunnels_accepted: u64,
    pub tunnels_refused: u64,
    pub tunnels_superseded: u64,
    pub ownership_lost: u64,
    pub ownership_reclaimed: u64,
    /// Mesh opens or frames refused for a stale epoch.
    pub epoch_mismatch: u64,
    /// Mesh opens refused because the agent does not serve the connector.
    pub mesh_opens_refused_connector: u64,
    pub routes: BTreeMap<&'static str, u64>,
    pub refusals: BTreeMap<&'static str, u64>,
    /// Shadow mode: what active mode would have done, by route kind.
    pub shadow_would: BTreeMap<&'static str, u64>,
    pub registry_errors: u64,
    pub registry_timeouts: u64,
    /// Replicas that left the registry ([`HubOutput::PeerDeparted`]).
    pub peers_departed: u64,
}

#[derive(Debug)]
pub struct Hub {
    cfg: HubConfig,
    agents: BTreeMap<TunnelId, AgentTunnel>,
    /// (agent id, slot) → tunnel that owns that slot here
    by_agent: BTreeMap<(String, u8), TunnelId>,
    /// Indexes of `agents`, kept by `insert_tunnel` and `remove_tunnel`
    /// only, so that a HELLO and a client's local route look at the agent's
    /// or the connector's tunnels, not at every tunnel of the hub: agent id
    /// → its tunnels here (any state), connector → the tunnels announcing it.
    tunnels_of_agent: BTreeMap<String, BTreeSet<TunnelId>>,
    tunnels_of_connector: BTreeMap<String, BTreeSet<TunnelId>>,
    pending: BTreeMap<OpId, Pending>,
    timers: Timers<Timer>,
    next_op: OpId,
    registry_healthy: bool,
    /// The registry took this replica's announcement at least once.
    announced: bool,
    registry_last_error: Option<String>,
    mesh_up: BTreeSet<String>,
    /// Replica ids the registry listed at the last discovery (this one
    /// included): a mesh peer is served only while it is one of them (or
    /// allow-listed by the runtime's configuration).
    registered_replicas: BTreeSet<String>,
    /// When each replica was last in a registry listing.
    replica_seen: BTreeMap<String, Instant>,
    draining: bool,
    rng: Rng,
    out: VecDeque<HubOutput>,
    pub counters: HubCounters,
}

impl Hub {
    pub fn new(now: Instant, cfg: HubConfig, seed: u64) -> Self {
        let mut hub = Hub {
            cfg,
            agents: BTreeMap::new(),
            by_agent: BTreeMap::new(),
            tunnels_of_agent: BTreeMap::new(),
            tunnels_of_connector: BTreeMap::new(),
            pending: BTreeMap::new(),
            timers: Timers::default(),
            next_op: 1,
            registry_healthy: true,
            announced: false,
            registry_last_error: None,
            mesh_up: BTreeSet::new(),
            registered_replicas: BTreeSet::new(),
            replica_seen: BTreeMap::new(),
            draining: false,
            rng: Rng::new(seed),
            out: VecDeque::new(),
            counters: HubCounters::default(),
        };
        hub.timers.set(Timer::Health, now + hub.cfg.health_interval);
        hub.timers
            .set(Timer::RenewAll, now + hub.cfg.renew_interval);
        if hub.cfg.mode != Mode::Off {
            hub.timers.set(Timer::Discovery, now);
        }
        hub
    }

    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }

    /// The deliberate bug this hub carries (test-only).
    #[cfg(feature = "planted-bugs")]
    pub(crate) fn planted_bug(&self) -> crate::mux::PlantedBug {
        self.cfg.planted_bug
    }

    pub fn replica_id(&self) -> &str {
        &self.cfg.replica_id
    }

    pub fn registry_healthy(&self) -> bool {
        self.registry_healthy
    }

    pub fn registry_last_error(&self) -> Option<&str> {
        self.registry_last_error.as_deref()
    }

    /// Agent tunnels owned here (one per agent and slot).
    pub fn agent_count(&self) -> usize {
        self.by_agent.len()
    }

    /// Tunnels held: owned ones and ones waiting for their claim.
    pub fn tunnel_count(&self) -> usize {
        self.agents.len()
    }

    pub fn pending_ops(&self) -> usize {
        self.pending.len()
    }

    /// Agents held here, with their epoch and connectors (for `/readyz`, metrics).
    pub fn agents(&self) -> impl Iterator<Item = (&str, Epoch, &[String])> + '_ {
        self.agents.values().filter_map(|a| match a.state {
            AgentState::Owned { epoch } => {
                Some((a.agent_id.as_str(), epoch, a.connectors.as_slice()))
            }
            AgentState::Claiming { .. } | AgentState::Superseded => None,
        })
    }

    /// The tunnels that own a slot of `agent_id` here, with their epochs
    /// (one for an agent with one tunnel), by slot.
    pub fn owned_tunnels(&self, agent_id: &str) -> Vec<(TunnelId, Epoch)> {
        self.by_agent
            .range((agent_id.to_string(), 0)..=(agent_id.to_string(), u8::MAX))
            .filter_map(|(_, t)| match self.agents.get(t)?.state {
                AgentState::Owned { epoch } => Some((*t, epoch)),
                AgentState::Claiming { .. } | AgentState::Superseded => None,
            })
            .collect()
    }

    /// The tunnel owning the lowest slot of `agent_id` here (for an agent
    /// with one tunnel: its tunnel), with its epoch.
    pub fn owned_tunnel(&self, agent_id: &str) -> Option<(TunnelId, Epoch)> {
        self.owned_tunnels(agent_id).into_iter().next()
    }

    /// The tunnel of `agent_id` owned here under `epoch`, if any: the one
    /// a mesh open under that epoch may use.
    pub fn owned_tunnel_at(&self, agent_id: &str, epoch: Epoch) -> Option<TunnelId> {
        self.owned_tunnels(agent_id)
            .into_iter()
            .find(|(_, e)| *e == epoch)
            .map(|(t, _)| t)
    }

    /// Readiness: the reasons this hub is degraded (empty means ready).
    /// `configured_peers` is how many mesh peers this hub expects.
    pub fn readiness(&self, configured_peers: usize) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.draining {
            reasons.push("draining".to_string());
        }
        if self.cfg.mode == Mode::Active {
            if !self.registry_healthy {
                reasons.push(format!(
                    "registry unhealthy: {}",
                    self.registry_last_error.as_deref().unwrap_or("no answer")
                ));
            }
            // Isolated from its peers a hub can still serve the agents it
            // holds: in a two-hub cluster the survivor of a restart must stay
            // ready (its peer's agents move to it).
            if configured_peers > 0 && self.mesh_up.is_empty() && self.agent_count() == 0 {
                reasons.push(
                    "no mesh peer link is established and no agent is connected here".to_string(),
                );
            }
        }
        reasons
    }

    fn op(&mut self, now: Instant, call: RegistryOp, pending: Pending) -> OpId {
        let op = self.next_op;
        self.next_op += 1;
        self.pending.insert(op, pending);
        self.timers
            .set(Timer::OpDeadline(op), now + self.cfg.registry_timeout);
        self.out.push_back(HubOutput::Registry { op, call });
        op
    }

    /// An agent's HELLO arrived on `tunnel`, whose token says `credential`.
    /// The HELLO must name the token's agent and announce only connectors
    /// the token lists; the agent and its connectors are then known by
    /// their tenant-qualified names ([`crate::tenant::qualify`]), so a flow
    /// never crosses tenants. On a refusal the tunnel is closed with the
    /// reason and the refusal's kind (`agent_mismatch`,
    /// `connector_outside_scope`, `duplicate_hello`) is returned for the
    /// runtime to count.
    pub fn tunnel_hello_as(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        credential: &AgentCredential,
        hello_agent_id: &str,
        connectors: &[String],
    ) -> Result<(), &'static str> {
        if self.refuse_repeated_hello(now, tunnel) {
            return Err("duplicate_hello");
        }
        if let Err((kind, reason)) = credential.admits(hello_agent_id, connectors) {
            self.counters.tunnels_refused += 1;
            self.out.push_back(HubOutput::CloseTunnel {
                tunnel,
                code: ErrorCode::Refused,
                reason,
            });
            return Err(kind);
        }
        let agent = qualify(&credential.tenant, hello_agent_id);
        let qualified: Vec<String> = connectors
            .iter()
            .map(|c| qualify(&credential.tenant, c))
            .collect();
        self.tunnel_hello(now, tunnel, &agent, &qualified, None);
        Ok(())
    }

    /// [`Hub::tunnel_hello`] for tunnel `slot` of an agent that holds
    /// `slots` tunnels at once (multi-homed): each slot is claimed and
    /// fenced on its own, so the agent's tunnels on other hubs stay owned.
    pub fn tunnel_hello_slot(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        agent_id: &str,
        connectors: &[String],
        slot: u8,
        slots: u8,
    ) {
        self.hello(now, tunnel, agent_id, connectors, None, slot, slots)
    }

    /// An agent's HELLO arrived on `tunnel`. `scope`, from its token, limits
    /// the connectors it may announce (`None`: any). Names are taken as
    /// they are (already qualified); [`Hub::tunnel_hello_as`] checks a
    /// token's credential first.
    pub fn tunnel_hello(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        agent_id: &str,
        connectors: &[String],
        scope: Option<&[String]>,
    ) {
        self.hello(now, tunnel, agent_id, connectors, scope, 0, 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn hello(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        agent_id: &str,
        connectors: &[String],
        scope: Option<&[String]>,
        slot: u8,
        slots: u8,
    ) {
        let refuse = |hub: &mut Hub, code, reason: String| {
            hub.counters.tunnels_refused += 1;
            hub.out.push_back(HubOutput::CloseTunnel {
                tunnel,
                code,
                reason,
            });
        };
        if self.refuse_repeated_hello(now, tunnel) {
            return;
        }
        if self.draining {
            return refuse(self, ErrorCode::Shutdown, "hub is draining".into());
        }
        if let Some(scope) = scope
            && let Some(bad) = connectors.iter().find(|c| !scope.contains(c))
        {
            return refuse(
                self,
                ErrorCode::Refused,
                format!("connector `{bad}` is outside the token's scope"),
            );
        }
        if slots == 0 || slots > crate::frame::MAX_SLOTS || slot >= slots {
            return refuse(
                self,
                ErrorCode::ProtocolError,
                format!(
                    "tunnel slot {slot} of {slots}: an agent holds 1 to {} tunnels, slots 0 to slots-1",
                    crate::frame::MAX_SLOTS
                ),
            );
        }
        // One tunnel per agent on a hub: a multi-homed agent's other slot
        // belongs on another hub. Refused before any claim, so a second slot
        // landing here (behind a balancer) never moves the agent's epoch
        // under the mesh, and one agent token takes one of `max_agents`.
        let other = self
            .tunnels_of(agent_id)
            .map(|t| self.agents[t].slot)
            .find(|s| *s != slot);
        if let Some(other) = other {
            return refuse(
                self,
                ErrorCode::Refused,
                format!(
                    "hub `{}` already carries tunnel slot {other} of agent `{agent_id}`: one tunnel per agent on a hub",
                    self.cfg.replica_id
                ),
            );
        }
        let key = (agent_id.to_string(), slot);
        if self.agents.len() >= self.cfg.max_agents && !self.by_agent.contains_key(&key) {
            return refuse(
                self,
                ErrorCode::LimitExceeded,
                format!("hub agent limit of {} reached", self.cfg.max_agents),
            );
        }
        // One claim per agent and slot at a time: a newer connection
        // supersedes an older one still waiting for its claim (its reply is
        // then released).
        let claiming: Vec<TunnelId> = self
            .tunnels_of(agent_id)
            .filter(|t| {
                let a = &self.agents[*t];
                **t != tunnel && a.slot == slot && matches!(a.state, AgentState::Claiming { .. })
            })
            .copied()
            .collect();
        for old in claiming {
            self.remove_tunnel(old);
            self.counters.tunnels_superseded += 1;
            self.out.push_back(HubOutput::CloseTunnel {
                tunnel: old,
                code: ErrorCode::StaleEpoch,
                reason: format!("agent `{agent_id}` connected again before this claim finished"),
            });
        }
        let op = self.op(
            now,
            RegistryOp::Claim {
                agent_id: agent_id.to_string(),
                slot,
                replica_id: self.cfg.replica_id.clone(),
                lease: self.cfg.lease,
            },
            Pending::Claim {
                tunnel,
                agent_id: agent_id.to_string(),
                slot,
            },
        );
        self.insert_tunnel(
            tunnel,
            AgentTunnel {
                hello: op,
                agent_id: agent_id.to_string(),
                slot,
                slots,
                connectors: connectors.to_vec(),
                state: AgentState::Claiming { op },
                open_flows: 0,
                can_drain: true,
            },
        );
        self.check_agent_bound();
    }

    /// A HELLO on a tunnel this hub already holds (claiming or owned) is a
    /// protocol error (`HubNode` refuses it before it gets here): the
    /// tunnel is forgotten, its ownership released, and it is closed.
    /// Taken as a fresh HELLO it would overwrite the tunnel's entry while
    /// the agent table still names the tunnel for its first agent, an entry
    /// no close would ever remove.
    fn refuse_repeated_hello(&mut self, now: Instant, tunnel: TunnelId) -> bool {
        if !self.agents.contains_key(&tunnel) {
            return false;
        }
        self.tunnel_closed(now, tunnel);
        self.counters.tunnels_refused += 1;
        self.out.push_back(HubOutput::CloseTunnel {
            tunnel,
            code: ErrorCode::ProtocolError,
            reason: "a second HELLO on an introduced tunnel".into(),
        });
        true
    }

    /// The tunnels of `agent_id` here, in any state.
    fn tunnels_of<'a>(&'a self, agent_id: &str) -> impl Iterator<Item = &'a TunnelId> + 'a {
        self.tunnels_of_agent.get(agent_id).into_iter().flatten()
    }

    /// Every tunnel enters `agents` here, and its indexes with it.
    fn insert_tunnel(&mut self, tunnel: TunnelId, a: AgentTunnel) {
        if let Some(old) = self.remove_tunnel(tunnel) {
            debug_assert!(false, "tunnel {tunnel:?} of `{}` replaced", old.agent_id);
        }
        self.tunnels_of_agent
            .entry(a.agent_id.clone())
            .or_default()
            .insert(tunnel);
        for c in &a.connectors {
            self.tunnels_of_connector
                .entry(c.clone())
                .or_default()
                .insert(tunnel);
        }
        self.agents.insert(tunnel, a);
    }

    /// Every tunnel leaves `agents` here, and its indexes with it.
    fn remove_tunnel(&mut self, tunnel: TunnelId) -> Option<AgentTunnel> {
        let a = self.agents.remove(&tunnel)?;
        let unindex = |index: &mut BTreeMap<String, BTreeSet<TunnelId>>, key: &str| {
            if let Some(set) = index.get_mut(key) {
                set.remove(&tunnel);
                if set.is_empty() {
                    index.remove(key);
                }
            }
        };
        unindex(&mut self.tunnels_of_agent, &a.agent_id);
        for c in &a.connectors {
            unindex(&mut self.tunnels_of_connector, c);
        }
        Some(a)
    }

    /// The agent limit holds, and it holds because every agent counted is
    /// owned by a tunnel held here that claimed that very agent: an entry
    /// pointing anywhere else could never be removed by a close.
    /// The agent and connector indexes match the tunnels too.
    fn check_agent_bound(&self) {
        debug_assert!(
            self.tunnels_of_agent
                .values()
                .map(BTreeSet::len)
                .sum::<usize>()
                == self.agents.len()
                && self.agents.iter().all(|(t, a)| {
                    self.tunnels_of_agent
                        .get(&a.agent_id)
                        .is_some_and(|s| s.contains(t))
                        && a.connectors.iter().all(|c| {
                            self.tunnels_of_connector
                                .get(c)
                                .is_some_and(|s| s.contains(t))
                        })
                })
                && self.tunnels_of_connector.iter().all(|(c, set)| {
                    !set.is_empty()
                        && set
                            .iter()
                            .all(|t| self.agents.get(t).is_some_and(|a| a.connectors.contains(c)))
                }),
            "the agent and connector indexes disagree with the tunnels"
        );
        debug_assert!(
            self.by_agent.len() <= self.cfg.max_agents,
            "{} agents owned, limit {}",
            self.by_agent.len(),
            self.cfg.max_agents
        );
        debug_assert!(
            self.by_agent
                .iter()
                .all(
                    |((agent, slot), t)| self.agents.get(t).is_some_and(|a| a.agent_id == *agent
                        && a.slot == *slot
                        && matches!(a.state, AgentState::Owned { .. }))
                ),
            "an owned agent whose tunnel is gone or serves another agent or slot"
        );
    }

    /// The tunnel's socket is gone. Releases ownership if it held it.
    pub fn tunnel_closed(&mut self, now: Instant, tunnel: TunnelId) {
        let Some(a) = self.remove_tunnel(tunnel) else {
            return;
        };
        self.timers.clear(Timer::Renew(tunnel));
        let key = (a.agent_id.clone(), a.slot);
        if self.by_agent.get(&key) == Some(&tunnel) {
            self.by_agent.remove(&key);
            if let AgentState::Owned { epoch } = a.state {
                self.op(
                    now,
                    RegistryOp::Release {
                        agent_id: a.agent_id,
                        slot: a.slot,
                        replica_id: self.cfg.replica_id.clone(),
                        epoch,
                    },
                    Pending::Other,
                );
            }
        }
        self.check_agent_bound();
    }

    pub fn flow_started(&mut self, tunnel: TunnelId) {
        if let Some(a) = self.agents.get_mut(&tunnel) {
            a.open_flows += 1;
        }
    }

    pub fn flow_ended(&mut self, tunnel: TunnelId) {
        if let Some(a) = self.agents.get_mut(&tunnel) {
            a.open_flows = a.open_flows.saturating_sub(1);
        }
        self.close_if_moved_and_idle(tunnel);
    }

    pub fn mesh_link_up(&mut self, replica_id: &str, up: bool) {
        if up {
            self.mesh_up.insert(replica_id.to_string());
        } else {
            self.mesh_up.remove(replica_id);
        }
    }

    pub fn mesh_links_up(&self) -> usize {
        self.mesh_up.len()
    }

    /// Graceful drain (shutdown): refuse new tunnels, report `draining` on
    /// readiness, and tell every agent here to move to another hub (DRAIN).
    /// Until an agent is owned elsewhere, its flows (local clients and mesh
    /// opens under its current epoch) are still served on its tunnel here;
    /// when a renewal finds the new owner, the tunnel is kept for the flows
    /// it carries but takes no new ones. The runtime stops its listeners and
    /// closes the tunnels when the flows are done or the grace period ends.
    pub fn drain(&mut self, now: Instant) {
        if self.draining {
            return;
        }
        self.draining = true;
        let owned: Vec<TunnelId> = self
            .agents
            .iter()
            .filter(|(_, a)| matches!(a.state, AgentState::Owned { .. }) && a.can_drain)
            .map(|(t, _)| *t)
            .collect();
        for tunnel in owned {
            self.out.push_back(HubOutput::DrainTunnel { tunnel });
            if self.cfg.mode != Mode::Off {
                // Renew often now: the renewal is what finds the new owner.
                self.timers
                    .set(Timer::Renew(tunnel), now + self.cfg.drain_check_interval);
            }
        }
    }

    /// While draining: agents told to move that no other hub owns yet (as
    /// far as this hub knows). Without a registry (mode `off`) a move is
    /// never seen, so this is 0.
    pub fn moves_pending(&self) -> usize {
        if !self.draining || self.cfg.mode == Mode::Off {
            return 0;
        }
        self.agents
            .values()
            .filter(|a| matches!(a.state, AgentState::Owned { .. }) && a.can_drain)
            .count()
    }

    /// The tunnel speaks a codec without DRAIN (v1): a drain neither tells
    /// its agent to move nor waits for it to.
    pub fn tunnel_cannot_drain(&mut self, tunnel: TunnelId) {
        if let Some(a) = self.agents.get_mut(&tunnel) {
            a.can_drain = false;
        }
    }

    /// A superseded tunnel (draining hub, agent owned elsewhere) with no
    /// flows left is closed.
    fn close_if_moved_and_idle(&mut self, tunnel: TunnelId) {
        let Some(a) = self.agents.get(&tunnel) else {
            return;
        };
        if a.state == AgentState::Superseded && a.open_flows == 0 {
            let agent = a.agent_id.clone();
            self.forget_tunnel(tunnel);
            self.out.push_back(HubOutput::CloseTunnel {
                tunnel,
                code: ErrorCode::Shutdown,
                reason: format!("hub draining: agent `{agent}` moved to another hub"),
            });
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Flows open on this hub's tunnels (local and mesh-bridged).
    pub fn open_tunnel_flows(&self) -> usize {
        self.agents.values().map(|a| a.open_flows).sum()
    }

    /// Owner side of the mesh: may a flow for `connector` of `agent_id`
    /// under `epoch` be served here? Returns the tunnel, or the refusal
    /// (counted when stale). A refusal names neither the current epoch nor
    /// the current owner: a peer learns nothing it could replay.
    pub fn check_mesh_open(
        &mut self,
        agent_id: &str,
        connector: &str,
        epoch: Epoch,
    ) -> Result<TunnelId, (ErrorCode, String)> {
        let owned = self.owned_tunnels(agent_id);
        let at_epoch = owned.iter().find(|(_, e)| *e == epoch).map(|(t, _)| *t);
        #[cfg(feature = "planted-bugs")]
        let at_epoch = at_epoch.or_else(|| {
            (self.cfg.planted_bug == crate::mux::PlantedBug::AcceptStaleEpoch)
                .then(|| owned.first().map(|(t, _)| *t))
                .flatten()
        });
        let tunnel = match at_epoch {
            Some(t) => t,
            None => {
                self.counters.epoch_mismatch += 1;
                return Err((
                    ErrorCode::StaleEpoch,
                    format!(
                        "agent `{agent_id}` is not owned by {} under epoch {}",
                        self.cfg.replica_id, epoch.0
                    ),
                ));
            }
        };
        if !self.agents[&tunnel]
            .connectors
            .iter()
            .any(|c| c == connector)
        {
            self.counters.mesh_opens_refused_connector += 1;
            return Err((
                ErrorCode::Refused,
                format!("agent `{agent_id}` does not serve connector `{connector}`"),
            ));
        }
        Ok(tunnel)
    }

    /// Whether the registry has taken this replica's announcement (see
    /// [`HubOutput::Announced`]).
    pub fn announced(&self) -> bool {
        self.announced
    }

    /// Whether the registry listed `replica_id` at the last discovery.
    pub fn replica_registered(&self, replica_id: &str) -> bool {
        self.registered_replicas.contains(replica_id)
    }

    /// A registry listing of replicas (from discovery, or read when a mesh
    /// peer not seen yet said M_HELLO). A replica missing from listings for
    /// a whole lease has left: [`HubOutput::PeerDeparted`]. The grace covers
    /// a Redis restart that lost its data (every live replica announces
    /// itself again within a renew interval, shorter than the lease).
    pub fn replicas_listed(&mut self, now: Instant, list: &[(String, String)]) {
        self.registered_replicas = list.iter().map(|(r, _)| r.clone()).collect();
        // This hub never departs from itself (its own record lapses when
        // its announcements fail, which the readiness reasons show).
        for r in self
            .registered_replicas
            .iter()
            .filter(|r| **r != self.cfg.replica_id)
        {
            self.replica_seen.insert(r.clone(), now);
        }
        let lease = self.cfg.lease;
        let gone: Vec<String> = self
            .replica_seen
            .iter()
            .filter(|(r, seen)| {
                !self.registered_replicas.contains(*r)
                    && now.saturating_duration_since(**seen) >= lease
            })
            .map(|(r, _)| r.clone())
            .collect();
        for replica_id in gone {
            self.replica_seen.remove(&replica_id);
            self.counters.peers_departed += 1;
            self.out.push_back(HubOutput::PeerDeparted { replica_id });
        }
    }

    /// A stale-epoch frame was refused elsewhere (mesh link); count it.
    pub fn count_epoch_mismatch(&mut self) {
        self.counters.epoch_mismatch += 1;
    }

    /// A client connected to a listener for `connector`.
    /// While draining this still routes (local tunnels until their agents
    /// are owned elsewhere, then the mesh): the runtime decides when its
    /// listeners stop taking clients.
    pub fn client_connected(&mut self, now: Instant, client: ClientId, connector: &str) {
        self.client_connected_pinned(now, client, connector, None)
    }

    /// [`Hub::client_connected`] for a listener that names the agents
    /// allowed to serve it (`pin`, qualified agent ids): no other agent is
    /// ever chosen, locally or across the mesh.
    pub fn client_connected_pinned(
        &mut self,
        now: Instant,
        client: ClientId,
        connector: &str,
        pin: Option<&[String]>,
    ) {
        if let Some(route) = self.local_route(connector, pin) {
            return self.route(client, route);
        }
        match self.cfg.mode {
            Mode::Off => self.route(
                client,
                Route::Refuse {
                    code: ErrorCode::NoAgent,
                    reason: format!("connector `{connector}`: no agent connected"),
                },
            ),
            Mode::Active if !self.registry_healthy => {
                let why = self
                    .registry_last_error
                    .clone()
                    .unwrap_or_else(|| "no answer".into());
                let route = route_remote(
                    connector,
                    &self.cfg.replica_id,
                    RemoteView::Unavailable(&why),
                    |_| false,
                    &mut self.rng,
                );
                self.route(client, route)
            }
            Mode::Shadow | Mode::Active => {
                if self.pending.len() >= self.cfg.max_pending_routes {
                    return self.route(
                        client,
                        Route::Refuse {
                            code: ErrorCode::LimitExceeded,
                            reason: format!(
                                "{} connections already wait for the registry",
                                self.cfg.max_pending_routes
                            ),
                        },
                    );
                }
                self.lookup(now, client, connector, pin, 0);
            }
        }
    }

    /// Ask the registry who serves `connector` for `client`.
    fn lookup(
        &mut self,
        now: Instant,
        client: ClientId,
        connector: &str,
        pin: Option<&[String]>,
        retries: u8,
    ) {
        self.op(
            now,
            RegistryOp::ListAgents {
                connector: connector.to_string(),
            },
            Pending::Route {
                client,
                connector: connector.to_string(),
                pin: pin.map(<[String]>::to_vec),
                retries,
            },
        );
    }

    /// The least-loaded agent owned here for `connector`, if any.
    fn local_route(&mut self, connector: &str, pin: Option<&[String]>) -> Option<Route> {
        let local: Vec<LocalCandidate> = self
            .tunnels_of_connector
            .get(connector)
            .into_iter()
            .flatten()
            .map(|t| (t, &self.agents[t]))
            .filter(|(_, a)| {
                matches!(a.state, AgentState::Owned { .. })
                    && pin.is_none_or(|p| p.contains(&a.agent_id))
            })
            .map(|(t, a)| LocalCandidate {
                tunnel: *t,
                agent_id: a.agent_id.clone(),
                open_flows: a.open_flows,
            })
            .collect();
        let c = pick_local(&local)?;
        if self.cfg.mode == Mode::Shadow {
            *self.counters.shadow_would.entry("local").or_default() += 1;
        }
        Some(Route::Local {
            tunnel: c.tunnel,
            agent_id: c.agent_id.clone(),
        })
    }

    fn route(&mut self, client: ClientId, route: Route) {
        *self.counters.routes.entry(route.kind()).or_default() += 1;
        if let Route::Refuse { code, .. } = &route {
            *self.counters.refusals.entry(code.as_str()).or_default() += 1;
        }
        self.out.push_back(HubOutput::Route { client, route });
    }

    pub fn registry_reply(
        &mut self,
        now: Instant,
        op: OpId,
        result: Result<RegistryReply, RegistryError>,
    ) {
        let Some(pending) = self.pending.remove(&op) else {
            return; // timed out already
        };
        self.timers.clear(Timer::OpDeadline(op));
        match &result {
            Ok(_) => {
                self.registry_healthy = true;
                self.registry_last_error = None;
            }
            Err(e) => {
                self.counters.registry_errors += 1;
                self.registry_healthy = false;
                self.registry_last_error = Some(e.to_string());
            }
        }
        self.complete(now, op, pending, result);
        self.check_agent_bound();
    }

    fn complete(
        &mut self,
        now: Instant,
        op: OpId,
        pending: Pending,
        result: Result<RegistryReply, RegistryError>,
    ) {
        match (pending, result) {
            (
                Pending::Claim {
                    tunnel,
                    agent_id,
                    slot,
                },
                Ok(RegistryReply::Claimed(epoch)),
            ) => self.claimed(now, op, tunnel, &agent_id, slot, epoch),
            (Pending::Claim { tunnel, .. }, other) => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(r) => format!("unexpected registry reply {r:?}"),
                };
                // Only the tunnel still waiting for this very claim fails
                // with it: the id may name a later tunnel by now.
                if self.waits_for_claim(tunnel, op) {
                    self.remove_tunnel(tunnel);
                    self.counters.tunnels_refused += 1;
                    self.out.push_back(HubOutput::CloseTunnel {
                        tunnel,
                        code: ErrorCode::RegistryUnavailable,
                        reason: format!("cannot claim ownership: {why}"),
                    });
                }
            }
            (
                Pending::Renew {
                    tunnel,
                    hello,
                    epoch,
                },
                Ok(RegistryReply::Lost { current }),
            ) => self.renewal_lost(now, tunnel, hello, epoch, current),
            (Pending::RenewMany { tunnels }, Ok(RegistryReply::RenewedMany { lost })) => {
                for (i, current) in lost {
                    // An index the call did not have is ignored: the
                    // reply comes from outside.
                    if let Some(&(tunnel, hello, epoch)) = tunnels.get(i) {
                        self.renewal_lost(now, tunnel, hello, epoch, current);
                    }
                }
            }
            // An error (kept; local flows go on, retried next interval).
            (Pending::RenewMany { .. }, _) => {}
            (
                Pending::Reclaim {
                    tunnel,
                    hello,
                    agent_id,
                    slot,
                    old,
                },
                Ok(RegistryReply::Claimed(epoch)),
            ) => {
                if self.still_owns(tunnel, hello, old) {
                    let a = self.agents.get_mut(&tunnel).expect("checked above");
                    a.state = AgentState::Owned { epoch };
                    self.counters.ownership_reclaimed += 1;
                    let call = RegistryOp::AddConnectors {
                        agent_id: a.agent_id.clone(),
                        connectors: a.connectors.clone(),
                        lease: self.cfg.lease,
                    };
                    self.op(now, call, Pending::Other);
                } else {
                    // The tunnel changed, closed, or its id names a later
                    // tunnel meanwhile: give the new claim back.
                    let call = RegistryOp::Release {
                        agent_id,
                        slot,
                        replica_id: self.cfg.replica_id.clone(),
                        epoch,
                    };
                    self.op(now, call, Pending::Other);
                }
            }
            // Failed reclaim: the renewal timer tries again.
            (Pending::Reclaim { .. }, _) => {}
            // Renewed, or an error (kept; local flows go on, retried next interval).
            (Pending::Renew { .. }, _) => {}
            (
                Pending::DrainCheck {
                    tunnel,
                    hello,
                    epoch,
                },
                Ok(RegistryReply::Owners(owners)),
            ) => {
                if !self.still_owns(tunnel, hello, epoch) {
                    return;
                }
                let a = &self.agents[&tunnel];
                // Another hub holds a tunnel of this agent (another slot, or
                // this slot moved): new flows go there now. This tunnel
                // keeps its flows, and its slot is given back so listings
                // stop naming this hub.
                if self.draining && owners.iter().any(|o| o.replica_id != self.cfg.replica_id) {
                    let call = RegistryOp::Release {
                        agent_id: a.agent_id.clone(),
                        slot: a.slot,
                        replica_id: self.cfg.replica_id.clone(),
                        epoch,
                    };
                    self.op(now, call, Pending::Other);
                    self.supersede(tunnel);
                }
            }
            (Pending::DrainCheck { .. }, _) => {}
            (
                Pending::Route {
                    client,
                    connector,
                    pin,
                    retries,
                },
                result,
            ) => {
                let pin = pin.as_deref();
                // A local claim may have landed while the lookup was out.
                if let Some(route) = self.local_route(&connector, pin) {
                    return self.route(client, route);
                }
                // The registry already names this hub as an owner whose
                // claim reply is still on its way: ask again (bounded).
                if let Ok(RegistryReply::Agents(list)) = &result
                    && retries < MAX_ROUTE_RETRIES
                    && list.iter().any(|a| {
                        a.owners.iter().any(|o| o.replica_id == self.cfg.replica_id)
                            && self.claiming(&a.agent_id)
                    })
                {
                    return self.lookup(now, client, &connector, pin, retries + 1);
                }
                let view_agents;
                let err;
                let view = match &result {
                    Ok(RegistryReply::Agents(a)) => {
                        view_agents = a
                            .iter()
                            .filter(|r| pin.is_none_or(|p| p.contains(&r.agent_id)))
                            .cloned()
                            .collect::<Vec<_>>();
                        RemoteView::Agents(&view_agents)
                    }
                    Ok(other) => {
                        err = format!("unexpected registry reply {other:?}");
                        RemoteView::Unavailable(&err)
                    }
                    Err(e) => {
                        err = e.to_string();
                        RemoteView::Unavailable(&err)
                    }
                };
                let mesh_up = self.mesh_up.clone();
                let route = route_remote(
                    &connector,
                    &self.cfg.replica_id,
                    view,
                    |r| mesh_up.contains(r),
                    &mut self.rng,
                );
                if self.cfg.mode == Mode::Shadow {
                    *self.counters.shadow_would.entry(route.kind()).or_default() += 1;
                    self.route(client, Route::Refuse {
                        code: ErrorCode::NoAgent,
                        reason: format!(
                            "connector `{connector}`: no local agent (shadow mode serves locally only; active would {})",
                            match &route {
                                Route::Mesh { replica_id, .. } => format!("forward to {replica_id}"),
                                Route::Refuse { reason, .. } => format!("refuse: {reason}"),
                                Route::Local { .. } => "serve locally".into(),
                            }
                        ),
                    });
                } else {
                    self.route(client, route);
                }
            }
            (Pending::Replicas, Ok(RegistryReply::Replicas(list))) => {
                self.replicas_listed(now, &list);
                let peers = list
                    .into_iter()
                    .filter(|(r, url)| *r != self.cfg.replica_id && !url.is_empty())
                    .collect();
                self.out.push_back(HubOutput::Peers(peers));
            }
            (Pending::Announce, Ok(_)) if !self.announced => {
                self.announced = true;
                self.out.push_back(HubOutput::Announced);
            }
            (Pending::Replicas, _) | (Pending::Announce, _) | (Pending::Other, _) => {}
        }
    }

    /// Whether a tunnel of `agent_id` here is waiting for its claim.
    fn claiming(&self, agent_id: &str) -> bool {
        self.agents
            .values()
            .any(|a| a.agent_id == agent_id && matches!(a.state, AgentState::Claiming { .. }))
    }

    /// Whether `tunnel` is the one that sent claim `op` and still waits for
    /// it. A claim reply is matched by its op, never by the tunnel id alone:
    /// the tunnel may have closed (or been superseded by a newer HELLO of
    /// its agent) meanwhile, and a runtime may give its id to a later
    /// tunnel, perhaps of another agent.
    fn waits_for_claim(&self, tunnel: TunnelId, op: OpId) -> bool {
        self.agents
            .get(&tunnel)
            .is_some_and(|a| a.state == AgentState::Claiming { op })
    }

    /// Whether `tunnel` is still the tunnel whose HELLO sent claim `hello`,
    /// and owns its agent under `epoch`: a renewal's reply is about that
    /// ownership, not about whatever tunnel carries the id by now.
    fn still_owns(&self, tunnel: TunnelId, hello: OpId, epoch: Epoch) -> bool {
        self.agents
            .get(&tunnel)
            .is_some_and(|a| a.hello == hello && a.state == AgentState::Owned { epoch })
    }

    fn claimed(
        &mut self,
        now: Instant,
        op: OpId,
        tunnel: TunnelId,
        agent_id: &str,
        slot: u8,
        epoch: Epoch,
    ) {
        let key = (agent_id.to_string(), slot);
        if !self.waits_for_claim(tunnel, op) {
            // The tunnel that asked closed or was superseded while claiming
            // (its id may name another tunnel by now): give the ownership
            // back. Taken for whatever tunnel holds the id, it would own an
            // agent the registry never gave this hub, under another agent's
            // epoch, past the agent limit (checked for the claim's agent).
            let call = RegistryOp::Release {
                agent_id: agent_id.to_string(),
                slot,
                replica_id: self.cfg.replica_id.clone(),
                epoch,
            };
            self.op(now, call, Pending::Other);
            return;
        }
        if !self.by_agent.contains_key(&key) && self.by_agent.len() >= self.cfg.max_agents {
            // The limit held at HELLO (this agent was here then), but the
            // agent's other tunnel left while others filled the hub.
            self.remove_tunnel(tunnel);
            self.counters.tunnels_refused += 1;
            self.out.push_back(HubOutput::CloseTunnel {
                tunnel,
                code: ErrorCode::LimitExceeded,
                reason: format!("hub agent limit of {} reached", self.cfg.max_agents),
            });
            let call = RegistryOp::Release {
                agent_id: agent_id.to_string(),
                slot,
                replica_id: self.cfg.replica_id.clone(),
                epoch,
            };
            self.op(now, call, Pending::Other);
            return;
        }
        let a = self.agents.get_mut(&tunnel).expect("checked above");
        debug_assert_eq!(a.agent_id, agent_id, "a tunnel claims only its own agent");
        a.state = AgentState::Owned { epoch };
        let agent_id = a.agent_id.clone();
        let connectors = a.connectors.clone();
        if let Some(old) = self.by_agent.insert(key, tunnel)
            && old != tunnel
        {
            self.counters.tunnels_superseded += 1;
            let which = if slot == 0 {
                String::new()
            } else {
                format!(" slot {slot}")
            };
            self.out.push_back(HubOutput::CloseTunnel {
                tunnel: old,
                code: ErrorCode::StaleEpoch,
                reason: format!("agent `{agent_id}`{which} reconnected (epoch {})", epoch.0),
            });
            self.remove_tunnel(old);
            self.timers.clear(Timer::Renew(old));
        }
        self.counters.tunnels_accepted += 1;
        self.out
            .push_back(HubOutput::AcceptTunnel { tunnel, epoch });
        self.op(
            now,
            RegistryOp::AddConnectors {
                agent_id,
                connectors,
                lease: self.cfg.lease,
            },
            Pending::Other,
        );
        // Renewed with every other tunnel (`Timer::RenewAll`), within one
        // renew interval; a draining hub renews each on its own, to look
        // whether its agent moved.
        if self.draining {
            self.timers
                .set(Timer::Renew(tunnel), now + self.cfg.renew_interval);
        }
    }

    /// A renewal found `tunnel`'s slot no longer held under `epoch`:
    /// `current` holds it now, if anyone. Unowned (the lease lapsed while
    /// the registry was away, or it lost its data): claim it again. Owned
    /// by another: the agent moved as asked while draining, else this
    /// tunnel is stale and closes. Nothing if the tunnel changed since.
    fn renewal_lost(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        hello: OpId,
        epoch: Epoch,
        current: Option<Owner>,
    ) {
        if !self.still_owns(tunnel, hello, epoch) {
            return;
        }
        let Some(owner) = current else {
            let agent_id = self.agents[&tunnel].agent_id.clone();
            let slot = self.agents[&tunnel].slot;
            let call = RegistryOp::Claim {
                agent_id: agent_id.clone(),
                slot,
                replica_id: self.cfg.replica_id.clone(),
                lease: self.cfg.lease,
            };
            let reclaim = Pending::Reclaim {
                tunnel,
                hello,
                agent_id,
                slot,
                old: epoch,
            };
            self.op(now, call, reclaim);
            return;
        };
        if self.draining {
            // The agent moved as asked (DRAIN); its old tunnel keeps
            // the flows it carries until the drain closes it.
            self.supersede(tunnel);
            return;
        }
        self.counters.ownership_lost += 1;
        self.counters.epoch_mismatch += 1;
        let agent = self.agents[&tunnel].agent_id.clone();
        self.out.push_back(HubOutput::CloseTunnel {
            tunnel,
            code: ErrorCode::StaleEpoch,
            reason: format!(
                "ownership of agent `{agent}` (epoch {}) lost to {} at epoch {}",
                epoch.0, owner.replica_id, owner.epoch.0
            ),
        });
        self.forget_tunnel(tunnel);
    }

    /// Every owned tunnel not renewed on its own (`Timer::Renew`, while
    /// draining) is renewed, in calls of at most [`RENEW_BATCH`] slots.
    fn renew_all(&mut self, now: Instant) {
        let due: Vec<(SlotLease, (TunnelId, OpId, Epoch))> = self
            .agents
            .iter()
            .filter(|(t, _)| self.timers.get(Timer::Renew(**t)).is_none())
            .filter_map(|(&tunnel, a)| {
                let AgentState::Owned { epoch } = a.state else {
                    return None;
                };
                let slot = SlotLease {
                    agent_id: a.agent_id.clone(),
                    slot: a.slot,
                    epoch,
                    connectors: a.connectors.clone(),
                };
                Some((slot, (tunnel, a.hello, epoch)))
            })
            .collect();
        let mut due = due.into_iter();
        loop {
            let (slots, tunnels): (Vec<_>, Vec<_>) = due.by_ref().take(RENEW_BATCH).unzip();
            if slots.is_empty() {
                break;
            }
            let call = RegistryOp::RenewMany {
                replica_id: self.cfg.replica_id.clone(),
                lease: self.cfg.lease,
                slots,
            };
            self.op(now, call, Pending::RenewMany { tunnels });
        }
    }

    fn forget_tunnel(&mut self, tunnel: TunnelId) {
        if let Some(a) = self.remove_tunnel(tunnel) {
            let key = (a.agent_id, a.slot);
            if self.by_agent.get(&key) == Some(&tunnel) {
                self.by_agent.remove(&key);
            }
        }
        self.timers.clear(Timer::Renew(tunnel));
    }

    /// Draining hub: the agent of `tunnel` is served by another hub now.
    /// The tunnel keeps the flows it carries but takes no new ones, is no
    /// longer renewed, and closes once idle.
    fn supersede(&mut self, tunnel: TunnelId) {
        if let Some(a) = self.agents.get_mut(&tunnel) {
            a.state = AgentState::Superseded;
            let key = (a.agent_id.clone(), a.slot);
            if self.by_agent.get(&key) == Some(&tunnel) {
                self.by_agent.remove(&key);
            }
        }
        self.timers.clear(Timer::Renew(tunnel));
        self.close_if_moved_and_idle(tunnel);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // One at a time: a timer cleared by an earlier one's handling does
        // not fire, one armed already due does.
        while let Some(t) = self.timers.pop_expired(now) {
            match t {
                Timer::OpDeadline(op) => {
                    if let Some(p) = self.pending.remove(&op) {
                        self.counters.registry_timeouts += 1;
                        let e = RegistryError::Timeout(self.cfg.registry_timeout);
                        self.registry_healthy = false;
                        self.registry_last_error = Some(e.to_string());
                        self.complete(now, op, p, Err(e));
                    }
                }
                Timer::Renew(tunnel) => {
                    if let Some(a) = self.agents.get(&tunnel)
                        && let AgentState::Owned { epoch } = a.state
                    {
                        let call = RegistryOp::Renew {
                            agent_id: a.agent_id.clone(),
                            slot: a.slot,
                            replica_id: self.cfg.replica_id.clone(),
                            epoch,
                            lease: self.cfg.lease,
                        };
                        let connectors = RegistryOp::AddConnectors {
                            agent_id: a.agent_id.clone(),
                            connectors: a.connectors.clone(),
                            lease: self.cfg.lease,
                        };
                        let check = (self.draining && a.slots > 1).then(|| RegistryOp::GetOwners {
                            agent_id: a.agent_id.clone(),
                        });
                        let hello = a.hello;
                        let renew = Pending::Renew {
                            tunnel,
                            hello,
                            epoch,
                        };
                        self.op(now, call, renew);
                        self.op(now, connectors, Pending::Other);
                        if let Some(check) = check {
                            self.op(
                                now,
                                check,
                                Pending::DrainCheck {
                                    tunnel,
                                    hello,
                                    epoch,
                                },
                            );
                        }
                        let every = if self.draining {
                            self.cfg.drain_check_interval
                        } else {
                            self.cfg.renew_interval
                        };
                        self.timers.set(Timer::Renew(tunnel), now + every);
                    }
                }
                Timer::RenewAll => {
                    self.renew_all(now);
                    self.timers
                        .set(Timer::RenewAll, now + self.cfg.renew_interval);
                }
                Timer::Discovery => {
                    // Every replica registers, with or without a mesh URL to
                    // announce: peers serve a mesh link only to a replica
                    // the registry lists.
                    let call = RegistryOp::AnnounceReplica {
                        replica_id: self.cfg.replica_id.clone(),
                        mesh_url: self.cfg.mesh_url.clone().unwrap_or_default(),
                        lease: self.cfg.lease,
                    };
                    self.op(now, call, Pending::Announce);
                    self.op(now, RegistryOp::ListReplicas, Pending::Replicas);
                    self.timers
                        .set(Timer::Discovery, now + self.cfg.renew_interval);
                }
                Timer::Health => {
                    if self.cfg.mode != Mode::Off {
                        let call = if self.registry_healthy {
                            RegistryOp::Sweep
                        } else {
                            RegistryOp::Health
                        };
                        self.op(now, call, Pending::Other);
                    }
                    self.timers
                        .set(Timer::Health, now + self.cfg.health_interval);
                }
            }
        }
        self.check_agent_bound();
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next().map(|(at, _)| at)
    }

    pub fn poll_output(&mut self) -> Option<HubOutput> {
        self.out.pop_front()
    }
}
