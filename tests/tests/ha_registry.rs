//! Hubs on a shared real redis-server: degradation when Redis dies, automatic
//! recovery, and fencing of a hub that lost ownership of an agent.

use std::io::Read;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::*;

fn ha_yaml(env: &Env, replica: &str, redis: &RedisProc, listeners: &[(&str, &str)]) -> String {
    env.hub_yaml(
        listeners,
        &format!(
            "ha:\n  enabled: true\n  mode: active\n  replica_id: {replica}\n  redis_url: {}\n  lease_sec: 3\n  renew_interval_sec: 1\n  registry_timeout_ms: 300\n",
            redis.url()
        ),
    )
}

#[test]
fn redis_outage_keeps_local_flows_refuses_remote_at_once_and_recovers() {
    let env = Env::new();
    let mut redis = RedisProc::start(env.path());
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub-a",
        &ha_yaml(
            &env,
            "hub-a",
            &redis,
            &[("echo", "echo"), ("other", "other")],
        ),
    );
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(
        hub.agents_attached(1.0, Duration::from_secs(15)),
        "{}\n{}",
        hub.proc.log_text(),
        agent.proc.log_text()
    );
    assert!(
        eventually(Duration::from_secs(5), || hub.get("/readyz").0 == 200),
        "{:?}",
        hub.get("/readyz")
    );
    let data = Arc::new(random_bytes(256 * 1024));
    let want = sha256(&data);
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        want
    );

    redis.kill();
    // Readiness turns 503 with the reason.
    assert!(
        eventually(Duration::from_secs(5), || {
            let (s, b) = hub.get("/readyz");
            s == 503 && b.contains("registry unhealthy")
        }),
        "{:?}",
        hub.get("/readyz")
    );
    // Local flows keep working.
    for _ in 0..5 {
        assert_eq!(
            echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
            want
        );
    }
    // A connector only a remote agent could serve is refused at once.
    let start = Instant::now();
    let mut c = TcpStream::connect(hub.listener("other")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refusal took {:?}",
        start.elapsed()
    );
    assert!(
        hub.metric("nowconnect_client_connections_refused_total{reason=\"registry_unavailable\"}")
            >= 1.0
    );
    hub.proc
        .wait_log("registry is unavailable", Duration::from_secs(5));

    // Redis comes back empty: the hub recovers by itself and re-claims its agent.
    redis.restart();
    assert!(
        eventually(Duration::from_secs(10), || hub.get("/readyz").0 == 200),
        "did not recover: {:?}",
        hub.get("/readyz")
    );
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        want
    );
    assert_eq!(hub.metric("nowconnect_agents_connected"), 1.0);
    // The agent never had to reconnect.
    assert_eq!(
        agent.proc.log_text().matches("tunnel established").count(),
        1,
        "{}",
        agent.proc.log_text()
    );
}

#[test]
fn a_hub_that_lost_ownership_closes_its_tunnel_and_counts_it() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let a = HubProc::start(
        env.path(),
        "hub-a",
        &ha_yaml(&env, "hub-a", &redis, &[("echo", "echo")]),
    );
    let b = HubProc::start(
        env.path(),
        "hub-b",
        &ha_yaml(&env, "hub-b", &redis, &[("echo", "echo")]),
    );
    let token = env.token("agent-1", None);
    let mut first = AgentProc::start(
        env.path(),
        "agent-on-a",
        &env.agent_yaml("agent-1", &[a.http], &[("echo", echo)], ""),
        &token,
    );
    assert!(a.agents_attached(1.0, Duration::from_secs(15)));
    // The same agent id attaches to hub B: B claims a higher epoch.
    let _second = AgentProc::start(
        env.path(),
        "agent-on-b",
        &env.agent_yaml("agent-1", &[b.http], &[("echo", echo)], ""),
        &token,
    );
    assert!(b.agents_attached(1.0, Duration::from_secs(15)));
    // A's next renewal finds the newer epoch: it closes its tunnel and counts it.
    assert!(
        eventually(Duration::from_secs(10), || a
            .metric("nowconnect_owner_epoch_mismatch_total")
            >= 1.0),
        "{}",
        a.proc.log_text()
    );
    first.proc.kill();
    a.proc.wait_log("lost to hub-b", Duration::from_secs(5));
    assert!(a.agents_attached(0.0, Duration::from_secs(5)));
    // B serves the agent.
    let data = Arc::new(random_bytes(64 * 1024));
    assert_eq!(
        echo_roundtrip(b.listener("echo"), data.clone()).unwrap(),
        sha256(&data)
    );
}
