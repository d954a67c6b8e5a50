//! The runtime conformance suite: the same scenarios, each run once per
//! deployment of the processes under test:
//! - `tokio::*`: hubs and agent on tokio;
//! - `async_std::*`: hubs and agent on async-std;
//! - `mixed::*`: hub-a on tokio, hub-b on async-std, an async-std agent
//!   (attached to the tokio hub, reached from the async-std hub through the
//!   mesh);
//! - `mixed_reverse::*`: hub-a on async-std, hub-b on tokio, a tokio agent.
//!
//! Single-hub scenarios use hub-a (a restarted hub comes back as hub-b).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::ldap::{self, ADMIN_PW, Slapd};
use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

/// Where each process of a scenario runs.
#[derive(Clone, Copy, Debug)]
struct Deploy {
    /// hub-a, hub-b.
    hubs: [Runtime; 2],
    agent: Runtime,
}

use Runtime::{AsyncStd, Tokio};

/// One `#[test]` per scenario and deployment.
macro_rules! for_each_runtime {
    ($($scenario:ident),* $(,)?) => {
        mod tokio {
            $( #[test] fn $scenario() { super::$scenario(super::Deploy { hubs: [super::Tokio; 2], agent: super::Tokio }) } )*
        }
        mod async_std {
            $( #[test] fn $scenario() { super::$scenario(super::Deploy { hubs: [super::AsyncStd; 2], agent: super::AsyncStd }) } )*
        }
        mod mixed {
            $( #[test] fn $scenario() { super::$scenario(super::Deploy { hubs: [super::Tokio, super::AsyncStd], agent: super::AsyncStd }) } )*
        }
        mod mixed_reverse {
            $( #[test] fn $scenario() { super::$scenario(super::Deploy { hubs: [super::AsyncStd, super::Tokio], agent: super::Tokio }) } )*
        }
    };
}

for_each_runtime!(
    ldap_answers_like_slapd_directly,
    bulk_data_arrives_intact,
    a_flow_across_a_long_round_trip_grows_its_window,
    an_unreachable_target_closes_the_client_at_once,
    the_agent_comes_back_after_a_hub_restart,
    ldap_reaches_the_agent_across_the_mesh,
    bulk_data_crosses_the_mesh_intact,
    the_agent_moves_when_its_owner_hub_dies,
    a_redis_outage_keeps_local_flows,
    a_rolling_restart_under_load_loses_no_connection,
    a_rolling_restart_with_a_multi_homed_agent_loses_no_connection,
    a_reset_reaches_the_other_end_as_a_reset,
);

fn attached(hub: &HubProc, agent: &AgentProc, d: Deploy) {
    assert!(
        hub.agents_attached(1.0, Duration::from_secs(15)),
        "{d:?}: the agent did not attach; hub log:\n{}\nagent log:\n{}",
        hub.proc.log_text(),
        agent.proc.log_text()
    );
}

/// One hub (hub-a's runtime), one agent serving `connectors`.
fn single(env: &Env, d: Deploy, connectors: &[(&str, SocketAddr)]) -> (HubProc, AgentProc) {
    let listeners: Vec<(&str, &str)> = connectors.iter().map(|(n, _)| (*n, *n)).collect();
    let hub = HubProc::start_on(d.hubs[0], env.path(), "hub", &env.hub_yaml(&listeners, ""));
    let agent = AgentProc::start_on(
        d.agent,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], connectors, ""),
        &env.token("agent-1", None),
    );
    attached(&hub, &agent, d);
    (hub, agent)
}

fn ldap_answers_like_slapd_directly(d: Deploy) {
    let env = Env::new();
    let slapd = Slapd::start(env.path());
    let (hub, _agent) = single(&env, d, &[("ldap", slapd.addr)]);
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

fn bulk_data_arrives_intact(d: Deploy) {
    let env = Env::new();
    let echo = echo_server();
    let (hub, _agent) = single(&env, d, &[("echo", echo)]);
    let via = hub.listener("echo");
    concurrent_echoes_intact(via, 1, 32 * 1024 * 1024, "a 32 MiB echo");
    concurrent_echoes_intact(via, 64, 512 * 1024, "a concurrent flow");
    assert_eq!(hub.settled_metric("nowconnect_protocol_errors_total"), 0.0);
}

/// The agent reaches its hub through a proxy that adds a 10 ms round trip:
/// a 256 KiB window then bounds a flow to 25 MiB/s, so once the tunnel's
/// first ping has measured the round trip, the flow's windows grow (the hub
/// counts it for the direction it receives) and every byte still arrives, in
/// order.
fn a_flow_across_a_long_round_trip_grows_its_window(d: Deploy) {
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start_on(
        d.hubs[0],
        env.path(),
        "hub",
        &env.hub_yaml(&[("echo", "echo")], ""),
    );
    let far = delay_proxy(hub.http, Duration::from_millis(5));
    let agent = AgentProc::start_on(
        d.agent,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[far], &[("echo", echo)], ""),
        &env.token("agent-1", None),
    );
    attached(&hub, &agent, d);
    assert!(
        eventually(Duration::from_secs(5), || hub
            .metric("nowconnect_tunnel_rtt_seconds_count")
            >= 1.0),
        "{d:?}: no tunnel ping answered"
    );
    // The agent's first ping goes at about the same time as the hub's.
    std::thread::sleep(Duration::from_millis(200));
    concurrent_echoes_intact(
        hub.listener("echo"),
        1,
        16 * 1024 * 1024,
        "a 16 MiB echo over a 10 ms round trip",
    );
    let grown = hub.settled_metric("nowconnect_flow_window_growths_total");
    assert!(
        grown >= 1.0,
        "{d:?}: no window grew ({grown}); hub log:\n{}",
        hub.proc.log_text()
    );
    assert_eq!(hub.settled_metric("nowconnect_protocol_errors_total"), 0.0);
}

fn an_unreachable_target_closes_the_client_at_once(d: Deploy) {
    let env = Env::new();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (hub, agent) = single(&env, d, &[("dead", dead)]);
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
    agent
        .proc
        .wait_log("Connection refused", Duration::from_secs(5));
}

fn the_agent_comes_back_after_a_hub_restart(d: Deploy) {
    let env = Env::new();
    let echo = echo_server();
    let http_port = free_port();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replace(
        "bind: 127.0.0.1:0\ntunnel",
        &format!("bind: 127.0.0.1:{http_port}\ntunnel"),
    );
    let mut hub = HubProc::start_on(d.hubs[0], env.path(), "hub1", &yaml);
    let agent = AgentProc::start_on(
        d.agent,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], ""),
        &env.token("agent-1", None),
    );
    attached(&hub, &agent, d);
    hub.proc.kill();
    let hub2 = HubProc::start_on(d.hubs[1], env.path(), "hub2", &yaml);
    attached(&hub2, &agent, d);
    let data = Arc::new(random_bytes(100_000));
    assert_eq!(
        echo_roundtrip(hub2.listener("echo"), data.clone()).unwrap(),
        sha256(&data)
    );
}

/// Two meshed hubs in active mode (hub-a's and hub-b's runtimes) and an
/// agent attached to hub-a serving `ldap` at `target`; with `both`, the
/// agent also knows hub-b (to move there). Returns once the mesh is up both
/// ways.
fn meshed_with_agent(
    env: &Env,
    d: Deploy,
    redis: &RedisProc,
    target: SocketAddr,
    both: bool,
) -> (HubProc, HubProc, AgentProc) {
    let (a, b, _, _) = meshed_pair_on(d.hubs, env, "active", redis, &Ca::new("mesh CA"));
    let hubs = if both {
        vec![a.http, b.http]
    } else {
        vec![a.http]
    };
    let agent = AgentProc::start_on(
        d.agent,
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &hubs, &[("ldap", target)], ""),
        &env.token("agent-1", None),
    );
    attached(&a, &agent, d);
    assert!(
        eventually(Duration::from_secs(15), || mesh_established(&b, "hub-a")
            && mesh_established(&a, "hub-b")),
        "mesh not up:\n{}\n{}",
        a.proc.log_text(),
        b.proc.log_text()
    );
    (a, b, agent)
}

fn ldap_reaches_the_agent_across_the_mesh(d: Deploy) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let slapd = Slapd::start(env.path());
    let (_a, b, _agent) = meshed_with_agent(&env, d, &redis, slapd.addr, false);
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

/// The owner joins each mesh flow to a flow on the agent's tunnel: one
/// 32 MiB flow and 32 concurrent ones cross it intact both ways (echo), and
/// afterwards neither hub holds a flow.
fn bulk_data_crosses_the_mesh_intact(d: Deploy) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let (a, b, _agent) = meshed_with_agent(&env, d, &redis, echo_server(), false);
    let via = b.listener("ldap");
    let small = Arc::new(random_bytes(1000));
    let small_hash = sha256(&small);
    assert!(
        eventually(Duration::from_secs(10), || matches!(
            echo_roundtrip(via, small.clone()),
            Ok(h) if h == small_hash
        )),
        "no route across the mesh; hub-b log:\n{}",
        b.proc.log_text()
    );
    concurrent_echoes_intact(via, 1, 32 * 1024 * 1024, "a 32 MiB echo across the mesh");
    concurrent_echoes_intact(via, 32, 512 * 1024, "a concurrent flow across the mesh");
    assert!(b.metric("nowconnect_flows_total{connector=\"ldap\",route=\"mesh\"}") >= 34.0);
    for h in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(10), || h
                .metric("nowconnect_flows_active{connector=\"ldap\"}")
                == 0.0),
            "flows left open; log:\n{}",
            h.proc.log_text()
        );
        assert_eq!(h.settled_metric("nowconnect_protocol_errors_total"), 0.0);
    }
}

fn the_agent_moves_when_its_owner_hub_dies(d: Deploy) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let (mut a, b, agent) = meshed_with_agent(&env, d, &redis, echo_server(), true);
    let data = Arc::new(random_bytes(50_000));
    let want = sha256(&data);
    assert_eq!(
        echo_roundtrip(b.listener("ldap"), data.clone()).unwrap(),
        want
    );
    a.proc.kill();
    if let Err(e) = echo_until_recovered(b.listener("ldap"), data, Duration::from_secs(15)) {
        panic!(
            "{e}; hub-b log:\n{}\nagent log:\n{}",
            b.proc.log_text(),
            agent.proc.log_text()
        );
    }
    let epochs = epochs_in_log(&agent.proc.log_text(), "tunnel established");
    assert_eq!(epochs.len(), 2, "{}", agent.proc.log_text());
    assert!(epochs[1] > epochs[0], "{epochs:?}");
}

/// A flow reset at one end reaches the other end as a TCP reset, not as an
/// end of stream that would pass a cut-off transfer for a whole one: the
/// target resetting (the client sees `ECONNRESET`) and the client resetting
/// (the target's read fails), on the local route and across the mesh.
fn a_reset_reaches_the_other_end_as_a_reset(d: Deploy) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let (lab, ends) = reset_lab();
    let (a, b, _agent) = meshed_with_agent(&env, d, &redis, lab, false);
    for (route, via) in [("local", a.listener("ldap")), ("mesh", b.listener("ldap"))] {
        // The target resets after 64 KiB.
        let mut c = TcpStream::connect(via).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut c, b"R").unwrap();
        let (got, end) = read_to_end_or_error(&mut c);
        assert_eq!(
            end,
            Some(std::io::ErrorKind::ConnectionReset),
            "{d:?} {route}: the target's reset reached the client as {end:?} after {got} bytes"
        );
        // The client resets once the target has its first byte.
        let mut c = TcpStream::connect(via).unwrap();
        std::io::Write::write_all(&mut c, b"W hello").unwrap();
        assert_eq!(
            ends.recv_timeout(Duration::from_secs(10)),
            Ok("started"),
            "{d:?} {route}"
        );
        reset_close(c);
        assert_eq!(
            ends.recv_timeout(Duration::from_secs(10)),
            Ok("reset"),
            "{d:?} {route}: the client's reset reached the target as an end of stream"
        );
    }
}

fn a_redis_outage_keeps_local_flows(d: Deploy) {
    let env = Env::new();
    let mut redis = RedisProc::start(env.path());
    let (a, _b, agent) = meshed_with_agent(&env, d, &redis, echo_server(), false);
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

/// A hub of the rolling-restart cluster on fixed ports (so it comes back
/// where agents and peers expect it), with a 1 s listener delay on SIGTERM.
struct FixedHub {
    name: &'static str,
    yaml: String,
    http: SocketAddr,
    ldap: SocketAddr,
}

impl FixedHub {
    fn new(
        env: &Env,
        name: &'static str,
        redis: &RedisProc,
        mesh: (u16, u16),
        ca: &Ca,
    ) -> FixedHub {
        let (http, ldap) = (free_port(), free_port());
        let yaml = mesh_hub_yaml(
            env,
            name,
            "active",
            redis,
            mesh.0,
            &[mesh.1],
            &ca.issue(env.path(), name),
        )
        .replacen(
            "  bind: 127.0.0.1:0\n",
            &format!("  bind: 127.0.0.1:{http}\n"),
            1,
        )
        .replacen(
            "bind: '127.0.0.1:0'",
            &format!("bind: '127.0.0.1:{ldap}'"),
            1,
        )
        .replacen(
            "shutdown_grace_sec: 3\n",
            "shutdown_grace_sec: 10\nshutdown_delay_sec: 1\n",
            1,
        );
        FixedHub {
            name,
            yaml,
            http: format!("127.0.0.1:{http}").parse().unwrap(),
            ldap: format!("127.0.0.1:{ldap}").parse().unwrap(),
        }
    }

    fn start(&self, rt: Runtime, env: &Env, run: usize) -> HubProc {
        let h = HubProc::start_on(rt, env.path(), &format!("{}-{run}", self.name), &self.yaml);
        assert_eq!(h.http, self.http);
        h
    }

    fn ready(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.http, Duration::from_millis(200)) else {
            return false;
        };
        use std::io::Write;
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = write!(
            s,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf.starts_with(b"HTTP/1.1 200")
    }
}

/// One short connection: 1 KiB echoed back exactly, then a clean close.
fn one_exchange(addr: SocketAddr, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(data).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got)
        .map_err(|e| format!("read {addr}: {e}"))?;
    if got != data {
        return Err("echo differs".into());
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("close {addr}: {e}"))?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err("bytes after the echo".into())
    }
}

/// A slow flow through `addr` (about 2 s): started before a hub's SIGTERM,
/// it must finish intact through the drain.
fn slow_flow(addr: SocketAddr) -> std::thread::JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        use std::io::Write;
        let data = random_bytes(2 << 20);
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let chunks: Vec<Vec<u8>> = data.chunks(64 << 10).map(<[u8]>::to_vec).collect();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            for c in chunks {
                w.write_all(&c)?;
                std::thread::sleep(Duration::from_millis(60));
            }
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .map_err(|e| format!("slow flow read: {e}"))?;
        writer
            .join()
            .unwrap()
            .map_err(|e| format!("slow flow write: {e}"))?;
        if sha256(&got) == sha256(&data) {
            Ok(())
        } else {
            Err(format!(
                "slow flow got {} of {} bytes",
                got.len(),
                data.len()
            ))
        }
    })
}

/// Two hubs restarted one after the other (SIGTERM, exit, start again)
/// while clients keep connecting to whichever hub `/readyz` says is ready,
/// as a load balancer would: every connection succeeds, flows in progress
/// finish through the drain, and each hub exits as soon as its agent moved
/// and its flows ended.
fn a_rolling_restart_under_load_loses_no_connection(d: Deploy) {
    rolling_restart(d, 1)
}

/// [`a_rolling_restart_under_load_loses_no_connection`] with the agent on
/// both hubs at once: a draining hub hands its tunnel over as soon as it
/// sees the agent's other one, without waiting for the agent to move.
fn a_rolling_restart_with_a_multi_homed_agent_loses_no_connection(d: Deploy) {
    rolling_restart(d, 2)
}

fn rolling_restart(d: Deploy, ha: u8) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let (pa, pb) = (free_port(), free_port());
    let hubs = [
        FixedHub::new(&env, "hub-a", &redis, (pa, pb), &ca),
        FixedHub::new(&env, "hub-b", &redis, (pb, pa), &ca),
    ];
    let mut procs = [
        Some(hubs[0].start(d.hubs[0], &env, 0)),
        Some(hubs[1].start(d.hubs[1], &env, 0)),
    ];
    let agent = AgentProc::start_on(
        d.agent,
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[hubs[0].http, hubs[1].http],
            &[("ldap", echo)],
            &format!("ha_connections: {ha}\n"),
        ),
        &env.token("agent-1", None),
    );
    attached(procs[0].as_ref().unwrap(), &agent, d);
    if ha > 1 {
        attached(procs[1].as_ref().unwrap(), &agent, d);
    }
    assert!(eventually(Duration::from_secs(15), || hubs
        .iter()
        .all(FixedHub::ready)));

    // The load balancer: a list of ready hubs, refreshed every 50 ms.
    let hubs = Arc::new(hubs);
    let stop = Arc::new(AtomicBool::new(false));
    let ready: Arc<Mutex<Vec<SocketAddr>>> =
        Arc::new(Mutex::new(hubs.iter().map(|h| h.ldap).collect()));
    let lb = {
        let (hubs, stop, ready) = (hubs.clone(), stop.clone(), ready.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let now: Vec<SocketAddr> =
                    hubs.iter().filter(|h| h.ready()).map(|h| h.ldap).collect();
                *ready.lock().unwrap() = now;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let ok = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, ready, ok, failures) =
                (stop.clone(), ready.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                let data = random_bytes(1024);
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let pick = {
                        let r = ready.lock().unwrap();
                        (!r.is_empty()).then(|| r[i % r.len()])
                    };
                    let res = match pick {
                        Some(addr) => one_exchange(addr, &data),
                        None => Err("no hub is ready".into()),
                    };
                    match res {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{:?}: {e}", t0.elapsed())),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(500));
    // The drained hubs' logs, for a failure message.
    let mut drained_logs = Vec::new();
    for (i, run) in [(0usize, 1usize), (1, 1)] {
        let h = &hubs[i];
        let slow = slow_flow(h.ldap);
        std::thread::sleep(Duration::from_millis(300));
        let before = ok.load(Ordering::Relaxed);
        let mut p = procs[i].take().unwrap();
        let started = Instant::now();
        let status = p.proc.terminate(Duration::from_secs(15));
        let took = started.elapsed();
        let log = p.proc.log_text();
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not exit cleanly ({status:?}); log:\n{log}",
            h.name
        );
        assert!(
            log.contains("drained: no flow left and every agent moved"),
            "{} waited out its grace period ({took:?}); log:\n{log}\nagent log:\n{}",
            h.name,
            agent.proc.log_text()
        );
        slow.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("flow through draining {}: {e}", h.name));
        drained_logs.push(format!("{} (drained):\n{log}", h.name));
        eprintln!(
            "{}: drained and exited in {took:?}; {} connections meanwhile",
            h.name,
            ok.load(Ordering::Relaxed) - before
        );
        procs[i] = Some(h.start(d.hubs[i], &env, run));
        assert!(
            eventually(Duration::from_secs(15), || h.ready()),
            "{} not ready after restart",
            h.name
        );
        if ha > 1 {
            // As a rollout does: the next hub goes once the agent is back
            // on both (its slot kept retrying this hub, not the other one).
            attached(procs[i].as_ref().unwrap(), &agent, d);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    lb.join().unwrap();
    let failures = failures.lock().unwrap();
    let ok = ok.load(Ordering::Relaxed);
    eprintln!(
        "{d:?}: {ok} connections through the rolling restart (ha_connections {ha}), {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {:?}\nagent log:\n{}\n{}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(10)],
        agent.proc.log_text(),
        drained_logs.join("\n")
            + &procs
                .iter()
                .flatten()
                .map(|p| format!("\nrestarted hub:\n{}", p.proc.log_text()))
                .collect::<String>()
    );
    assert!(ok > 200, "too little load to mean anything: {ok}");
    let alog = agent.proc.log_text();
    assert_eq!(
        alog.matches("hub is draining: moving to the next hub")
            .count(),
        2,
        "{alog}"
    );
}
