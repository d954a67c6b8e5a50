//! Redis sizing for the HA registry (issue #22), with a real `redis-server`
//! driven through the product's own registry (`RedisRegistry`, the scripts
//! the hubs run):
//!
//! 1. Memory: N agents, each claimed by one of R replicas (one registry
//!    connection per replica, as each hub has) and announcing K connectors,
//!    in a fresh server: `used_memory` over the empty server (scripts
//!    loaded, replicas announced) and `DBSIZE`.
//! 2. Steady state at the largest N: every agent's renewal as the hubs send
//!    it every `ha.renew_interval_sec` (each replica's slots in `renew_many`
//!    calls of up to 256, at its tick), the replicas' ticks spread over one
//!    interval, with the latency of each call and the server's CPU; then
//!    all of them at once (a burst); `list_agents`
//!    of a connector all N agents serve (one per cross-replica connection).
//! 3. Eviction: the same registry in a server that runs out of memory, once
//!    with `allkeys-lru` (what an eviction does to ownership and listings)
//!    and once with `noeviction` (which calls fail, and how).
//!
//!   target/e2e/release/redis-sizing [--agents 1000,10000] [--connectors 1,5] [--replicas 3]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nowconnect_core::Epoch;
use nowconnect_core::hub::RENEW_BATCH;
use nowconnect_core::registry::{RegistryOp, RegistryReply, SlotLease};
use nowconnect_tests::{Env, RedisProc, redis_cli, redis_cpu};
use nowconnect_tokio::registry::RedisRegistry;

const PREFIX: &str = "nowconnect:";
/// The defaults of `ha.lease_sec` and `ha.renew_interval_sec`.
const LEASE: Duration = Duration::from_secs(15);
const RENEW: Duration = Duration::from_secs(5);

/// One field of `INFO` (e.g. `used_memory`), as a number.
fn info(url: &str, section: &str, field: &str) -> f64 {
    redis_cli(url, &["INFO", section])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:"))?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
}

/// The agents of one population: ids, connector names, slots.
#[derive(Clone, Copy)]
struct Shape {
    agents: usize,
    connectors: usize,
    slots: u8,
    /// Every agent its own connector names (else all share `c0`…).
    unique: bool,
}

impl Shape {
    fn connectors_of(&self, agent: usize) -> Vec<String> {
        (0..self.connectors)
            .map(|c| {
                if self.unique {
                    format!("agent-{agent}-c{c}")
                } else {
                    format!("c{c}")
                }
            })
            .collect()
    }
}

struct Cluster {
    redis: RedisProc,
    /// One registry connection per replica.
    regs: Vec<Arc<RedisRegistry>>,
}

impl Cluster {
    async fn start(env: &Env, replicas: usize) -> Cluster {
        let redis = RedisProc::start(env.path());
        let regs: Vec<Arc<RedisRegistry>> = (0..replicas)
            .map(|_| {
                Arc::new(RedisRegistry::new(&redis.url(), PREFIX, Duration::from_secs(30)).unwrap())
            })
            .collect();
        let c = Cluster { redis, regs };
        // Every script loaded once (on a throwaway agent), then the data
        // dropped: the baseline holds the script cache, not the warm-up.
        let warm = Shape {
            agents: 1,
            connectors: 1,
            slots: 1,
            unique: false,
        };
        let epochs = c.populate(warm, 0).await;
        c.renew_all(warm, 0, &epochs, None).await;
        for op in [
            RegistryOp::ListAgents {
                connector: "c0".into(),
            },
            RegistryOp::GetOwners {
                agent_id: "agent-0".into(),
            },
            RegistryOp::Sweep,
            RegistryOp::ListReplicas,
            RegistryOp::Release {
                agent_id: "agent-0".into(),
                slot: 0,
                replica_id: "hub-0".into(),
                epoch: epochs[0],
            },
        ] {
            c.regs[0].apply(&op).await.unwrap();
        }
        redis_cli(&c.redis.url(), &["FLUSHALL"]);
        for (r, reg) in c.regs.iter().enumerate() {
            reg.apply(&RegistryOp::AnnounceReplica {
                replica_id: format!("hub-{r}"),
                mesh_url: format!("wss://hub-{r}.example:7443/mesh"),
                lease: LEASE,
            })
            .await
            .unwrap();
        }
        c
    }

    fn url(&self) -> String {
        self.redis.url()
    }

    /// The replica (and its connection) that owns slot `slot` of `agent`.
    fn owner_of(&self, agent: usize, slot: u8) -> (usize, Arc<RedisRegistry>) {
        let r = (agent + slot as usize) % self.regs.len();
        (r, self.regs[r].clone())
    }

    /// Claim every slot of agents `first..first + shape.agents` and announce
    /// their connectors, all calls in flight at once: the epochs, agent by
    /// agent, slot by slot.
    async fn populate(&self, shape: Shape, first: usize) -> Vec<Epoch> {
        let mut set = tokio::task::JoinSet::new();
        for a in first..first + shape.agents {
            for slot in 0..shape.slots {
                let (r, reg) = self.owner_of(a, slot);
                let connectors = shape.connectors_of(a);
                set.spawn(async move {
                    let agent_id = format!("agent-{a}");
                    let claim = RegistryOp::Claim {
                        agent_id: agent_id.clone(),
                        slot,
                        replica_id: format!("hub-{r}"),
                        lease: LEASE,
                    };
                    let e = match reg.apply(&claim).await {
                        Ok(RegistryReply::Claimed(e)) => e,
                        other => panic!("claim: {other:?}"),
                    };
                    let add = RegistryOp::AddConnectors {
                        agent_id,
                        connectors,
                        lease: LEASE,
                    };
                    reg.apply(&add).await.unwrap();
                    ((a - first) * shape.slots as usize + slot as usize, e)
                });
            }
        }
        let mut epochs = vec![Epoch(0); shape.agents * shape.slots as usize];
        while let Some(r) = set.join_next().await {
            let (i, e) = r.unwrap();
            epochs[i] = e;
        }
        epochs
    }

    /// Every slot's renewal as the hubs send it: each replica renews the
    /// slots it owns in `renew_many` calls of up to `RENEW_BATCH`, all at
    /// its tick; the replicas' ticks spread evenly over `pace` (all at once
    /// when `None`): the latency of every call, in µs.
    async fn renew_all(
        &self,
        shape: Shape,
        first: usize,
        epochs: &[Epoch],
        pace: Option<Duration>,
    ) -> Histogram<u64> {
        let replicas = self.regs.len();
        let mut per_replica: Vec<Vec<SlotLease>> = vec![Vec::new(); replicas];
        for (i, &epoch) in epochs.iter().enumerate() {
            let a = first + i / shape.slots as usize;
            let slot = (i % shape.slots as usize) as u8;
            let (r, _) = self.owner_of(a, slot);
            per_replica[r].push(SlotLease {
                agent_id: format!("agent-{a}"),
                slot,
                epoch,
                connectors: shape.connectors_of(a),
            });
        }
        let start = tokio::time::Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (r, slots) in per_replica.into_iter().enumerate() {
            let at = pace.map(|p| start + p.mul_f64(r as f64 / replicas as f64));
            for batch in slots.chunks(RENEW_BATCH) {
                let reg = self.regs[r].clone();
                let op = RegistryOp::RenewMany {
                    replica_id: format!("hub-{r}"),
                    lease: LEASE,
                    slots: batch.to_vec(),
                };
                set.spawn(async move {
                    if let Some(at) = at {
                        tokio::time::sleep_until(at).await;
                    }
                    let t = Instant::now();
                    let renewed = reg.apply(&op).await;
                    let took = t.elapsed();
                    assert_eq!(renewed, Ok(RegistryReply::RenewedMany { lost: Vec::new() }));
                    took
                });
            }
        }
        let mut h = Histogram::<u64>::new(3).unwrap();
        while let Some(r) = set.join_next().await {
            h.record(r.unwrap().as_micros() as u64).unwrap();
        }
        h
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn latency_row(what: &str, calls: u64, secs: f64, h: &Histogram<u64>, cpu: Option<f64>) {
    println!(
        "| {what} | {calls} | {secs:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
        calls as f64 / secs,
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
        cpu.map_or("–".into(), |c| format!("{:.0} %", c * 100.0))
    );
}

fn list<T: std::str::FromStr>(s: &str) -> Vec<T> {
    s.split(',')
        .map(|v| v.trim().parse().ok().expect("a comma-separated list"))
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut agent_counts: Vec<usize> = vec![1000, 10000];
    let mut connector_counts: Vec<usize> = vec![1, 5];
    let mut replicas = 3;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).map(String::as_str).unwrap_or("");
        match args[i].as_str() {
            "--agents" => agent_counts = list(v),
            "--connectors" => connector_counts = list(v),
            "--replicas" => replicas = v.parse().expect("--replicas N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let env = Env::new();
    let version = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("# Redis sizing ({version}; {replicas} replicas, one connection each)");

    // ---- 1. memory
    let nmax = *agent_counts.iter().max().unwrap();
    let kmax = *connector_counts.iter().max().unwrap();
    let mut shapes: Vec<Shape> = Vec::new();
    for &agents in &agent_counts {
        for &connectors in &connector_counts {
            shapes.push(Shape {
                agents,
                connectors,
                slots: 1,
                unique: false,
            });
        }
    }
    shapes.push(Shape {
        agents: nmax,
        connectors: kmax,
        slots: 1,
        unique: true,
    });
    shapes.push(Shape {
        agents: nmax,
        connectors: 1,
        slots: 2,
        unique: false,
    });
    println!();
    println!("## Memory");
    println!();
    println!(
        "| agents | connectors each | names | slots each | keys (DBSIZE) | used_memory over empty | per agent | per 1000 agents | claim + announce, all at once |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for s in &shapes {
        let c = Cluster::start(&env, replicas).await;
        let base = info(&c.url(), "memory", "used_memory");
        let t = Instant::now();
        c.populate(*s, 0).await;
        let secs = t.elapsed().as_secs_f64();
        let used = info(&c.url(), "memory", "used_memory") - base;
        let keys = redis_cli(&c.url(), &["DBSIZE"]);
        println!(
            "| {} | {} | {} | {} | {keys} | {:.2} MiB | {:.0} B | {:.2} MiB | {:.2} s ({:.0} agents/s) |",
            s.agents,
            s.connectors,
            if s.unique {
                "per agent"
            } else {
                "shared by all"
            },
            s.slots,
            used / 1048576.0,
            used / s.agents as f64,
            used / s.agents as f64 * 1000.0 / 1048576.0,
            secs,
            s.agents as f64 / secs
        );
    }

    // ---- 2. steady state and bursts at the largest N
    let shape = Shape {
        agents: nmax,
        connectors: connector_counts[0],
        slots: 1,
        unique: false,
    };
    let c = Cluster::start(&env, replicas).await;
    let epochs = c.populate(shape, 0).await;
    println!();
    println!(
        "## Calls at {nmax} agents ({} connector each, shared), registry calls over {replicas} connections",
        shape.connectors
    );
    println!();
    println!("| what | calls | seconds | calls/s | p50 ms | p99 ms | max ms | redis CPU |");
    println!("|---|---|---|---|---|---|---|---|");
    let cpu0 = redis_cpu(&c.url());
    let t = Instant::now();
    let h = c.renew_all(shape, 0, &epochs, Some(RENEW)).await;
    let secs = t.elapsed().as_secs_f64();
    let cpu = (redis_cpu(&c.url()) - cpu0) / secs;
    latency_row(
        &format!(
            "every hub's batched renewal (renew_many, {RENEW_BATCH} slots a call), the hubs' ticks spread over one renew interval ({} s)",
            RENEW.as_secs()
        ),
        h.len(),
        secs,
        &h,
        Some(cpu),
    );
    let cpu0 = redis_cpu(&c.url());
    let t = Instant::now();
    let h = c.renew_all(shape, 0, &epochs, None).await;
    let secs = t.elapsed().as_secs_f64();
    let cpu = (redis_cpu(&c.url()) - cpu0) / secs;
    latency_row(
        "the same, all at once (a burst)",
        h.len(),
        secs,
        &h,
        Some(cpu),
    );
    let t = Instant::now();
    let h = {
        let mut h = Histogram::<u64>::new(3).unwrap();
        let mut set = tokio::task::JoinSet::new();
        for a in 0..shape.agents {
            let (r, reg) = c.owner_of(a, 0);
            set.spawn(async move {
                let t = Instant::now();
                reg.apply(&RegistryOp::Claim {
                    agent_id: format!("agent-{a}"),
                    slot: 0,
                    replica_id: format!("hub-{r}"),
                    lease: LEASE,
                })
                .await
                .unwrap();
                t.elapsed()
            });
        }
        while let Some(r) = set.join_next().await {
            h.record(r.unwrap().as_micros() as u64).unwrap();
        }
        h
    };
    latency_row(
        "every agent claims again at once (all tunnels reconnect)",
        h.len(),
        t.elapsed().as_secs_f64(),
        &h,
        None,
    );
    for (what, op) in [
        (
            format!("list_agents of a connector all {nmax} agents serve, one at a time"),
            RegistryOp::ListAgents {
                connector: "c0".into(),
            },
        ),
        (
            "sweep (one step), one at a time".to_string(),
            RegistryOp::Sweep,
        ),
        (
            "renew of one slot, one at a time".to_string(),
            RegistryOp::Renew {
                agent_id: "agent-0".into(),
                slot: 0,
                replica_id: "hub-0".into(),
                epoch: Epoch(0),
                lease: LEASE,
            },
        ),
    ] {
        let mut h = Histogram::<u64>::new(3).unwrap();
        let t = Instant::now();
        let n = if matches!(op, RegistryOp::ListAgents { .. }) {
            100
        } else {
            2000
        };
        for _ in 0..n {
            let t = Instant::now();
            c.regs[0].apply(&op).await.unwrap();
            h.record(t.elapsed().as_micros() as u64).unwrap();
        }
        latency_row(&what, n, t.elapsed().as_secs_f64(), &h, None);
    }
    drop(c);

    // ---- 3. eviction
    let small = Shape {
        agents: 2000,
        connectors: 1,
        slots: 1,
        unique: false,
    };
    println!();
    println!(
        "## A full Redis: {} agents registered, maxmemory set just above, then {} more agents attach",
        small.agents, small.agents
    );
    for policy in ["allkeys-lru", "noeviction"] {
        let c = Cluster::start(&env, replicas).await;
        let epochs = c.populate(small, 0).await;
        let used = info(&c.url(), "memory", "used_memory") as u64;
        let max = used + 256 * 1024;
        redis_cli(&c.url(), &["CONFIG", "SET", "maxmemory", &max.to_string()]);
        redis_cli(&c.url(), &["CONFIG", "SET", "maxmemory-policy", policy]);
        println!();
        println!("### `maxmemory {max}` (used {used}), `maxmemory-policy {policy}`");
        println!();
        // New agents attach: each claims and announces, one at a time.
        let (mut claimed, mut first_error) = (0, None);
        for a in small.agents..2 * small.agents {
            let (r, reg) = c.owner_of(a, 0);
            let claim = reg
                .apply(&RegistryOp::Claim {
                    agent_id: format!("agent-{a}"),
                    slot: 0,
                    replica_id: format!("hub-{r}"),
                    lease: LEASE,
                })
                .await;
            let add = reg
                .apply(&RegistryOp::AddConnectors {
                    agent_id: format!("agent-{a}"),
                    connectors: small.connectors_of(a),
                    lease: LEASE,
                })
                .await;
            match (claim, add) {
                (Ok(_), Ok(_)) => claimed += 1,
                (c, a) => {
                    first_error.get_or_insert(format!("claim: {c:?}; add_connectors: {a:?}"));
                }
            }
        }
        println!(
            "- new agents that claimed and announced: {claimed} of {}; first failure: {}",
            small.agents,
            first_error.as_deref().unwrap_or("none")
        );
        println!(
            "- evicted keys: {}",
            info(&c.url(), "stats", "evicted_keys")
        );
        // The first agents' hubs renew, as their timers fire.
        let (mut renewed, mut unowned, mut lost, mut failed) = (0, 0, 0, Vec::new());
        let mut members_failed = Vec::new();
        for (a, e) in epochs.iter().enumerate() {
            let (r, reg) = c.owner_of(a, 0);
            match reg
                .apply(&RegistryOp::Renew {
                    agent_id: format!("agent-{a}"),
                    slot: 0,
                    replica_id: format!("hub-{r}"),
                    epoch: *e,
                    lease: LEASE,
                })
                .await
            {
                Ok(RegistryReply::Renewed) => renewed += 1,
                Ok(RegistryReply::Lost { current: None }) => unowned += 1,
                Ok(_) => lost += 1,
                Err(e) => failed.push(e.to_string()),
            }
            // The membership renewal that goes with it.
            if let Err(e) = reg
                .apply(&RegistryOp::AddConnectors {
                    agent_id: format!("agent-{a}"),
                    connectors: small.connectors_of(a),
                    lease: LEASE,
                })
                .await
            {
                members_failed.push(e.to_string());
            }
        }
        println!(
            "- renewals of the first {} agents: {renewed} renewed, {unowned} found no owner (the hub claims again; until then the agent is unowned), {lost} found another owner, {} failed{}",
            small.agents,
            failed.len(),
            failed
                .first()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        println!(
            "- their membership renewals (add_connectors): {} of {} failed{}",
            members_failed.len(),
            small.agents,
            members_failed
                .first()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        match c.regs[0]
            .apply(&RegistryOp::ListAgents {
                connector: "c0".into(),
            })
            .await
        {
            Ok(RegistryReply::Agents(list)) => {
                let ownerless = list.iter().filter(|a| a.owners.is_empty()).count();
                println!(
                    "- list_agents(c0), what an entry hub routes by: {} agents listed of {} registered, {ownerless} of them with no owner (a client for them is routed nowhere)",
                    list.len(),
                    small.agents + claimed
                );
            }
            other => println!("- list_agents(c0): {other:?}"),
        }
        for (what, op) in [
            (
                "get_owners",
                RegistryOp::GetOwners {
                    agent_id: "agent-1".into(),
                },
            ),
            ("sweep", RegistryOp::Sweep),
            (
                "announce_replica",
                RegistryOp::AnnounceReplica {
                    replica_id: "hub-0".into(),
                    mesh_url: "wss://hub-0.example:7443/mesh".into(),
                    lease: LEASE,
                },
            ),
            ("health", RegistryOp::Health),
        ] {
            let r = c.regs[0].apply(&op).await;
            println!(
                "- {what}: {}",
                match r {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("error: {e}"),
                }
            );
        }
    }
}
