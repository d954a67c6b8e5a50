//! A hub renews every tunnel it owns once per renew interval in a few
//! batched calls (`RegistryOp::RenewMany`), not one call per tunnel: the
//! registry's load per idle agent is what limits how many agents a cluster
//! holds. The batch's reply names only the slots lost, and only those act:
//! reclaimed when unowned, closed when another replica owns them. A reply
//! that names a slot the call did not carry (a hostile or broken registry)
//! changes nothing.

use std::collections::BTreeSet;

use nowconnect_core::hub::{Hub, HubConfig, HubOutput, OpId, RENEW_BATCH, TunnelId};
use nowconnect_core::registry::{MemoryRegistry, Owner, RegistryOp, RegistryReply, SlotLease};
use nowconnect_core::routing::Mode;
use nowconnect_core::{Epoch, ErrorCode};

mod common;
use common::origin;

fn hub(max_agents: usize) -> Hub {
    Hub::new(
        origin(),
        HubConfig {
            replica_id: "hub-a".into(),
            mode: Mode::Active,
            max_agents,
            ..HubConfig::default()
        },
        1,
    )
}

fn outputs(h: &mut Hub) -> Vec<HubOutput> {
    std::iter::from_fn(|| h.poll_output()).collect()
}

/// Agent `agent` owned on `tunnel` under epoch `tunnel + 100`.
fn own(h: &mut Hub, tunnel: u64, agent: &str) {
    h.tunnel_hello(origin(), TunnelId(tunnel), agent, &["ldap".into()], None);
    let claim = outputs(h)
        .into_iter()
        .find_map(|o| match o {
            HubOutput::Registry {
                op,
                call: RegistryOp::Claim { .. },
            } => Some(op),
            _ => None,
        })
        .expect("a claim");
    h.registry_reply(
        origin(),
        claim,
        Ok(RegistryReply::Claimed(Epoch(tunnel + 100))),
    );
    let out = outputs(h);
    assert!(
        out.contains(&HubOutput::AcceptTunnel {
            tunnel: TunnelId(tunnel),
            epoch: Epoch(tunnel + 100)
        }),
        "{out:?}"
    );
}

/// The batched renewals among `out`, and whether any per-tunnel renewal or
/// membership call is there too.
fn batches(out: &[HubOutput]) -> (Vec<(OpId, Vec<SlotLease>)>, usize) {
    let mut many = Vec::new();
    let mut single = 0;
    for o in out {
        match o {
            HubOutput::Registry {
                op,
                call:
                    RegistryOp::RenewMany {
                        slots, replica_id, ..
                    },
            } => {
                assert_eq!(replica_id, "hub-a");
                many.push((*op, slots.clone()));
            }
            HubOutput::Registry {
                call: RegistryOp::Renew { .. } | RegistryOp::AddConnectors { .. },
                ..
            } => single += 1,
            _ => {}
        }
    }
    (many, single)
}

#[test]
fn one_interval_renews_every_owned_tunnel_once_in_a_few_batched_calls() {
    let n = 600u64;
    let mut h = hub(1000);
    for t in 0..n {
        own(&mut h, t, &format!("a{t}"));
    }
    let every = HubConfig::default().renew_interval;
    for round in 1..=3u32 {
        let at = origin() + every * round;
        // Nothing before the interval is up.
        h.handle_timeout(at - std::time::Duration::from_millis(1));
        let (early, _) = batches(&outputs(&mut h));
        assert!(early.is_empty(), "round {round}: renewed early");
        h.handle_timeout(at);
        let (many, single) = batches(&outputs(&mut h));
        assert_eq!(single, 0, "round {round}: a per-tunnel renewal");
        assert_eq!(
            many.len(),
            (n as usize).div_ceil(RENEW_BATCH),
            "round {round}"
        );
        let mut seen = BTreeSet::new();
        for (op, slots) in &many {
            assert!(slots.len() <= RENEW_BATCH);
            for s in slots {
                let t: u64 = s.agent_id[1..].parse().unwrap();
                assert_eq!(s.epoch, Epoch(t + 100));
                assert_eq!(s.connectors, vec!["ldap".to_string()]);
                assert!(seen.insert(t), "a{t} twice in one round");
            }
            h.registry_reply(at, *op, Ok(RegistryReply::RenewedMany { lost: Vec::new() }));
        }
        assert_eq!(seen.len(), n as usize, "round {round}: not every tunnel");
        assert!(outputs(&mut h).is_empty());
        assert_eq!(h.agent_count(), n as usize);
    }
}

#[test]
fn a_batched_renewal_acts_only_on_the_slots_it_lost() {
    let mut h = hub(10);
    for t in 0..4 {
        own(&mut h, t, &format!("a{t}"));
    }
    let at = origin() + HubConfig::default().renew_interval;
    h.handle_timeout(at);
    let (many, _) = batches(&outputs(&mut h));
    let [(op, slots)] = &many[..] else {
        panic!("{many:?}")
    };
    let index = |agent: &str| slots.iter().position(|s| s.agent_id == agent).unwrap();
    let lost = vec![
        (
            index("a1"),
            Some(Owner {
                replica_id: "hub-b".into(),
                epoch: Epoch(900),
                slot: 0,
            }),
        ),
        (index("a2"), None),
        // Slots the call did not carry.
        (slots.len(), None),
        (usize::MAX, None),
    ];
    h.registry_reply(at, *op, Ok(RegistryReply::RenewedMany { lost }));
    let out = outputs(&mut h);
    // a1 is owned by hub-b now: its tunnel here is stale and closes.
    assert!(
        out.iter().any(|o| matches!(o, HubOutput::CloseTunnel {
            tunnel: TunnelId(1),
            code: ErrorCode::StaleEpoch,
            reason,
        } if reason.contains("hub-b at epoch 900"))),
        "{out:?}"
    );
    // a2's ownership vanished (the registry lost it): claimed again.
    let reclaims: Vec<&str> = out
        .iter()
        .filter_map(|o| match o {
            HubOutput::Registry {
                call: RegistryOp::Claim { agent_id, .. },
                ..
            } => Some(agent_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(reclaims, ["a2"]);
    // Nothing else: a0 and a3 untouched, the made-up indices ignored.
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(h.owned_tunnel("a0"), Some((TunnelId(0), Epoch(100))));
    assert_eq!(h.owned_tunnel("a3"), Some((TunnelId(3), Epoch(103))));
    assert_eq!(h.owned_tunnel("a1"), None);
    // A failed batch keeps every tunnel; the next interval renews them.
    let next = at + HubConfig::default().renew_interval;
    h.handle_timeout(next);
    let (many, _) = batches(&outputs(&mut h));
    let renewed: Vec<&str> = many[0].1.iter().map(|s| s.agent_id.as_str()).collect();
    assert_eq!(renewed, ["a0", "a2", "a3"]);
    h.registry_reply(
        next,
        many[0].0,
        Err(nowconnect_core::registry::RegistryError::Unavailable(
            "down".into(),
        )),
    );
    assert_eq!(h.agent_count(), 3);
}

#[test]
fn a_draining_hub_renews_each_tunnel_on_its_own_and_not_twice() {
    let mut h = hub(10);
    for t in 0..3 {
        own(&mut h, t, &format!("a{t}"));
    }
    h.drain(origin());
    let _ = outputs(&mut h);
    let check = HubConfig::default().drain_check_interval;
    h.handle_timeout(origin() + check);
    let out = outputs(&mut h);
    let singles = out
        .iter()
        .filter(|o| {
            matches!(
                o,
                HubOutput::Registry {
                    call: RegistryOp::Renew { .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(singles, 3, "{out:?}");
    // The interval's batch leaves out the tunnels renewed on their own.
    let at = origin() + HubConfig::default().renew_interval;
    let mut t = origin() + check;
    while t < at {
        t += check;
        h.handle_timeout(t.min(at));
    }
    let (many, _) = batches(&outputs(&mut h));
    assert!(many.iter().all(|(_, s)| s.is_empty()), "{many:?}");
    assert!(many.is_empty(), "an empty batch was sent: {many:?}");
}

/// The in-memory registry (one process, and the simulation's) gives a
/// batch the meaning of its slots' renewals and membership, one by one.
#[test]
fn the_memory_registry_renews_a_batch_as_its_slots_one_by_one() {
    let t0 = origin();
    let lease = std::time::Duration::from_secs(15);
    let mut r = MemoryRegistry::new();
    let claim = |agent: &str, replica: &str| RegistryOp::Claim {
        agent_id: agent.into(),
        slot: 0,
        replica_id: replica.into(),
        lease,
    };
    let Ok(RegistryReply::Claimed(e1)) = r.apply(t0, &claim("a1", "hub-a")) else {
        panic!()
    };
    let Ok(RegistryReply::Claimed(e2)) = r.apply(t0, &claim("a2", "hub-b")) else {
        panic!()
    };
    for a in ["a1", "a2"] {
        r.apply(
            t0,
            &RegistryOp::AddConnectors {
                agent_id: a.into(),
                connectors: vec!["ldap".into()],
                lease,
            },
        )
        .unwrap();
    }
    let slot = |agent: &str, epoch| SlotLease {
        agent_id: agent.into(),
        slot: 0,
        epoch,
        connectors: vec!["ldap".into()],
    };
    let t1 = t0 + std::time::Duration::from_secs(10);
    let batch = RegistryOp::RenewMany {
        replica_id: "hub-a".into(),
        lease,
        slots: vec![slot("a1", e1), slot("a2", e2), slot("a3", Epoch(1))],
    };
    assert_eq!(
        r.apply(t1, &batch).unwrap(),
        RegistryReply::RenewedMany {
            lost: vec![
                (
                    1,
                    Some(Owner {
                        replica_id: "hub-b".into(),
                        epoch: e2,
                        slot: 0
                    })
                ),
                (2, None),
            ]
        }
    );
    // Past the first lease: a1 (renewed) is still owned and listed; a2,
    // which the batch could not renew for hub-a, lapsed with its lease.
    let t2 = t0 + std::time::Duration::from_secs(20);
    let Ok(RegistryReply::Agents(listed)) = r.apply(
        t2,
        &RegistryOp::ListAgents {
            connector: "ldap".into(),
        },
    ) else {
        panic!()
    };
    let ids: Vec<&str> = listed.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, ["a1"]);
    assert_eq!(listed[0].owners[0].epoch, e1);
}
