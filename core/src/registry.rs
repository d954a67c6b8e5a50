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
//!   `RenewMany` does the same for many slots in one call, and extends the
//!   connector membership of each agent with a slot it renewed.
//! - `Release` drops ownership only if the releaser still owns that epoch.
//! - `Sweep` removes owners and connector entries whose lease lapsed; the
//!   epoch counter itself is never removed, so epochs only grow.
//!
//! Ownership is per *slot*: a multi-homed agent holds up to
//! [`MAX_SLOTS`](crate::frame::MAX_SLOTS) tunnels at once, one per slot,
//! each on its own hub, and each slot is claimed, renewed, released and
//! fenced on its own. The epoch counter is the agent's, shared by its
//! slots, so an epoch names one tunnel of the agent. An agent with one
//! tunnel uses slot 0, whose keys are the ones every agent used before
//! slots existed. Connector membership is the agent's: it lasts while any
//! slot renews it, and a release removes it only with the last slot.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::frame::Epoch;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOp {
    Claim {
        agent_id: String,
        slot: u8,
        replica_id: String,
        lease: Duration,
    },
    Renew {
        agent_id: String,
        slot: u8,
        replica_id: String,
        epoch: Epoch,
        lease: Duration,
    },
    /// `Renew` for each of `slots`, all owned by `replica_id`, in one call;
    /// an agent with a slot renewed also has its connector membership
    /// extended (`AddConnectors`). A hub sends one per batch of its tunnels
    /// every renew interval, so its registry load grows with the tunnels it
    /// holds but its calls do not.
    RenewMany {
        replica_id: String,
        lease: Duration,
        slots: Vec<SlotLease>,
    },
    Release {
        agent_id: String,
        slot: u8,
        replica_id: String,
        epoch: Epoch,
    },
    AddConnectors {
        agent_id: String,
        connectors: Vec<String>,
        lease: Duration,
    },
    /// Agents serving `connector`, each with the current owner of each of
    /// its slots.
    ListAgents {
        connector: String,
    },
    /// The current owners of every slot of `agent_id`.
    GetOwners {
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
            RegistryOp::RenewMany { .. } => "renew_many",
            RegistryOp::Release { .. } => "release",
            RegistryOp::AddConnectors { .. } => "add_connectors",
            RegistryOp::ListAgents { .. } => "list_agents",
            RegistryOp::GetOwners { .. } => "get_owners",
            RegistryOp::AnnounceReplica { .. } => "announce_replica",
            RegistryOp::ListReplicas => "list_replicas",
            RegistryOp::Sweep => "sweep",
            RegistryOp::Health => "health",
        }
    }
}

/// One slot of a [`RegistryOp::RenewMany`]: the agent's slot this replica
/// owns under `epoch`, and the connectors the agent serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLease {
    pub agent_id: String,
    pub slot: u8,
    pub epoch: Epoch,
    pub connectors: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub replica_id: String,
    pub epoch: Epoch,
    /// Which of the agent's tunnels (0 for an agent with one).
    pub slot: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    pub agent_id: String,
    /// The owner of each slot that has one, by slot.
    pub owners: Vec<Owner>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryReply {
    Claimed(Epoch),
    Renewed,
    /// The renewer no longer owns the agent's slot; `current` is who
    /// does, if anyone.
    Lost {
        current: Option<Owner>,
    },
    /// The answer to [`RegistryOp::RenewMany`]: every slot was renewed but
    /// these, each by its index in the call's `slots`, with its current
    /// owner, if anyone (as `Lost`).
    RenewedMany {
        lost: Vec<(usize, Option<Owner>)>,
    },
    Released,
    Done,
    Agents(Vec<AgentRecord>),
    Owners(Vec<Owner>),
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
    /// slot → (replica, epoch, lease end)
    owners: BTreeMap<u8, (String, Epoch, Instant)>,
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
                slot,
                replica_id,
                lease,
            } => {
                let floor = self
                    .server_clock
                    .map_or(0, |o| now.saturating_duration_since(o).as_millis() as u64);
                let e = self.entry(agent_id);
                e.last_epoch = (e.last_epoch + 1).max(floor);
                let epoch = Epoch(e.last_epoch);
                e.owners
                    .insert(*slot, (replica_id.clone(), epoch, now + *lease));
                RegistryReply::Claimed(epoch)
            }
            RegistryOp::Renew {
                agent_id,
                slot,
                replica_id,
                epoch,
                lease,
            } => match self
                .agents
                .get_mut(agent_id)
                .and_then(|e| e.owners.get_mut(slot))
            {
                Some((r, ep, until)) if r == replica_id && ep == epoch && *until > now => {
                    *until = now + *lease;
                    RegistryReply::Renewed
                }
                _ => RegistryReply::Lost {
                    current: self
                        .owners(now, agent_id)
                        .into_iter()
                        .find(|o| o.slot == *slot),
                },
            },
            RegistryOp::RenewMany {
                replica_id,
                lease,
                slots,
            } => {
                let mut lost = Vec::new();
                for (i, s) in slots.iter().enumerate() {
                    let renew = RegistryOp::Renew {
                        agent_id: s.agent_id.clone(),
                        slot: s.slot,
                        replica_id: replica_id.clone(),
                        epoch: s.epoch,
                        lease: *lease,
                    };
                    match self.apply(now, &renew)? {
                        RegistryReply::Lost { current } => lost.push((i, current)),
                        _ => {
                            let members = RegistryOp::AddConnectors {
                                agent_id: s.agent_id.clone(),
                                connectors: s.connectors.clone(),
                                lease: *lease,
                            };
                            self.apply(now, &members)?;
                        }
                    }
                }
                RegistryReply::RenewedMany { lost }
            }
            RegistryOp::Release {
                agent_id,
                slot,
                replica_id,
                epoch,
            } => {
                if let Some(e) = self.agents.get_mut(agent_id)
                    && matches!(e.owners.get(slot), Some((r, ep, _)) if r == replica_id && ep == epoch)
                {
                    e.owners.remove(slot);
                    // Membership goes with the last slot held.
                    if !e.owners.values().any(|(_, _, until)| *until > now) {
                        e.connectors.clear();
                        e.connectors_until = None;
                    }
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
                        owners: self.owners(now, id),
                    })
                    .collect();
                RegistryReply::Agents(agents)
            }
            RegistryOp::GetOwners { agent_id } => RegistryReply::Owners(self.owners(now, agent_id)),
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
                    let before = e.owners.len();
                    e.owners.retain(|_, (_, _, until)| *until > now);
                    n += (before - e.owners.len()) as u64;
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
                owners: BTreeMap::new(),
                connectors: BTreeSet::new(),
                connectors_until: None,
            })
    }

    /// The live owner of each slot of `agent_id`, by slot.
    fn owners(&self, now: Instant, agent_id: &str) -> Vec<Owner> {
        let Some(e) = self.agents.get(agent_id) else {
            return Vec::new();
        };
        e.owners
            .iter()
            .filter(|(_, (_, _, until))| *until > now)
            .map(|(slot, (r, epoch, _))| Owner {
                replica_id: r.clone(),
                epoch: *epoch,
                slot: *slot,
            })
            .collect()
    }

    /// The highest epoch ever handed out for `agent_id` (0 if never claimed).
    pub fn last_epoch(&self, agent_id: &str) -> Epoch {
        Epoch(self.agents.get(agent_id).map_or(0, |e| e.last_epoch))
    }
}
