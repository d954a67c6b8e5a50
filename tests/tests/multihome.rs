//! Multi-homed agents with real processes: an agent holds a tunnel on each
//! of two meshed hubs (real redis-server, mTLS mesh), so clients on either
//! hub are served locally, a hub's loss costs the survivor nothing, and
//! behind one round-robin address the agent keeps dialing until its
//! tunnels are on distinct hubs.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nowconnect_tests::ldap::{self, Slapd};
use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

/// Two meshed hubs and an agent dialing `hubs` with `ha_connections: 2`.
fn multihomed(
    env: &Env,
    redis: &RedisProc,
    target: SocketAddr,
    hubs: impl FnOnce(&HubProc, &HubProc) -> Vec<SocketAddr>,
) -> (HubProc, HubProc, AgentProc) {
    let (a, b, pa, pb) = meshed_pair(env, "active", redis, &Ca::new("mesh CA"));
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &hubs(&a, &b),
            &[("ldap", target)],
            "ha_connections: 2\n",
        ),
        &env.token("agent-1", None),
    );
    assert!(
        eventually(Duration::from_secs(20), || a
            .metric("nowconnect_agents_connected")
            == 1.0
            && b.metric("nowconnect_agents_connected") == 1.0
            && dialed_link_up(&a, pb)
            && dialed_link_up(&b, pa)
            && mesh_established(&a, "hub-b")
            && mesh_established(&b, "hub-a")),
        "the agent is not on both hubs:\nhub-a:\n{}\nhub-b:\n{}\nagent:\n{}",
        a.proc.log_text(),
        b.proc.log_text(),
        agent.proc.log_text()
    );
    (a, b, agent)
}

fn mesh_flows(h: &HubProc) -> f64 {
    h.metric("nowconnect_flows_total{connector=\"ldap\",route=\"mesh\"}")
}

fn local_flows(h: &HubProc) -> f64 {
    h.metric("nowconnect_flows_total{connector=\"ldap\",route=\"local\"}")
}

#[test]
fn every_client_is_served_by_a_local_tunnel_on_either_hub() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let slapd = Slapd::start(env.path());
    let (a, b, _agent) = multihomed(&env, &redis, slapd.addr, |a, b| vec![a.http, b.http]);
    let direct = ldap::search(slapd.addr, "(uid=alice)");
    assert_eq!(direct.0, 0);
    // Clients alternate between the hubs, as behind a round-robin balancer.
    let n = 40;
    for i in 0..n {
        let via = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            ldap::search(via.listener("ldap"), "(uid=alice)"),
            direct,
            "search {i}"
        );
    }
    let local = local_flows(&a) + local_flows(&b);
    let mesh = mesh_flows(&a) + mesh_flows(&b);
    assert_eq!(local, f64::from(n), "every flow local");
    assert_eq!(mesh, 0.0, "no flow crossed the mesh");
}

#[test]
fn a_killed_hub_costs_the_surviving_hub_no_refused_connection() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let (mut a, b, agent) = multihomed(&env, &redis, echo_server(), |a, b| vec![a.http, b.http]);
    let data = Arc::new(random_bytes(4096));
    let want = sha256(&data);
    a.proc.kill();
    let killed = Instant::now();
    // From the moment hub-a is gone, every connection through hub-b works:
    // its own tunnel to the agent was there all along.
    let mut first_ok = None;
    for i in 0..50 {
        match echo_roundtrip(b.listener("ldap"), data.clone()) {
            Ok(h) if h == want => {
                first_ok.get_or_insert(killed.elapsed());
            }
            other => panic!(
                "connection {i} through hub-b failed after hub-a died: {other:?}\nhub-b:\n{}\nagent:\n{}",
                b.proc.log_text(),
                agent.proc.log_text()
            ),
        }
    }
    println!("first connection through the survivor after the kill: {first_ok:?}");
    assert_eq!(mesh_flows(&b), 0.0);
    assert!(local_flows(&b) >= 50.0);
    // The agent did not give up its tunnel to hub-b to get there.
    assert_eq!(b.metric("nowconnect_agents_connected"), 1.0);
}

/// A TCP proxy that sends each new connection to the next of `to` in turn
/// (a round-robin balancer in front of the hubs' tunnel ports).
fn round_robin(to: Vec<SocketAddr>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let next = AtomicUsize::new(0);
    std::thread::spawn(move || {
        for c in l.incoming().map_while(Result::ok) {
            let up = to[next.fetch_add(1, Ordering::Relaxed) % to.len()];
            let Ok(s) = TcpStream::connect(up) else {
                continue;
            };
            for (mut r, mut w) in [(c.try_clone().unwrap(), s.try_clone().unwrap()), (s, c)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut r, &mut w);
                    let _ = w.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

#[test]
fn behind_one_balanced_address_the_agent_ends_up_on_both_hubs() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    // The balancer's first two connections both go to hub-a: the agent's
    // two slots land on the same hub, and it must move one on.
    let (a, b, agent) = multihomed(&env, &redis, echo_server(), |a, b| {
        vec![round_robin(vec![a.http, a.http, b.http])]
    });
    let log = agent.proc.log_text();
    assert!(
        log.contains("already carries tunnel slot"),
        "the agent never saw its two tunnels on one hub:\n{log}"
    );
    // Both hubs serve locally.
    let data = Arc::new(random_bytes(1000));
    for h in [&a, &b] {
        assert_eq!(
            echo_roundtrip(h.listener("ldap"), data.clone()).unwrap(),
            sha256(&data)
        );
        assert_eq!(mesh_flows(h), 0.0);
    }
}
