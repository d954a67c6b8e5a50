//! What the agent shows its operators of its tunnels: per configured hub
//! URL how many tunnels are in each state (`nowconnect_agent_tunnels`,
//! `nowconnect_agent_reconnects_total`), and for `/readyz` whether a tunnel
//! is established and, when none is, why each slot is not.
//!
//! The agent loop ([`crate::agent`]) tells [`TunnelView`] what it dials,
//! why dials fail and when the node took an input that may move a tunnel
//! ([`TunnelView::touch`]: not a flow's data); after such a wake-up the view
//! compares the node's slot states with what it last exported (a handful
//! of small values, nothing allocated) and touches the gauges and the
//! readiness only when something changed. Wake-ups that only move data
//! cost one flag test. The HTTP task reads the readiness from
//! [`AgentStatus`], never the agent loop's state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use nowconnect_core::agent::{AttemptId, HubLinkState};
use nowconnect_core::agent_node::{AgentNode, LinkRole};
use nowconnect_core::frame::MAX_SLOTS;

use crate::config::AgentConfig;
use crate::metrics::agent::{AgentMetrics, HubSeries, TunnelState};

/// The readiness the agent loop last published.
#[derive(Debug)]
pub struct AgentStatus {
    inner: Mutex<(bool, Vec<String>)>,
}

impl Default for AgentStatus {
    fn default() -> Self {
        AgentStatus {
            inner: Mutex::new((false, vec!["starting".into()])),
        }
    }
}

impl AgentStatus {
    fn publish(&self, ready: bool, reasons: Vec<String>) {
        *self.inner.lock().expect("agent status lock") = (ready, reasons);
    }

    /// `/readyz`: ready while at least one tunnel is established; else the
    /// reasons of each slot and, read now, what is wrong with the token.
    pub fn readyz(&self, cfg: &AgentConfig) -> (u16, String) {
        let (ready, mut reasons) = self.inner.lock().expect("agent status lock").clone();
        if !ready {
            reasons.extend(token_problem(cfg));
            if reasons.is_empty() {
                reasons.push("no tunnel is established".into());
            }
        }
        crate::http_wire::readiness(&reasons)
    }
}

/// What keeps the token the agent would dial with now from being accepted,
/// as far as the agent can tell: an unreadable or empty `token_file`, or
/// an `exp` in the past.
fn token_problem(cfg: &AgentConfig) -> Option<String> {
    let token = match cfg.current_token() {
        Ok(t) => t,
        Err(e) => return Some(format!("token: {e}")),
    };
    let exp = crate::token_renewal::token_exp(&token).as_secs();
    let now = crate::jwt::unix_now();
    (exp > 0 && exp <= now).then(|| format!("token: expired {} s ago", now - exp))
}

/// One tunnel slot as operators see it.
#[derive(Debug, Default)]
struct Slot {
    /// The configured hub (index) it dials or holds.
    hub: Option<usize>,
    /// Dials since it last held an established tunnel.
    tries: u32,
    /// Whether it has dialed at all (a later dial is a reconnect).
    dialed: bool,
    /// Why its last dial or tunnel failed.
    error: Option<String>,
}

/// What is exported: a (hub, state) per slot, then per draining tunnel.
type Shown = [Option<(usize, TunnelState)>; 2 * MAX_SLOTS as usize];

pub struct TunnelView {
    hubs: Vec<String>,
    series: Vec<HubSeries>,
    slots: Vec<Slot>,
    /// The hub each attempt dialed, while the attempt is a dial or a link.
    attempts: BTreeMap<AttemptId, usize>,
    shown: Shown,
    /// The node took an input that may have moved a tunnel since the last
    /// [`Self::update`].
    dirty: bool,
    status: Arc<AgentStatus>,
}

impl TunnelView {
    pub fn new(cfg: &AgentConfig, metrics: &AgentMetrics, status: Arc<AgentStatus>) -> Self {
        let hubs = cfg.raw.hubs.clone();
        TunnelView {
            series: hubs.iter().map(|h| metrics.hub(h)).collect(),
            hubs,
            slots: Vec::new(),
            attempts: BTreeMap::new(),
            shown: [None; 2 * MAX_SLOTS as usize],
            dirty: true,
            status,
        }
    }

    fn slot(&mut self, k: u8) -> &mut Slot {
        let k = usize::from(k);
        if self.slots.len() <= k {
            self.slots.resize_with(k + 1, Slot::default);
        }
        &mut self.slots[k]
    }

    /// The node took an input that may move a tunnel (a hub dial's outcome,
    /// a tunnel event other than a flow's, a timer, the stop).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Slot `k` dials `url` (one of the configured hubs) as `attempt`.
    pub fn dialing(&mut self, k: u8, attempt: AttemptId, url: &str) {
        self.dirty = true;
        let Some(hub) = self.hubs.iter().position(|h| h == url) else {
            return;
        };
        self.attempts.insert(attempt, hub);
        let s = self.slot(k);
        let again = std::mem::replace(&mut s.dialed, true);
        s.hub = Some(hub);
        s.tries = s.tries.saturating_add(1);
        if again {
            self.series[hub].reconnects.inc();
        }
    }

    /// Why slot `k`'s dial or tunnel failed (a leading `URL: ` is dropped:
    /// the reason is shown beside the URL).
    pub fn failed(&mut self, k: u8, reason: &str) {
        let hub = self.slot(k).hub;
        let reason = hub
            .and_then(|h| reason.strip_prefix(self.hubs[h].as_str()))
            .and_then(|r| r.strip_prefix(": "))
            .unwrap_or(reason)
            .to_string();
        self.slot(k).error = Some(reason);
        self.dirty = true;
    }

    /// After a wake-up: export what changed in the node's tunnels.
    pub fn update(&mut self, node: &AgentNode) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let mut now: Shown = [None; 2 * MAX_SLOTS as usize];
        for (k, st) in node.slot_states().enumerate() {
            let state = match st {
                HubLinkState::Dialing { .. } => TunnelState::Connecting,
                HubLinkState::Connected { .. } => TunnelState::Established,
                HubLinkState::Backoff => TunnelState::Backoff,
                HubLinkState::Stopped => continue,
            };
            now[k] = self.slots.get(k).and_then(|s| s.hub).map(|h| (h, state));
        }
        let draining = node
            .links()
            .filter(|(_, role)| *role == LinkRole::Draining)
            .filter_map(|(a, _)| self.attempts.get(&a).map(|h| (*h, TunnelState::Draining)));
        for (i, d) in draining.take(MAX_SLOTS as usize).enumerate() {
            now[MAX_SLOTS as usize + i] = Some(d);
        }
        if now == self.shown {
            return;
        }
        for (hub, state) in self.shown.iter().flatten() {
            self.series[*hub].tunnels[*state as usize].dec();
        }
        for (hub, state) in now.iter().flatten() {
            self.series[*hub].tunnels[*state as usize].inc();
        }
        self.shown = now;
        self.attempts
            .retain(|a, _| node.role(*a).is_some() || node.is_dialing(*a));
        for (k, entry) in now.iter().take(MAX_SLOTS as usize).enumerate() {
            if let (Some((_, TunnelState::Established)), Some(s)) = (entry, self.slots.get_mut(k)) {
                s.tries = 0;
                s.error = None;
            }
        }
        let ready = now
            .iter()
            .flatten()
            .any(|(_, s)| *s == TunnelState::Established);
        let reasons = if ready {
            Vec::new()
        } else {
            self.reasons(node)
        };
        self.status.publish(ready, reasons);
    }

    /// Why no tunnel is established: each slot's state, hub and last error,
    /// and each draining tunnel.
    fn reasons(&self, node: &AgentNode) -> Vec<String> {
        let mut out = Vec::new();
        for (k, st) in node.slot_states().enumerate() {
            let slot = self.slots.get(k);
            let url = slot
                .and_then(|s| s.hub)
                .map_or_else(|| format!("slot {k}"), |h| self.hubs[h].clone());
            let tries = slot.map_or(0, |s| s.tries);
            let mut r = match st {
                HubLinkState::Dialing { .. } => format!("{url}: connecting (attempt {tries})"),
                HubLinkState::Backoff => format!("{url}: backoff after attempt {tries}"),
                HubLinkState::Stopped => format!("{url}: stopped"),
                HubLinkState::Connected { .. } => continue,
            };
            if let Some(e) = slot.and_then(|s| s.error.as_deref()) {
                r.push_str(": ");
                r.push_str(e);
            }
            out.push(r);
        }
        for (hub, _) in self.shown[MAX_SLOTS as usize..].iter().flatten() {
            out.push(format!("{}: draining", self.hubs[*hub]));
        }
        out
    }
}
