//! The hub node's tunnel decisions: which HELLO is admitted and how a
//! refusal is labelled and counted, v1 tunnels and drains, the token's
//! deadline and its renewal, and forgetting a closed tunnel. Also the
//! adversary's view: a tunnel that says it is another agent, says HELLO
//! twice, or renews with another agent's token. And a graceful drain's
//! course: when the listeners close, and when the drain is over.

use std::time::{Duration, Instant};

use nowconnect_core::hub::{Hub, HubConfig, HubOutput, TunnelId};
use nowconnect_core::hub_node::{
    DrainLeft, HubNode, NodeOutput, RefusalCount, RefusalStage, Refused, TunnelRefusal,
};
use nowconnect_core::registry::{MemoryRegistry, RegistryOp};
use nowconnect_core::routing::{Mode, Route};
use nowconnect_core::tenant::AgentCredential;
use nowconnect_core::tunnel::TunnelEvent;
use nowconnect_core::{Codec, Epoch, ErrorCode};

mod common;
use common::origin;

const LIFETIME: Duration = Duration::from_secs(600);

struct Fixture {
    node: HubNode,
    reg: MemoryRegistry,
    /// Registry calls made, in order.
    calls: Vec<RegistryOp>,
}

impl Fixture {
    fn new() -> Self {
        Self::with(HubConfig::default())
    }

    /// A hub with a registry (`active`): a drain waits for its agents to
    /// be owned elsewhere.
    fn active() -> Self {
        Self::with(HubConfig {
            replica_id: "hub-a".into(),
            mode: Mode::Active,
            ..HubConfig::default()
        })
    }

    fn with(cfg: HubConfig) -> Self {
        Fixture {
            node: HubNode::new(Hub::new(origin(), cfg, 7), 100),
            reg: MemoryRegistry::new(),
            calls: Vec::new(),
        }
    }

    /// Every output, registry calls answered by the in-memory registry.
    fn outputs(&mut self, now: Instant) -> Vec<NodeOutput> {
        let mut outs = Vec::new();
        while let Some(o) = self.node.poll_output() {
            match o {
                NodeOutput::Hub(HubOutput::Registry { op, call }) => {
                    let r = self.reg.apply(now, &call);
                    self.calls.push(call);
                    self.node.hub_mut().registry_reply(now, op, r);
                }
                o => outs.push(o),
            }
        }
        outs
    }

    fn connect(&mut self, now: Instant, t: TunnelId, cred: AgentCredential, expires: Instant) {
        self.node.tunnel_connected(now, t, cred, expires);
    }

    fn hello(&mut self, now: Instant, t: TunnelId, agent: &str, connectors: &[&str]) {
        let ev = TunnelEvent::Hello {
            slot: 0,
            slots: 1,
            agent_id: agent.into(),
            connectors: connectors.iter().map(|c| c.to_string()).collect(),
        };
        self.node.tunnel_event(now, t, &ev);
    }

    /// Connect and HELLO as the credential says; the epoch it is accepted under.
    fn admitted(&mut self, now: Instant, t: TunnelId, cred: AgentCredential) -> Epoch {
        let agent = cred.agent_id.clone();
        let scope = cred.scope.clone().unwrap_or_default();
        self.connect(now, t, cred, now + LIFETIME);
        let announced: Vec<&str> = scope.iter().map(String::as_str).collect();
        self.hello(now, t, &agent, &announced);
        let outs = self.outputs(now);
        match outs.as_slice() {
            [NodeOutput::AcceptTunnel { tunnel, epoch }] if *tunnel == t => *epoch,
            other => panic!("expected an accept of {t}: {other:?}"),
        }
    }
}

fn cred(tenant: &str, agent: &str, scope: &[&str]) -> AgentCredential {
    AgentCredential {
        tenant: tenant.into(),
        agent_id: agent.into(),
        scope: Some(scope.iter().map(|s| s.to_string()).collect()),
    }
}

/// The one refusal and the close that follows it.
fn refused(outs: &[NodeOutput]) -> (&Refused, ErrorCode, &str) {
    match outs {
        [
            NodeOutput::Refused(r),
            NodeOutput::CloseTunnel {
                tunnel,
                code,
                reason,
            },
        ] if *tunnel == r.tunnel => (r, *code, reason.as_str()),
        other => panic!("expected a refusal and its close: {other:?}"),
    }
}

#[test]
fn an_admitted_hello_is_claimed_and_accepted_under_the_tenant_qualified_name() {
    let mut f = Fixture::new();
    let now = origin();
    let epoch = f.admitted(now, TunnelId(1), cred("acme", "a1", &["echo"]));
    assert!(epoch.0 > 0);
    let t = f.node.tunnel(TunnelId(1)).expect("known");
    assert_eq!(t.agent().as_deref(), Some("acme/a1"));
    assert_eq!(t.announced(), Some(&["echo".to_string()][..]));
    assert_eq!(
        f.node.hub().owned_tunnel("acme/a1"),
        Some((TunnelId(1), epoch))
    );
    assert!(f.calls.iter().any(|c| matches!(
        c,
        RegistryOp::Claim { agent_id, .. } if agent_id == "acme/a1"
    )));
}

#[test]
fn a_hello_for_another_agent_is_refused_as_agent_mismatch() {
    let mut f = Fixture::new();
    let now = origin();
    f.connect(
        now,
        TunnelId(1),
        cred("default", "a1", &["echo"]),
        now + LIFETIME,
    );
    f.hello(now, TunnelId(1), "a2", &["echo"]);
    let outs = f.outputs(now);
    let (r, code, reason) = refused(&outs);
    assert_eq!(r.refusal, TunnelRefusal::HelloAgentMismatch);
    assert_eq!(r.refusal.as_str(), "agent_mismatch");
    assert_eq!(r.refusal.stage(), RefusalStage::Hello);
    assert_eq!(
        r.refusal.count(),
        RefusalCount::AuthFailure("agent_mismatch")
    );
    assert_eq!(r.hello_agent.as_deref(), Some("a2"));
    assert_eq!(r.agent_id, "a1");
    assert_eq!(code, ErrorCode::Refused);
    assert!(
        reason.contains("`a2`") && reason.contains("`a1`"),
        "{reason}"
    );
    // Nothing claimed for either name.
    assert!(f.calls.is_empty(), "{:?}", f.calls);
    assert_eq!(f.node.hub().tunnel_count(), 0);
    assert_eq!(f.node.hub().counters.tunnels_refused, 1);
}

#[test]
fn a_hello_announcing_a_connector_outside_the_scope_is_refused_and_counted_as_a_security_event() {
    let mut f = Fixture::new();
    let now = origin();
    f.connect(
        now,
        TunnelId(1),
        cred("default", "a1", &["echo"]),
        now + LIFETIME,
    );
    f.hello(now, TunnelId(1), "a1", &["echo", "ldap"]);
    let outs = f.outputs(now);
    let (r, code, reason) = refused(&outs);
    assert_eq!(r.refusal, TunnelRefusal::HelloOutsideScope);
    assert_eq!(r.refusal.as_str(), "connector_outside_scope");
    assert_eq!(
        r.refusal.count(),
        RefusalCount::SecurityEvent("connector_outside_scope")
    );
    assert_eq!(code, ErrorCode::Refused);
    assert!(reason.contains("`ldap`"), "{reason}");
    assert!(f.calls.is_empty());
    assert!(f.node.tunnel(TunnelId(1)).unwrap().agent().is_none());
}

#[test]
fn an_unscoped_credential_may_announce_any_connector() {
    let mut f = Fixture::new();
    let now = origin();
    let unscoped = AgentCredential {
        tenant: "default".into(),
        agent_id: "a1".into(),
        scope: None,
    };
    f.connect(now, TunnelId(1), unscoped, now + LIFETIME);
    f.hello(now, TunnelId(1), "a1", &["anything"]);
    assert!(matches!(
        f.outputs(now).as_slice(),
        [NodeOutput::AcceptTunnel {
            tunnel: TunnelId(1),
            ..
        }]
    ));
}

#[test]
fn a_second_hello_on_a_tunnel_is_refused_as_a_protocol_error() {
    let mut f = Fixture::new();
    let now = origin();
    f.admitted(now, TunnelId(1), cred("default", "a1", &["echo"]));
    // The same agent again: refused, and the tunnel closed.
    f.hello(now, TunnelId(1), "a1", &["echo"]);
    let outs = f.outputs(now);
    let (r, code, _) = refused(&outs);
    assert_eq!(r.refusal, TunnelRefusal::HelloRepeated);
    assert_eq!(r.refusal.as_str(), "duplicate_hello");
    assert_eq!(
        r.refusal.count(),
        RefusalCount::SecurityEvent("tunnel_duplicate_hello")
    );
    assert_eq!(code, ErrorCode::ProtocolError);
    // Another agent's HELLO while the close is on the way changes nothing.
    f.hello(now, TunnelId(1), "a2", &["echo"]);
    assert!(f.outputs(now).is_empty());
    // The first HELLO's ownership is untouched: no second claim.
    let claims = f
        .calls
        .iter()
        .filter(|c| matches!(c, RegistryOp::Claim { .. }))
        .count();
    assert_eq!(claims, 1);
}

#[test]
fn a_hello_on_a_tunnel_never_connected_is_ignored() {
    let mut f = Fixture::new();
    let now = origin();
    f.hello(now, TunnelId(9), "a1", &["echo"]);
    assert!(f.outputs(now).is_empty());
    assert!(f.calls.is_empty());
}

#[test]
fn a_v1_tunnel_is_not_told_to_drain_and_a_v2_tunnel_is() {
    let mut f = Fixture::new();
    let now = origin();
    let e1 = f.admitted(now, TunnelId(1), cred("default", "old", &["echo"]));
    let e2 = f.admitted(now, TunnelId(2), cred("default", "new", &["echo"]));
    for (t, epoch, codec) in [(1, e1, Codec::V1), (2, e2, Codec::V2)] {
        f.node.tunnel_event(
            now,
            TunnelId(t),
            &TunnelEvent::Established {
                replica_id: String::new(),
                epoch,
                codec,
            },
        );
        assert_eq!(f.node.tunnel(TunnelId(t)).unwrap().codec(), Some(codec));
    }
    f.node
        .drain(now, Duration::from_secs(5), Duration::from_secs(30));
    let outs = f.outputs(now);
    assert_eq!(
        outs,
        vec![NodeOutput::DrainTunnel {
            tunnel: TunnelId(2)
        }]
    );
}

#[test]
fn an_expired_token_closes_its_tunnel_at_the_deadline_and_not_before() {
    let mut f = Fixture::new();
    let now = origin();
    let expires = now + Duration::from_secs(10);
    f.connect(now, TunnelId(1), cred("default", "a1", &["echo"]), expires);
    f.hello(now, TunnelId(1), "a1", &["echo"]);
    f.outputs(now);
    assert!(f.node.poll_timeout().is_some_and(|at| at <= expires));
    let mut at = now;
    while at < expires - Duration::from_millis(1) {
        at = f
            .node
            .poll_timeout()
            .unwrap()
            .min(expires - Duration::from_millis(1));
        f.node.handle_timeout(at);
        let outs = f.outputs(at);
        assert!(
            !outs
                .iter()
                .any(|o| matches!(o, NodeOutput::CloseTunnel { .. })),
            "closed early at {:?}: {outs:?}",
            at - now
        );
    }
    assert_eq!(f.node.poll_timeout(), Some(expires));
    f.node.handle_timeout(expires);
    let outs = f.outputs(expires);
    let (r, code, reason) = refused(&outs);
    assert_eq!(r.refusal, TunnelRefusal::TokenExpired);
    assert_eq!(r.refusal.as_str(), "token_expired");
    assert_eq!(r.refusal.stage(), RefusalStage::Expiry);
    assert_eq!(
        r.refusal.count(),
        RefusalCount::SecurityEvent("tunnel_token_expired")
    );
    assert_eq!(code, ErrorCode::Refused);
    assert_eq!(reason, "token_expired: the agent's token expired");
    // Once: the deadline is gone, and a renewal comes too late.
    assert!(f.node.poll_timeout().is_none_or(|at| at > expires));
    f.node.handle_timeout(expires + Duration::from_secs(1));
    assert!(
        !f.outputs(expires)
            .iter()
            .any(|o| matches!(o, NodeOutput::Refused(_)))
    );
    assert!(!f.node.tunnel_reauthed(
        expires,
        TunnelId(1),
        cred("default", "a1", &["echo"]),
        expires + LIFETIME
    ));
    assert!(f.outputs(expires).is_empty());
}

#[test]
fn a_renewed_token_moves_the_deadline() {
    let mut f = Fixture::new();
    let now = origin();
    let first = now + Duration::from_secs(10);
    f.connect(now, TunnelId(1), cred("default", "a1", &["echo"]), first);
    f.hello(now, TunnelId(1), "a1", &["echo"]);
    f.outputs(now);
    let later = now + Duration::from_secs(60);
    // A wider scope is fine: it still covers what the HELLO announced.
    let renewed = cred("default", "a1", &["echo", "ldap"]);
    assert!(f.node.tunnel_reauthed(
        now + Duration::from_secs(5),
        TunnelId(1),
        renewed.clone(),
        later
    ));
    assert!(f.outputs(now).is_empty());
    assert_eq!(f.node.tunnel(TunnelId(1)).unwrap().expires(), later);
    assert_eq!(f.node.tunnel(TunnelId(1)).unwrap().credential(), &renewed);
    f.node.handle_timeout(first);
    assert!(
        !f.outputs(first)
            .iter()
            .any(|o| matches!(o, NodeOutput::CloseTunnel { .. }))
    );
    f.node.handle_timeout(later);
    let outs = f.outputs(later);
    assert_eq!(refused(&outs).0.refusal, TunnelRefusal::TokenExpired);
}

#[test]
fn a_renewed_token_for_another_agent_or_tenant_or_a_narrower_scope_is_refused() {
    let cases = [
        (
            cred("default", "a2", &["echo"]),
            TunnelRefusal::ReauthAgentMismatch,
        ),
        (
            cred("acme", "a1", &["echo"]),
            TunnelRefusal::ReauthAgentMismatch,
        ),
        (
            cred("default", "a1", &["ldap"]),
            TunnelRefusal::ReauthOutsideScope,
        ),
    ];
    for (renewed, want) in cases {
        let mut f = Fixture::new();
        let now = origin();
        let expires = now + LIFETIME;
        f.connect(now, TunnelId(1), cred("default", "a1", &["echo"]), expires);
        f.hello(now, TunnelId(1), "a1", &["echo"]);
        f.outputs(now);
        assert!(
            !f.node
                .tunnel_reauthed(now, TunnelId(1), renewed.clone(), expires + LIFETIME)
        );
        let outs = f.outputs(now);
        let (r, code, reason) = refused(&outs);
        assert_eq!(r.refusal, want, "{renewed:?}");
        assert_eq!(r.refusal.stage(), RefusalStage::Reauth);
        assert_eq!(r.refusal.count(), RefusalCount::AuthFailure(want.as_str()));
        assert_eq!(code, ErrorCode::Refused);
        assert!(
            reason.starts_with(&format!("renewed token refused: {}: ", want.as_str())),
            "{reason}"
        );
        // The tunnel keeps its own token and deadline until it closes.
        let t = f.node.tunnel(TunnelId(1)).unwrap();
        assert_eq!(t.credential(), &cred("default", "a1", &["echo"]));
        assert_eq!(t.expires(), expires);
    }
}

#[test]
fn a_renewed_token_the_runtime_refused_closes_the_tunnel_with_its_label() {
    let mut f = Fixture::new();
    let now = origin();
    f.admitted(now, TunnelId(1), cred("default", "a1", &["echo"]));
    f.node
        .tunnel_reauth_refused(now, TunnelId(1), "revoked", "the token is revoked".into());
    let outs = f.outputs(now);
    let (r, code, reason) = refused(&outs);
    assert_eq!(r.refusal, TunnelRefusal::ReauthInvalid("revoked"));
    assert_eq!(r.refusal.as_str(), "revoked");
    assert_eq!(r.refusal.count(), RefusalCount::AuthFailure("revoked"));
    assert_eq!(r.detail, "the token is revoked");
    assert_eq!(code, ErrorCode::Refused);
    assert_eq!(
        reason,
        "renewed token refused: revoked: the token is revoked"
    );
}

#[test]
fn a_closed_tunnel_is_forgotten_and_its_agent_released() {
    let mut f = Fixture::new();
    let now = origin();
    let expires = now + Duration::from_secs(10);
    f.connect(now, TunnelId(1), cred("default", "a1", &["echo"]), expires);
    f.hello(now, TunnelId(1), "a1", &["echo"]);
    assert!(matches!(
        f.outputs(now).as_slice(),
        [NodeOutput::AcceptTunnel { .. }]
    ));
    f.node.tunnel_event(
        now,
        TunnelId(1),
        &TunnelEvent::Closed {
            code: ErrorCode::LinkLost,
            reason: "gone".into(),
        },
    );
    f.outputs(now);
    assert!(f.node.tunnel(TunnelId(1)).is_none());
    assert_eq!(f.node.tunnel_count(), 0);
    assert_eq!(f.node.hub().tunnel_count(), 0);
    assert_eq!(f.node.hub().owned_tunnel("a1"), None);
    assert!(
        f.calls
            .iter()
            .any(|c| matches!(c, RegistryOp::Release { agent_id, .. } if agent_id == "a1"))
    );
    // Its deadline went with it; inputs for it are ignored.
    f.node.handle_timeout(expires);
    assert!(f.outputs(expires).is_empty());
    assert!(!f.node.tunnel_reauthed(
        now,
        TunnelId(1),
        cred("default", "a1", &["echo"]),
        expires + LIFETIME
    ));
    f.node
        .tunnel_reauth_refused(now, TunnelId(1), "revoked", "x".into());
    f.hello(now, TunnelId(1), "a1", &["echo"]);
    assert!(f.outputs(now).is_empty());
}

#[test]
fn a_tunnel_refused_at_hello_cannot_say_hello_again_as_itself() {
    let mut f = Fixture::new();
    let now = origin();
    f.connect(
        now,
        TunnelId(1),
        cred("default", "a1", &["echo"]),
        now + LIFETIME,
    );
    f.hello(now, TunnelId(1), "a2", &["echo"]);
    let outs = f.outputs(now);
    assert_eq!(refused(&outs).0.refusal, TunnelRefusal::HelloAgentMismatch);
    // Its close is on the way: a second try, even a correct one, is not
    // admitted, and neither is a renewed token.
    f.hello(now, TunnelId(1), "a1", &["echo"]);
    assert!(!f.node.tunnel_reauthed(
        now,
        TunnelId(1),
        cred("default", "a1", &["echo"]),
        now + LIFETIME
    ));
    assert!(f.outputs(now).is_empty());
    assert!(f.calls.is_empty());
    assert!(f.node.tunnel(TunnelId(1)).unwrap().agent().is_none());
}

#[test]
fn a_revoked_token_closes_its_tunnel_once() {
    let mut f = Fixture::new();
    let now = origin();
    f.admitted(now, TunnelId(1), cred("default", "a1", &["echo"]));
    f.node.tunnel_revoked(now, TunnelId(1));
    let outs = f.outputs(now);
    let (r, code, reason) = refused(&outs);
    assert_eq!(r.refusal, TunnelRefusal::Revoked);
    assert_eq!(r.refusal.as_str(), "revoked");
    assert_eq!(r.refusal.stage(), RefusalStage::Revocation);
    assert_eq!(
        r.refusal.count(),
        RefusalCount::SecurityEvent("tunnel_revoked")
    );
    assert_eq!(code, ErrorCode::Refused);
    assert_eq!(reason, "revoked: the agent's token is revoked");
    // Its close is on the way: no second refusal, and no renewal saves it.
    f.node.tunnel_revoked(now, TunnelId(1));
    assert!(!f.node.tunnel_reauthed(
        now,
        TunnelId(1),
        cred("default", "a1", &["echo"]),
        now + LIFETIME
    ));
    assert!(f.outputs(now).is_empty());
}

#[test]
fn a_local_route_counts_on_its_tunnel_until_its_flow_ends() {
    let mut f = Fixture::new();
    let now = origin();
    f.admitted(now, TunnelId(1), cred("acme", "a1", &["echo"]));
    f.node.hub_mut().client_connected(now, 9, "acme/echo");
    let outs = f.outputs(now);
    assert!(
        matches!(
            outs.as_slice(),
            [NodeOutput::Hub(HubOutput::Route {
                client: 9,
                route: Route::Local {
                    tunnel: TunnelId(1),
                    ..
                }
            })]
        ),
        "{outs:?}"
    );
    // Counted from the routing decision on, before any flow is open.
    assert_eq!(f.node.hub().open_tunnel_flows(), 1);
    f.node.flow_ended(TunnelId(1));
    assert_eq!(f.node.hub().open_tunnel_flows(), 0);
}

#[test]
fn an_admitted_mesh_open_counts_on_the_tunnel_and_a_refused_one_does_not() {
    let mut f = Fixture::new();
    let now = origin();
    let epoch = f.admitted(now, TunnelId(1), cred("acme", "a1", &["echo"]));
    let stale = f
        .node
        .mesh_open("acme/a1", "acme/echo", Epoch(epoch.0 - 1))
        .unwrap_err();
    assert_eq!(stale.0, ErrorCode::StaleEpoch);
    let other = f.node.mesh_open("acme/a1", "acme/ldap", epoch).unwrap_err();
    assert_eq!(other.0, ErrorCode::Refused, "{}", other.1);
    assert_eq!(f.node.hub().open_tunnel_flows(), 0);
    assert_eq!(
        f.node.mesh_open("acme/a1", "acme/echo", epoch),
        Ok(TunnelId(1))
    );
    assert_eq!(f.node.hub().open_tunnel_flows(), 1);
    // The agent's tunnel did not take it (or the bridged flow ended).
    f.node.flow_ended(TunnelId(1));
    assert_eq!(f.node.hub().open_tunnel_flows(), 0);
}

const DELAY: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(30);

/// The outputs of a drain's course (listeners, the end), in order.
fn drain_steps(outs: &[NodeOutput]) -> Vec<NodeOutput> {
    outs.iter()
        .filter(|o| matches!(o, NodeOutput::CloseListeners | NodeOutput::Drained { .. }))
        .cloned()
        .collect()
}

fn drained(complete: bool, left: DrainLeft) -> NodeOutput {
    NodeOutput::Drained { complete, left }
}

/// A v2 agent admitted on tunnel `t` (it can be told to move).
fn admitted_v2(f: &mut Fixture, now: Instant, t: TunnelId, agent: &str) -> Epoch {
    let epoch = f.admitted(now, t, cred("acme", agent, &["echo"]));
    f.node.tunnel_event(
        now,
        t,
        &TunnelEvent::Established {
            replica_id: String::new(),
            epoch,
            codec: Codec::V2,
        },
    );
    assert!(f.outputs(now).is_empty());
    epoch
}

/// Jump the clock from one wakeup of the node to the next up to `until`:
/// the drain's steps, each with the time it came.
fn steps_until(f: &mut Fixture, until: Instant) -> Vec<(Instant, NodeOutput)> {
    let mut steps = Vec::new();
    while let Some(at) = f.node.poll_timeout().filter(|at| *at <= until) {
        f.node.handle_timeout(at);
        steps.extend(drain_steps(&f.outputs(at)).into_iter().map(|o| (at, o)));
    }
    steps
}

#[test]
fn the_listeners_close_after_the_delay_and_not_before() {
    let mut f = Fixture::new();
    let now = origin();
    f.node.drain(now, DELAY, GRACE);
    assert!(f.node.is_draining());
    assert!(drain_steps(&f.outputs(now)).is_empty());
    // Nothing was open: the drain is over as soon as the listeners close.
    assert_eq!(
        steps_until(&mut f, now + GRACE),
        vec![
            (now + DELAY, NodeOutput::CloseListeners),
            (now + DELAY, drained(true, DrainLeft::default()))
        ]
    );
}

#[test]
fn a_drain_is_over_once_the_last_flow_ended_and_every_agent_moved() {
    let mut f = Fixture::active();
    let now = origin();
    admitted_v2(&mut f, now, TunnelId(1), "a1");
    f.node.client_accepted(now, 9).unwrap();
    f.node.client_connected(now, 9, "acme/echo", None);
    let outs = f.outputs(now);
    assert!(
        matches!(
            outs.as_slice(),
            [NodeOutput::Hub(HubOutput::Route {
                client: 9,
                route: Route::Local {
                    tunnel: TunnelId(1),
                    ..
                }
            })]
        ),
        "{outs:?}"
    );
    f.node.drain(now, DELAY, GRACE);
    assert_eq!(
        f.outputs(now),
        vec![NodeOutput::DrainTunnel {
            tunnel: TunnelId(1)
        }]
    );
    assert_eq!(
        f.node.drain_left(),
        DrainLeft {
            client_flows: 1,
            tunnel_flows: 1,
            agents_to_move: 1,
        }
    );
    let closed = now + DELAY;
    f.node.handle_timeout(closed);
    assert_eq!(
        drain_steps(&f.outputs(closed)),
        vec![NodeOutput::CloseListeners]
    );
    // The client's flow ends (its tunnel count first, then the client).
    f.node.flow_ended(TunnelId(1));
    assert!(drain_steps(&f.outputs(closed)).is_empty());
    f.node.client_closed(closed, 9);
    assert!(
        drain_steps(&f.outputs(closed)).is_empty(),
        "over while the agent still has to move"
    );
    assert_eq!(
        f.node.drain_left(),
        DrainLeft {
            client_flows: 0,
            tunnel_flows: 0,
            agents_to_move: 1,
        }
    );
    // Another hub claims the agent; the next renewal finds out.
    f.reg
        .apply(
            closed,
            &RegistryOp::Claim {
                slot: 0,
                agent_id: "acme/a1".into(),
                replica_id: "hub-b".into(),
                lease: Duration::from_secs(15),
            },
        )
        .unwrap();
    let moved = closed + Duration::from_millis(100);
    f.node.handle_timeout(moved);
    let outs = f.outputs(moved);
    assert_eq!(
        drain_steps(&outs),
        vec![drained(true, DrainLeft::default())],
        "{outs:?}"
    );
    // Over once: nothing more, however long it waits or what still ends.
    f.node.client_closed(moved, 9);
    f.node.flow_ended(TunnelId(1));
    f.node.handle_timeout(now + GRACE);
    assert!(drain_steps(&f.outputs(now + GRACE)).is_empty());
}

#[test]
fn the_grace_period_ends_a_drain_with_what_is_left() {
    let mut f = Fixture::new();
    let now = origin();
    admitted_v2(&mut f, now, TunnelId(1), "a1");
    f.node.client_accepted(now, 9).unwrap();
    f.node.client_connected(now, 9, "acme/echo", None);
    f.outputs(now);
    // No delay: the listeners close at once.
    f.node.drain(now, Duration::ZERO, GRACE);
    assert_eq!(
        f.outputs(now),
        vec![
            NodeOutput::DrainTunnel {
                tunnel: TunnelId(1)
            },
            NodeOutput::CloseListeners
        ]
    );
    let left = DrainLeft {
        client_flows: 1,
        tunnel_flows: 1,
        agents_to_move: 0,
    };
    assert_eq!(
        steps_until(&mut f, now + GRACE + DELAY),
        vec![(now + GRACE, drained(false, left))]
    );
    // What was left ends later: the drain was over already.
    f.node.flow_ended(TunnelId(1));
    f.node.client_closed(now + GRACE, 9);
    assert!(drain_steps(&f.outputs(now + GRACE)).is_empty());
}

#[test]
fn a_client_that_arrives_during_the_delay_keeps_the_drain_open() {
    let mut f = Fixture::new();
    let now = origin();
    f.node.drain(now, DELAY, GRACE);
    f.outputs(now);
    let during = now + Duration::from_secs(1);
    // Refused (no agent), but counted until its connection is gone.
    f.node.client_accepted(during, 4).unwrap();
    f.node.client_connected(during, 4, "acme/echo", None);
    f.outputs(during);
    assert_eq!(f.node.client_flows(), 1);
    f.node.handle_timeout(now + DELAY);
    assert_eq!(
        drain_steps(&f.outputs(now + DELAY)),
        vec![NodeOutput::CloseListeners]
    );
    let gone = now + DELAY + Duration::from_secs(1);
    f.node.client_closed(gone, 4);
    assert_eq!(
        drain_steps(&f.outputs(gone)),
        vec![drained(true, DrainLeft::default())]
    );
}

#[test]
fn a_second_drain_changes_nothing_and_the_end_is_reported_once() {
    let mut f = Fixture::new();
    let now = origin();
    f.node.drain(now, Duration::ZERO, GRACE);
    // Called again (a second SIGTERM), later and with other settings.
    let again = now + Duration::from_secs(1);
    f.node.drain(again, Duration::ZERO, Duration::ZERO);
    f.node.handle_timeout(now + GRACE);
    let mut steps = drain_steps(&f.outputs(now));
    steps.extend(drain_steps(&f.outputs(now + GRACE)));
    assert_eq!(
        steps,
        vec![
            NodeOutput::CloseListeners,
            drained(true, DrainLeft::default())
        ]
    );
    // No drain deadline is left to wake for.
    assert!(f.node.poll_timeout().is_none_or(|at| at > now + GRACE));
}

#[test]
fn a_closed_client_is_forgotten_once_and_an_unknown_one_is_ignored() {
    let mut f = Fixture::new();
    let now = origin();
    f.node.client_accepted(now, 1).unwrap();
    f.node.client_connected(now, 1, "acme/echo", None);
    f.node.client_accepted(now, 2).unwrap();
    f.node.client_connected(now, 2, "acme/echo", None);
    f.outputs(now);
    assert_eq!(f.node.client_flows(), 2);
    f.node.client_closed(now, 1);
    f.node.client_closed(now, 1);
    f.node.client_closed(now, 77);
    assert_eq!(f.node.client_flows(), 1);
}
