//! The nemesis: a seeded schedule of real faults, applied to the lab and
//! healed. One fault at a time; each is drawn from the seed, so a run's
//! schedule is replayed by its seed (timing, being real, is not).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore};

use crate::cluster::{AGENTS, Cluster, HUBS, redis_save};

#[derive(Debug, Clone)]
pub enum Fault {
    /// Hub ↔ hub: the mesh link between them.
    PartitionHubs {
        a: usize,
        b: usize,
        oneway: bool,
    },
    /// Agent ↔ hub: one of the agent's tunnels.
    PartitionAgent {
        agent: usize,
        hub: usize,
        oneway: bool,
    },
    /// Hub ↔ Redis: the hub's registry.
    PartitionRedis {
        hub: usize,
        oneway: bool,
    },
    KillHub(usize),
    KillAgent(usize),
    PauseHub(usize),
    PauseAgent(usize),
    /// Delay ± jitter (ms) with `reorder`% sent at once, both ways, on a
    /// link (`a`, `b` are lab node names).
    Delay {
        a: &'static str,
        b: &'static str,
        delay_ms: u64,
        jitter_ms: u64,
        reorder_pct: u32,
    },
    /// Packet loss (%) both ways on a link.
    Loss {
        a: &'static str,
        b: &'static str,
        pct: u32,
    },
    /// Redis killed, then restarted with its data (a snapshot taken just
    /// before) or without.
    RedisRestart {
        keep: bool,
    },
}

impl Fault {
    /// The kind the report counts it under.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::PartitionHubs { .. }
            | Fault::PartitionAgent { .. }
            | Fault::PartitionRedis { .. } => "partition",
            Fault::KillHub(_) | Fault::KillAgent(_) => "kill",
            Fault::PauseHub(_) | Fault::PauseAgent(_) => "pause",
            Fault::Delay { .. } | Fault::Loss { .. } => "netem",
            Fault::RedisRestart { .. } => "redis",
        }
    }

    /// A finer label for the recovery table.
    pub fn label(&self) -> String {
        let way = |o: &bool| if *o { "one-way" } else { "two-way" };
        match self {
            Fault::PartitionHubs { oneway, .. } => format!("partition hub↔hub ({})", way(oneway)),
            Fault::PartitionAgent { oneway, .. } => {
                format!("partition agent↔hub ({})", way(oneway))
            }
            Fault::PartitionRedis { oneway, .. } => {
                format!("partition hub↔Redis ({})", way(oneway))
            }
            Fault::KillHub(_) => "SIGKILL hub (restarted)".into(),
            Fault::KillAgent(_) => "SIGKILL agent (restarted)".into(),
            Fault::PauseHub(_) => "SIGSTOP/SIGCONT hub".into(),
            Fault::PauseAgent(_) => "SIGSTOP/SIGCONT agent".into(),
            Fault::Delay { .. } => "delay, jitter, reordering".into(),
            Fault::Loss { .. } => "packet loss".into(),
            Fault::RedisRestart { keep: true } => "Redis restart with data".into(),
            Fault::RedisRestart { keep: false } => "Redis restart without data".into(),
        }
    }

    pub fn draw(rng: &mut StdRng) -> Fault {
        let hub = |rng: &mut StdRng| rng.random_range(0..HUBS.len());
        let oneway = rng.random_bool(0.4);
        match rng.random_range(0..12) {
            0 | 1 => {
                let a = hub(rng);
                let b = (a + rng.random_range(1..HUBS.len())) % HUBS.len();
                Fault::PartitionHubs { a, b, oneway }
            }
            2 | 3 => Fault::PartitionAgent {
                agent: rng.random_range(0..AGENTS.len()),
                hub: hub(rng),
                oneway,
            },
            4 => Fault::PartitionRedis {
                hub: hub(rng),
                oneway,
            },
            5 => Fault::KillHub(hub(rng)),
            6 => Fault::KillAgent(rng.random_range(0..AGENTS.len())),
            7 => Fault::PauseHub(hub(rng)),
            8 => Fault::PauseAgent(rng.random_range(0..AGENTS.len())),
            9 | 10 => {
                let (a, b) = link(rng);
                if rng.random_bool(0.5) {
                    Fault::Delay {
                        a,
                        b,
                        delay_ms: rng.random_range(10..=80),
                        jitter_ms: rng.random_range(0..=20),
                        reorder_pct: rng.random_range(0..=25),
                    }
                } else {
                    Fault::Loss {
                        a,
                        b,
                        pct: rng.random_range(1..=10),
                    }
                }
            }
            _ => Fault::RedisRestart {
                keep: rng.random_bool(0.5),
            },
        }
    }

    /// How long the fault lasts.
    pub fn duration(&self, rng: &mut StdRng) -> Duration {
        let ms = match self {
            Fault::PauseHub(_) | Fault::PauseAgent(_) => rng.random_range(1000..=4000),
            Fault::KillHub(_) | Fault::KillAgent(_) | Fault::RedisRestart { .. } => {
                rng.random_range(500..=3000)
            }
            _ => rng.random_range(2000..=6000),
        };
        Duration::from_millis(ms)
    }
}

/// A link for netem faults: hub↔hub, agent↔hub or hub↔Redis.
fn link(rng: &mut StdRng) -> (&'static str, &'static str) {
    let h = HUBS[rng.random_range(0..HUBS.len())];
    match rng.random_range(0..3) {
        0 => {
            let others: Vec<&str> = HUBS.iter().copied().filter(|x| *x != h).collect();
            (h, others[rng.random_range(0..others.len())])
        }
        1 => (AGENTS[rng.random_range(0..AGENTS.len())], h),
        _ => (h, "redis"),
    }
}

/// What an applied fault holds until it is healed.
pub struct Active {
    pub fault: Fault,
    netem: Vec<Child>,
}

fn signal(pid: u32, sig: &str) {
    if pid != 0 {
        let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
    }
}

pub fn apply(c: &mut Cluster, fault: Fault, rng: &mut StdRng) -> Result<Active, String> {
    let mut netem = Vec::new();
    match &fault {
        Fault::PartitionHubs { a, b, oneway } => {
            if *oneway {
                c.lab.drop_one_way(HUBS[*a], HUBS[*b])?
            } else {
                c.lab.partition(HUBS[*a], HUBS[*b])?
            }
        }
        Fault::PartitionAgent { agent, hub, oneway } => {
            if *oneway {
                c.lab.drop_one_way(HUBS[*hub], AGENTS[*agent])?
            } else {
                c.lab.partition(AGENTS[*agent], HUBS[*hub])?
            }
        }
        Fault::PartitionRedis { hub, oneway } => {
            if *oneway {
                c.lab.drop_one_way(HUBS[*hub], "redis")?
            } else {
                c.lab.partition(HUBS[*hub], "redis")?
            }
        }
        Fault::KillHub(i) => {
            if let Some(h) = c.hubs[*i].as_mut() {
                h.proc.kill();
            }
        }
        Fault::KillAgent(i) => {
            if let Some(a) = c.agents[*i].as_mut() {
                a.proc.kill();
            }
        }
        Fault::PauseHub(i) => signal(c.pid(HUBS[*i]), "-STOP"),
        Fault::PauseAgent(i) => signal(c.pid(AGENTS[*i]), "-STOP"),
        Fault::Delay {
            a,
            b,
            delay_ms,
            jitter_ms,
            reorder_pct,
        } => {
            // One daemon per side, in that side's namespace (queues are
            // per namespace); rules only once it is bound.
            for (x, y) in [(*a, *b), (*b, *a)] {
                let mut cmd = c.lab.command(x, &c.own);
                cmd.args([
                    "netem",
                    "--queue",
                    "7",
                    "--delay-ms",
                    &delay_ms.to_string(),
                    "--jitter-ms",
                    &jitter_ms.to_string(),
                    "--reorder-pct",
                    &reorder_pct.to_string(),
                    "--seed",
                    &rng.next_u64().to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
                let mut child = cmd.spawn().map_err(|e| format!("netem: {e}"))?;
                let mut line = String::new();
                let out = child.stdout.take().expect("piped");
                let mut r = std::io::BufReader::new(out);
                std::io::BufRead::read_line(&mut r, &mut line).map_err(|e| e.to_string())?;
                if !line.starts_with("chaos netem") {
                    let _ = child.kill();
                    return Err(format!("netem in {x} did not start: {line}"));
                }
                // Keep reading so its last line never blocks it.
                std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = std::io::Read::read_to_string(&mut r, &mut s);
                });
                netem.push(child);
                c.lab.queue_to(x, y, 7)?;
            }
        }
        Fault::Loss { a, b, pct } => c.lab.loss(a, b, *pct)?,
        Fault::RedisRestart { keep } => {
            if *keep && !redis_save(c.redis_addr()) {
                return Err("redis SAVE failed".into());
            }
            c.kill_redis();
        }
    }
    Ok(Active { fault, netem })
}

pub fn heal(c: &mut Cluster, mut a: Active) -> Result<(), String> {
    // Network first, then let the delay daemons release what they hold.
    c.lab.heal_network()?;
    for mut d in a.netem.drain(..) {
        drop(d.stdin.take());
        let _ = d.wait();
    }
    match a.fault {
        Fault::KillHub(i) => c.restart_hub(i),
        Fault::KillAgent(i) => c.restart_agent(i),
        Fault::PauseHub(i) => signal(c.pid(HUBS[i]), "-CONT"),
        Fault::PauseAgent(i) => signal(c.pid(AGENTS[i]), "-CONT"),
        Fault::RedisRestart { keep } => c.restart_redis(keep),
        _ => {}
    }
    Ok(())
}
