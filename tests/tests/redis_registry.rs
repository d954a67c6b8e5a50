//! The Redis registry against a real redis-server: atomic claims, epochs that
//! only grow (also across data loss), fenced renewals and releases, connector
//! membership, leases and the sweeper, replica announcements.

use std::time::Duration;

use nowconnect_core::Epoch;
use nowconnect_core::registry::{AgentRecord, Owner, RegistryOp, RegistryReply, SlotLease};
use nowconnect_tests::{Env, RedisProc, redis_cli};
use nowconnect_tokio::registry::RedisRegistry;

fn claim(agent: &str, replica: &str, lease_ms: u64) -> RegistryOp {
    RegistryOp::Claim {
        slot: 0,
        agent_id: agent.into(),
        replica_id: replica.into(),
        lease: Duration::from_millis(lease_ms),
    }
}

async fn epoch_of(r: &RedisRegistry, op: RegistryOp) -> Epoch {
    match r.apply(&op).await.unwrap() {
        RegistryReply::Claimed(e) => e,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn claims_renewals_releases_and_membership() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let r = RedisRegistry::new(&redis.url(), "t:", Duration::from_secs(2)).unwrap();

    let e1 = epoch_of(&r, claim("a1", "hub-a", 10_000)).await;
    let e2 = epoch_of(&r, claim("a1", "hub-b", 10_000)).await;
    assert!(e2 > e1, "{e2:?} !> {e1:?}");

    // The old owner's renewal is refused and names the new owner.
    let renew_a = RegistryOp::Renew {
        slot: 0,
        agent_id: "a1".into(),
        replica_id: "hub-a".into(),
        epoch: e1,
        lease: Duration::from_secs(10),
    };
    assert_eq!(
        r.apply(&renew_a).await.unwrap(),
        RegistryReply::Lost {
            current: Some(Owner {
                slot: 0,
                replica_id: "hub-b".into(),
                epoch: e2
            })
        }
    );
    let renew_b = RegistryOp::Renew {
        slot: 0,
        agent_id: "a1".into(),
        replica_id: "hub-b".into(),
        epoch: e2,
        lease: Duration::from_secs(10),
    };
    assert_eq!(r.apply(&renew_b).await.unwrap(), RegistryReply::Renewed);

    // Connectors and listing with owners.
    r.apply(&RegistryOp::AddConnectors {
        agent_id: "a1".into(),
        connectors: vec!["ldap".into(), "ssh".into()],
        lease: Duration::from_secs(10),
    })
    .await
    .unwrap();
    let agents = r
        .apply(&RegistryOp::ListAgents {
            connector: "ldap".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        agents,
        RegistryReply::Agents(vec![AgentRecord {
            agent_id: "a1".into(),
            owners: vec![Owner {
                slot: 0,
                replica_id: "hub-b".into(),
                epoch: e2
            }]
        }])
    );

    // A stale release changes nothing; the owner's release removes it all.
    r.apply(&RegistryOp::Release {
        slot: 0,
        agent_id: "a1".into(),
        replica_id: "hub-a".into(),
        epoch: e1,
    })
    .await
    .unwrap();
    assert_eq!(
        r.apply(&RegistryOp::GetOwners {
            agent_id: "a1".into()
        })
        .await
        .unwrap(),
        RegistryReply::Owners(vec![Owner {
            slot: 0,
            replica_id: "hub-b".into(),
            epoch: e2
        }])
    );
    r.apply(&RegistryOp::Release {
        slot: 0,
        agent_id: "a1".into(),
        replica_id: "hub-b".into(),
        epoch: e2,
    })
    .await
    .unwrap();
    assert_eq!(
        r.apply(&RegistryOp::GetOwners {
            agent_id: "a1".into()
        })
        .await
        .unwrap(),
        RegistryReply::Owners(vec![])
    );
    assert_eq!(
        r.apply(&RegistryOp::ListAgents {
            connector: "ssh".into()
        })
        .await
        .unwrap(),
        RegistryReply::Agents(vec![])
    );
    assert_eq!(
        r.apply(&RegistryOp::Health).await.unwrap(),
        RegistryReply::Healthy
    );
}

#[tokio::test]
async fn leases_lapse_and_the_sweeper_prunes() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let r = RedisRegistry::new(&redis.url(), "t:", Duration::from_secs(2)).unwrap();
    let e = epoch_of(&r, claim("a1", "hub-a", 300)).await;
    r.apply(&RegistryOp::AddConnectors {
        agent_id: "a1".into(),
        connectors: vec!["ldap".into()],
        lease: Duration::from_millis(300),
    })
    .await
    .unwrap();
    r.apply(&RegistryOp::AnnounceReplica {
        replica_id: "hub-a".into(),
        mesh_url: "wss://a/mesh".into(),
        lease: Duration::from_millis(300),
    })
    .await
    .unwrap();
    assert_eq!(
        r.apply(&RegistryOp::ListReplicas).await.unwrap(),
        RegistryReply::Replicas(vec![("hub-a".into(), "wss://a/mesh".into())])
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Lapsed entries are invisible at once and removed by the sweeper.
    assert_eq!(
        r.apply(&RegistryOp::ListAgents {
            connector: "ldap".into()
        })
        .await
        .unwrap(),
        RegistryReply::Agents(vec![])
    );
    assert_eq!(
        r.apply(&RegistryOp::ListReplicas).await.unwrap(),
        RegistryReply::Replicas(vec![])
    );
    assert_eq!(
        r.apply(&RegistryOp::Sweep).await.unwrap(),
        RegistryReply::Swept(2)
    );
    let renew = RegistryOp::Renew {
        slot: 0,
        agent_id: "a1".into(),
        replica_id: "hub-a".into(),
        epoch: e,
        lease: Duration::from_secs(1),
    };
    assert_eq!(
        r.apply(&renew).await.unwrap(),
        RegistryReply::Lost { current: None }
    );
}

#[tokio::test]
async fn epochs_keep_growing_when_redis_loses_its_data_and_errors_are_reported() {
    let env = Env::new();
    let mut redis = RedisProc::start(env.path());
    let r = RedisRegistry::new(&redis.url(), "t:", Duration::from_millis(500)).unwrap();
    let before = epoch_of(&r, claim("a1", "hub-a", 10_000)).await;
    redis.kill();
    let err = r.apply(&claim("a1", "hub-b", 10_000)).await.unwrap_err();
    assert!(err.to_string().contains("redis claim"), "{err}");
    redis.restart(); // empty: no persistence
    let mut after = None;
    for _ in 0..40 {
        if let Ok(RegistryReply::Claimed(e)) = r.apply(&claim("a1", "hub-b", 10_000)).await {
            after = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = after.expect("registry did not recover after redis restarted");
    assert!(
        after > before,
        "epoch went back after data loss: {after:?} <= {before:?}"
    );
}

use nowconnect_tests::redis_cli as cli;

/// The connector set does not grow without bound: once the last agent of a
/// connector is gone (its lease lapsed) the sweep removes the name, and one
/// sweep call looks at a bounded step of the set (its cursor kept in Redis),
/// so a thousand dead names are pruned over several calls while a live one
/// stays.
#[tokio::test]
async fn the_sweep_prunes_dead_connectors_a_bounded_step_at_a_time() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let url = redis.url();
    let r = RedisRegistry::new(&url, "t:", Duration::from_secs(2)).unwrap();
    for i in 0..1000 {
        r.apply(&RegistryOp::AddConnectors {
            agent_id: format!("a{i}"),
            connectors: vec![format!("c{i}")],
            lease: Duration::from_millis(200),
        })
        .await
        .unwrap();
    }
    r.apply(&RegistryOp::AddConnectors {
        agent_id: "live".into(),
        connectors: vec!["ldap".into()],
        lease: Duration::from_secs(60),
    })
    .await
    .unwrap();
    let scard = || {
        cli(&url, &["SCARD", "t:connectors"])
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(scard(), 1001);
    tokio::time::sleep(Duration::from_millis(400)).await;
    r.apply(&RegistryOp::Sweep).await.unwrap();
    let after_one = scard();
    assert!(
        after_one > 1 && after_one < 1001,
        "one sweep pruned {} of 1000 dead names: not a bounded step",
        1001 - after_one
    );
    let mut sweeps = 1;
    while scard() > 1 {
        assert!(sweeps < 100, "{} names left after {sweeps} sweeps", scard());
        r.apply(&RegistryOp::Sweep).await.unwrap();
        sweeps += 1;
    }
    assert_eq!(cli(&url, &["SISMEMBER", "t:connectors", "ldap"]), "1");
    match r
        .apply(&RegistryOp::ListAgents {
            connector: "ldap".into(),
        })
        .await
        .unwrap()
    {
        RegistryReply::Agents(a) => assert_eq!(a.len(), 1),
        other => panic!("{other:?}"),
    }
    eprintln!("1000 dead connector names pruned in {sweeps} sweeps");
}

fn claim_slot(agent: &str, slot: u8, replica: &str, lease_ms: u64) -> RegistryOp {
    RegistryOp::Claim {
        slot,
        agent_id: agent.into(),
        replica_id: replica.into(),
        lease: Duration::from_millis(lease_ms),
    }
}

fn owner(slot: u8, replica: &str, epoch: Epoch) -> Owner {
    Owner {
        slot,
        replica_id: replica.into(),
        epoch,
    }
}

/// A multi-homed agent's slots in the real scripts: each owned, fenced,
/// leased and released on its own; the agent stays listed for its
/// connectors until its last slot goes.
#[tokio::test]
async fn each_slot_is_owned_fenced_leased_and_released_on_its_own() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let r = RedisRegistry::new(&redis.url(), "t:", Duration::from_secs(2)).unwrap();
    let owners = || async {
        r.apply(&RegistryOp::GetOwners {
            agent_id: "a1".into(),
        })
        .await
        .unwrap()
    };
    let listed = |connector: &'static str| {
        let r = &r;
        async move {
            r.apply(&RegistryOp::ListAgents {
                connector: connector.into(),
            })
            .await
            .unwrap()
        }
    };

    let e0 = epoch_of(&r, claim_slot("a1", 0, "hub-a", 10_000)).await;
    let e1 = epoch_of(&r, claim_slot("a1", 1, "hub-b", 10_000)).await;
    let e2 = epoch_of(&r, claim_slot("a1", 2, "hub-c", 300)).await;
    assert!(
        e0 < e1 && e1 < e2,
        "the agent's epochs grow across its slots"
    );
    r.apply(&RegistryOp::AddConnectors {
        agent_id: "a1".into(),
        connectors: vec!["ldap".into()],
        lease: Duration::from_secs(10),
    })
    .await
    .unwrap();
    assert_eq!(
        owners().await,
        RegistryReply::Owners(vec![
            owner(0, "hub-a", e0),
            owner(1, "hub-b", e1),
            owner(2, "hub-c", e2)
        ])
    );

    // Slot 2's short lease lapses: only that slot is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let both = vec![owner(0, "hub-a", e0), owner(1, "hub-b", e1)];
    assert_eq!(owners().await, RegistryReply::Owners(both.clone()));
    assert_eq!(
        listed("ldap").await,
        RegistryReply::Agents(vec![AgentRecord {
            agent_id: "a1".into(),
            owners: both,
        }])
    );

    // Slot 1 reconnects to hub-a: hub-b's renewal of slot 1 is fenced and
    // names the new owner; slot 0's renewal is untouched.
    let e3 = epoch_of(&r, claim_slot("a1", 1, "hub-a", 10_000)).await;
    let renew = |slot, replica: &str, epoch| RegistryOp::Renew {
        slot,
        agent_id: "a1".into(),
        replica_id: replica.into(),
        epoch,
        lease: Duration::from_secs(10),
    };
    assert_eq!(
        r.apply(&renew(1, "hub-b", e1)).await.unwrap(),
        RegistryReply::Lost {
            current: Some(owner(1, "hub-a", e3))
        }
    );
    assert_eq!(
        r.apply(&renew(0, "hub-a", e0)).await.unwrap(),
        RegistryReply::Renewed
    );
    // Another slot's epoch does not renew this one.
    assert!(matches!(
        r.apply(&renew(0, "hub-a", e3)).await.unwrap(),
        RegistryReply::Lost { .. }
    ));

    let release = |slot, replica: &str, epoch| RegistryOp::Release {
        slot,
        agent_id: "a1".into(),
        replica_id: replica.into(),
        epoch,
    };
    // A stale release (hub-b's old slot 1) changes nothing.
    r.apply(&release(1, "hub-b", e1)).await.unwrap();
    assert_eq!(
        owners().await,
        RegistryReply::Owners(vec![owner(0, "hub-a", e0), owner(1, "hub-a", e3)])
    );
    // Releasing slot 0 keeps the agent listed for its connectors: slot 1
    // still carries it.
    r.apply(&release(0, "hub-a", e0)).await.unwrap();
    assert_eq!(
        listed("ldap").await,
        RegistryReply::Agents(vec![AgentRecord {
            agent_id: "a1".into(),
            owners: vec![owner(1, "hub-a", e3)],
        }])
    );
    // The last slot's release drops the agent from its connectors.
    r.apply(&release(1, "hub-a", e3)).await.unwrap();
    assert_eq!(owners().await, RegistryReply::Owners(vec![]));
    assert_eq!(listed("ldap").await, RegistryReply::Agents(vec![]));
}

/// A hub's batched renewal against real Redis: every slot still held is
/// extended with its agent's membership, the lost ones are named with
/// their owner, a membership set that lapsed is refilled, and the batch
/// costs Redis about two commands per slot (Redis counts the commands a
/// script runs), which is what keeps an idle agent under half a command a
/// second at the default 5 s renew interval.
#[tokio::test]
async fn a_batched_renewal_extends_held_slots_names_lost_ones_and_is_cheap() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let url = redis.url();
    let r = RedisRegistry::new(&url, "t:", Duration::from_secs(2)).unwrap();
    let n = 100usize;
    let short = Duration::from_millis(1500);
    let mut slots = Vec::new();
    for i in 0..n {
        let id = format!("a{i}");
        let epoch = epoch_of(&r, claim(&id, "hub-a", 1500)).await;
        r.apply(&RegistryOp::AddConnectors {
            agent_id: id.clone(),
            connectors: vec!["ldap".into()],
            lease: short,
        })
        .await
        .unwrap();
        slots.push(SlotLease {
            agent_id: id,
            slot: 0,
            epoch,
            connectors: vec!["ldap".into()],
        });
    }
    // One slot moved to hub-b meanwhile, one was never claimed.
    let moved = epoch_of(&r, claim("a7", "hub-b", 10_000)).await;
    slots.push(SlotLease {
        agent_id: "ghost".into(),
        slot: 0,
        epoch: Epoch(1),
        connectors: vec!["ldap".into()],
    });
    // a9's membership set lapsed on its own: the batch refills it.
    redis_cli(&url, &["DEL", "t:agent:a9:connectors"]);
    let batch = RegistryOp::RenewMany {
        replica_id: "hub-a".into(),
        lease: Duration::from_secs(10),
        slots: slots.clone(),
    };
    let lost = vec![
        (
            7,
            Some(Owner {
                slot: 0,
                replica_id: "hub-b".into(),
                epoch: moved,
            }),
        ),
        (n, None),
    ];
    assert_eq!(
        r.apply(&batch).await.unwrap(),
        RegistryReply::RenewedMany { lost: lost.clone() }
    );
    assert_eq!(
        redis_cli(&url, &["SMEMBERS", "t:agent:a9:connectors"]),
        "ldap"
    );

    // The cost of a batch once its script is loaded, counted by Redis.
    redis_cli(&url, &["CONFIG", "RESETSTAT"]);
    assert_eq!(
        r.apply(&batch).await.unwrap(),
        RegistryReply::RenewedMany { lost }
    );
    let stats = redis_cli(&url, &["INFO", "stats"]);
    let commands: usize = stats
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_commands_processed");
    // EVALSHA, TIME, MGET, one ZADD and one SADD for the batch; a PEXPIRE
    // of the owner and of the membership per renewed slot (the CONFIG
    // RESETSTAT is counted too).
    assert!(
        commands <= 2 * n + 6,
        "{commands} commands for a batch of {} slots:\n{stats}",
        n + 2
    );

    // Past the first lease, every renewed agent is still listed with its
    // owner; the moved one with hub-b.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let RegistryReply::Agents(listed) = r
        .apply(&RegistryOp::ListAgents {
            connector: "ldap".into(),
        })
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(listed.len(), n - 1, "{listed:?}");
    assert!(
        listed.iter().all(|a| a.agent_id != "a7"
            && a.owners.len() == 1
            && a.owners[0].replica_id == "hub-a")
    );
}
