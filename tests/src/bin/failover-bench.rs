//! Failover and cross-replica share with multi-homed and single-homed
//! agents (`docs/performance.md`, issue #21), with real processes: per run a
//! `redis-server`, two meshed hubs (mTLS) and an agent on both hubs' list,
//! with `ha_connections` 1 or 2 in alternating rounds. Each run:
//!
//! 1. 100 clients alternate between the two hubs (a round-robin balancer):
//!    the share of flows that crossed the mesh, from the hubs' own
//!    `nowconnect_flows_total{route}`;
//! 2. hub-a (which holds the single-homed agent, and one of the
//!    multi-homed agent's tunnels) is killed with SIGKILL and new
//!    connections go through hub-b at once, one after the other: the time
//!    from the kill until the first one completes, and how many failed
//!    after the first 50 ms.
//!
//! With `--delay-ms D` the agent reaches the hubs through a proxy adding D
//! each way (a WAN round trip of 2·D to the premise).
//!
//!   NOWCONNECT_BIN=target/e2e/release/nowconnect \
//!   cargo run --release -p nowconnect-tests --bin failover-bench -- [--runs 10] [--delay-ms 0,10]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

struct Run {
    /// Kill → first completed connection through the survivor.
    gap: Duration,
    /// Connections through the survivor that failed after the first 50 ms.
    late_failures: u32,
    /// Connections that failed in all.
    failures: u32,
    /// Mesh flows / all flows while both hubs were up.
    cross_share: f64,
}

fn one_run(ha: u8, delay: Duration) -> Run {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let (mut a, b, _, _) = meshed_pair(&env, "active", &redis, &Ca::new("mesh CA"));
    let hubs = if delay.is_zero() {
        vec![a.http, b.http]
    } else {
        vec![delay_proxy(a.http, delay), delay_proxy(b.http, delay)]
    };
    let echo = echo_server();
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &hubs,
            &[("ldap", echo)],
            &format!("ha_connections: {ha}\n"),
        ),
        &env.token("agent-1", None),
    );
    let ready = eventually(Duration::from_secs(30), || {
        a.metric("nowconnect_agents_connected") == 1.0
            && (ha == 1 || b.metric("nowconnect_agents_connected") == 1.0)
            && mesh_established(&a, "hub-b")
            && mesh_established(&b, "hub-a")
    });
    assert!(ready, "cluster not ready:\n{}", agent.proc.log_text());
    let flows = |h: &HubProc, route: &str| {
        h.metric(&format!(
            "nowconnect_flows_total{{connector=\"ldap\",route=\"{route}\"}}"
        ))
    };
    let small = Arc::new(vec![7u8; 64]);
    let quiet = Duration::from_secs(2);
    for i in 0..100 {
        let via = if i % 2 == 0 { &a } else { &b };
        echo_roundtrip_within(via.listener("ldap"), small.clone(), quiet)
            .expect("echo before the kill");
    }
    let mesh = flows(&a, "mesh") + flows(&b, "mesh");
    let local = flows(&a, "local") + flows(&b, "local");
    let cross_share = mesh / (mesh + local);

    a.proc.kill();
    let killed = Instant::now();
    let (mut gap, mut failures, mut late_failures, mut after_ok) = (None, 0, 0, 0);
    while after_ok < 50 && killed.elapsed() < Duration::from_secs(20) {
        let started = killed.elapsed();
        match echo_roundtrip_within(b.listener("ldap"), small.clone(), quiet) {
            Ok(_) => {
                gap.get_or_insert(killed.elapsed());
                after_ok += u32::from(gap.is_some());
            }
            Err(_) => {
                failures += 1;
                if started > Duration::from_millis(50) {
                    late_failures += 1;
                }
            }
        }
    }
    Run {
        gap: gap.expect("no connection through the survivor within 20 s"),
        late_failures,
        failures,
        cross_share,
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let mut runs = 10;
    let mut delays = vec![0u64, 10];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--runs" => runs = v.parse().expect("--runs N"),
            "--delay-ms" => {
                delays = v
                    .split(',')
                    .map(|d| d.parse().expect("--delay-ms D[,D]"))
                    .collect()
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    println!(
        "| agent | delay each way | runs | kill → first connection through the survivor, p50 / p99 / max (ms) | failed connections (after the first 50 ms) | cross-replica share, median |"
    );
    println!("|---|---|---|---|---|---|");
    for delay in delays {
        let delay = Duration::from_millis(delay);
        let mut by_ha: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
        // Alternating rounds: single-homed, multi-homed, single, ...
        for _ in 0..runs {
            for (k, ha) in [1u8, 2].into_iter().enumerate() {
                by_ha[k].push(one_run(ha, delay));
            }
        }
        for (k, name) in [
            "single-homed (ha_connections: 1)",
            "multi-homed (ha_connections: 2)",
        ]
        .into_iter()
        .enumerate()
        {
            let rs = &by_ha[k];
            let mut gaps: Vec<Duration> = rs.iter().map(|r| r.gap).collect();
            gaps.sort();
            let mut shares: Vec<f64> = rs.iter().map(|r| r.cross_share).collect();
            shares.sort_by(f64::total_cmp);
            let failures: u32 = rs.iter().map(|r| r.failures).sum();
            let late: u32 = rs.iter().map(|r| r.late_failures).sum();
            println!(
                "| {name} | {} ms | {} | {} / {} / {} | {failures} ({late}) | {:.1} % |",
                delay.as_millis(),
                rs.len(),
                ms(quantile(&gaps, 0.5)),
                ms(quantile(&gaps, 0.99)),
                ms(*gaps.last().expect("runs")),
                shares[shares.len() / 2] * 100.0,
            );
        }
    }
}
