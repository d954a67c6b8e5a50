//! The control plane's interface: ownership of agent tunnels fenced by epochs,
//! connector membership, leases. The hub state machine emits [`RegistryOp`]s
//! with ids and takes [`RegistryReply`]s back; a runtime performs them against
//! Redis or against the pure [`MemoryRegistry`] here (single process).
//!
//! Rules every implementation keeps:
//! - `Claim` gives the agent a new epoch strictly greater than any epoch it
//!   ever had, and makes the claimer the owner with a lease.
//! - `Renew` extends the lease only if the renewer still owns that epoch;
//!   otherwise it answers `Lost` and the renewer must close its tunnel.
//! - `Release` drops ownership only if the releaser still owns that epoch.
//! - `Sweep` removes owners and connector entries whose lease lapsed; the
//!   epoch counter itself is never removed, so epochs only grow.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::frame::Epoch;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOp {
    Claim {
        agent_id: String,
        replica_id: String,
        lease: Duration,
    },
    Renew {
        agent_id: String,
        replica_id: String,
        epoch: Epoch,
        lease: Duration,
    },
    Release {
        agent_id: String,
        replica_id: String,
        epoch: Epoch,
    },
    AddConnectors {
        agent_id: String,
        connectors: Vec<String>,
        lease: Duration,
    },
    /// Agents serving `connector`, each with its current owner.
    ListAgents {
        connector: String,
    },
    GetOwner {
        agent_id: String,
    },
    /// Announce this hub's mesh URL (peer discovery) with a lease.
    AnnounceReplica {
        replica_id: String,
        mesh_url: String,
        lease: Duration,
    },
    ListReplicas,
    Sweep,
    Health,
}

impl RegistryOp {
    pub fn name(&self) -> &'static str {
        match self {
            RegistryOp::Claim { .. } => "claim",
            RegistryOp::Renew { .. } => "renew",
            RegistryOp::Release { .. } => "release",
            RegistryOp::AddConnectors { .. } => "add_connectors",
            RegistryOp::ListAgents { .. } => "list_agents",
            RegistryOp::GetOwner { .. } => "get_owner",
            RegistryOp::AnnounceReplica { .. } => "announce_replica",
            RegistryOp::ListReplicas => "list_replicas",
            RegistryOp::Sweep => "sweep",
            RegistryOp::Health => "health",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub replica_id: String,
    pub epoch: Epoch,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub agent_id: String,
    pub owner: Option<Owner>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryReply {
    Claimed(Epoch),
    Renewed,
    /// The renewer no longer owns the agent; `current` is who does, if anyone.
    Lost {
        current: Option<Owner>,
    },
    Released,
    Done,
    Agents(Vec<AgentRecord>),
    Owner(Option<Owner>),
    Replicas(Vec<(String, String)>),
    Swept(u64),
    Healthy,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    #[error("registry operation timed out after {0:?}")]
    Timeout(Duration),
}

#[derive(Clone, Debug)]
struct AgentEntry {
    last_epoch: u64,
    owner: Option<(String, Epoch, Instant)>,
    connectors: BTreeSet<String>,
    connectors_until: Option<Instant>,
}

/// The single-process registry: the same semantics as the Redis one, in memory.
#[derive(Clone, Debug, Default)]
pub struct MemoryRegistry {
    agents: BTreeMap<String, AgentEntry>,
    replicas: BTreeMap<String, (String, Instant)>,
    /// When set, a claim takes `max(counter + 1, server time in ms)` like the
    /// Redis registry, server time being milliseconds since this instant.
    server_clock: Option<Instant>,
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry whose epochs follow a server clock (milliseconds since
    /// `origin`) as the Redis one does, so they keep growing across
    /// [`MemoryRegistry::lose_data`].
    pub fn with_server_clock(origin: Instant) -> Self {
        MemoryRegistry {
            server_clock: Some(origin),
            ..Self::default()
        }
    }

    /// Forget every key, as a Redis restarted without persistence or failed
    /// over to an empty replica would. The server clock survives.
    pub fn lose_data(&mut self) {
        self.agents.clear();
        self.replicas.clear();
    }

    pub fn apply(&mut self, now: Instant, op: &RegistryOp) -> Result<RegistryReply, RegistryError> {
        Ok(match op {
            RegistryOp::Claim {
                agent_id,
                replica_id,
                lease,
            } => {
                let floor = self
                    .server_clock
                    .map_or(0, |o| now.saturating_duration_since(o).as_millis() as u64);
                let e = self.entry(agent_id);
                e.last_epoch = (e.last_epoch + 1).max(floor);
                let epoch = Epoch(e.last_epoch);
                e.owner = Some((replica_id.clone(), epoch, now + *lease));
                RegistryReply::Claimed(epoch)
            }
            RegistryOp::Renew {
                agent_id,
                replica_id,
                epoch,
                lease,
            } => match self.agents.get_mut(agent_id).and_then(|e| e.owner.as_mut()) {
                Some((r, ep, until)) if r == replica_id && ep == epoch && *until > now => {
                    *until = now + *lease;
                    RegistryReply::Renewed
                }
                _ => RegistryReply::Lost {
                    current: self.owner(now, agent_id),
                },
            },
            RegistryOp::Release {
                agent_id,
                replica_id,
                epoch,
            } => {
                if let Some(e) = self.agents.get_mut(agent_id)
                    && matches!(&e.owner, Some((r, ep, _)) if r == replica_id && ep == epoch)
                {
                    e.owner = None;
                    e.connectors.clear();
                    e.connectors_until = None;
                }
                RegistryReply::Released
            }
            RegistryOp::AddConnectors {
                agent_id,
                connectors,
                lease,
            } => {
                let e = self.entry(agent_id);
                e.connectors.extend(connectors.iter().cloned());
                e.connectors_until = Some(now + *lease);
                RegistryReply::Done
            }
            RegistryOp::ListAgents { connector } => {
                let agents = self
                    .agents
                    .iter()
                    .filter(|(_, e)| {
                        e.connectors.contains(connector)
                            && e.connectors_until.is_some_and(|u| u > now)
                    })
                    .map(|(id, _)| AgentRecord {
                        agent_id: id.clone(),
                        owner: self.owner(now, id),
                    })
                    .collect();
                RegistryReply::Agents(agents)
            }
            RegistryOp::GetOwner { agent_id } => RegistryReply::Owner(self.owner(now, agent_id)),
            RegistryOp::AnnounceReplica {
                replica_id,
                mesh_url,
                lease,
            } => {
                self.replicas
                    .insert(replica_id.clone(), (mesh_url.clone(), now + *lease));
                RegistryReply::Done
            }
            RegistryOp::ListReplicas => RegistryReply::Replicas(
                self.replicas
                    .iter()
                    .filter(|(_, (_, until))| *until > now)
                    .map(|(r, (u, _))| (r.clone(), u.clone()))
                    .collect(),
            ),
            RegistryOp::Sweep => {
                let mut n = 0;
                for e in self.agents.values_mut() {
                    if matches!(e.owner, Some((_, _, until)) if until <= now) {
                        e.owner = None;
                        n += 1;
                    }
                    if e.connectors_until.is_some_and(|u| u <= now) {
                        e.connectors.clear();
                        e.connectors_until = None;
                        n += 1;
                    }
                }
                let before = self.replicas.len();
                self.replicas.retain(|_, (_, until)| *until > now);
                RegistryReply::Swept(n + (before - self.replicas.len()) as u64)
            }
            RegistryOp::Health => RegistryReply::Healthy,
        })
    }

    fn entry(&mut self, agent_id: &str) -> &mut AgentEntry {
        self.agents
            .entry(agent_id.to_string())
            .or_insert(AgentEntry {
                last_epoch: 0,
                owner: None,
                connectors: BTreeSet::new(),
                connectors_until: None,
            })
    }

    fn owner(&self, now: Instant, agent_id: &str) -> Option<Owner> {
        match self.agents.get(agent_id)?.owner.as_ref()? {
            (r, epoch, until) if *until > now => Some(Owner {
                replica_id: r.clone(),
                epoch: *epoch,
            }),
            _ => None,
        }
    }

    /// The highest epoch ever handed out for `agent_id` (0 if never claimed).
    pub fn last_epoch(&self, agent_id: &str) -> Epoch {
        Epoch(self.agents.get(agent_id).map_or(0, |e| e.last_epoch))
    }
}
