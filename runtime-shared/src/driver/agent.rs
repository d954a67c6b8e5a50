//! The pieces of the agent's loop both runtimes share: target dials, the
//! core agent's outputs, and each tunnel's step.

use std::collections::BTreeMap;
use std::time::Instant;

use nowconnect_core::tunnel::TunnelEvent;
use nowconnect_core::{Cid, ErrorCode};

use super::{FlowEnd, LinkCmd, TunnelDriver};

/// What an agent runtime must do for the core agent: start a hub dial or a
/// target dial as a task that reports back into the runtime's own event
/// channel, and cancel such a task. Everything else of the agent's loop is
/// [`agent_outputs`] and [`agent_tunnel_step`], shared.
pub trait AgentTasks {
    type Task;
    /// Dial `url` with `token`; report the WebSocket (or the failure) for `attempt`.
    fn dial_hub(&self, attempt: u64, url: String, token: String) -> Self::Task;
    /// Connect to `target`; report the stream (or the failure) for flow
    /// `cid` of tunnel `attempt`.
    fn dial_target(&self, attempt: u64, cid: Cid, target: String) -> Self::Task;
    fn cancel(&self, task: Self::Task);
}

/// A flow of the agent: cids are per tunnel, so (tunnel attempt, cid).
pub type AgentFlow = (u64, Cid);

/// The dials an agent has running and the flow ends waiting for them.
pub struct AgentDials<T> {
    pub hub: Option<(u64, T)>,
    pub targets: BTreeMap<AgentFlow, T>,
    pub waiting: BTreeMap<AgentFlow, FlowEnd>,
}

impl<T> Default for AgentDials<T> {
    fn default() -> Self {
        AgentDials {
            hub: None,
            targets: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }
}

impl<T> AgentDials<T> {
    /// Flows of tunnel `attempt` that ended (reset by the hub, or closed)
    /// while their target dial still ran: drop their waiting ends and
    /// return their dials (to cancel) with their cids (to tell the core, so
    /// they no longer count as pending dials).
    pub fn forget_ended(
        &mut self,
        attempt: u64,
        open: impl Fn(Cid) -> bool,
    ) -> Vec<(Cid, Option<T>)> {
        let range = (attempt, 0)..=(attempt, Cid::MAX);
        let ended: Vec<AgentFlow> = self
            .waiting
            .range(range)
            .map(|(k, _)| *k)
            .filter(|(_, cid)| !open(*cid))
            .collect();
        ended
            .into_iter()
            .map(|k| {
                self.waiting.remove(&k);
                (k.1, self.targets.remove(&k))
            })
            .collect()
    }

    /// Tunnel `attempt` is gone: drop its waiting flows and return its
    /// running target dials (to cancel).
    pub fn forget_tunnel(&mut self, attempt: u64) -> Vec<T> {
        let range = (attempt, 0)..=(attempt, Cid::MAX);
        let cids: Vec<AgentFlow> = self.waiting.range(range.clone()).map(|(k, _)| *k).collect();
        for k in cids {
            self.waiting.remove(&k);
        }
        let cids: Vec<AgentFlow> = self.targets.range(range).map(|(k, _)| *k).collect();
        cids.into_iter()
            .filter_map(|k| self.targets.remove(&k))
            .collect()
    }
}

/// Carry out what the core agent asked for; `conns` are the agent's open
/// tunnels (the current one and a draining one), each with the dial attempt
/// it belongs to. `token` gives the token for a new hub connection.
pub fn agent_outputs<R: AgentTasks>(
    rt: &R,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
    mut conns: Vec<(u64, &mut TunnelDriver)>,
    token: impl Fn() -> String,
) {
    use nowconnect_core::agent::AgentOutput;
    while let Some(out) = agent.poll_output() {
        match out {
            AgentOutput::DialHub { attempt, url } => {
                tracing::info!(attempt, %url, "connecting to hub");
                if let Some((_, t)) = dials.hub.take() {
                    rt.cancel(t);
                }
                dials.hub = Some((attempt, rt.dial_hub(attempt, url, token())));
            }
            AgentOutput::AbortHub { attempt, reason } => {
                tracing::warn!(attempt, %reason, "hub attempt abandoned");
                if let Some((a, t)) = dials.hub.take() {
                    if a == attempt {
                        rt.cancel(t);
                    } else {
                        dials.hub = Some((a, t));
                    }
                }
                if let Some((_, d)) = conns.iter_mut().find(|(a, _)| *a == attempt) {
                    d.tunnel.close(ErrorCode::IdleTimeout, &reason);
                }
            }
            AgentOutput::DialTarget {
                attempt,
                cid,
                target,
            } => {
                dials
                    .targets
                    .insert((attempt, cid), rt.dial_target(attempt, cid, target));
            }
            AgentOutput::ResetFlow {
                attempt,
                cid,
                code,
                reason,
            } => {
                tracing::warn!(attempt, cid, %code, %reason, "flow reset");
                if let Some(t) = dials.targets.remove(&(attempt, cid)) {
                    rt.cancel(t);
                }
                dials.waiting.remove(&(attempt, cid));
                if let Some((_, d)) = conns.iter_mut().find(|(a, _)| *a == attempt) {
                    d.on_cmd(Instant::now(), LinkCmd::Reset { cid, code, reason });
                }
            }
        }
    }
    // Send what those outputs queued (RSTs) before waiting again.
    for (_, d) in conns {
        d.drain();
        d.flush();
    }
}

/// What became of a tunnel in one [`agent_tunnel_step`].
#[derive(Debug, PartialEq, Eq)]
pub enum TunnelStep {
    Running,
    /// The hub said DRAIN: this tunnel is now a draining one (the core agent
    /// is already dialing the next hub).
    Draining,
    /// The tunnel ended with this close.
    Lost(ErrorCode, String),
}

/// The agent's step after every wake-up, the same on every runtime: hand
/// the tunnel's events to the core [`Agent`](nowconnect_core::agent::Agent)
/// (established, DRAIN, flows opened: their ends wait in `waiting` for the
/// target dial), send what the core queued, export its counters.
pub fn agent_tunnel_step(
    driver: &mut TunnelDriver,
    agent: &mut nowconnect_core::agent::Agent,
    attempt: u64,
    waiting: &mut BTreeMap<AgentFlow, FlowEnd>,
    now: Instant,
) -> TunnelStep {
    let mut step = TunnelStep::Running;
    for ev in driver.drain() {
        match ev {
            TunnelEvent::Established { epoch, codec } => {
                tracing::info!(
                    attempt,
                    epoch = epoch.0,
                    codec = codec.as_str(),
                    "tunnel established"
                );
                agent.hub_established(now, attempt);
            }
            TunnelEvent::Drain => {
                tracing::info!(
                    attempt,
                    open_flows = driver.tunnel.flow_count(),
                    "hub is draining: moving to the next hub, this tunnel keeps its flows"
                );
                agent.hub_draining(now, attempt);
                if step == TunnelStep::Running {
                    step = TunnelStep::Draining;
                }
            }
            TunnelEvent::Open { cid, connector } => {
                let end = driver.attach_flow(cid, &connector);
                waiting.insert((attempt, cid), end);
                agent.flow_opened(now, attempt, cid, &connector);
            }
            TunnelEvent::Closed { code, reason } => {
                tracing::warn!(attempt, %code, %reason, "tunnel closed");
                step = TunnelStep::Lost(code, reason);
            }
            TunnelEvent::Hello { .. }
            | TunnelEvent::Reauth { .. }
            | TunnelEvent::Flow(_)
            | TunnelEvent::Rtt(_) => {}
        }
    }
    driver.drain();
    driver.flush();
    driver.report_due(now);
    step
}

/// One tunnel of an agent runtime (its socket halves are the runtime's).
pub trait AgentConn {
    fn attempt(&self) -> u64;
    fn driver(&mut self) -> &mut TunnelDriver;
    /// The tunnel is over: stop what the runtime runs for it (its reader).
    fn finish(self);
}

/// The agent's step over its tunnels after every wake-up, the same on every
/// runtime: [`agent_tunnel_step`] for the draining tunnel and the current
/// one; a lost tunnel is ended (socket closed, its dials cancelled, the core
/// told); a current tunnel whose hub said DRAIN becomes the draining one
/// (one at a time: a second drain in a row ends the older one).
pub fn agent_tunnels_step<R: AgentTasks, C: AgentConn>(
    rt: &R,
    conn: &mut Option<C>,
    old: &mut Option<C>,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
) {
    if let Some(c) = old.as_mut()
        && let TunnelStep::Lost(code, reason) = conn_step(rt, c, agent, dials)
    {
        let c = old.take().expect("draining tunnel");
        end_agent_conn(rt, c, code, &reason, agent, dials);
    }
    let Some(c) = conn.as_mut() else {
        return;
    };
    match conn_step(rt, c, agent, dials) {
        TunnelStep::Running => {}
        TunnelStep::Lost(code, reason) => {
            let c = conn.take().expect("current tunnel");
            end_agent_conn(rt, c, code, &reason, agent, dials);
        }
        TunnelStep::Draining => {
            if let Some(mut prev) = old.take() {
                let why = "a newer hub is draining too";
                prev.driver().tunnel.close(ErrorCode::Shutdown, why);
                prev.driver().drain();
                end_agent_conn(rt, prev, ErrorCode::Shutdown, why, agent, dials);
            }
            *old = conn.take();
        }
    }
}

/// [`agent_tunnel_step`] for one tunnel, then the dials of its flows that
/// ended meanwhile are cancelled.
fn conn_step<R: AgentTasks, C: AgentConn>(
    rt: &R,
    c: &mut C,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
) -> TunnelStep {
    let attempt = c.attempt();
    let step = agent_tunnel_step(
        c.driver(),
        agent,
        attempt,
        &mut dials.waiting,
        Instant::now(),
    );
    cancel_ended_dials(rt, c.driver(), attempt, agent, dials);
    step
}

/// Flows the hub ended while their target dial ran: the dial is cancelled
/// (no socket to a target nobody waits for) and the core forgets it, so it
/// no longer holds one of `max_pending_dials`.
fn cancel_ended_dials<R: AgentTasks>(
    rt: &R,
    driver: &TunnelDriver,
    attempt: u64,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
) {
    if dials.waiting.is_empty() {
        return;
    }
    for (cid, task) in dials.forget_ended(attempt, |cid| driver.tunnel.mux().contains(cid)) {
        if let Some(t) = task {
            rt.cancel(t);
        }
        agent.flow_gone(attempt, cid);
    }
}

/// A tunnel ended: close its socket (the writer task sends the close and
/// ends), cancel its target dials, tell the core.
fn end_agent_conn<R: AgentTasks, C: AgentConn>(
    rt: &R,
    mut c: C,
    code: ErrorCode,
    reason: &str,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
) {
    let attempt = c.attempt();
    c.driver().close_socket(code, reason);
    for t in dials.forget_tunnel(attempt) {
        rt.cancel(t);
    }
    c.finish();
    agent.hub_lost(Instant::now(), attempt);
}

/// How a hub's refusal of the tunnel upgrade reads in the agent's log.
pub fn hub_refusal(url: &str, status: impl std::fmt::Display, body: Option<&[u8]>) -> String {
    let body = body
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default();
    format!("{url}: hub refused the tunnel: HTTP {status} {body}")
}
