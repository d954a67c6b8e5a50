use std::time::{Duration, Instant};

use nowconnect_core::Epoch;
use nowconnect_core::registry::*;

mod common;

fn claim(r: &mut MemoryRegistry, now: Instant, agent: &str, replica: &str) -> Epoch {
    match r
        .apply(
            now,
            &RegistryOp::Claim {
                slot: 0,
                agent_id: agent.into(),
                replica_id: replica.into(),
                lease: Duration::from_secs(10),
            },
        )
        .unwrap()
    {
        RegistryReply::Claimed(e) => e,
        other => panic!("{other:?}"),
    }
}

#[test]
fn epochs_grow_and_stale_owner_loses_renewal() {
    let now = common::origin();
    let mut r = MemoryRegistry::new();
    let e1 = claim(&mut r, now, "a1", "hub-a");
    let e2 = claim(&mut r, now, "a1", "hub-b");
    assert!(e2 > e1);
    let renew = RegistryOp::Renew {
        slot: 0,
        agent_id: "a1".into(),
        replica_id: "hub-a".into(),
        epoch: e1,
        lease: Duration::from_secs(10),
    };
    assert_eq!(
        r.apply(now, &renew).unwrap(),
        RegistryReply::Lost {
            current: Some(Owner {
                slot: 0,
                replica_id: "hub-b".into(),
                epoch: e2
            })
        }
    );
    // A stale release does not remove the new owner.
    r.apply(
        now,
        &RegistryOp::Release {
            slot: 0,
            agent_id: "a1".into(),
            replica_id: "hub-a".into(),
            epoch: e1,
        },
    )
    .unwrap();
    assert_eq!(
        r.apply(
            now,
            &RegistryOp::GetOwners {
                agent_id: "a1".into()
            }
        )
        .unwrap(),
        RegistryReply::Owners(vec![Owner {
            slot: 0,
            replica_id: "hub-b".into(),
            epoch: e2
        }])
    );
}

#[test]
fn sweep_prunes_lapsed_leases_but_epochs_keep_growing() {
    let now = common::origin();
    let mut r = MemoryRegistry::new();
    let e1 = claim(&mut r, now, "a1", "hub-a");
    r.apply(
        now,
        &RegistryOp::AddConnectors {
            agent_id: "a1".into(),
            connectors: vec!["ldap".into()],
            lease: Duration::from_secs(10),
        },
    )
    .unwrap();
    let later = now + Duration::from_secs(11);
    assert_eq!(
        r.apply(later, &RegistryOp::Sweep).unwrap(),
        RegistryReply::Swept(2)
    );
    assert_eq!(
        r.apply(
            later,
            &RegistryOp::ListAgents {
                connector: "ldap".into()
            }
        )
        .unwrap(),
        RegistryReply::Agents(vec![])
    );
    assert!(claim(&mut r, later, "a1", "hub-b") > e1);
}

#[test]
fn with_a_server_clock_epochs_keep_growing_across_data_loss() {
    let t0 = common::origin();
    let mut r = MemoryRegistry::with_server_clock(t0);
    let a = claim(&mut r, t0 + Duration::from_millis(5), "a1", "hub-a");
    let b = claim(&mut r, t0 + Duration::from_millis(5), "a1", "hub-b");
    assert!(b > a, "{b:?} after {a:?}");
    r.lose_data();
    assert_eq!(r.last_epoch("a1"), Epoch(0), "the data is gone");
    let c = claim(&mut r, t0 + Duration::from_millis(40), "a1", "hub-a");
    assert!(c > b, "epoch {c:?} after data loss is not above {b:?}");
    // Without a server clock an empty registry would start over: the case
    // the Redis registry guards against with max(INCR, server time).
    let mut plain = MemoryRegistry::new();
    let d = claim(&mut plain, t0, "a1", "hub-a");
    plain.lose_data();
    assert_eq!(claim(&mut plain, t0, "a1", "hub-a"), d);
}
