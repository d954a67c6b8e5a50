//! Multi-homed agents: one agent, several tunnels at once, each on its own
//! hub and each claimed and fenced on its own (a slot). The registry, the
//! hub and the agent node, and what a holder of one agent token can and
//! cannot do with slots.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nowconnect_core::Codec;
use nowconnect_core::agent::{AgentConfig, AttemptId};
use nowconnect_core::agent_node::{AgentCommand, AgentNode};
use nowconnect_core::codec::decode;
use nowconnect_core::frame::{Frame, Limits};
use nowconnect_core::hub::{Hub, HubConfig, HubOutput, TunnelId};
use nowconnect_core::registry::{MemoryRegistry, Owner, RegistryOp, RegistryReply};
use nowconnect_core::routing::{Mode, Route};
use nowconnect_core::tunnel::TunnelEvent;
use nowconnect_core::{Epoch, ErrorCode, WsMessage};

mod common;
use common::origin;

const LEASE: Duration = Duration::from_secs(15);

fn hub(replica: &str) -> Hub {
    Hub::new(
        origin(),
        HubConfig {
            replica_id: replica.into(),
            mode: Mode::Active,
            ..HubConfig::default()
        },
        7,
    )
}

/// Carry out the hub's registry calls against `reg` (their replies may
/// call again) and return everything else it said.
fn run(h: &mut Hub, reg: &mut MemoryRegistry, now: Instant) -> Vec<HubOutput> {
    let mut out = Vec::new();
    while let Some(o) = h.poll_output() {
        match o {
            HubOutput::Registry { op, call } => {
                let reply = reg.apply(now, &call);
                h.registry_reply(now, op, reply);
            }
            HubOutput::Peers(_) | HubOutput::Announced => {}
            other => out.push(other),
        }
    }
    out
}

fn accepted(out: &[HubOutput], tunnel: TunnelId) -> Epoch {
    out.iter()
        .find_map(|o| match o {
            HubOutput::AcceptTunnel { tunnel: t, epoch } if *t == tunnel => Some(*epoch),
            _ => None,
        })
        .unwrap_or_else(|| panic!("tunnel {tunnel} not accepted: {out:?}"))
}

fn ldap() -> Vec<String> {
    vec!["ldap".into()]
}

#[test]
fn two_slots_of_one_agent_are_owned_by_two_hubs_at_once_and_each_renews() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let (mut a, mut b) = (hub("hub-a"), hub("hub-b"));
    a.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 0, 2);
    let ea = accepted(&run(&mut a, &mut reg, now), TunnelId(1));
    b.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 1, 2);
    let eb = accepted(&run(&mut b, &mut reg, now), TunnelId(1));
    assert!(eb > ea, "epochs are the agent's, shared by its slots");

    // The registry names both, each with its slot.
    let listed = reg
        .apply(
            now,
            &RegistryOp::ListAgents {
                connector: "ldap".into(),
            },
        )
        .unwrap();
    let RegistryReply::Agents(agents) = listed else {
        panic!("{listed:?}")
    };
    assert_eq!(
        agents[0].owners,
        vec![
            Owner {
                replica_id: "hub-a".into(),
                epoch: ea,
                slot: 0
            },
            Owner {
                replica_id: "hub-b".into(),
                epoch: eb,
                slot: 1
            },
        ]
    );

    // Renewals keep both: hub-b's claim did not take hub-a's tunnel.
    for i in 1..=4 {
        let t = now + Duration::from_secs(5 * i);
        a.handle_timeout(t);
        b.handle_timeout(t);
        let (oa, ob) = (run(&mut a, &mut reg, t), run(&mut b, &mut reg, t));
        assert!(
            !oa.iter()
                .chain(&ob)
                .any(|o| matches!(o, HubOutput::CloseTunnel { .. })),
            "a renewal closed a slot: {oa:?} {ob:?}"
        );
    }
    assert_eq!(a.owned_tunnels("agent-1"), vec![(TunnelId(1), ea)]);
    assert_eq!(b.owned_tunnels("agent-1"), vec![(TunnelId(1), eb)]);

    // Each hub serves its own clients on its own tunnel: no mesh.
    a.client_connected(now, 1, "ldap");
    b.client_connected(now, 1, "ldap");
    for h in [&mut a, &mut b] {
        assert!(matches!(
            h.poll_output(),
            Some(HubOutput::Route {
                route: Route::Local { .. },
                ..
            })
        ));
    }
}

#[test]
fn a_mesh_open_reaches_exactly_the_tunnel_its_epoch_names() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let (mut a, mut b) = (hub("hub-a"), hub("hub-b"));
    a.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 0, 2);
    let e1 = accepted(&run(&mut a, &mut reg, now), TunnelId(1));
    b.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 1, 2);
    let e2 = accepted(&run(&mut b, &mut reg, now), TunnelId(1));
    assert_eq!(a.check_mesh_open("agent-1", "ldap", e1), Ok(TunnelId(1)));
    assert_eq!(b.check_mesh_open("agent-1", "ldap", e2), Ok(TunnelId(1)));
    // An open naming the other hub's slot is not served by this one's
    // tunnel, nor is an epoch no tunnel holds (a stale one).
    for (h, wrong) in [(&mut a, e2), (&mut b, e1)] {
        assert!(matches!(
            h.check_mesh_open("agent-1", "ldap", wrong),
            Err((ErrorCode::StaleEpoch, _))
        ));
    }
    assert!(matches!(
        a.check_mesh_open("agent-1", "ldap", Epoch(e1.0.min(e2.0) - 1)),
        Err((ErrorCode::StaleEpoch, _))
    ));
    // The slot reconnecting to its hub: the new epoch is served, the old
    // one is fenced.
    a.tunnel_closed(now, TunnelId(1));
    run(&mut a, &mut reg, now);
    a.tunnel_hello_slot(now, TunnelId(2), "agent-1", &ldap(), 0, 2);
    let e3 = accepted(&run(&mut a, &mut reg, now), TunnelId(2));
    assert_eq!(a.check_mesh_open("agent-1", "ldap", e3), Ok(TunnelId(2)));
    assert!(matches!(
        a.check_mesh_open("agent-1", "ldap", e1),
        Err((ErrorCode::StaleEpoch, _))
    ));
}

#[test]
fn a_slot_reconnecting_elsewhere_fences_only_that_slot() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let (mut a, mut b, mut c) = (hub("hub-a"), hub("hub-b"), hub("hub-c"));
    a.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 0, 2);
    let ea = accepted(&run(&mut a, &mut reg, now), TunnelId(1));
    b.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 1, 2);
    accepted(&run(&mut b, &mut reg, now), TunnelId(1));
    // Slot 1 comes back on hub-c (its tunnel to hub-b is half-open, say).
    c.tunnel_hello_slot(now, TunnelId(5), "agent-1", &ldap(), 1, 2);
    let ec = accepted(&run(&mut c, &mut reg, now), TunnelId(5));

    let t = now + Duration::from_secs(5);
    for h in [&mut a, &mut b, &mut c] {
        h.handle_timeout(t);
    }
    let (oa, ob, oc) = (
        run(&mut a, &mut reg, t),
        run(&mut b, &mut reg, t),
        run(&mut c, &mut reg, t),
    );
    // hub-b's slot 1 is fenced ...
    assert!(
        ob.iter().any(|o| matches!(
            o,
            HubOutput::CloseTunnel {
                tunnel: TunnelId(1),
                code: ErrorCode::StaleEpoch,
                ..
            }
        )),
        "{ob:?}"
    );
    assert!(b.owned_tunnels("agent-1").is_empty());
    // ... and slot 0 on hub-a, and the new slot 1 on hub-c, are untouched.
    assert!(oa.is_empty() && oc.is_empty(), "{oa:?} {oc:?}");
    assert_eq!(a.owned_tunnels("agent-1"), vec![(TunnelId(1), ea)]);
    assert_eq!(c.owned_tunnels("agent-1"), vec![(TunnelId(5), ec)]);
}

#[test]
fn the_agents_connectors_stay_listed_until_its_last_slot_is_released() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let claim = |reg: &mut MemoryRegistry, slot, replica: &str| match reg
        .apply(
            now,
            &RegistryOp::Claim {
                agent_id: "agent-1".into(),
                slot,
                replica_id: replica.into(),
                lease: LEASE,
            },
        )
        .unwrap()
    {
        RegistryReply::Claimed(e) => e,
        other => panic!("{other:?}"),
    };
    let e0 = claim(&mut reg, 0, "hub-a");
    let e1 = claim(&mut reg, 1, "hub-b");
    reg.apply(
        now,
        &RegistryOp::AddConnectors {
            agent_id: "agent-1".into(),
            connectors: ldap(),
            lease: LEASE,
        },
    )
    .unwrap();
    let listed = |reg: &mut MemoryRegistry| match reg
        .apply(
            now,
            &RegistryOp::ListAgents {
                connector: "ldap".into(),
            },
        )
        .unwrap()
    {
        RegistryReply::Agents(a) => a,
        other => panic!("{other:?}"),
    };
    let release = |reg: &mut MemoryRegistry, slot, replica: &str, epoch| {
        reg.apply(
            now,
            &RegistryOp::Release {
                agent_id: "agent-1".into(),
                slot,
                replica_id: replica.into(),
                epoch,
            },
        )
        .unwrap();
    };
    // A release naming the wrong slot's epoch changes nothing.
    release(&mut reg, 0, "hub-a", e1);
    assert_eq!(listed(&mut reg)[0].owners.len(), 2);
    release(&mut reg, 0, "hub-a", e0);
    let after = listed(&mut reg);
    assert_eq!(after.len(), 1, "slot 1 still serves the connector");
    assert_eq!(after[0].owners.len(), 1);
    assert_eq!(after[0].owners[0].slot, 1);
    release(&mut reg, 1, "hub-b", e1);
    assert!(listed(&mut reg).is_empty());
}

/// A token holder may say any slot numbers in its HELLO: the codec refuses
/// counts above the maximum and slots outside the count, and the hub (for
/// a caller that skips the codec) refuses them too, so one agent token
/// never claims more than `MAX_SLOTS` tunnels' worth of a hub.
#[test]
fn slots_outside_the_bounds_are_refused_by_the_codec_and_the_hub() {
    let limits = Limits::default();
    for (slot, slots) in [(0u8, 0u8), (0, 5), (2, 2), (200, 255)] {
        let json = format!(
            r#"{{"type":"HELLO","agent_id":"a1","connectors":["ldap"],"slot":{slot},"slots":{slots}}}"#
        );
        let err = decode(&WsMessage::Text(json), &limits).unwrap_err();
        assert!(
            err.to_string().contains("slot"),
            "slot {slot} of {slots}: {err}"
        );
    }
    let ok = decode(
        &WsMessage::Text(
            r#"{"type":"HELLO","agent_id":"a1","connectors":["ldap"],"slot":3,"slots":4}"#.into(),
        ),
        &limits,
    )
    .unwrap();
    assert!(matches!(
        ok,
        Frame::Hello {
            slot: 3,
            slots: 4,
            ..
        }
    ));
    // An agent that predates slots says nothing: slot 0 of 1.
    let old = decode(
        &WsMessage::Text(r#"{"type":"HELLO","agent_id":"a1","connectors":["ldap"]}"#.into()),
        &limits,
    )
    .unwrap();
    assert!(matches!(
        old,
        Frame::Hello {
            slot: 0,
            slots: 1,
            ..
        }
    ));

    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut a = hub("hub-a");
    a.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 9, 200);
    let out = run(&mut a, &mut reg, now);
    assert!(
        matches!(
            &out[..],
            [HubOutput::CloseTunnel {
                tunnel: TunnelId(1),
                code: ErrorCode::ProtocolError,
                ..
            }]
        ),
        "{out:?}"
    );
    assert_eq!(a.tunnel_count(), 0);
}

#[test]
fn a_draining_hub_hands_a_multi_homed_agent_over_without_waiting_for_it_to_move() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let (mut a, mut b) = (hub("hub-a"), hub("hub-b"));
    a.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 0, 2);
    accepted(&run(&mut a, &mut reg, now), TunnelId(1));
    b.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 1, 2);
    accepted(&run(&mut b, &mut reg, now), TunnelId(1));
    a.flow_started(TunnelId(1));

    a.drain(now);
    let out = run(&mut a, &mut reg, now);
    assert!(out.contains(&HubOutput::DrainTunnel {
        tunnel: TunnelId(1)
    }));
    // At the first drain check hub-a sees hub-b holding the agent's other
    // slot: its own tunnel takes no new flows and its slot is given back.
    let t = now + Duration::from_millis(100);
    a.handle_timeout(t);
    run(&mut a, &mut reg, t);
    assert_eq!(a.moves_pending(), 0);
    assert!(a.owned_tunnels("agent-1").is_empty());
    match reg
        .apply(
            t,
            &RegistryOp::GetOwners {
                agent_id: "agent-1".into(),
            },
        )
        .unwrap()
    {
        RegistryReply::Owners(o) => assert_eq!(
            o.iter().map(|o| o.replica_id.as_str()).collect::<Vec<_>>(),
            ["hub-b"]
        ),
        other => panic!("{other:?}"),
    }
    // A client still reaching hub-a goes to the registry (and on to
    // hub-b over the mesh), not to the handed-over tunnel.
    a.client_connected(t, 7, "ldap");
    assert!(
        !std::iter::from_fn(|| a.poll_output()).any(|o| matches!(
            o,
            HubOutput::Route {
                route: Route::Local { .. },
                ..
            }
        )),
        "a handed-over tunnel took a new flow"
    );
    // Its last flow ends: it closes.
    a.flow_ended(TunnelId(1));
    let out = run(&mut a, &mut reg, t);
    assert!(
        out.iter().any(|o| matches!(
            o,
            HubOutput::CloseTunnel {
                tunnel: TunnelId(1),
                code: ErrorCode::Shutdown,
                ..
            }
        )),
        "{out:?}"
    );
}

// ---- the agent node ----

fn agent_cfg(hubs: &[&str], ha: u8) -> AgentConfig {
    let mut connectors = BTreeMap::new();
    connectors.insert("ldap".to_string(), "10.0.0.5:389".to_string());
    AgentConfig {
        agent_id: "a1".into(),
        hubs: hubs.iter().map(|h| h.to_string()).collect(),
        connectors,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        hub_connect_timeout: Duration::from_secs(5),
        target_connect_timeout: Duration::from_secs(3),
        max_pending_dials: 4,
        ha_connections: ha,
    }
}

fn dials(n: &mut AgentNode) -> Vec<(AttemptId, String, u8)> {
    std::iter::from_fn(|| n.poll_command())
        .filter_map(|c| match c {
            AgentCommand::DialHub { attempt, url, slot } => Some((attempt, url, slot)),
            _ => None,
        })
        .collect()
}

fn welcome(replica: &str) -> TunnelEvent {
    TunnelEvent::Established {
        epoch: Epoch(1),
        codec: Codec::V2,
        replica_id: replica.into(),
    }
}

#[test]
fn slots_start_on_distinct_hubs_of_the_list() {
    let mut n = AgentNode::new(
        origin(),
        agent_cfg(&["wss://a", "wss://b", "wss://c"], 2),
        1,
    );
    let d = dials(&mut n);
    assert_eq!(
        d,
        vec![
            (AttemptId(1), "wss://a".into(), 0),
            (AttemptId(2), "wss://b".into(), 1)
        ]
    );
    assert_eq!(n.slot_of(AttemptId(1)), 0);
    assert_eq!(n.slot_of(AttemptId(2)), 1);
}

#[test]
fn behind_one_balanced_url_a_second_tunnel_on_the_same_hub_is_closed_and_redialed() {
    let t0 = origin();
    let mut n = AgentNode::new(t0, agent_cfg(&["wss://lb"], 2), 1);
    assert_eq!(dials(&mut n).len(), 2);
    n.hub_connected(t0, AttemptId(1)).unwrap();
    n.hub_connected(t0, AttemptId(2)).unwrap();
    n.tunnel_event(t0, AttemptId(1), &welcome("hub-a"));
    assert_eq!(n.hub_of(AttemptId(1)), Some("hub-a"));
    // The balancer sent slot 1 to hub-a as well.
    n.tunnel_event(t0, AttemptId(2), &welcome("hub-a"));
    let cmds: Vec<AgentCommand> = std::iter::from_fn(|| n.poll_command()).collect();
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            AgentCommand::CloseTunnel { attempt: AttemptId(2), reason, .. } if reason.contains("hub-a")
        )),
        "{cmds:?}"
    );
    assert_eq!(n.counters().duplicate_hubs, 1);
    assert_eq!(n.connected_slots(), 1);
    // Its slot dials again after a backoff (not at once: no herd).
    assert!(dials(&mut n).is_empty());
    let later = t0 + Duration::from_secs(1);
    n.handle_timeout(later);
    let again = dials(&mut n);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].2, 1);
    // This time it lands on hub-b: both slots held, on distinct hubs.
    let (attempt, _, _) = again[0].clone();
    n.hub_connected(later, attempt).unwrap();
    n.tunnel_event(later, attempt, &welcome("hub-b"));
    assert_eq!(n.connected_slots(), 2);
}

#[test]
fn a_hub_that_predates_slots_keeps_the_agent_at_one_tunnel() {
    let t0 = origin();
    let mut n = AgentNode::new(t0, agent_cfg(&["wss://a", "wss://b"], 2), 1);
    dials(&mut n);
    n.hub_connected(t0, AttemptId(1)).unwrap();
    n.hub_connected(t0, AttemptId(2)).unwrap();
    n.tunnel_event(t0, AttemptId(1), &welcome(""));
    // Slot 1's hub names no replica: it took the tunnel as slot 0.
    n.tunnel_event(t0, AttemptId(2), &welcome(""));
    let cmds: Vec<AgentCommand> = std::iter::from_fn(|| n.poll_command()).collect();
    assert!(
        cmds.iter().any(|c| matches!(
            c,
            AgentCommand::CloseTunnel { attempt: AttemptId(2), reason, .. } if reason.contains("one tunnel")
        )),
        "{cmds:?}"
    );
    // Slot 0 stays; slot 1 never dials again.
    for s in 1..30 {
        n.handle_timeout(t0 + Duration::from_secs(s));
        assert!(dials(&mut n).is_empty());
    }
    assert_eq!(n.connected_slots(), 1);
}

#[test]
fn a_slot_never_dials_a_listed_hub_another_slot_holds() {
    let t0 = origin();
    let mut n = AgentNode::new(t0, agent_cfg(&["wss://a", "wss://b"], 2), 1);
    dials(&mut n);
    n.hub_connected(t0, AttemptId(1)).unwrap();
    n.hub_connected(t0, AttemptId(2)).unwrap();
    n.tunnel_event(t0, AttemptId(1), &welcome("hub-a"));
    n.tunnel_event(t0, AttemptId(2), &welcome("hub-b"));
    assert_eq!(n.connected_slots(), 2);
    // hub-a drains: slot 0 dials on at once, but not hub-b, which carries
    // slot 1 (it would only be closed as a duplicate, after a claim that
    // bumps the agent's epoch under the other hubs' feet).
    n.tunnel_event(t0, AttemptId(1), &TunnelEvent::Drain);
    let d = dials(&mut n);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].1.as_str(), d[0].2), ("wss://a", 0), "{d:?}");
    // The draining hub refuses; slot 0 keeps trying hub-a, after backoffs.
    let mut now = t0;
    let mut attempt = d[0].0;
    for _ in 0..5 {
        n.hub_failed(now, attempt);
        let mut next = Vec::new();
        while next.is_empty() {
            now += Duration::from_millis(100);
            n.handle_timeout(now);
            next = dials(&mut n);
        }
        assert_eq!((next[0].1.as_str(), next[0].2), ("wss://a", 0), "{next:?}");
        attempt = next[0].0;
    }
    // hub-a is back: slot 0 is on it again, and slot 1 losing hub-b
    // redials hub-b rather than hub-a.
    n.hub_connected(now, attempt).unwrap();
    n.tunnel_event(now, attempt, &welcome("hub-a"));
    n.tunnel_event(
        now,
        AttemptId(2),
        &TunnelEvent::Closed {
            code: ErrorCode::LinkLost,
            reason: "gone".into(),
        },
    );
    let mut next = Vec::new();
    while next.is_empty() {
        now += Duration::from_millis(100);
        n.handle_timeout(now);
        next = dials(&mut n);
    }
    assert_eq!((next[0].1.as_str(), next[0].2), ("wss://b", 1), "{next:?}");
}

#[test]
fn a_hub_takes_one_tunnel_per_agent_and_refuses_a_second_slot_before_claiming() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut a = hub("hub-a");
    a.tunnel_hello_slot(now, TunnelId(1), "agent-1", &ldap(), 0, 2);
    let e0 = accepted(&run(&mut a, &mut reg, now), TunnelId(1));
    // The agent's slot 1 lands here too (a balancer), or a token holder
    // tries to take more of the hub's agent table with one identity.
    for (t, slot) in [(2, 1), (3, 2)] {
        a.tunnel_hello_slot(now, TunnelId(t), "agent-1", &ldap(), slot, 4);
        let out = run(&mut a, &mut reg, now);
        assert!(
            out.iter().any(|o| matches!(
                o,
                HubOutput::CloseTunnel { tunnel, code: ErrorCode::Refused, reason }
                    if *tunnel == TunnelId(t) && reason.contains("already carries tunnel slot 0")
            )),
            "{out:?}"
        );
    }
    // No claim was made: the registry still names slot 0 alone, under its
    // epoch, and the hub counts one agent.
    let owners = reg
        .apply(
            now,
            &RegistryOp::GetOwners {
                agent_id: "agent-1".into(),
            },
        )
        .unwrap();
    assert_eq!(
        owners,
        RegistryReply::Owners(vec![Owner {
            replica_id: "hub-a".into(),
            epoch: e0,
            slot: 0
        }])
    );
    assert_eq!(a.agent_count(), 1);
    // The same slot reconnecting still replaces its tunnel.
    a.tunnel_closed(now, TunnelId(1));
    run(&mut a, &mut reg, now);
    a.tunnel_hello_slot(now, TunnelId(4), "agent-1", &ldap(), 1, 2);
    accepted(&run(&mut a, &mut reg, now), TunnelId(4));
}
