//! The tunnel side of a hub as one node: the control machine ([`Hub`]) and
//! the table of the hub's agent tunnels, each with the credential its token
//! carries, the token's expiry, what its HELLO announced and its codec.
//!
//! Each tunnel's [`crate::tunnel::Tunnel`] is still driven on its own (one
//! task per socket in the runtimes); its link reports what happened through
//! typed inputs ([`HubNode::tunnel_connected`], [`HubNode::tunnel_event`],
//! [`HubNode::tunnel_reauthed`], …) and executes the node's
//! [`NodeOutput`]s. The decisions that span the token and the tunnel are made
//! here: whether a HELLO is admitted (and how its refusal is counted), that a
//! v1 tunnel cannot be told to drain, when a token has expired, whether a
//! renewed token may replace the current one, whether a listener's new
//! client fits under the hub's client connection limit (decided at accept,
//! before anything is read from it), and the course of a graceful
//! drain: when the listeners close and when the drain is over (no client
//! flow, no tunnel flow and no agent to move left, or the grace period
//! ended).
//!
//! Verifying a token (signatures, keys, revocation, operator settings) stays
//! in the runtime: it reports the verified [`AgentCredential`], or the
//! refusal's label.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::codec::Codec;
use crate::frame::{Epoch, ErrorCode};
use crate::hub::{ClientId, Hub, HubOutput, TunnelId};
use crate::routing::Route;
use crate::tenant::{AgentCredential, Inadmissible, qualify};
use crate::timer::Timers;
use crate::tunnel::TunnelEvent;

/// Why the node refused a tunnel's agent (at HELLO, at a token renewal, or
/// when its token ran out). The tunnel is closed with code
/// [`ErrorCode::Refused`] (a repeated HELLO: [`ErrorCode::ProtocolError`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelRefusal {
    /// The HELLO names another agent than the token.
    HelloAgentMismatch,
    /// The HELLO announces a connector the token's scope does not list.
    HelloOutsideScope,
    /// A second HELLO on a tunnel that already introduced itself.
    HelloRepeated,
    /// A renewed token for another agent or another tenant.
    ReauthAgentMismatch,
    /// A renewed token whose scope no longer covers what the HELLO announced.
    ReauthOutsideScope,
    /// The runtime refused the renewed token itself (signature, expiry,
    /// revocation, an unscoped token): the verifier's label.
    ReauthInvalid(&'static str),
    /// The tunnel outlived its token.
    TokenExpired,
    /// The runtime found the tunnel's token on the revocation list.
    Revoked,
}

/// How a refusal is counted: as an authentication failure (by reason) or
/// as a security event (by kind: a valid credential's holder tried to go
/// beyond it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalCount {
    AuthFailure(&'static str),
    SecurityEvent(&'static str),
}

impl TunnelRefusal {
    /// The refusal's label (the `reason` of its log line and close).
    pub fn as_str(&self) -> &'static str {
        match self {
            TunnelRefusal::HelloAgentMismatch | TunnelRefusal::ReauthAgentMismatch => {
                "agent_mismatch"
            }
            TunnelRefusal::HelloOutsideScope | TunnelRefusal::ReauthOutsideScope => {
                "connector_outside_scope"
            }
            TunnelRefusal::HelloRepeated => "duplicate_hello",
            TunnelRefusal::ReauthInvalid(label) => label,
            TunnelRefusal::TokenExpired => "token_expired",
            TunnelRefusal::Revoked => "revoked",
        }
    }

    /// Which counter the refusal goes to. A HELLO for another agent is
    /// counted as an authentication failure (the token does not say who
    /// is there); announcing beyond the scope, a repeated HELLO, an
    /// expired and a revoked token as security events; every renewal
    /// refusal as an authentication failure.
    pub fn count(&self) -> RefusalCount {
        match self {
            TunnelRefusal::HelloAgentMismatch
            | TunnelRefusal::ReauthAgentMismatch
            | TunnelRefusal::ReauthOutsideScope
            | TunnelRefusal::ReauthInvalid(_) => RefusalCount::AuthFailure(self.as_str()),
            TunnelRefusal::HelloOutsideScope => RefusalCount::SecurityEvent(self.as_str()),
            TunnelRefusal::HelloRepeated => RefusalCount::SecurityEvent("tunnel_duplicate_hello"),
            TunnelRefusal::TokenExpired => RefusalCount::SecurityEvent("tunnel_token_expired"),
            TunnelRefusal::Revoked => RefusalCount::SecurityEvent("tunnel_revoked"),
        }
    }

    /// At which step the refusal happened.
    pub fn stage(&self) -> RefusalStage {
        match self {
            TunnelRefusal::HelloAgentMismatch
            | TunnelRefusal::HelloOutsideScope
            | TunnelRefusal::HelloRepeated => RefusalStage::Hello,
            TunnelRefusal::ReauthAgentMismatch
            | TunnelRefusal::ReauthOutsideScope
            | TunnelRefusal::ReauthInvalid(_) => RefusalStage::Reauth,
            TunnelRefusal::TokenExpired => RefusalStage::Expiry,
            TunnelRefusal::Revoked => RefusalStage::Revocation,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalStage {
    Hello,
    Reauth,
    Expiry,
    Revocation,
}

/// A refusal as the runtime counts and logs it; the tunnel's close follows
/// as [`NodeOutput::CloseTunnel`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub tunnel: TunnelId,
    pub refusal: TunnelRefusal,
    /// Who the tunnel's token says its agent is.
    pub tenant: String,
    pub agent_id: String,
    /// At HELLO: the agent id the HELLO named.
    pub hello_agent: Option<String>,
    pub detail: String,
}

/// What the runtime must do, drained with [`HubNode::poll_output`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeOutput {
    /// Send WELCOME on the tunnel: it is owned under `epoch`.
    AcceptTunnel { tunnel: TunnelId, epoch: Epoch },
    /// Close the tunnel with this code and reason.
    CloseTunnel {
        tunnel: TunnelId,
        code: ErrorCode,
        reason: String,
    },
    /// Send DRAIN on the tunnel (v2 tunnels only).
    DrainTunnel { tunnel: TunnelId },
    /// Count and log a refusal (its close is a `CloseTunnel` after it).
    Refused(Refused),
    /// Draining: the listeners stop taking clients (the drain's delay is
    /// over). Once per drain.
    CloseListeners,
    /// Draining: the drain is over. `complete`: nothing was left (every
    /// client flow and tunnel flow ended, every agent moved); otherwise the
    /// grace period ended with `left`. The runtime closes what is left.
    /// Once per drain, after [`NodeOutput::CloseListeners`].
    Drained { complete: bool, left: DrainLeft },
    /// Every other output of the [`Hub`] (registry calls, routes, peers),
    /// passed through as it is: never `AcceptTunnel`, `CloseTunnel` or
    /// `DrainTunnel`, which become the variants above.
    Hub(HubOutput),
}

/// What the node knows of one agent tunnel.
#[derive(Clone, Debug)]
pub struct NodeTunnel {
    credential: AgentCredential,
    expires: Instant,
    /// Said HELLO (admitted or not): a second one is refused.
    said_hello: bool,
    /// Its close was decided (refused, expired, or closed by the hub):
    /// what it says from then on is ignored.
    closing: bool,
    /// What the HELLO announced (bare names), once it was admitted.
    announced: Option<Vec<String>>,
    codec: Option<Codec>,
}

impl NodeTunnel {
    /// What the tunnel's current token says.
    pub fn credential(&self) -> &AgentCredential {
        &self.credential
    }

    /// When the current token expires.
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// The connectors the admitted HELLO announced (bare names).
    pub fn announced(&self) -> Option<&[String]> {
        self.announced.as_deref()
    }

    /// The agent, tenant-qualified, once its HELLO was admitted.
    pub fn agent(&self) -> Option<String> {
        self.announced
            .as_ref()
            .map(|_| qualify(&self.credential.tenant, &self.credential.agent_id))
    }

    /// The codec, once the tunnel is established.
    pub fn codec(&self) -> Option<Codec> {
        self.codec
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum NodeTimer {
    TokenExpiry(TunnelId),
    /// The drain's delay is over: the listeners close.
    ListenersClose,
    /// The drain's grace period is over.
    DrainGrace,
}

/// Why the node refused a client a listener accepted; `as_str` is the
/// metric label (`nowconnect_client_connections_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientRefusal {
    /// The hub holds its `max_clients` client connections already.
    LimitExceeded,
}

impl ClientRefusal {
    pub const ALL: [ClientRefusal; 1] = [ClientRefusal::LimitExceeded];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientRefusal::LimitExceeded => ErrorCode::LimitExceeded.as_str(),
        }
    }
}

/// What a drain still waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainLeft {
    /// Client connections of the listeners still open, from their accept
    /// on (routed or not).
    pub client_flows: usize,
    /// Flows on this hub's tunnels (local clients' and mesh opens').
    pub tunnel_flows: usize,
    /// Agents told to move that no other hub owns yet.
    pub agents_to_move: usize,
}

impl DrainLeft {
    pub fn is_empty(&self) -> bool {
        *self == DrainLeft::default()
    }
}

/// A drain in progress (or over).
#[derive(Clone, Copy, Debug)]
struct Drain {
    listeners_closed: bool,
    over: bool,
}

/// The hub's control machine and its agent tunnels, composed.
#[derive(Debug)]
pub struct HubNode {
    hub: Hub,
    tunnels: BTreeMap<TunnelId, NodeTunnel>,
    timers: Timers<NodeTimer>,
    /// The listeners' client connections still open, from their accept
    /// on (at most `max_clients`).
    clients: BTreeSet<ClientId>,
    max_clients: usize,
    drain: Option<Drain>,
    out: VecDeque<NodeOutput>,
}

impl HubNode {
    /// The node of `hub`, taking at most `max_clients` client connections
    /// at once over all listeners (see [`HubNode::client_accepted`]).
    pub fn new(hub: Hub, max_clients: usize) -> Self {
        HubNode {
            hub,
            tunnels: BTreeMap::new(),
            timers: Timers::default(),
            clients: BTreeSet::new(),
            max_clients,
            drain: None,
            out: VecDeque::new(),
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The control machine, for inputs the node does not take yet (the
    /// registry's replies, the mesh). Its outputs still leave through
    /// [`HubNode::poll_output`], which also re-checks whether a drain is
    /// over.
    pub fn hub_mut(&mut self) -> &mut Hub {
        &mut self.hub
    }

    /// The tunnels known to the node.
    pub fn tunnel(&self, tunnel: TunnelId) -> Option<&NodeTunnel> {
        self.tunnels.get(&tunnel)
    }

    pub fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    /// A tunnel's socket was accepted for a verified token: `credential` is
    /// who it says the agent is, `expires` when it runs out (the runtime
    /// turns the token's `exp` into an `Instant`). At `expires` the node
    /// closes the tunnel unless a renewed token came first.
    pub fn tunnel_connected(
        &mut self,
        _now: Instant,
        tunnel: TunnelId,
        credential: AgentCredential,
        expires: Instant,
    ) {
        self.tunnels.insert(
            tunnel,
            NodeTunnel {
                credential,
                expires,
                said_hello: false,
                closing: false,
                announced: None,
                codec: None,
            },
        );
        self.timers.set(NodeTimer::TokenExpiry(tunnel), expires);
    }

    /// An event of the tunnel's own machine: `Hello`, `Established` and
    /// `Closed` are the node's business; the others are ignored (a
    /// `Reauth`'s token is verified by the runtime first, see
    /// [`HubNode::tunnel_reauthed`]).
    pub fn tunnel_event(&mut self, now: Instant, tunnel: TunnelId, event: &TunnelEvent) {
        match event {
            TunnelEvent::Hello {
                agent_id,
                connectors,
                slot,
                slots,
            } => self.hello(now, tunnel, agent_id, connectors, *slot, *slots),
            TunnelEvent::Established { codec, .. } => {
                if let Some(t) = self.tunnels.get_mut(&tunnel) {
                    t.codec = Some(*codec);
                }
                // A v1 agent has no DRAIN: a drain neither tells it to move
                // nor waits for it.
                if *codec != Codec::V2 {
                    self.hub.tunnel_cannot_drain(tunnel);
                }
            }
            TunnelEvent::Closed { .. } => self.tunnel_closed(now, tunnel),
            TunnelEvent::Open { .. }
            | TunnelEvent::Flow(_)
            | TunnelEvent::Rtt(_)
            | TunnelEvent::Drain
            | TunnelEvent::Reauth { .. } => {}
        }
        self.absorb_hub();
    }

    fn hello(
        &mut self,
        now: Instant,
        tunnel: TunnelId,
        hello_agent: &str,
        connectors: &[String],
        slot: u8,
        slots: u8,
    ) {
        let Some(t) = self.tunnels.get_mut(&tunnel) else {
            // Never connected here (or already forgotten): nothing to admit.
            return;
        };
        if t.closing {
            return;
        }
        let repeated = std::mem::replace(&mut t.said_hello, true);
        let refusal = if repeated {
            Some((
                TunnelRefusal::HelloRepeated,
                ErrorCode::ProtocolError,
                "a second HELLO on an introduced tunnel".to_string(),
            ))
        } else {
            t.credential
                .admission(hello_agent, connectors)
                .err()
                .map(|(kind, reason)| {
                    let refusal = match kind {
                        Inadmissible::AgentMismatch => TunnelRefusal::HelloAgentMismatch,
                        Inadmissible::ConnectorOutsideScope => TunnelRefusal::HelloOutsideScope,
                    };
                    (refusal, ErrorCode::Refused, reason)
                })
        };
        if let Some((refusal, code, reason)) = refusal {
            self.hub.counters.tunnels_refused += 1;
            self.refuse(
                tunnel,
                refusal,
                Some(hello_agent),
                code,
                reason.clone(),
                reason,
            );
            return;
        }
        t.announced = Some(connectors.to_vec());
        let tenant = t.credential.tenant.clone();
        let agent = qualify(&tenant, hello_agent);
        let qualified: Vec<String> = connectors.iter().map(|c| qualify(&tenant, c)).collect();
        self.hub
            .tunnel_hello_slot(now, tunnel, &agent, &qualified, slot, slots);
    }

    /// The agent sent a renewed token that the runtime verified (signature,
    /// expiry, revocation, the operator's scope rules): it replaces the
    /// current one if it is for the same agent and tenant and covers every
    /// connector the HELLO announced, and `expires` becomes the tunnel's
    /// deadline. Otherwise the tunnel is refused and closed. Returns
    /// whether the token was taken.
    pub fn tunnel_reauthed(
        &mut self,
        _now: Instant,
        tunnel: TunnelId,
        credential: AgentCredential,
        expires: Instant,
    ) -> bool {
        let Some(t) = self.tunnels.get_mut(&tunnel) else {
            return false;
        };
        if t.closing {
            // Too late: its close is on the way.
            return false;
        }
        let current = &t.credential;
        let refused = if credential.tenant != current.tenant {
            Some((
                TunnelRefusal::ReauthAgentMismatch,
                format!(
                    "the renewed token is for tenant `{}`, the tunnel for `{}`",
                    credential.tenant, current.tenant
                ),
            ))
        } else {
            let announced = t.announced.as_deref().unwrap_or(&[]);
            credential
                .admission(&current.agent_id, announced)
                .err()
                .map(|(kind, reason)| {
                    let refusal = match kind {
                        Inadmissible::AgentMismatch => TunnelRefusal::ReauthAgentMismatch,
                        Inadmissible::ConnectorOutsideScope => TunnelRefusal::ReauthOutsideScope,
                    };
                    (refusal, reason)
                })
        };
        if let Some((refusal, detail)) = refused {
            #[cfg(feature = "planted-bugs")]
            if self.hub.planted_bug() == crate::mux::PlantedBug::RefusedReauthTakesIdentity {
                t.credential = credential;
            }
            self.refuse_reauth(tunnel, refusal, detail);
            return false;
        }
        t.credential = credential;
        t.expires = expires;
        #[cfg(feature = "planted-bugs")]
        if self.hub.planted_bug() == crate::mux::PlantedBug::ReauthKeepsDeadline {
            return true;
        }
        self.timers.set(NodeTimer::TokenExpiry(tunnel), expires);
        true
    }

    /// The runtime refused the renewed token itself (`label`: the
    /// verifier's, `detail`: why): the tunnel is closed.
    pub fn tunnel_reauth_refused(
        &mut self,
        _now: Instant,
        tunnel: TunnelId,
        label: &'static str,
        detail: String,
    ) {
        if self.tunnels.get(&tunnel).is_some_and(|t| !t.closing) {
            self.refuse_reauth(tunnel, TunnelRefusal::ReauthInvalid(label), detail);
        }
    }

    /// The runtime found the tunnel's current token on the revocation list
    /// (a list it reloads, so the check stays there): the tunnel is closed,
    /// once.
    pub fn tunnel_revoked(&mut self, _now: Instant, tunnel: TunnelId) {
        if self.tunnels.get(&tunnel).is_some_and(|t| !t.closing) {
            self.refuse(
                tunnel,
                TunnelRefusal::Revoked,
                None,
                ErrorCode::Refused,
                "its token is revoked".into(),
                "revoked: the agent's token is revoked".into(),
            );
        }
    }

    fn refuse_reauth(&mut self, tunnel: TunnelId, refusal: TunnelRefusal, detail: String) {
        let reason = format!("renewed token refused: {}: {detail}", refusal.as_str());
        self.refuse(tunnel, refusal, None, ErrorCode::Refused, detail, reason);
    }

    fn refuse(
        &mut self,
        tunnel: TunnelId,
        refusal: TunnelRefusal,
        hello_agent: Option<&str>,
        code: ErrorCode,
        detail: String,
        reason: String,
    ) {
        let Some(t) = self.tunnels.get_mut(&tunnel) else {
            return;
        };
        t.closing = true;
        self.out.push_back(NodeOutput::Refused(Refused {
            tunnel,
            refusal,
            tenant: t.credential.tenant.clone(),
            agent_id: t.credential.agent_id.clone(),
            hello_agent: hello_agent.map(str::to_string),
            detail,
        }));
        self.out.push_back(NodeOutput::CloseTunnel {
            tunnel,
            code,
            reason,
        });
    }

    /// The tunnel's socket is gone: forget it, and let the hub release
    /// what it held.
    pub fn tunnel_closed(&mut self, now: Instant, tunnel: TunnelId) {
        self.tunnels.remove(&tunnel);
        self.timers.clear(NodeTimer::TokenExpiry(tunnel));
        self.hub.tunnel_closed(now, tunnel);
        self.absorb_hub();
    }

    /// Owner side of the mesh: the tunnel that serves a flow for
    /// `connector` of `agent_id` under `epoch` (see
    /// [`Hub::check_mesh_open`]), or the refusal. An admitted open counts on
    /// that tunnel from now on: [`HubNode::flow_ended`] when the bridged flow
    /// ends or the tunnel does not take it.
    pub fn mesh_open(
        &mut self,
        agent_id: &str,
        connector: &str,
        epoch: Epoch,
    ) -> Result<TunnelId, (ErrorCode, String)> {
        let tunnel = self.hub.check_mesh_open(agent_id, connector, epoch)?;
        self.hub.flow_started(tunnel);
        Ok(tunnel)
    }

    /// A flow counted on `tunnel` (a local route's, or a mesh open's) ended,
    /// or its open failed.
    pub fn flow_ended(&mut self, tunnel: TunnelId) {
        self.hub.flow_ended(tunnel);
        self.absorb_hub();
    }

    /// A listener accepted `client`'s connection: it takes one of the hub's
    /// `max_clients` client connections, or is refused
    /// ([`ClientRefusal::LimitExceeded`]; the runtime closes it). Decided at
    /// accept, before anything is read from the connection (a PROXY header,
    /// the listener's admission) and before it is routed, so a burst of
    /// accepts cannot run past the limit. An accepted client counts (a drain
    /// waits for it) until [`HubNode::client_closed`], however it ends:
    /// refused later at the listener, routed, or refused by the route. An
    /// id accepted already is taken again without counting twice.
    pub fn client_accepted(
        &mut self,
        _now: Instant,
        client: ClientId,
    ) -> Result<(), ClientRefusal> {
        if !self.clients.contains(&client) && self.clients.len() >= self.max_clients {
            return Err(ClientRefusal::LimitExceeded);
        }
        self.clients.insert(client);
        Ok(())
    }

    /// An accepted client ([`HubNode::client_accepted`]) is to be routed:
    /// it wants `connector` (qualified by the listener's tenant; `pin`: the
    /// agents the listener allows, if it names them). It is routed
    /// ([`HubOutput::Route`]) and still counted as a client flow until
    /// [`HubNode::client_closed`], routed or refused.
    ///
    /// A client not accepted first is a misuse by the caller (a debug
    /// assertion); a release build counts it from now on, limit or not.
    pub fn client_connected(
        &mut self,
        now: Instant,
        client: ClientId,
        connector: &str,
        pin: Option<&[String]>,
    ) {
        debug_assert!(
            self.clients.contains(&client),
            "client {client} connected without client_accepted"
        );
        self.clients.insert(client);
        self.hub
            .client_connected_pinned(now, client, connector, pin);
        self.absorb_hub();
    }

    /// The client's connection is gone (however it ended): its slot is
    /// free again. An unknown or closed client changes nothing, so a
    /// second call cannot free another's slot.
    pub fn client_closed(&mut self, _now: Instant, client: ClientId) {
        self.clients.remove(&client);
        self.absorb_hub();
    }

    /// Client connections open (see [`HubNode::client_accepted`]).
    pub fn client_flows(&self) -> usize {
        self.clients.len()
    }

    /// The most client connections taken at once.
    pub fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// Graceful drain (shutdown): the hub refuses new tunnels, reports
    /// `draining` on readiness and tells every agent to move (see
    /// [`Hub::drain`]). The listeners keep taking clients for `delay`, then
    /// close ([`NodeOutput::CloseListeners`]); the drain is over
    /// ([`NodeOutput::Drained`]) once nothing is left after that, or when
    /// `grace` (counted from now, the delay included) ends. A second call
    /// changes nothing.
    pub fn drain(&mut self, now: Instant, delay: Duration, grace: Duration) {
        if self.drain.is_some() {
            return;
        }
        self.hub.drain(now);
        self.drain = Some(Drain {
            listeners_closed: false,
            over: false,
        });
        // The delay is part of the grace period.
        self.timers
            .set(NodeTimer::ListenersClose, now + delay.min(grace));
        self.timers.set(NodeTimer::DrainGrace, now + grace);
        self.absorb_hub();
        self.drain_timers(now);
    }

    pub fn is_draining(&self) -> bool {
        self.hub.is_draining()
    }

    /// What a drain waits for now.
    pub fn drain_left(&self) -> DrainLeft {
        DrainLeft {
            client_flows: self.clients.len(),
            tunnel_flows: self.hub.open_tunnel_flows(),
            agents_to_move: self.hub.moves_pending(),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.hub.handle_timeout(now);
        self.absorb_hub();
        self.drain_timers(now);
        while let Some(timer) = self.timers.pop_expired(now) {
            match timer {
                NodeTimer::TokenExpiry(tunnel) => {
                    if self.tunnels.get(&tunnel).is_none_or(|t| t.closing) {
                        continue;
                    }
                    #[cfg(feature = "planted-bugs")]
                    if self.hub.planted_bug() == crate::mux::PlantedBug::IgnoreTokenExpiry {
                        continue;
                    }
                    self.refuse(
                        tunnel,
                        TunnelRefusal::TokenExpired,
                        None,
                        ErrorCode::Refused,
                        "its token expired".into(),
                        "token_expired: the agent's token expired".into(),
                    );
                }
                // Handled first, by `drain_timers`.
                NodeTimer::ListenersClose | NodeTimer::DrainGrace => {}
            }
        }
    }

    /// The drain's timers that are due: the listeners close, then the drain
    /// is over if nothing is left, or if the grace period ended.
    fn drain_timers(&mut self, now: Instant) {
        let Some(drain) = &mut self.drain else {
            return;
        };
        let due = |timers: &Timers<NodeTimer>, t| timers.get(t).is_some_and(|at| at <= now);
        if !drain.listeners_closed && due(&self.timers, NodeTimer::ListenersClose) {
            self.timers.clear(NodeTimer::ListenersClose);
            drain.listeners_closed = true;
            self.out.push_back(NodeOutput::CloseListeners);
        }
        self.check_drained();
        if due(&self.timers, NodeTimer::DrainGrace) {
            self.timers.clear(NodeTimer::DrainGrace);
            self.end_drain(false);
        }
    }

    /// Once the listeners are closed, the drain is over when nothing is
    /// left. Checked after every input (and in `poll_output`, which follows
    /// the inputs given to the [`Hub`] directly).
    fn check_drained(&mut self) {
        if self.drain.is_some_and(|d| d.listeners_closed && !d.over) && self.drain_left().is_empty()
        {
            self.end_drain(true);
        }
    }

    fn end_drain(&mut self, complete: bool) {
        let Some(drain) = &mut self.drain else {
            return;
        };
        if drain.over {
            return;
        }
        // The listeners closed first: their delay is never past the grace.
        debug_assert!(drain.listeners_closed);
        drain.over = true;
        self.timers.clear(NodeTimer::DrainGrace);
        let left = self.drain_left();
        self.out.push_back(NodeOutput::Drained { complete, left });
    }

    /// The next deadline: the hub's, a token's expiry, or the drain's.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let own = self.timers.next().map(|(at, _)| at);
        match (self.hub.poll_timeout(), own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn poll_output(&mut self) -> Option<NodeOutput> {
        self.absorb_hub();
        self.out.pop_front()
    }

    /// Move the hub's outputs into the node's queue, in their order, then
    /// see whether a drain is over.
    fn absorb_hub(&mut self) {
        while let Some(o) = self.hub.poll_output() {
            let o = match o {
                HubOutput::AcceptTunnel { tunnel, epoch } => {
                    NodeOutput::AcceptTunnel { tunnel, epoch }
                }
                HubOutput::CloseTunnel {
                    tunnel,
                    code,
                    reason,
                } => {
                    if let Some(t) = self.tunnels.get_mut(&tunnel) {
                        t.closing = true;
                    }
                    NodeOutput::CloseTunnel {
                        tunnel,
                        code,
                        reason,
                    }
                }
                HubOutput::DrainTunnel { tunnel } => NodeOutput::DrainTunnel { tunnel },
                HubOutput::Route {
                    client,
                    route: route @ Route::Local { .. },
                } => {
                    // A local flow counts on its tunnel from the routing
                    // decision on, so a draining hub never closes a tunnel
                    // a flow is being opened on; `flow_ended` when it ends
                    // or its open fails.
                    if let Route::Local { tunnel, .. } = &route {
                        self.hub.flow_started(*tunnel);
                    }
                    NodeOutput::Hub(HubOutput::Route { client, route })
                }
                other => NodeOutput::Hub(other),
            };
            self.out.push_back(o);
        }
        self.check_drained();
    }
}
