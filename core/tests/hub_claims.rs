//! Registry replies that arrive after the tunnel that asked for them is
//! gone (perhaps while a later tunnel carries its id), and HELLOs on a
//! tunnel the hub already holds: none may make the hub count an agent it
//! cannot forget, own more agents than `max_agents`, or act on a tunnel
//! for another one's ownership. The `hub` fuzz seed
//! `fuzz/corpus/hub/late-claim-reply-on-reused-tunnel-id` is the same attack.

use nowconnect_core::hub::{Hub, HubConfig, HubOutput, OpId, TunnelId};
use nowconnect_core::registry::{Owner, RegistryError, RegistryOp, RegistryReply};
use nowconnect_core::{Epoch, ErrorCode};

mod common;
use common::origin;

fn full_hub() -> Hub {
    Hub::new(
        origin(),
        HubConfig {
            replica_id: "hub-a".into(),
            max_agents: 1,
            ..HubConfig::default()
        },
        1,
    )
}

fn outputs(h: &mut Hub) -> Vec<HubOutput> {
    std::iter::from_fn(|| h.poll_output()).collect()
}

/// A HELLO of `agent` on `tunnel`; returns the op of the claim it sends.
fn hello(h: &mut Hub, tunnel: u64, agent: &str) -> OpId {
    h.tunnel_hello(origin(), TunnelId(tunnel), agent, &["ldap".into()], None);
    let out = outputs(h);
    out.iter()
        .find_map(|o| match o {
            HubOutput::Registry {
                op,
                call: RegistryOp::Claim { agent_id, .. },
            } if agent_id == agent => Some(*op),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no claim for {agent} on {tunnel}: {out:?}"))
}

fn reply(h: &mut Hub, op: OpId, r: Result<RegistryReply, RegistryError>) -> Vec<HubOutput> {
    h.registry_reply(origin(), op, r);
    outputs(h)
}

fn closed(h: &mut Hub, tunnel: u64) -> Vec<HubOutput> {
    h.tunnel_closed(origin(), TunnelId(tunnel));
    outputs(h)
}

/// The attack, with tokens for three agents against a hub that takes one:
/// each agent connects, the agent gives up before the registry answers its
/// claim, and the runtime hands the tunnel's id to the next connection.
/// The late replies used to be taken by whatever tunnel held the id then:
/// a late failure closed and forgot the next agent's tunnel while the agent
/// stayed counted (no close could remove it), and a late success made the
/// next agent the owner under the first one's epoch, with the limit checked
/// for the first one (already counted, so not checked at all). Repeated,
/// the hub owned an agent for every token, whatever its limit. Now a reply
/// counts only for the tunnel that still waits for that very claim.
#[test]
fn late_claim_replies_on_a_reused_tunnel_id_cannot_grow_the_hub_past_its_limit() {
    let mut h = full_hub();
    let bounded = |h: &Hub| assert!(h.agent_count() <= 1, "{} agents", h.agent_count());

    // a0 connects on tunnel 1 and leaves before its claim is answered; a1
    // connects on a tunnel the runtime again calls 1, and is owned.
    let a0_claim = hello(&mut h, 1, "a0");
    assert!(closed(&mut h, 1).is_empty());
    let a1_claim = hello(&mut h, 1, "a1");
    let out = reply(&mut h, a1_claim, Ok(RegistryReply::Claimed(Epoch(1))));
    assert!(out.contains(&HubOutput::AcceptTunnel {
        tunnel: TunnelId(1),
        epoch: Epoch(1)
    }));
    // a0's claim fails late: that failure is not a1's.
    let out = reply(
        &mut h,
        a0_claim,
        Err(RegistryError::Unavailable("down".into())),
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, HubOutput::CloseTunnel { .. })),
        "{out:?}"
    );
    assert_eq!(h.owned_tunnel("a1"), Some((TunnelId(1), Epoch(1))));
    bounded(&h);
    // a1 leaves: nothing is left counted.
    closed(&mut h, 1);
    assert_eq!((h.agent_count(), h.tunnel_count()), (0, 0));

    // a1 connects on tunnel 2 and leaves before its claim is answered; a2
    // takes the free place under the id 2. a1's late success is a2's
    // neither: it is given back to the registry.
    let a1_again = hello(&mut h, 2, "a1");
    closed(&mut h, 2);
    let a2_claim = hello(&mut h, 2, "a2");
    let out = reply(&mut h, a1_again, Ok(RegistryReply::Claimed(Epoch(2))));
    assert!(
        out.iter().any(|o| matches!(o, HubOutput::Registry {
            call: RegistryOp::Release { agent_id, epoch: Epoch(2), .. }, ..
        } if agent_id == "a1")),
        "{out:?}"
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, HubOutput::AcceptTunnel { .. })),
        "{out:?}"
    );
    assert_eq!(h.owned_tunnel("a2"), None, "a2 owned under a1's epoch");
    bounded(&h);
    // a2's own claim makes it the owner.
    let out = reply(&mut h, a2_claim, Ok(RegistryReply::Claimed(Epoch(1))));
    assert!(out.contains(&HubOutput::AcceptTunnel {
        tunnel: TunnelId(2),
        epoch: Epoch(1)
    }));
    assert_eq!(h.owned_tunnel("a2"), Some((TunnelId(2), Epoch(1))));
    bounded(&h);

    // With the hub full, a3 is refused at HELLO as always.
    h.tunnel_hello(origin(), TunnelId(3), "a3", &["ldap".into()], None);
    assert!(outputs(&mut h).iter().any(|o| matches!(
        o,
        HubOutput::CloseTunnel {
            tunnel: TunnelId(3),
            code: ErrorCode::LimitExceeded,
            ..
        }
    )));
    bounded(&h);
}

/// A second HELLO on a tunnel the hub holds (`HubNode` refuses it first;
/// this is the hub on its own) is refused, and the tunnel is forgotten and
/// its ownership released, instead of the second agent overwriting the
/// tunnel while the first one stays counted for it forever.
#[test]
fn a_second_hello_on_a_held_tunnel_closes_it_and_leaves_nothing_counted() {
    let mut h = full_hub();
    let claim = hello(&mut h, 1, "a1");
    reply(&mut h, claim, Ok(RegistryReply::Claimed(Epoch(1))));
    assert_eq!(h.agent_count(), 1);

    h.tunnel_hello(origin(), TunnelId(1), "a2", &["ldap".into()], None);
    let out = outputs(&mut h);
    assert!(
        out.iter().any(|o| matches!(
            o,
            HubOutput::CloseTunnel {
                tunnel: TunnelId(1),
                code: ErrorCode::ProtocolError,
                ..
            }
        )),
        "{out:?}"
    );
    assert!(
        out.iter().any(|o| matches!(o, HubOutput::Registry {
            call: RegistryOp::Release { agent_id, epoch: Epoch(1), .. }, ..
        } if agent_id == "a1")),
        "{out:?}"
    );
    assert!(
        !out.iter().any(|o| matches!(
            o,
            HubOutput::Registry {
                call: RegistryOp::Claim { .. },
                ..
            }
        )),
        "{out:?}"
    );
    assert_eq!((h.agent_count(), h.tunnel_count()), (0, 0));
    closed(&mut h, 1);
    assert_eq!((h.agent_count(), h.tunnel_count()), (0, 0));
}

/// A renewal's late reply is about the ownership that was renewed, not
/// about a later tunnel that carries the same id: a1 renews on tunnel 1 and
/// leaves, a2 connects on a tunnel again called 1 and is owned (under its
/// own epoch 5, which a1 had too). That a1 moved elsewhere, or that its
/// ownership lapsed, neither closes a2's tunnel nor claims a2 again.
#[test]
fn a_late_renewal_reply_is_not_taken_by_the_tunnel_that_reuses_the_id() {
    let lost = [
        Some(Owner {
            slot: 0,
            replica_id: "hub-b".into(),
            epoch: Epoch(6),
        }),
        None,
    ];
    for current in lost {
        let late = RegistryReply::RenewedMany {
            lost: vec![(0, current)],
        };
        let mut h = full_hub();
        let claim = hello(&mut h, 1, "a1");
        reply(&mut h, claim, Ok(RegistryReply::Claimed(Epoch(5))));
        let at = origin() + HubConfig::default().renew_interval;
        h.handle_timeout(at);
        let renew = outputs(&mut h)
            .into_iter()
            .find_map(|o| match o {
                HubOutput::Registry {
                    op,
                    call: RegistryOp::RenewMany { slots, .. },
                } if slots.len() == 1 && slots[0].agent_id == "a1" => Some(op),
                _ => None,
            })
            .expect("a1 renews");
        closed(&mut h, 1);
        let claim = hello(&mut h, 1, "a2");
        reply(&mut h, claim, Ok(RegistryReply::Claimed(Epoch(5))));

        h.registry_reply(at, renew, Ok(late.clone()));
        let out = outputs(&mut h);
        assert!(out.is_empty(), "{late:?} for a1 gave {out:?}");
        assert_eq!(h.owned_tunnel("a2"), Some((TunnelId(1), Epoch(5))));
    }
}
