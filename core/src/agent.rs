//! The agent's control state machine: which hub to dial and when (capped
//! exponential backoff with jitter, rotating through the hub list), and the
//! target dial of every flow the hub opens, with its timeout.
//!
//! One current tunnel at a time: ownership is per agent, so holding two
//! claiming tunnels would make hubs take the agent from each other. The
//! exception is a hub that is shutting down: after its DRAIN the agent
//! dials the next hub at once and keeps the draining tunnel (no longer
//! current) for the flows it carries until that hub closes it. Flows are
//! therefore named by (tunnel attempt, cid): cids are per tunnel.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::frame::{Cid, ErrorCode};
use crate::rng::Rng;
use crate::timer::Timers;

/// One dial of a hub by the agent, and the tunnel it becomes: the agent's
/// flows are named by (attempt, cid), since cids are per tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttemptId(pub u64);

impl std::fmt::Display for AttemptId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub agent_id: String,
    pub hubs: Vec<String>,
    /// connector name → target `host:port`
    pub connectors: BTreeMap<String, String>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Dial plus WebSocket handshake plus WELCOME, per attempt.
    pub hub_connect_timeout: Duration,
    pub target_connect_timeout: Duration,
    /// Target dials in progress at once (per tunnel slot).
    pub max_pending_dials: usize,
    /// Simultaneous tunnels to distinct hubs (multi-homing), 1 to
    /// [`MAX_SLOTS`](crate::frame::MAX_SLOTS).
    pub ha_connections: u8,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            agent_id: "agent".into(),
            hubs: Vec::new(),
            connectors: BTreeMap::new(),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            hub_connect_timeout: Duration::from_secs(10),
            target_connect_timeout: Duration::from_secs(5),
            max_pending_dials: 1024,
            ha_connections: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentOutput {
    /// Dial this hub; report with `hub_established` or `hub_lost`.
    DialHub { attempt: AttemptId, url: String },
    /// Abandon the hub attempt or tunnel (timed out).
    AbortHub { attempt: AttemptId, reason: String },
    /// Connect to the target of flow `cid` of tunnel `attempt`; report with
    /// `target_connected` / `target_failed`.
    DialTarget {
        attempt: AttemptId,
        cid: Cid,
        target: String,
    },
    /// Reset the flow on tunnel `attempt` (and abort its dial if one is running).
    ResetFlow {
        attempt: AttemptId,
        cid: Cid,
        code: ErrorCode,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubLinkState {
    Dialing { attempt: AttemptId },
    Connected { attempt: AttemptId },
    Backoff,
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    HubDeadline,
    Reconnect,
    Dial(AttemptId, Cid),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    pub hub_attempts: u64,
    pub hub_failures: u64,
    pub target_dials: u64,
    pub target_failures: u64,
    pub target_timeouts: u64,
    pub unknown_connector: u64,
    /// Hubs that said DRAIN (shutting down) while this agent was on them.
    pub hub_drains: u64,
    /// Tunnels closed on their WELCOME because their hub already carries
    /// another of this agent's tunnels (multi-homing wants distinct hubs).
    pub duplicate_hubs: u64,
}

impl AgentCounters {
    /// The counters of several machines together.
    pub fn add(&mut self, o: &AgentCounters) {
        self.hub_attempts += o.hub_attempts;
        self.hub_failures += o.hub_failures;
        self.target_dials += o.target_dials;
        self.target_failures += o.target_failures;
        self.target_timeouts += o.target_timeouts;
        self.unknown_connector += o.unknown_connector;
        self.hub_drains += o.hub_drains;
        self.duplicate_hubs += o.duplicate_hubs;
    }
}

#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    state: HubLinkState,
    hub_index: usize,
    next_attempt: AttemptId,
    /// Attempt ids go up by this much (the number of slots), so the
    /// machines of one agent's slots never hand out the same id.
    attempt_stride: u64,
    backoff: Backoff,
    rng: Rng,
    /// Target dials in progress, by (tunnel attempt, cid).
    dials: BTreeMap<(AttemptId, Cid), Instant>,
    /// Tunnels whose hub said DRAIN: still carrying flows, no longer current.
    draining: BTreeSet<AttemptId>,
    /// Hubs (indices into `hubs`) the agent's other slots are dialing or
    /// connected to: skipped while another hub is left, so the slots of a
    /// multi-homed agent never dial the same listed hub.
    avoid: BTreeSet<usize>,
    timers: Timers<Timer>,
    out: VecDeque<AgentOutput>,
    pub counters: AgentCounters,
}

impl Agent {
    /// Starts dialing the first hub at once.
    pub fn new(now: Instant, cfg: AgentConfig, seed: u64) -> Self {
        Agent::for_slot(now, cfg, seed, 0, 1)
    }

    /// The machine of tunnel `slot` of `slots`: it starts at the
    /// `slot`-th hub of the list (so slots begin on distinct hubs), and
    /// its attempt ids are `slot + 1` plus multiples of `slots`
    /// ([`Agent::slot_of`]).
    pub fn for_slot(now: Instant, cfg: AgentConfig, seed: u64, slot: u8, slots: u8) -> Self {
        let backoff = Backoff::new(cfg.backoff_base, cfg.backoff_max);
        let slots = slots.max(1);
        let mut a = Agent {
            cfg,
            state: HubLinkState::Backoff,
            hub_index: usize::from(slot),
            next_attempt: AttemptId(u64::from(slot) + 1),
            attempt_stride: u64::from(slots),
            backoff,
            rng: Rng::new(seed),
            dials: BTreeMap::new(),
            draining: BTreeSet::new(),
            avoid: BTreeSet::new(),
            timers: Timers::default(),
            out: VecDeque::new(),
            counters: AgentCounters::default(),
        };
        a.dial_hub(now);
        a
    }

    pub fn state(&self) -> &HubLinkState {
        &self.state
    }

    /// The slot (of `slots`) whose machine handed out `attempt`.
    pub fn slot_of(attempt: AttemptId, slots: u8) -> usize {
        (attempt.0.saturating_sub(1) % u64::from(slots.max(1))) as usize
    }

    /// The tunnel of `attempt` got its WELCOME from a hub that already
    /// carries another tunnel of this agent: it is closed, and the next hub
    /// is tried after a (growing, jittered) backoff, as for a failed dial,
    /// so an agent behind one load-balanced URL keeps dialing until its
    /// tunnels land on distinct hubs without hammering them.
    pub fn hub_duplicate(&mut self, now: Instant, attempt: AttemptId) {
        if self.state == (HubLinkState::Dialing { attempt }) {
            self.counters.duplicate_hubs += 1;
            self.move_on(now, attempt);
        }
    }

    /// The listed hub (its index in `hubs`) this machine is dialing or
    /// connected to, if any.
    pub fn hub_in_use(&self) -> Option<usize> {
        match self.state {
            HubLinkState::Dialing { .. } | HubLinkState::Connected { .. } => {
                Some(self.hub_index % self.cfg.hubs.len().max(1))
            }
            _ => None,
        }
    }

    /// The listed hubs the agent's other slots use ([`Agent::hub_in_use`]):
    /// the next dial skips them while the list has a hub they do not use.
    /// With one URL (a load balancer) nothing can be skipped, and the
    /// replica id in WELCOME tells duplicates apart instead.
    pub fn avoid_hubs(&mut self, hubs: BTreeSet<usize>) {
        self.avoid = hubs;
    }

    pub fn connectors(&self) -> Vec<String> {
        self.cfg.connectors.keys().cloned().collect()
    }

    pub fn agent_id(&self) -> &str {
        &self.cfg.agent_id
    }

    pub fn pending_dials(&self) -> usize {
        self.dials.len()
    }

    fn dial_hub(&mut self, now: Instant) {
        if self.cfg.hubs.is_empty() {
            self.state = HubLinkState::Stopped;
            return;
        }
        let attempt = self.next_attempt;
        self.next_attempt = AttemptId(attempt.0 + self.attempt_stride);
        self.counters.hub_attempts += 1;
        self.state = HubLinkState::Dialing { attempt };
        self.timers
            .set(Timer::HubDeadline, now + self.cfg.hub_connect_timeout);
        let n = self.cfg.hubs.len();
        if (0..n).any(|i| !self.avoid.contains(&i)) {
            while self.avoid.contains(&(self.hub_index % n)) {
                self.hub_index = (self.hub_index + 1) % n;
            }
        }
        let url = self.cfg.hubs[self.hub_index % n].clone();
        self.out.push_back(AgentOutput::DialHub { attempt, url });
    }

    /// The tunnel of `attempt` got its WELCOME.
    /// The backoff starts over once a tunnel has stayed up for
    /// [`STABLE_AFTER`](crate::backoff::STABLE_AFTER).
    pub fn hub_established(&mut self, now: Instant, attempt: AttemptId) {
        if self.state == (HubLinkState::Dialing { attempt }) {
            self.state = HubLinkState::Connected { attempt };
            self.timers.clear(Timer::HubDeadline);
            self.backoff.connected(now);
        }
    }

    /// The dial of `attempt` failed, or its tunnel ended. Every flow of the
    /// tunnel is gone with it; the next hub in the list is tried after a backoff.
    pub fn hub_lost(&mut self, now: Instant, attempt: AttemptId) {
        if self.draining.remove(&attempt) {
            // A draining tunnel ended: only its own flows go with it.
            self.forget_dials(attempt);
            return;
        }
        let ours = matches!(self.state, HubLinkState::Dialing { attempt: a } | HubLinkState::Connected { attempt: a } if a == attempt);
        if !ours {
            return;
        }
        self.counters.hub_failures += 1;
        self.move_on(now, attempt);
    }

    /// The tunnel or dial of `attempt` is over: its flows' dials go, and
    /// the next hub in the list is tried after a backoff.
    fn move_on(&mut self, now: Instant, attempt: AttemptId) {
        self.timers.clear(Timer::HubDeadline);
        self.forget_dials(attempt);
        self.hub_index = (self.hub_index + 1) % self.cfg.hubs.len().max(1);
        self.state = HubLinkState::Backoff;
        self.backoff.disconnected(now);
        let delay = self.backoff.next_delay(&mut self.rng);
        self.timers.set(Timer::Reconnect, now + delay);
    }

    fn forget_dials(&mut self, attempt: AttemptId) {
        let gone: Vec<(AttemptId, Cid)> = self
            .dials
            .range((attempt, Cid::MIN)..=(attempt, Cid::MAX))
            .map(|(k, _)| *k)
            .collect();
        for (a, cid) in gone {
            self.dials.remove(&(a, cid));
            self.timers.clear(Timer::Dial(a, cid));
        }
    }

    /// The hub of tunnel `attempt` said DRAIN: it is shutting down. If that
    /// is the current tunnel, it becomes a draining one (its flows go on, and
    /// it may still get new ones until the agent is owned elsewhere) and the
    /// next hub is dialed at once, without backoff.
    pub fn hub_draining(&mut self, now: Instant, attempt: AttemptId) {
        if self.state != (HubLinkState::Connected { attempt }) {
            return;
        }
        self.counters.hub_drains += 1;
        self.backoff.disconnected(now);
        self.draining.insert(attempt);
        self.hub_index = (self.hub_index + 1) % self.cfg.hubs.len().max(1);
        self.dial_hub(now);
    }

    /// Tunnels still open after their hub said DRAIN.
    pub fn draining_tunnels(&self) -> impl Iterator<Item = AttemptId> + '_ {
        self.draining.iter().copied()
    }

    /// Stop for good (shutdown).
    pub fn stop(&mut self) {
        self.state = HubLinkState::Stopped;
        self.timers.clear_all();
        self.dials.clear();
        self.draining.clear();
    }

    /// The hub of tunnel `attempt` opened flow `cid` for `connector`.
    pub fn flow_opened(&mut self, now: Instant, attempt: AttemptId, cid: Cid, connector: &str) {
        // A flow id is opened once; should it come again, the flow is reset
        // and any dial still running for it is abandoned with it.
        if self.dials.remove(&(attempt, cid)).is_some() {
            self.timers.clear(Timer::Dial(attempt, cid));
            self.out.push_back(AgentOutput::ResetFlow {
                attempt,
                cid,
                code: ErrorCode::ProtocolError,
                reason: format!("flow {cid} opened twice"),
            });
            return;
        }
        let Some(target) = self.cfg.connectors.get(connector).cloned() else {
            self.counters.unknown_connector += 1;
            self.out.push_back(AgentOutput::ResetFlow {
                attempt,
                cid,
                code: ErrorCode::UnknownConnector,
                reason: format!(
                    "agent `{}` does not serve connector `{connector}`",
                    self.cfg.agent_id
                ),
            });
            return;
        };
        if self.dials.len() >= self.cfg.max_pending_dials {
            self.out.push_back(AgentOutput::ResetFlow {
                attempt,
                cid,
                code: ErrorCode::LimitExceeded,
                reason: format!(
                    "{} target dials already in progress",
                    self.cfg.max_pending_dials
                ),
            });
            return;
        }
        self.counters.target_dials += 1;
        let deadline = now + self.cfg.target_connect_timeout;
        self.dials.insert((attempt, cid), deadline);
        self.timers.set(Timer::Dial(attempt, cid), deadline);
        debug_assert!(self.dials.len() <= self.cfg.max_pending_dials);
        // One timer per dial, and the hub deadline or the reconnect.
        debug_assert!(self.timers.len() <= self.dials.len() + 2);
        self.out.push_back(AgentOutput::DialTarget {
            attempt,
            cid,
            target,
        });
    }

    pub fn target_connected(&mut self, _now: Instant, attempt: AttemptId, cid: Cid) -> bool {
        self.timers.clear(Timer::Dial(attempt, cid));
        self.dials.remove(&(attempt, cid)).is_some()
    }

    pub fn target_failed(&mut self, _now: Instant, attempt: AttemptId, cid: Cid, reason: &str) {
        self.timers.clear(Timer::Dial(attempt, cid));
        if self.dials.remove(&(attempt, cid)).is_some() {
            self.counters.target_failures += 1;
            self.out.push_back(AgentOutput::ResetFlow {
                attempt,
                cid,
                code: ErrorCode::TargetUnreachable,
                reason: format!("target unreachable: {reason}"),
            });
        }
    }

    /// The flow ended before its dial finished (hub reset it).
    pub fn flow_gone(&mut self, attempt: AttemptId, cid: Cid) {
        self.timers.clear(Timer::Dial(attempt, cid));
        self.dials.remove(&(attempt, cid));
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // The due timers fire in timer order (the hub deadline, the
        // reconnect, then dials by attempt and flow), whatever their
        // deadlines: the order this machine has always used.
        let mut due = self.timers.expired(now);
        due.sort_unstable();
        for t in due {
            match t {
                Timer::HubDeadline => {
                    if let HubLinkState::Dialing { attempt } = self.state {
                        self.out.push_back(AgentOutput::AbortHub {
                            attempt,
                            reason: format!("no WELCOME within {:?}", self.cfg.hub_connect_timeout),
                        });
                        self.hub_lost(now, attempt);
                    }
                }
                Timer::Reconnect => {
                    if self.state == HubLinkState::Backoff {
                        self.dial_hub(now);
                    }
                }
                Timer::Dial(attempt, cid) => {
                    if self.dials.remove(&(attempt, cid)).is_some() {
                        self.counters.target_timeouts += 1;
                        self.out.push_back(AgentOutput::ResetFlow {
                            attempt,
                            cid,
                            code: ErrorCode::ConnectTimeout,
                            reason: format!(
                                "target connect timed out after {:?}",
                                self.cfg.target_connect_timeout
                            ),
                        });
                    }
                }
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next().map(|(at, _)| at)
    }

    pub fn poll_output(&mut self) -> Option<AgentOutput> {
        self.out.pop_front()
    }
}
