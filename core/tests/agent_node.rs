//! The agent as one state machine: how its control machine and its tunnel
//! links combine, including a hub that misbehaves on purpose.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nowconnect_core::agent::{AgentConfig, AttemptId, HubLinkState};
use nowconnect_core::agent_node::{AgentCommand, AgentNode, LinkRole, StaleConnection};
use nowconnect_core::mux::FlowEvent;
use nowconnect_core::tunnel::TunnelEvent;
use nowconnect_core::{Cid, Codec, Epoch, ErrorCode};

mod common;
use common::origin;

fn cfg() -> AgentConfig {
    let mut connectors = BTreeMap::new();
    connectors.insert("ldap".to_string(), "10.0.0.5:389".to_string());
    AgentConfig {
        ha_connections: 1,
        agent_id: "a1".into(),
        hubs: vec!["wss://hub-a".into(), "wss://hub-b".into()],
        connectors,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        hub_connect_timeout: Duration::from_secs(2),
        target_connect_timeout: Duration::from_secs(3),
        max_pending_dials: 4,
    }
}

fn commands(n: &mut AgentNode) -> Vec<AgentCommand> {
    std::iter::from_fn(|| n.poll_command()).collect()
}

fn established() -> TunnelEvent {
    TunnelEvent::Established {
        epoch: Epoch(1),
        codec: Codec::V2,
        replica_id: "hub-a".into(),
    }
}

fn open(cid: Cid, connector: &str) -> TunnelEvent {
    TunnelEvent::Open {
        cid,
        connector: connector.into(),
    }
}

/// The node's next commands are exactly: stop waiting for flow `cid`'s
/// target (of tunnel 1), then reset the flow with `code`.
fn cancelled_and_reset(n: &mut AgentNode, cid: Cid, code: ErrorCode) {
    let cmds = commands(n);
    assert!(
        matches!(
            &cmds[..],
            [
                AgentCommand::CancelTarget { attempt: AttemptId(1), cid: c1 },
                AgentCommand::ResetFlow { attempt: AttemptId(1), cid: c2, code: got, .. },
            ] if *c1 == cid && *c2 == cid && *got == code
        ),
        "expected the target of flow {cid} cancelled and the flow reset with {code}: {cmds:?}"
    );
}

/// A node whose first tunnel (attempt 1, to hub-a) is established.
fn connected(t0: Instant) -> AgentNode {
    let mut n = AgentNode::new(t0, cfg(), 7);
    assert_eq!(
        commands(&mut n),
        vec![AgentCommand::DialHub {
            slot: 0,
            attempt: AttemptId(1),
            url: "wss://hub-a".into()
        }]
    );
    n.hub_connected(t0, AttemptId(1))
        .expect("the attempt being dialed");
    n.tunnel_event(t0, AttemptId(1), &established());
    assert_eq!(
        n.state(),
        &HubLinkState::Connected {
            attempt: AttemptId(1)
        }
    );
    assert!(commands(&mut n).is_empty());
    n
}

#[test]
fn only_the_attempt_being_dialed_becomes_a_tunnel() {
    let t0 = origin();
    let mut n = AgentNode::new(t0, cfg(), 7);
    commands(&mut n);
    assert_eq!(
        n.hub_connected(t0, AttemptId(2)),
        Err(StaleConnection::NotDialing),
        "an attempt never dialed"
    );
    // Attempt 1 runs out of time: its dial is cancelled, and its socket,
    // should it come late, is refused.
    n.handle_timeout(t0 + Duration::from_secs(2));
    assert_eq!(
        commands(&mut n),
        vec![AgentCommand::CancelHubDial {
            attempt: AttemptId(1),
            reason: "no WELCOME within 2s".into()
        }]
    );
    assert_eq!(
        n.hub_connected(t0 + Duration::from_secs(2), AttemptId(1)),
        Err(StaleConnection::NotDialing)
    );
    assert_eq!(n.links().count(), 0);
    // After the backoff the next hub is dialed.
    n.handle_timeout(t0 + Duration::from_secs(4));
    assert_eq!(
        commands(&mut n),
        vec![AgentCommand::DialHub {
            slot: 0,
            attempt: AttemptId(2),
            url: "wss://hub-b".into()
        }]
    );
}

#[test]
fn a_tunnel_without_welcome_in_time_is_closed_and_ended() {
    let t0 = origin();
    let mut n = AgentNode::new(t0, cfg(), 7);
    commands(&mut n);
    n.hub_connected(t0, AttemptId(1)).unwrap();
    n.handle_timeout(t0 + Duration::from_secs(2));
    let cmds = commands(&mut n);
    assert!(
        matches!(
            &cmds[..],
            [
                AgentCommand::CloseTunnel {
                    attempt: AttemptId(1),
                    code: ErrorCode::IdleTimeout,
                    ..
                },
                AgentCommand::EndTunnel {
                    attempt: AttemptId(1),
                    code: ErrorCode::IdleTimeout,
                    ..
                },
            ]
        ),
        "{cmds:?}"
    );
    assert_eq!(n.links().count(), 0);
    // Its Closed event, arriving after, changes nothing.
    n.tunnel_event(
        t0 + Duration::from_secs(2),
        AttemptId(1),
        &TunnelEvent::Closed {
            code: ErrorCode::IdleTimeout,
            reason: "x".into(),
        },
    );
    assert!(commands(&mut n).is_empty());
    assert_eq!(n.state(), &HubLinkState::Backoff);
}

#[test]
fn a_drained_tunnel_keeps_its_flows_and_a_second_drain_ends_the_first() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "ldap"));
    assert!(matches!(
        &commands(&mut n)[..],
        [AgentCommand::DialTarget {
            attempt: AttemptId(1),
            cid: Cid(2),
            ..
        }]
    ));
    assert!(n.target_connected(t0, AttemptId(1), Cid(2)));
    n.tunnel_event(t0, AttemptId(1), &TunnelEvent::Drain);
    assert_eq!(n.role(AttemptId(1)), Some(LinkRole::Draining));
    assert_eq!(
        commands(&mut n),
        vec![AgentCommand::DialHub {
            slot: 0,
            attempt: AttemptId(2),
            url: "wss://hub-b".into()
        }],
        "the next hub at once, no backoff"
    );
    // The draining tunnel still takes flows.
    n.tunnel_event(t0, AttemptId(1), &open(Cid(4), "ldap"));
    assert!(matches!(
        &commands(&mut n)[..],
        [AgentCommand::DialTarget {
            attempt: AttemptId(1),
            cid: Cid(4),
            ..
        }]
    ));
    n.hub_connected(t0, AttemptId(2)).unwrap();
    n.tunnel_event(t0, AttemptId(2), &established());
    n.tunnel_event(t0, AttemptId(2), &TunnelEvent::Drain);
    let cmds = commands(&mut n);
    assert_eq!(
        cmds,
        vec![
            AgentCommand::CloseTunnel {
                attempt: AttemptId(1),
                code: ErrorCode::Shutdown,
                reason: "a newer hub is draining too".into()
            },
            AgentCommand::CancelTarget {
                attempt: AttemptId(1),
                cid: Cid(4)
            },
            AgentCommand::EndTunnel {
                attempt: AttemptId(1),
                code: ErrorCode::Shutdown,
                reason: "a newer hub is draining too".into()
            },
            AgentCommand::DialHub {
                slot: 0,
                attempt: AttemptId(3),
                url: "wss://hub-a".into()
            },
        ]
    );
    assert_eq!(
        n.links().collect::<Vec<_>>(),
        vec![(AttemptId(2), LinkRole::Draining)],
        "one draining tunnel at a time"
    );
    assert_eq!(n.pending_dials(), 0);
}

#[test]
fn a_flow_that_ends_while_its_target_is_dialed_cancels_the_dial() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "ldap"));
    commands(&mut n);
    assert_eq!((n.pending_dials(), n.waiting_flows()), (1, 1));
    n.tunnel_event(
        t0,
        AttemptId(1),
        &TunnelEvent::Flow(FlowEvent::Reset {
            cid: Cid(2),
            code: ErrorCode::ConnectionReset,
            reason: "client went away".into(),
        }),
    );
    assert_eq!(
        commands(&mut n),
        vec![AgentCommand::CancelTarget {
            attempt: AttemptId(1),
            cid: Cid(2)
        }]
    );
    assert_eq!((n.pending_dials(), n.waiting_flows()), (0, 0));
    assert!(
        !n.target_connected(t0, AttemptId(1), Cid(2)),
        "a target connected too late is dropped"
    );
}

#[test]
fn target_failures_and_timeouts_reset_the_flow_and_free_the_dial() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "ldap"));
    n.tunnel_event(t0, AttemptId(1), &open(Cid(4), "ldap"));
    commands(&mut n);
    n.target_failed(t0, AttemptId(1), Cid(2), "connection refused");
    cancelled_and_reset(&mut n, Cid(2), ErrorCode::TargetUnreachable);
    n.handle_timeout(t0 + Duration::from_secs(3));
    cancelled_and_reset(&mut n, Cid(4), ErrorCode::ConnectTimeout);
    assert_eq!((n.pending_dials(), n.waiting_flows()), (0, 0));
}

#[test]
fn a_lost_tunnel_takes_its_waiting_flows_and_the_agent_backs_off() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "ldap"));
    commands(&mut n);
    n.tunnel_event(
        t0,
        AttemptId(1),
        &TunnelEvent::Closed {
            code: ErrorCode::LinkLost,
            reason: "tunnel read error".into(),
        },
    );
    assert_eq!(
        commands(&mut n),
        vec![
            AgentCommand::CancelTarget {
                attempt: AttemptId(1),
                cid: Cid(2)
            },
            AgentCommand::EndTunnel {
                attempt: AttemptId(1),
                code: ErrorCode::LinkLost,
                reason: "tunnel read error".into()
            },
        ]
    );
    assert_eq!(n.state(), &HubLinkState::Backoff);
    assert_eq!(
        (n.pending_dials(), n.waiting_flows(), n.links().count()),
        (0, 0, 0)
    );
}

#[test]
fn a_lost_draining_tunnel_leaves_the_current_one_alone() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &TunnelEvent::Drain);
    n.hub_connected(t0, AttemptId(2)).unwrap();
    n.tunnel_event(t0, AttemptId(2), &established());
    commands(&mut n);
    n.tunnel_event(
        t0,
        AttemptId(1),
        &TunnelEvent::Closed {
            code: ErrorCode::Shutdown,
            reason: "hub shut down".into(),
        },
    );
    assert!(matches!(
        &commands(&mut n)[..],
        [AgentCommand::EndTunnel {
            attempt: AttemptId(1),
            ..
        }]
    ));
    assert_eq!(
        n.state(),
        &HubLinkState::Connected {
            attempt: AttemptId(2)
        }
    );
    assert_eq!(
        n.links().collect::<Vec<_>>(),
        vec![(AttemptId(2), LinkRole::Current)]
    );
}

#[test]
fn stopping_closes_every_tunnel_and_cancels_every_dial() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &TunnelEvent::Drain);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "ldap"));
    commands(&mut n);
    n.stop();
    let cmds = commands(&mut n);
    assert_eq!(
        cmds,
        vec![
            AgentCommand::CancelHubDial {
                attempt: AttemptId(2),
                reason: "agent shutting down".into()
            },
            AgentCommand::CloseTunnel {
                attempt: AttemptId(1),
                code: ErrorCode::Shutdown,
                reason: "agent shutting down".into()
            },
            AgentCommand::CancelTarget {
                attempt: AttemptId(1),
                cid: Cid(2)
            },
            AgentCommand::EndTunnel {
                attempt: AttemptId(1),
                code: ErrorCode::Shutdown,
                reason: "agent shutting down".into()
            },
        ]
    );
    assert_eq!(n.state(), &HubLinkState::Stopped);
    assert_eq!(n.poll_timeout(), None);
}

// A hub holding the agent's tunnel plays against it.

#[test]
fn a_hub_cannot_open_a_connector_the_agent_does_not_serve() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "payroll-db"));
    cancelled_and_reset(&mut n, Cid(2), ErrorCode::UnknownConnector);
    assert_eq!(n.counters().unknown_connector, 1);
    assert_eq!(n.waiting_flows(), 0);
}

#[test]
fn a_hub_cannot_run_more_target_dials_than_the_limit() {
    let t0 = origin();
    let mut n = connected(t0);
    for cid in (2..40).step_by(2).map(Cid) {
        n.tunnel_event(t0, AttemptId(1), &open(cid, "ldap"));
    }
    let cmds = commands(&mut n);
    let dials = cmds
        .iter()
        .filter(|c| matches!(c, AgentCommand::DialTarget { .. }))
        .count();
    let refused = cmds
        .iter()
        .filter(|c| {
            matches!(
                c,
                AgentCommand::ResetFlow {
                    code: ErrorCode::LimitExceeded,
                    ..
                }
            )
        })
        .count();
    assert_eq!((dials, refused), (4, 15));
    assert_eq!((n.pending_dials(), n.waiting_flows()), (4, 4));
}

#[test]
fn a_hub_opening_the_same_flow_twice_gets_it_reset() {
    let t0 = origin();
    let mut n = connected(t0);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "ldap"));
    commands(&mut n);
    n.tunnel_event(t0, AttemptId(1), &open(Cid(2), "ldap"));
    cancelled_and_reset(&mut n, Cid(2), ErrorCode::ProtocolError);
    assert_eq!((n.pending_dials(), n.waiting_flows()), (0, 0));
}

#[test]
fn events_of_a_tunnel_the_node_does_not_hold_change_nothing() {
    let t0 = origin();
    let mut n = connected(t0);
    for ev in [
        open(Cid(2), "ldap"),
        TunnelEvent::Drain,
        established(),
        TunnelEvent::Closed {
            code: ErrorCode::LinkLost,
            reason: "x".into(),
        },
    ] {
        n.tunnel_event(t0, AttemptId(9), &ev);
    }
    assert!(commands(&mut n).is_empty());
    assert_eq!(
        n.state(),
        &HubLinkState::Connected {
            attempt: AttemptId(1)
        }
    );
    assert_eq!(n.waiting_flows(), 0);
}

#[test]
fn a_drain_before_welcome_is_not_a_drain() {
    let t0 = origin();
    let mut n = AgentNode::new(t0, cfg(), 7);
    commands(&mut n);
    n.hub_connected(t0, AttemptId(1)).unwrap();
    n.tunnel_event(t0, AttemptId(1), &TunnelEvent::Drain);
    assert_eq!(n.role(AttemptId(1)), Some(LinkRole::Current));
    assert!(commands(&mut n).is_empty(), "no second hub dialed");
}
