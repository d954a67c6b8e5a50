//! Two and three hubs joined by the mTLS mesh, sharing a real redis-server:
//! cross-replica LDAP, shadow mode, certificate checks.

use std::time::Duration;

use nowconnect_tests::ldap::{self, Slapd};
use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

#[test]
fn ldap_reaches_an_agent_on_another_hub_through_the_mesh() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let slapd = Slapd::start(env.path());
    let ca = Ca::new("mesh CA");
    let (a, b, _, _) = meshed_pair(&env, "active", &redis, &ca);
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", slapd.addr)], ""),
        &env.token("agent-1", None),
    );
    assert!(
        eventually(Duration::from_secs(15), || a
            .metric("nowconnect_agents_connected")
            == 1.0
            && mesh_established(&b, "hub-a")
            && mesh_established(&a, "hub-b")),
        "hub-a:\n{}\nhub-b:\n{}",
        a.proc.log_text(),
        b.proc.log_text()
    );
    assert!(
        eventually(Duration::from_secs(5), || b.get("/readyz").0 == 200),
        "{:?}",
        b.get("/readyz")
    );

    for filter in ["(objectClass=*)", "(uid=alice)"] {
        let direct = ldap::search(slapd.addr, filter);
        assert_eq!(direct.0, 0);
        assert_eq!(
            ldap::search(b.listener("ldap"), filter),
            direct,
            "search {filter} through hub-b differs"
        );
    }
    let bad = ldap::whoami(b.listener("ldap"), "wrong");
    assert_eq!(bad.0, 49, "{bad:?}");
    assert!(b.metric("nowconnect_flows_total{connector=\"ldap\",route=\"mesh\"}") >= 3.0);
    // Link counters are exported a few times a second, not per frame.
    for (h, series) in [
        (
            &b,
            "nowconnect_mesh_frames_total{dir=\"out\",type=\"M_OPEN\"}",
        ),
        (
            &a,
            "nowconnect_mesh_frames_total{dir=\"in\",type=\"M_DATA\"}",
        ),
        (
            &b,
            "nowconnect_mesh_frames_total{dir=\"in\",type=\"M_DATA\"}",
        ),
    ] {
        assert!(
            eventually(Duration::from_secs(2), || h.metric(series) >= 3.0),
            "{series}: {}",
            h.metric(series)
        );
    }
    // Hubs dial their configured peers only once registered, so a cluster
    // that starts raises no security event against its own members.
    for (h, name) in [(&a, "hub-a"), (&b, "hub-b")] {
        let text = h.get("/metrics").1;
        let raised: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nowconnect_security_events_total{") && !l.ends_with(" 0"))
            .collect();
        assert!(
            raised.is_empty(),
            "{name}: {raised:?}\n{}",
            h.proc.log_text()
        );
        assert!(
            text.contains("nowconnect_security_events_total{kind=\"mesh_peer_not_registered\"} 0")
        );
    }
}

#[test]
fn shadow_mode_serves_locally_and_counts_what_active_would_route() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let (a, b, _, _) = meshed_pair(&env, "shadow", &redis, &ca);
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(eventually(Duration::from_secs(15), || a
        .metric("nowconnect_agents_connected")
        == 1.0
        && mesh_established(&b, "hub-a")));
    // hub-b has no local agent: shadow serves locally only, so it refuses...
    let mut c = std::net::TcpStream::connect(b.listener("ldap")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut c, &mut buf),
        Ok(0) | Err(_)
    ));
    // ...and counts that active mode would have used the mesh.
    assert!(eventually(Duration::from_secs(5), || b
        .metric("nowconnect_shadow_would_route_total{route=\"mesh\"}")
        >= 1.0));
    b.proc
        .wait_log("active would forward to hub-a", Duration::from_secs(5));
    // hub-a serves its own agent as usual.
    let data = std::sync::Arc::new(random_bytes(10_000));
    assert_eq!(
        echo_roundtrip(a.listener("ldap"), data.clone()).unwrap(),
        sha256(&data)
    );
}

#[test]
fn a_mesh_peer_with_a_certificate_from_another_ca_is_refused() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let good = Ca::new("mesh CA");
    let rogue = Ca::new("rogue CA");
    let (pa, pc) = (free_port(), free_port());
    let a = HubProc::start(
        env.path(),
        "hub-a",
        &mesh_hub_yaml(
            &env,
            "hub-a",
            "active",
            &redis,
            pa,
            &[],
            &good.issue(env.path(), "hub-a"),
        ),
    );
    let c = HubProc::start(
        env.path(),
        "hub-c",
        &mesh_hub_yaml(
            &env,
            "hub-c",
            "active",
            &redis,
            pc,
            &[pa],
            &rogue.issue(env.path(), "hub-c"),
        ),
    );
    assert!(
        eventually(Duration::from_secs(10), || a
            .proc
            .log_text()
            .contains("mesh peer refused")),
        "{}",
        a.proc.log_text()
    );
    assert!(eventually(Duration::from_secs(2), || a
        .metric("nowconnect_mesh_link_errors_total")
        >= 1.0));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!mesh_established(&c, "hub-a"));
    assert_eq!(
        c.get("/readyz").0,
        503,
        "hub-c must not be ready without a mesh peer"
    );
}

#[test]
fn when_the_owner_hub_is_killed_the_agent_moves_and_new_flows_work_again() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let (mut a, b, _, _) = meshed_pair(&env, "active", &redis, &ca);
    let agent_yaml = env.agent_yaml("agent-1", &[a.http, b.http], &[("ldap", echo)], "");
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &agent_yaml,
        &env.token("agent-1", None),
    );
    assert!(eventually(Duration::from_secs(15), || a
        .metric("nowconnect_agents_connected")
        == 1.0
        && mesh_established(&b, "hub-a")));
    let data = std::sync::Arc::new(random_bytes(50_000));
    let want = sha256(&data);
    // Through the mesh first.
    assert_eq!(
        echo_roundtrip(b.listener("ldap"), data.clone()).unwrap(),
        want
    );

    a.proc.kill();
    let recovered = echo_until_recovered(b.listener("ldap"), data.clone(), Duration::from_secs(15))
        .unwrap_or_else(|e| {
            panic!(
                "{e}; hub-b log:\n{}\nagent log:\n{}",
                b.proc.log_text(),
                agent.proc.log_text()
            )
        });
    eprintln!("time to recovery after SIGKILL of the owner hub: {recovered:?}");
    assert_eq!(b.metric("nowconnect_agents_connected"), 1.0);
    // The new claim carries a higher epoch than the dead owner's.
    let log = agent.proc.log_text();
    let epochs = epochs_in_log(&log, "tunnel established");
    assert_eq!(epochs.len(), 2, "{log}");
    assert!(epochs[1] > epochs[0], "{epochs:?}");
}

#[test]
fn redis_down_refuses_cross_replica_at_once_keeps_local_flows_and_recovers() {
    let env = Env::new();
    let mut redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let (a, b, _, _) = meshed_pair(&env, "active", &redis, &ca);
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(eventually(Duration::from_secs(15), || a
        .metric("nowconnect_agents_connected")
        == 1.0
        && mesh_established(&b, "hub-a")));
    let data = std::sync::Arc::new(random_bytes(50_000));
    let want = sha256(&data);
    assert_eq!(
        echo_roundtrip(b.listener("ldap"), data.clone()).unwrap(),
        want
    );

    redis.kill();
    assert!(eventually(Duration::from_secs(5), || a.get("/readyz").0
        == 503
        && b.get("/readyz").0 == 503));
    // A's own agent keeps serving A's clients.
    assert_eq!(
        echo_roundtrip(a.listener("ldap"), data.clone()).unwrap(),
        want
    );
    // B refuses the cross-replica flow within a second, with a logged reason.
    let start = std::time::Instant::now();
    let mut c = std::net::TcpStream::connect(b.listener("ldap")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(
        std::io::Read::read(&mut c, &mut buf),
        Ok(0) | Err(_)
    ));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    b.proc
        .wait_log("registry is unavailable", Duration::from_secs(5));

    redis.restart();
    assert!(
        eventually(Duration::from_secs(15), || a.get("/readyz").0 == 200
            && b.get("/readyz").0 == 200),
        "{:?} {:?}",
        a.get("/readyz"),
        b.get("/readyz")
    );
    // Cross-replica flows work again once A re-announced its agent.
    assert!(
        eventually(
            Duration::from_secs(10),
            || matches!(echo_roundtrip(b.listener("ldap"), data.clone()), Ok(h) if h == want)
        ),
        "{}",
        b.proc.log_text()
    );
}

#[test]
fn three_hubs_with_one_started_later_join_by_discovery_alone() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let ports = [free_port(), free_port(), free_port()];
    let yaml = |i: usize| {
        let name = ["hub-a", "hub-b", "hub-c"][i];
        // No peers listed: each hub only announces where it can be reached.
        mesh_hub_yaml(
            &env,
            name,
            "active",
            &redis,
            ports[i],
            &[],
            &ca.issue(env.path(), name),
        )
        .replace(
            "    require_mtls: true\n",
            &format!(
                "    require_mtls: true\n    advertise_url: 'wss://127.0.0.1:{}/mesh'\n",
                ports[i]
            ),
        )
    };
    let a = HubProc::start(env.path(), "hub-a", &yaml(0));
    let b = HubProc::start(env.path(), "hub-b", &yaml(1));
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(
        eventually(Duration::from_secs(15), || mesh_established(&a, "hub-b")
            && mesh_established(&b, "hub-a")),
        "{}",
        a.proc.log_text()
    );
    let c = HubProc::start(env.path(), "hub-c", &yaml(2));
    assert!(
        eventually(Duration::from_secs(15), || mesh_established(&c, "hub-a")
            && mesh_established(&c, "hub-b")
            && mesh_established(&a, "hub-c")
            && mesh_established(&b, "hub-c")),
        "{}",
        c.proc.log_text()
    );
    let data = std::sync::Arc::new(random_bytes(100_000));
    assert!(a.agents_attached(1.0, Duration::from_secs(5)));
    assert_eq!(
        echo_roundtrip(c.listener("ldap"), data.clone()).unwrap(),
        sha256(&data)
    );
    c.proc
        .wait_log("mesh peer discovered", Duration::from_secs(5));
}

#[test]
fn a_severed_mesh_link_resets_only_its_flows_and_comes_back() {
    use std::io::{Read, Write};
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let (echo_a, echo_b) = (echo_server(), echo_server());
    let ca = Ca::new("mesh CA");
    let (pa, pb) = (free_port(), free_port());
    let proxy = Proxy::start(format!("127.0.0.1:{pa}").parse().unwrap());
    // B reaches A only through the proxy; A does not dial B.
    let a = HubProc::start(
        env.path(),
        "hub-a",
        &mesh_hub_yaml(
            &env,
            "hub-a",
            "active",
            &redis,
            pa,
            &[],
            &ca.issue(env.path(), "hub-a"),
        ),
    );
    let b_yaml = mesh_hub_yaml(
        &env,
        "hub-b",
        "active",
        &redis,
        pb,
        &[proxy.addr.port()],
        &ca.issue(env.path(), "hub-b"),
    )
    .replace(
        "listeners:\n",
        "listeners:\n  - { name: local, bind: '127.0.0.1:0', connector: local }\n",
    );
    let b = HubProc::start(env.path(), "hub-b", &b_yaml);
    let _agent_a = AgentProc::start(
        env.path(),
        "agent-a",
        &env.agent_yaml("agent-a", &[a.http], &[("ldap", echo_a)], ""),
        &env.token("agent-a", None),
    );
    let _agent_b = AgentProc::start(
        env.path(),
        "agent-b",
        &env.agent_yaml("agent-b", &[b.http], &[("local", echo_b)], ""),
        &env.token("agent-b", None),
    );
    let via_proxy = |h: &HubProc| mesh_established(h, "hub-a");
    assert!(eventually(Duration::from_secs(15), || via_proxy(&b)
        && a.metric("nowconnect_agents_connected") == 1.0
        && b.metric("nowconnect_agents_connected") == 1.0));

    let ping = |s: &mut std::net::TcpStream, msg: &[u8]| -> std::io::Result<()> {
        s.write_all(msg)?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        assert_eq!(back, msg);
        Ok(())
    };
    let mut over_mesh = std::net::TcpStream::connect(b.listener("ldap")).unwrap();
    let mut local = std::net::TcpStream::connect(b.listener("local")).unwrap();
    for s in [&mut over_mesh, &mut local] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    ping(&mut over_mesh, b"mesh-1").unwrap();
    ping(&mut local, b"local-1").unwrap();

    proxy.cut();
    // The flow on the severed link ends; the local flow on the same hub does not.
    let mut buf = [0u8; 16];
    let ended = over_mesh
        .write_all(b"x")
        .and_then(|_| over_mesh.read(&mut buf))
        .map_or(true, |n| n == 0);
    assert!(ended, "a flow on the severed mesh link survived");
    ping(&mut local, b"local-2").unwrap();
    assert!(eventually(Duration::from_secs(5), || b
        .metric("nowconnect_flow_resets_total{code=\"link_lost\"}")
        >= 1.0));
    // The link comes back by itself and new mesh flows work.
    let data = std::sync::Arc::new(random_bytes(20_000));
    assert!(
        eventually(
            Duration::from_secs(10),
            || matches!(echo_roundtrip(b.listener("ldap"), data.clone()), Ok(h) if h == sha256(&data))
        ),
        "{}",
        b.proc.log_text()
    );
    assert!(eventually(Duration::from_secs(2), || b
        .metric("nowconnect_mesh_link_reconnects_total")
        >= 1.0));
    ping(&mut local, b"local-3").unwrap();
}
