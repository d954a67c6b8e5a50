//! The runtime conformance suite: the same scenarios, each run once per
//! runtime of the process under test (`tokio_agent::*`, `async_std_agent::*`).
//! Hubs run on tokio, so every async-std case is also a mixed deployment: an
//! async-std agent attached to a tokio hub (and, in the HA cases, reached
//! through a tokio mesh).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::ldap::{self, ADMIN_PW, Slapd};
use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

/// One `#[test]` per scenario and runtime.
macro_rules! for_each_runtime {
    ($($scenario:ident),* $(,)?) => {
        mod tokio_agent {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::Tokio) } )*
        }
        mod async_std_agent {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::AsyncStd) } )*
        }
    };
}

for_each_runtime!(
    ldap_answers_like_slapd_directly,
    bulk_data_arrives_intact,
    an_unreachable_target_closes_the_client_at_once,
    the_agent_comes_back_after_a_hub_restart,
    ldap_reaches_the_agent_across_the_mesh,
    the_agent_moves_when_its_owner_hub_dies,
    a_redis_outage_keeps_local_flows,
);

fn attached(hub: &HubProc, agent: &AgentProc, rt: Runtime) {
    assert!(
        eventually(Duration::from_secs(15), || hub
            .metric("nowconnect_agents_connected")
            == 1.0),
        "{} agent did not attach; hub log:\n{}\nagent log:\n{}",
        rt.name(),
        hub.proc.log_text(),
        agent.proc.log_text()
    );
}

/// One hub, one agent on `rt` serving `connectors`.
fn single(env: &Env, rt: Runtime, connectors: &[(&str, SocketAddr)]) -> (HubProc, AgentProc) {
    let listeners: Vec<(&str, &str)> = connectors.iter().map(|(n, _)| (*n, *n)).collect();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&listeners, ""));
    let agent = AgentProc::start_on(
        rt,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], connectors, ""),
        &env.token("agent-1", None),
    );
    attached(&hub, &agent, rt);
    (hub, agent)
}

fn ldap_answers_like_slapd_directly(rt: Runtime) {
    let env = Env::new();
    let slapd = Slapd::start(env.path());
    let (hub, _agent) = single(&env, rt, &[("ldap", slapd.addr)]);
    let via = hub.listener("ldap");
    for filter in ["(objectClass=*)", "(uid=alice)", "(uid=nobody)"] {
        let direct = ldap::search(slapd.addr, filter);
        assert_eq!(direct.0, 0, "direct search failed: {}", direct.1);
        assert_eq!(ldap::search(via, filter), direct, "search {filter} differs");
    }
    let direct = ldap::whoami(slapd.addr, ADMIN_PW);
    let tunneled = ldap::whoami(via, ADMIN_PW);
    assert_eq!(tunneled.0, 0, "{tunneled:?}");
    assert_eq!(tunneled.1, direct.1);
    assert_eq!(ldap::whoami(via, "wrong").0, 49, "invalid credentials");
}

fn bulk_data_arrives_intact(rt: Runtime) {
    let env = Env::new();
    let echo = echo_server();
    let (hub, _agent) = single(&env, rt, &[("echo", echo)]);
    let via = hub.listener("echo");
    let big = Arc::new(random_bytes(32 * 1024 * 1024));
    let want = sha256(&big);
    assert_eq!(
        echo_roundtrip(via, big).unwrap(),
        want,
        "32 MiB echo corrupted"
    );
    let handles: Vec<_> = (0..64)
        .map(|_| {
            let data = Arc::new(random_bytes(512 * 1024));
            let want = sha256(&data);
            std::thread::spawn(move || (echo_roundtrip(via, data), want))
        })
        .collect();
    for h in handles {
        let (got, want) = h.join().unwrap();
        assert_eq!(
            got.expect("flow failed"),
            want,
            "a concurrent flow was corrupted"
        );
    }
    assert_eq!(hub.metric("nowconnect_protocol_errors_total"), 0.0);
}

fn an_unreachable_target_closes_the_client_at_once(rt: Runtime) {
    let env = Env::new();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (hub, agent) = single(&env, rt, &[("dead", dead)]);
    let mut c = TcpStream::connect(hub.listener("dead")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let r = c.read(&mut buf);
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "data from a dead target: {r:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    assert!(eventually(Duration::from_secs(5), || hub.metric(
        "nowconnect_flow_resets_total{code=\"target_unreachable\"}"
    ) >= 1.0));
    assert!(
        agent.proc.log_text().contains("Connection refused"),
        "{}",
        agent.proc.log_text()
    );
}

fn the_agent_comes_back_after_a_hub_restart(rt: Runtime) {
    let env = Env::new();
    let echo = echo_server();
    let http_port = free_port();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replace(
        "bind: 127.0.0.1:0\ntunnel",
        &format!("bind: 127.0.0.1:{http_port}\ntunnel"),
    );
    let mut hub = HubProc::start(env.path(), "hub1", &yaml);
    let agent = AgentProc::start_on(
        rt,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], ""),
        &env.token("agent-1", None),
    );
    attached(&hub, &agent, rt);
    hub.proc.kill();
    let hub2 = HubProc::start(env.path(), "hub2", &yaml);
    attached(&hub2, &agent, rt);
    let data = Arc::new(random_bytes(100_000));
    assert_eq!(
        echo_roundtrip(hub2.listener("echo"), data.clone()).unwrap(),
        sha256(&data)
    );
}

fn ldap_reaches_the_agent_across_the_mesh(rt: Runtime) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let slapd = Slapd::start(env.path());
    let ca = Ca::new("mesh CA");
    let (a, b, pa, pb) = meshed_pair(&env, "active", &redis, &ca);
    let agent = AgentProc::start_on(
        rt,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", slapd.addr)], ""),
        &env.token("agent-1", None),
    );
    attached(&a, &agent, rt);
    assert!(
        eventually(Duration::from_secs(15), || mesh_established(&b, pa)
            && mesh_established(&a, pb)),
        "mesh not up:\n{}\n{}",
        a.proc.log_text(),
        b.proc.log_text()
    );
    let direct = ldap::search(slapd.addr, "(uid=alice)");
    assert!(
        eventually(Duration::from_secs(10), || ldap::search(
            b.listener("ldap"),
            "(uid=alice)"
        ) == direct),
        "LDAP via the other hub differs; hub-b log:\n{}",
        b.proc.log_text()
    );
    assert!(b.metric("nowconnect_flows_total{connector=\"ldap\",route=\"mesh\"}") >= 1.0);
}

fn the_agent_moves_when_its_owner_hub_dies(rt: Runtime) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let (mut a, b, pa, _) = meshed_pair(&env, "active", &redis, &ca);
    let agent = AgentProc::start_on(
        rt,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http, b.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    attached(&a, &agent, rt);
    assert!(eventually(Duration::from_secs(15), || mesh_established(
        &b, pa
    )));
    let data = Arc::new(random_bytes(50_000));
    let want = sha256(&data);
    assert_eq!(
        echo_roundtrip(b.listener("ldap"), data.clone()).unwrap(),
        want
    );
    a.proc.kill();
    assert!(
        eventually(Duration::from_secs(15), || matches!(
            echo_roundtrip(b.listener("ldap"), data.clone()),
            Ok(h) if h == want
        )),
        "no recovery; agent log:\n{}",
        agent.proc.log_text()
    );
    let epochs = epochs_in_log(&agent.proc.log_text(), "tunnel established");
    assert_eq!(epochs.len(), 2, "{}", agent.proc.log_text());
    assert!(epochs[1] > epochs[0], "{epochs:?}");
}

fn a_redis_outage_keeps_local_flows(rt: Runtime) {
    let env = Env::new();
    let mut redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let (a, _b, _, _) = meshed_pair(&env, "active", &redis, &ca);
    let agent = AgentProc::start_on(
        rt,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    attached(&a, &agent, rt);
    let data = Arc::new(random_bytes(200_000));
    let want = sha256(&data);
    redis.kill();
    assert!(eventually(Duration::from_secs(5), || a.get("/readyz").0 == 503));
    for _ in 0..3 {
        assert_eq!(
            echo_roundtrip(a.listener("ldap"), data.clone()).unwrap(),
            want
        );
    }
    redis.restart();
    assert!(eventually(Duration::from_secs(10), || a.get("/readyz").0 == 200));
    assert_eq!(
        echo_roundtrip(a.listener("ldap"), data.clone()).unwrap(),
        want
    );
    assert_eq!(
        agent.proc.log_text().matches("tunnel established").count(),
        1,
        "the agent had to reconnect: {}",
        agent.proc.log_text()
    );
}
