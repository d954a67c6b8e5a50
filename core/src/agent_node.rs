//! [`AgentNode`]: the whole agent as one state machine. It owns the control
//! machine ([`Agent`]: which hub to dial, backoff, target dials and their
//! timeouts) and the table of the agent's tunnel links (the current one and
//! at most one whose hub said DRAIN), and makes every decision of how the
//! two combine:
//!
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
use crate::frame::{Cid, ErrorCode};
use crate::mux::FlowEvent;
use crate::tunnel::TunnelEvent;

/// What the node asks of whoever drives its links, sockets and dials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCommand {
    /// Dial this hub (with a current token); report the outcome with
    /// [`AgentNode::hub_connected`] or [`AgentNode::hub_failed`].
    DialHub { attempt: AttemptId, url: String },
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

#[derive(Debug)]
pub struct AgentNode {
    agent: Agent,
    /// The hub dial in progress, if any.
    dialing: Option<AttemptId>,
    links: BTreeMap<AttemptId, LinkRole>,
    /// Flows opened by a hub whose target is not connected yet.
    waiting: BTreeSet<(AttemptId, Cid)>,
    out: VecDeque<AgentCommand>,
}

impl AgentNode {
    /// Starts dialing the first hub at once.
    pub fn new(now: Instant, cfg: AgentConfig, seed: u64) -> Self {
        let mut n = AgentNode {
            agent: Agent::new(now, cfg, seed),
            dialing: None,
            links: BTreeMap::new(),
            waiting: BTreeSet::new(),
            out: VecDeque::new(),
        };
        n.pump();
        n
    }

    pub fn agent_id(&self) -> &str {
        self.agent.agent_id()
    }

    /// Connector names this agent serves (what its HELLO announces).
    pub fn connectors(&self) -> Vec<String> {
        self.agent.connectors()
    }

    pub fn state(&self) -> &HubLinkState {
        self.agent.state()
    }

    pub fn counters(&self) -> &AgentCounters {
        &self.agent.counters
    }

    /// Target dials in progress.
    pub fn pending_dials(&self) -> usize {
        self.agent.pending_dials()
    }

    /// Flows waiting for their target.
    pub fn waiting_flows(&self) -> usize {
        self.waiting.len()
    }

    /// The tunnel links: their attempt and role.
    pub fn links(&self) -> impl Iterator<Item = (AttemptId, LinkRole)> + '_ {
        self.links.iter().map(|(a, r)| (*a, *r))
    }

    pub fn role(&self, attempt: AttemptId) -> Option<LinkRole> {
        self.links.get(&attempt).copied()
    }

    /// The dial of hub `attempt` gave a WebSocket. `Ok`: it is the current
    /// tunnel now (start a `Tunnel::agent` on it and report its events);
    /// `Err`: the attempt is stale and the socket is to be dropped.
    pub fn hub_connected(
        &mut self,
        _now: Instant,
        attempt: AttemptId,
    ) -> Result<(), StaleConnection> {
        if self.agent.state() != &(HubLinkState::Dialing { attempt })
            || self.links.contains_key(&attempt)
        {
            return Err(StaleConnection::NotDialing);
        }
        if self.dialing == Some(attempt) {
            self.dialing = None;
        }
        self.links.insert(attempt, LinkRole::Current);
        self.check();
        Ok(())
    }

    /// The dial of hub `attempt` failed.
    pub fn hub_failed(&mut self, now: Instant, attempt: AttemptId) {
        if self.dialing == Some(attempt) {
            self.dialing = None;
        }
        if !self.links.contains_key(&attempt) {
            self.agent.hub_lost(now, attempt);
        }
        self.pump();
    }

    /// An event of tunnel `attempt`'s core machine. Only `Established`,
    /// `Drain`, `Open`, `Closed` and the end of a flow (`Reset`, `Closed`)
    /// concern the node; the rest is the link's own business.
    pub fn tunnel_event(&mut self, now: Instant, attempt: AttemptId, ev: &TunnelEvent) {
        let Some(role) = self.links.get(&attempt).copied() else {
            return;
        };
        match ev {
            TunnelEvent::Established { .. } if role == LinkRole::Current => {
                self.agent.hub_established(now, attempt);
            }
            TunnelEvent::Drain
                if role == LinkRole::Current
                    && self.agent.state() == &(HubLinkState::Connected { attempt }) =>
            {
                self.drained(now, attempt)
            }
            TunnelEvent::Open { cid, connector } => {
                self.waiting.insert((attempt, *cid));
                self.agent.flow_opened(now, attempt, *cid, connector);
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

    /// The target of flow `cid` of tunnel `attempt` is connected. `true`:
    /// pipe it to the flow; `false`: the flow is gone (drop the socket).
    pub fn target_connected(&mut self, now: Instant, attempt: AttemptId, cid: Cid) -> bool {
        let wanted = self.agent.target_connected(now, attempt, cid);
        let waiting = self.waiting.remove(&(attempt, cid));
        self.check();
        wanted && waiting
    }

    /// The target of flow `cid` of tunnel `attempt` could not be reached.
    pub fn target_failed(&mut self, now: Instant, attempt: AttemptId, cid: Cid, reason: &str) {
        self.agent.target_failed(now, attempt, cid, reason);
        self.pump();
    }

    /// Stop for good: every tunnel is closed with `SHUTDOWN` and ended, every
    /// dial cancelled.
    pub fn stop(&mut self) {
        const WHY: &str = "agent shutting down";
        if let Some(attempt) = self.dialing.take() {
            self.out.push_back(AgentCommand::CancelHubDial {
                attempt,
                reason: WHY.into(),
            });
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
        self.agent.stop();
        while self.agent.poll_output().is_some() {}
        self.check();
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.agent.handle_timeout(now);
        self.pump();
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.agent.poll_timeout()
    }

    pub fn poll_command(&mut self) -> Option<AgentCommand> {
        self.out.pop_front()
    }

    /// The current tunnel's hub said DRAIN: it becomes the draining one, and
    /// the one draining before (if any) is ended.
    fn drained(&mut self, now: Instant, attempt: AttemptId) {
        let older: Vec<AttemptId> = self
            .links
            .iter()
            .filter(|(_, r)| **r == LinkRole::Draining)
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
        self.links.insert(attempt, LinkRole::Draining);
        self.agent.hub_draining(now, attempt);
    }

    fn flow_ended(&mut self, attempt: AttemptId, cid: Cid) {
        if self.waiting.remove(&(attempt, cid)) {
            self.agent.flow_gone(attempt, cid);
            self.out
                .push_back(AgentCommand::CancelTarget { attempt, cid });
        }
    }

    /// Tunnel `attempt` is over: its waiting flows go, its socket closes,
    /// and the control machine is told.
    fn end_link(&mut self, now: Instant, attempt: AttemptId, code: ErrorCode, reason: &str) {
        if self.forget_link(attempt, code, reason) {
            self.agent.hub_lost(now, attempt);
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
            self.agent.flow_gone(a, cid);
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

    /// Turn what the control machine asked for into commands.
    fn pump(&mut self) {
        while let Some(o) = self.agent.poll_output() {
            match o {
                AgentOutput::DialHub { attempt, url } => {
                    if let Some(prev) = self.dialing.replace(attempt) {
                        self.out.push_back(AgentCommand::CancelHubDial {
                            attempt: prev,
                            reason: format!("attempt {attempt} replaces it"),
                        });
                    }
                    self.out.push_back(AgentCommand::DialHub { attempt, url });
                }
                AgentOutput::AbortHub { attempt, reason } => {
                    if self.dialing == Some(attempt) {
                        self.dialing = None;
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
        self.check();
    }

    /// The node's bounds, checked in debug builds after every input.
    fn check(&self) {
        let current = self
            .links
            .values()
            .filter(|r| **r == LinkRole::Current)
            .count();
        let draining = self.links.len() - current;
        debug_assert!(current <= 1, "{current} current tunnels");
        debug_assert!(draining <= 1, "{draining} draining tunnels");
        debug_assert!(
            self.agent.draining_tunnels().count() <= 1,
            "the control machine holds more than one draining tunnel"
        );
        // Every pending target dial belongs to a waiting flow of a live link.
        debug_assert!(self.agent.pending_dials() <= self.waiting.len());
        debug_assert!(
            self.waiting.iter().all(|(a, _)| self.links.contains_key(a)),
            "a flow waits on a tunnel that is gone"
        );
    }
}
