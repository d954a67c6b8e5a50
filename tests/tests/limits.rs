//! Limits at the edge, with real processes: 10,000 idle client connections
//! held open on one listener (each a real flow through the agent to a target
//! that never answers) while other flows keep working; then all of them go
//! away and the hub is back to zero. Prints the hub's RSS per idle flow.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::*;

const IDLE: usize = 10_000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn ten_thousand_idle_connections_on_a_listener_leave_other_flows_alone() {
    let env = Env::new();
    let holder = Proc::spawn(
        "hold-target",
        Command::new(env!("CARGO_BIN_EXE_hold-target")),
        env.path(),
    );
    let line = holder.wait_line("listening ", Duration::from_secs(10));
    let hold: SocketAddr = line
        .trim_start_matches("listening ")
        .trim()
        .parse()
        .unwrap();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("idle", "idle"), ("echo", "echo")],
            "log:\n  level: warn\n",
        )
        .replace("tunnel:\n", "tunnel:\n  max_flows_per_agent: 12000\n"),
    );
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[hub.http],
            &[("idle", hold), ("echo", echo)],
            "log:\n  level: warn\nmax_flows: 12000\n",
        ),
        &env.token("agent-1", None),
    );
    assert!(eventually(Duration::from_secs(15), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));
    let data = Arc::new(random_bytes(1024 * 1024));
    let want = sha256(&data);
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        want
    );
    let before = rss_kib(hub.proc.pid());

    // Open them in batches so the agent's target dials keep up (its pending
    // dial limit is a separate edge).
    let via = hub.listener("idle");
    let start = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE);
    let active = || hub.metric("nowconnect_flows_active{connector=\"idle\"}");
    while idle.len() < IDLE {
        for _ in 0..500.min(IDLE - idle.len()) {
            idle.push(TcpStream::connect_timeout(&via, Duration::from_secs(10)).unwrap());
        }
        let n = idle.len() as f64;
        assert!(
            eventually(Duration::from_secs(30), || active() >= n),
            "only {} of {n} idle flows open; hub log:\n{}\nagent log:\n{}",
            active(),
            hub.proc.log_text(),
            agent.proc.log_text()
        );
    }
    let opened = start.elapsed();
    let after = rss_kib(hub.proc.pid());
    eprintln!(
        "{IDLE} idle flows opened in {opened:?}; hub RSS {before} KiB -> {after} KiB: {:.2} KiB per flow",
        (after.saturating_sub(before)) as f64 / IDLE as f64
    );

    // Everything else still works beside them.
    assert_eq!(hub.get("/healthz"), (200, "ok".into()));
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        want
    );

    // They all go away (clients close, then the target process exits: a
    // half-closed flow lives until its target side ends too); the hub is
    // back to zero idle flows.
    drop(idle);
    drop(holder);
    assert!(
        eventually(Duration::from_secs(60), || active() == 0.0),
        "{} idle flows left after the clients closed",
        active()
    );
    assert_eq!(echo_roundtrip(hub.listener("echo"), data).unwrap(), want);
    assert_eq!(hub.metric("nowconnect_protocol_errors_total"), 0.0);
}
