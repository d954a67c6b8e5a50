//! [`AgentNode`]: the whole agent as one state machine. It owns one control
//! machine per tunnel slot ([`Agent`]: which hub to dial, backoff, target
//! dials and their timeouts) and the table of the agent's tunnel links (per
//! slot, the current one and at most one whose hub said DRAIN), and makes
//! every decision of how they combine:
//!
//! - a multi-homed agent (`ha_connections` > 1) holds one tunnel per slot,
//!   each claimed on its own by its hub; slots start on distinct hubs of
//!   the list, and a tunnel whose WELCOME names a hub that already carries
//!   another slot's current tunnel is closed and its slot moves on to the
//!   next hub after a jittered, growing backoff (behind one load-balanced
//!   URL the agent keeps dialing until its tunnels are on distinct hubs);
//! - a hub connection is taken only for the attempt being dialed (a late
//!   one is refused);
//! - a tunnel whose hub says DRAIN keeps its flows and the next hub is
//!   dialed at once; a second DRAIN in a row ends the older draining tunnel;
//! - a flow the hub opens waits for its target dial; a flow that ends while
//!   its dial runs has the dial cancelled and no longer counts as pending;
//! - a tunnel that ends takes its own flows' dials with it;
//! - stopping closes every tunnel with `SHUTDOWN`.
//!
//! The links themselves ([`Tunnel`](crate::tunnel::Tunnel)s) are driven by
//! whoever moves their bytes (a runtime's agent task, the simulator): they
//! report to the node with [`AgentNode::tunnel_event`] and carry out its
//! [`AgentCommand`]s. Sockets, tasks and tokens stay outside.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use crate::agent::{Agent, AgentConfig, AgentCounters, AgentOutput, AttemptId, HubLinkState};
use crate::frame::{Cid, ErrorCode, MAX_SLOTS};
use crate::mux::FlowEvent;
use crate::tunnel::TunnelEvent;

/// What the node asks of whoever drives its links, sockets and dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCommand {
    /// Dial this hub (with a current token) for tunnel `slot` (of
    /// [`AgentNode::slots`]); report the outcome with
    /// [`AgentNode::hub_connected`] or [`AgentNode::hub_failed`].
    DialHub {
        attempt: AttemptId,
        url: String,
        slot: u8,
    },
    /// Stop the running dial of hub `attempt`; it is no longer wanted
    /// (`reason` says why).
    CancelHubDial { attempt: AttemptId, reason: String },
    /// Close tunnel `attempt` in its core machine (it sends CLOSE and resets
    /// its flows); the tunnel then reports `Closed` and is ended.
    CloseTunnel {
        attempt: AttemptId,
        code: ErrorCode,
        reason: String,
    },
    /// Tunnel `attempt` is over: close its socket with this code and reason
    /// (after what is queued) and stop driving it.
    EndTunnel {
        attempt: AttemptId,
        code: ErrorCode,
        reason: String,
    },
    /// Connect to `target` for flow `cid` of tunnel `attempt`; report with
    /// [`AgentNode::target_connected`] or [`AgentNode::target_failed`].
    DialTarget {
        attempt: AttemptId,
        cid: Cid,
        target: String,
    },
    /// Flow `cid` of tunnel `attempt` no longer waits for its target: stop
    /// the dial if it still runs and drop what waits for it.
    CancelTarget { attempt: AttemptId, cid: Cid },
    /// Reset flow `cid` on tunnel `attempt`.
    ResetFlow {
        attempt: AttemptId,
        cid: Cid,
        code: ErrorCode,
        reason: String,
    },
}

/// What a tunnel link is to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkRole {
    /// The tunnel the agent is owned through (or being established).
    Current,
    /// Its hub said DRAIN: it carries its flows until that hub closes it.
    Draining,
}

/// Why [`AgentNode::hub_connected`] refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleConnection {
    /// The attempt is no longer the one being dialed (it timed out, or the
    /// agent stopped or moved on).
    NotDialing,
}

/// One tunnel slot: its control machine and the hub dial it runs.
#[derive(Debug)]
struct Slot {
    agent: Agent,
    /// The hub dial in progress, if any.
    dialing: Option<AttemptId>,
}

/// A tunnel link: its slot, its role, and the hub that answered its
/// WELCOME (once it did).
#[derive(Clone, Debug)]
struct LinkInfo {
    slot: u8,
    role: LinkRole,
    hub: Option<String>,
}

#[derive(Debug)]
pub struct AgentNode {
    slots: Vec<Slot>,
    links: BTreeMap<AttemptId, LinkInfo>,
    /// Flows opened by a hub whose target is not connected yet.
    waiting: BTreeSet<(AttemptId, Cid)>,
    /// The slots' counters together.
    counters: AgentCounters,
    out: VecDeque<AgentCommand>,
}

impl AgentNode {
    /// Starts dialing at once: each slot its own hub.
    pub fn new(now: Instant, cfg: AgentConfig, seed: u64) -> Self {
        let n_slots = cfg.ha_connections.clamp(1, MAX_SLOTS);
        let slots = (0..n_slots)
            .map(|k| Slot {
                agent: Agent::for_slot(
                    now,
                    cfg.clone(),
                    seed.wrapping_add(u64::from(k).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    k,
                    n_slots,
                ),
                dialing: None,
            })
            .collect();
        let mut n = AgentNode {
            slots,
            links: BTreeMap::new(),
            waiting: BTreeSet::new(),
            counters: AgentCounters::default(),
            out: VecDeque::new(),
        };
        n.pump();
        n
    }

    pub fn agent_id(&self) -> &str {
        self.slots[0].agent.agent_id()
    }

    /// Connector names this agent serves (what its HELLO announces).
    pub fn connectors(&self) -> Vec<String> {
        self.slots[0].agent.connectors()
    }

    /// How many tunnels the agent holds at once (its HELLO's `slots`).
    pub fn slots(&self) -> u8 {
        self.slots.len() as u8
    }

    /// The hub link state of slot 0 (the only one of a single-homed agent).
    pub fn state(&self) -> &HubLinkState {
        self.slots[0].agent.state()
    }

    /// Whether hub dial `attempt` is what its own slot waits for (a dial
    /// that is not is stale: its outcome changes nothing).
    pub fn is_dialing(&self, attempt: AttemptId) -> bool {
        let slot = usize::from(self.slot_of(attempt));
        self.slots[slot].agent.state() == &(HubLinkState::Dialing { attempt })
    }

    /// The hub link state of each slot.
    pub fn slot_states(&self) -> impl Iterator<Item = &HubLinkState> + '_ {
        self.slots.iter().map(|s| s.agent.state())
    }

    /// Slots whose current tunnel is established.
    pub fn connected_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.agent.state(), HubLinkState::Connected { .. }))
            .count()
    }

    /// The slot that dialed `attempt`.
    pub fn slot_of(&self, attempt: AttemptId) -> u8 {
        Agent::slot_of(attempt, self.slots()) as u8
    }

    pub fn counters(&self) -> &AgentCounters {
        &self.counters
    }

    /// Target dials in progress.
    pub fn pending_dials(&self) -> usize {
        self.slots.iter().map(|s| s.agent.pending_dials()).sum()
    }

    /// Flows waiting for their target.
    pub fn waiting_flows(&self) -> usize {
        self.waiting.len()
    }

    /// The tunnel links: their attempt and role.
    pub fn links(&self) -> impl Iterator<Item = (AttemptId, LinkRole)> + '_ {
        self.links.iter().map(|(a, l)| (*a, l.role))
    }

    pub fn role(&self, attempt: AttemptId) -> Option<LinkRole> {
        self.links.get(&attempt).map(|l| l.role)
    }

    /// The hub (replica id from its WELCOME) of tunnel `attempt`, if it
    /// named one.
    pub fn hub_of(&self, attempt: AttemptId) -> Option<&str> {
        self.links.get(&attempt)?.hub.as_deref()
    }

    fn agent_mut(&mut self, attempt: AttemptId) -> &mut Agent {
        let k = Agent::slot_of(attempt, self.slots());
        self.avoid_others(k);
        &mut self.slots[k].agent
    }

    /// Tell slot `k`'s machine which listed hubs the other slots are
    /// dialing or connected to, before it may dial.
    fn avoid_others(&mut self, k: usize) {
        let used = self
            .slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .filter_map(|(_, s)| s.agent.hub_in_use())
            .collect();
        self.slots[k].agent.avoid_hubs(used);
    }

    /// The dial of hub `attempt` gave a WebSocket. `Ok`: it is its slot's
    /// current tunnel now (start a `Tunnel::agent_slot` on it and report
    /// its events); `Err`: the attempt is stale and the socket is to be
    /// dropped.
    pub fn hub_connected(
        &mut self,
        _now: Instant,
        attempt: AttemptId,
    ) -> Result<(), StaleConnection> {
        if !self.is_dialing(attempt) || self.links.contains_key(&attempt) {
            return Err(StaleConnection::NotDialing);
        }
        let slot = self.slot_of(attempt);
        let s = &mut self.slots[usize::from(slot)];
        if s.dialing == Some(attempt) {
            s.dialing = None;
        }
        self.links.insert(
            attempt,
            LinkInfo {
                slot,
                role: LinkRole::Current,
                hub: None,
            },
        );
        self.check();
        Ok(())
    }

    /// The dial of hub `attempt` failed.
    pub fn hub_failed(&mut self, now: Instant, attempt: AttemptId) {
        let slot = usize::from(self.slot_of(attempt));
        if self.slots[slot].dialing == Some(attempt) {
            self.slots[slot].dialing = None;
        }
        if !self.links.contains_key(&attempt) {
            self.avoid_others(slot);
            self.slots[slot].agent.hub_lost(now, attempt);
        }
        self.pump();
    }

    /// An event of tunnel `attempt`'s core machine. Only `Established`,
    /// `Drain`, `Open`, `Closed` and the end of a flow (`Reset`, `Closed`)
    /// concern the node; the rest is the link's own business.
    pub fn tunnel_event(&mut self, now: Instant, attempt: AttemptId, ev: &TunnelEvent) {
        let Some(link) = self.links.get(&attempt).cloned() else {
            return;
        };
        let role = link.role;
        match ev {
            TunnelEvent::Established { replica_id, .. } if role == LinkRole::Current => {
                self.established(now, attempt, link.slot, replica_id)
            }
            TunnelEvent::Drain
                if role == LinkRole::Current
                    && self.agent_mut(attempt).state()
                        == &(HubLinkState::Connected { attempt }) =>
            {
                self.drained(now, attempt)
            }
            TunnelEvent::Open { cid, connector } => {
                self.waiting.insert((attempt, *cid));
                self.agent_mut(attempt)
                    .flow_opened(now, attempt, *cid, connector);
            }
            TunnelEvent::Flow(FlowEvent::Reset { cid, .. } | FlowEvent::Closed { cid }) => {
                self.flow_ended(attempt, *cid);
            }
            TunnelEvent::Closed { code, reason } => {
                self.end_link(now, attempt, *code, reason);
            }
            _ => {}
        }
        self.pump();
    }

    /// The current tunnel of `slot` got its WELCOME from hub `replica_id`.
    /// A hub that already carries another slot's current tunnel gets no
    /// second one: this tunnel closes and its slot tries the next hub.
    fn established(&mut self, now: Instant, attempt: AttemptId, slot: u8, replica_id: &str) {
        if slot > 0 && replica_id.is_empty() {
            // A hub that names no replica predates slots: it took this
            // tunnel as the agent's only one (slot 0), fencing the others.
            // The agent keeps one tunnel: this slot stops for good.
            let reason = "the hub does not name its replica (it predates multi-homed agents): holding one tunnel";
            self.out.push_back(AgentCommand::CloseTunnel {
                attempt,
                code: ErrorCode::Normal,
                reason: reason.into(),
            });
            self.forget_link(attempt, ErrorCode::Normal, reason);
            let k = usize::from(slot);
            self.slots[k].agent.stop();
            while self.slots[k].agent.poll_output().is_some() {}
            self.slots[k].dialing = None;
            return;
        }
        let taken_by = (!replica_id.is_empty())
            .then(|| {
                self.links.values().find(|l| {
                    l.slot != slot
                        && l.role == LinkRole::Current
                        && l.hub.as_deref() == Some(replica_id)
                })
            })
            .flatten()
            .map(|l| l.slot);
        if let Some(other) = taken_by {
            let reason = format!(
                "hub `{replica_id}` already carries tunnel slot {other} of this agent: trying another hub"
            );
            self.out.push_back(AgentCommand::CloseTunnel {
                attempt,
                code: ErrorCode::Normal,
                reason: reason.clone(),
            });
            self.forget_link(attempt, ErrorCode::Normal, &reason);
            self.agent_mut(attempt).hub_duplicate(now, attempt);
            return;
        }
        if let Some(l) = self.links.get_mut(&attempt) {
            l.hub = (!replica_id.is_empty()).then(|| replica_id.to_string());
        }
        self.agent_mut(attempt).hub_established(now, attempt);
    }

    /// The target of flow `cid` of tunnel `attempt` is connected. `true`:
    /// pipe it to the flow; `false`: the flow is gone (drop the socket).
    pub fn target_connected(&mut self, now: Instant, attempt: AttemptId, cid: Cid) -> bool {
        let wanted = self.agent_mut(attempt).target_connected(now, attempt, cid);
        let waiting = self.waiting.remove(&(attempt, cid));
        self.check();
        wanted && waiting
    }

    /// The target of flow `cid` of tunnel `attempt` could not be reached.
    pub fn target_failed(&mut self, now: Instant, attempt: AttemptId, cid: Cid, reason: &str) {
        self.agent_mut(attempt)
            .target_failed(now, attempt, cid, reason);
        self.pump();
    }

    /// Stop for good: every tunnel is closed with `SHUTDOWN` and ended, every
    /// dial cancelled.
    pub fn stop(&mut self) {
        const WHY: &str = "agent shutting down";
        for s in &mut self.slots {
            if let Some(attempt) = s.dialing.take() {
                self.out.push_back(AgentCommand::CancelHubDial {
                    attempt,
                    reason: WHY.into(),
                });
            }
        }
        let links: Vec<AttemptId> = self.links.keys().copied().collect();
        for attempt in links {
            self.out.push_back(AgentCommand::CloseTunnel {
                attempt,
                code: ErrorCode::Shutdown,
                reason: WHY.into(),
            });
            self.forget_link(attempt, ErrorCode::Shutdown, WHY);
        }
        for s in &mut self.slots {
            s.agent.stop();
            while s.agent.poll_output().is_some() {}
        }
        self.check();
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for k in 0..self.slots.len() {
            self.avoid_others(k);
            self.slots[k].agent.handle_timeout(now);
        }
        self.pump();
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| s.agent.poll_timeout())
            .min()
    }

    pub fn poll_command(&mut self) -> Option<AgentCommand> {
        self.out.pop_front()
    }

    /// The current tunnel's hub said DRAIN: it becomes its slot's draining
    /// one, and the one draining before in that slot (if any) is ended.
    fn drained(&mut self, now: Instant, attempt: AttemptId) {
        let slot = self.slot_of(attempt);
        let older: Vec<AttemptId> = self
            .links
            .iter()
            .filter(|(_, l)| l.slot == slot && l.role == LinkRole::Draining)
            .map(|(a, _)| *a)
            .collect();
        for old in older {
            let why = "a newer hub is draining too";
            self.out.push_back(AgentCommand::CloseTunnel {
                attempt: old,
                code: ErrorCode::Shutdown,
                reason: why.into(),
            });
            self.end_link(now, old, ErrorCode::Shutdown, why);
        }
        if let Some(l) = self.links.get_mut(&attempt) {
            l.role = LinkRole::Draining;
        }
        self.agent_mut(attempt).hub_draining(now, attempt);
    }

    fn flow_ended(&mut self, attempt: AttemptId, cid: Cid) {
        if self.waiting.remove(&(attempt, cid)) {
            self.agent_mut(attempt).flow_gone(attempt, cid);
            self.out
                .push_back(AgentCommand::CancelTarget { attempt, cid });
        }
    }

    /// Tunnel `attempt` is over: its waiting flows go, its socket closes,
    /// and its slot's control machine is told.
    fn end_link(&mut self, now: Instant, attempt: AttemptId, code: ErrorCode, reason: &str) {
        if self.forget_link(attempt, code, reason) {
            self.agent_mut(attempt).hub_lost(now, attempt);
        }
    }

    fn forget_link(&mut self, attempt: AttemptId, code: ErrorCode, reason: &str) -> bool {
        if self.links.remove(&attempt).is_none() {
            return false;
        }
        let gone: Vec<(AttemptId, Cid)> = self
            .waiting
            .range((attempt, Cid::MIN)..=(attempt, Cid::MAX))
            .copied()
            .collect();
        for (a, cid) in gone {
            self.waiting.remove(&(a, cid));
            self.agent_mut(a).flow_gone(a, cid);
            self.out
                .push_back(AgentCommand::CancelTarget { attempt: a, cid });
        }
        self.out.push_back(AgentCommand::EndTunnel {
            attempt,
            code,
            reason: reason.to_string(),
        });
        true
    }

    /// Turn what the slots' control machines asked for into commands.
    fn pump(&mut self) {
        for k in 0..self.slots.len() {
            while let Some(o) = self.slots[k].agent.poll_output() {
                self.command(k, o);
            }
        }
        let mut counters = AgentCounters::default();
        for s in &self.slots {
            counters.add(&s.agent.counters);
        }
        self.counters = counters;
        self.check();
    }

    fn command(&mut self, k: usize, o: AgentOutput) {
        match o {
            AgentOutput::DialHub { attempt, url } => {
                if let Some(prev) = self.slots[k].dialing.replace(attempt) {
                    self.out.push_back(AgentCommand::CancelHubDial {
                        attempt: prev,
                        reason: format!("attempt {attempt} replaces it"),
                    });
                }
                self.out.push_back(AgentCommand::DialHub {
                    attempt,
                    url,
                    slot: k as u8,
                });
            }
            AgentOutput::AbortHub { attempt, reason } => {
                if self.slots[k].dialing == Some(attempt) {
                    self.slots[k].dialing = None;
                    self.out.push_back(AgentCommand::CancelHubDial {
                        attempt,
                        reason: reason.clone(),
                    });
                }
                // A tunnel that got no WELCOME in time: the control
                // machine has given it up already.
                if self.links.contains_key(&attempt) {
                    self.out.push_back(AgentCommand::CloseTunnel {
                        attempt,
                        code: ErrorCode::IdleTimeout,
                        reason: reason.clone(),
                    });
                    self.forget_link(attempt, ErrorCode::IdleTimeout, &reason);
                }
            }
            AgentOutput::DialTarget {
                attempt,
                cid,
                target,
            } => {
                self.out.push_back(AgentCommand::DialTarget {
                    attempt,
                    cid,
                    target,
                });
            }
            AgentOutput::ResetFlow {
                attempt,
                cid,
                code,
                reason,
            } => {
                if self.waiting.remove(&(attempt, cid)) {
                    self.out
                        .push_back(AgentCommand::CancelTarget { attempt, cid });
                }
                if self.links.contains_key(&attempt) {
                    self.out.push_back(AgentCommand::ResetFlow {
                        attempt,
                        cid,
                        code,
                        reason,
                    });
                }
            }
        }
    }

    /// The node's bounds, checked in debug builds after every input.
    fn check(&self) {
        for (k, s) in self.slots.iter().enumerate() {
            let of_slot = || {
                self.links
                    .values()
                    .filter(move |l| usize::from(l.slot) == k)
            };
            let current = of_slot().filter(|l| l.role == LinkRole::Current).count();
            let draining = of_slot().count() - current;
            debug_assert!(current <= 1, "slot {k}: {current} current tunnels");
            debug_assert!(draining <= 1, "slot {k}: {draining} draining tunnels");
            debug_assert!(
                s.agent.draining_tunnels().count() <= 1,
                "slot {k}: the control machine holds more than one draining tunnel"
            );
        }
        // Every link belongs to the slot that dialed it.
        debug_assert!(
            self.links
                .iter()
                .all(|(a, l)| Agent::slot_of(*a, self.slots()) == usize::from(l.slot))
        );
        // Two slots' current tunnels are never on the same named hub.
        debug_assert!({
            let hubs: Vec<&str> = self
                .links
                .values()
                .filter(|l| l.role == LinkRole::Current)
                .filter_map(|l| l.hub.as_deref())
                .collect();
            let mut unique = hubs.clone();
            unique.sort_unstable();
            unique.dedup();
            unique.len() == hubs.len()
        });
        // Every pending target dial belongs to a waiting flow of a live link.
        debug_assert!(self.pending_dials() <= self.waiting.len());
        debug_assert!(
            self.waiting.iter().all(|(a, _)| self.links.contains_key(a)),
            "a flow waits on a tunnel that is gone"
        );
    }
}
