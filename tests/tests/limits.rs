//! Limits at the edge, with real processes: 10,000 idle client connections
//! held open on one listener (each a real flow through the agent to a target
//! that never answers) while other flows keep working; then all of them go
//! away and the hub is back to zero. Prints the hub's RSS per idle flow.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::*;

const IDLE: usize = 10_000;

/// A target that accepts connections and holds them, never writing.
fn hold_target(env: &Env) -> (Proc, SocketAddr) {
    let holder = Proc::spawn(
        "hold-target",
        Command::new(env!("CARGO_BIN_EXE_hold-target")),
        env.path(),
    );
    let line = holder.wait_line("listening ", Duration::from_secs(10));
    let hold = line
        .trim_start_matches("listening ")
        .trim()
        .parse()
        .unwrap();
    (holder, hold)
}

/// Agent `agent-1` serving `connectors`, logging warnings only, attached
/// to `hub`.
fn attached_agent(env: &Env, hub: &HubProc, connectors: &[(&str, SocketAddr)]) -> AgentProc {
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], connectors, "log:\n  level: warn\n"),
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
    agent
}

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
    let (holder, hold) = hold_target(&env);
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("idle", "idle"), ("echo", "echo")],
            "log:\n  level: warn\n",
        )
        .replace("tunnel:\n", "tunnel:\n  max_flows_per_agent: 16000\n")
        .replace(
            "connector: idle }",
            "connector: idle, max_connections: 12000, max_connections_per_client: 12000, \
             max_new_connections_per_sec: 100000, max_new_connections_per_sec_per_client: 100000, \
             first_byte_timeout_sec: 0 }",
        ),
    );
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[hub.http],
            &[("idle", hold), ("echo", echo)],
            "log:\n  level: warn\nmax_flows: 16000\n",
        ),
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
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
    assert_eq!(hub.settled_metric("nowconnect_protocol_errors_total"), 0.0);
}

/// `limits.client_idle_timeout_sec`: a client flow that moves no byte for
/// that long is reset (`idle_timeout`) and closed; a flow that keeps
/// talking is not.
#[test]
fn an_idle_client_flow_is_closed_and_a_busy_one_is_not() {
    use std::io::{Read, Write};
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("echo", "echo")],
            "limits:\n  client_idle_timeout_sec: 1\n",
        ),
    );
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
    let open = || {
        let mut s = TcpStream::connect(hub.listener("echo")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        s
    };
    let mut idle = open();
    let mut busy = open();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        busy.write_all(b"ok").unwrap();
        let mut b = [0u8; 2];
        busy.read_exact(&mut b).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut b = [0u8; 1];
    let closed = matches!(idle.read(&mut b), Ok(0) | Err(_));
    assert!(closed, "the idle flow is still open after 2.5 s");
    busy.write_all(b"still").unwrap();
    let mut b = [0u8; 5];
    busy.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still");
    assert!(eventually(Duration::from_secs(2), || hub
        .metric("nowconnect_flow_resets_total{code=\"idle_timeout\"}")
        >= 1.0));
}

/// `tunnel.max_connectors_per_agent`: a HELLO announcing more connectors
/// closes the tunnel with the reason, which the agent logs.
#[test]
fn an_agent_announcing_too_many_connectors_is_refused_with_the_reason() {
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(&[("a", "a")], "")
            .replace("tunnel:\n", "tunnel:\n  max_connectors_per_agent: 2\n"),
    );
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[hub.http],
            &[("a", echo), ("b", echo), ("c", echo)],
            "",
        ),
        &env.token("agent-1", None),
    );
    assert!(
        eventually(Duration::from_secs(10), || agent
            .proc
            .log_text()
            .contains("3 entries, at most 2")),
        "agent log:\n{}\nhub log:\n{}",
        agent.proc.log_text(),
        hub.proc.log_text()
    );
    assert_eq!(hub.metric("nowconnect_agents_connected"), 0.0);
    assert_eq!(hub.get("/healthz").0, 200);
}

/// `limits.max_pending_routes`: with the registry stalled (Redis stopped
/// with SIGSTOP), client connections that need a registry answer beyond the
/// limit are refused at once with `limit_exceeded`, not queued.
#[test]
fn clients_beyond_the_pending_route_limit_are_refused_at_once() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("ldap", "ldap")],
            &format!(
                "ha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n  redis_url: {}\n  registry_timeout_ms: 2000\n  mesh:\n    require_mtls: false\nlimits:\n  max_pending_routes: 2\n",
                redis.url()
            ),
        ),
    );
    let stop = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &redis.proc.pid().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    stop("-STOP");
    let refused =
        || hub.metric("nowconnect_client_connections_refused_total{reason=\"limit_exceeded\"}");
    let before = refused();
    let clients: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(hub.listener("ldap")).unwrap())
        .collect();
    let ok = eventually(Duration::from_secs(1), || refused() - before >= 4.0);
    stop("-CONT");
    assert!(
        ok,
        "refused: {}; log:\n{}",
        refused() - before,
        hub.proc.log_text()
    );
    drop(clients);
}

/// `ha.mesh.max_inbound_links`: connections beyond the limit are closed
/// before any handshake and counted; once one ends there is room again.
#[test]
fn mesh_connections_beyond_the_inbound_limit_are_refused() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let port = free_port();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[],
            &format!(
                "ha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n  redis_url: {}\n  mesh:\n    listen: 127.0.0.1:{port}\n    require_mtls: false\n    handshake_timeout_sec: 5\n    max_inbound_links: 2\n",
                redis.url()
            ),
        ),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Two connections that have not finished a handshake hold both slots.
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let errors = hub.metric("nowconnect_mesh_link_errors_total");
    let third = TcpStream::connect(addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!((&third).read(&mut b), Ok(0) | Err(_)),
        "the third connection was not closed"
    );
    assert!(eventually(Duration::from_secs(2), || hub
        .metric("nowconnect_mesh_link_errors_total")
        > errors));
    hub.proc
        .wait_log("inbound link limit reached", Duration::from_secs(5));
    drop(held);
    // Room again: a new connection is kept (until its handshake timeout).
    assert!(eventually(Duration::from_secs(3), || {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!((&s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
    }));
}

/// A token holder's agent sends protocol PINGs as fast as it can from a
/// socket it never reads (a tiny receive buffer). Every PING causes a PONG
/// the hub cannot send; those replies are bounded
/// (`tunnel.max_control_backlog_bytes`, default 1 MiB): the hub closes that
/// tunnel, logs and counts it, its memory stays flat, and the real agent's
/// flows go on. With the default configuration.
#[test]
fn a_ping_flood_from_an_agent_that_never_reads_is_bounded_and_closed() {
    use futures_util::SinkExt;
    use nowconnect_core::{Codec, Frame, Limits, WsMessage};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[("echo", "echo")], ""));
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(eventually(Duration::from_secs(10), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));
    let data = Arc::new(random_bytes(100_000));
    let want = sha256(&data);
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        want
    );
    let before = rss_kib(hub.proc.pid());
    let token = env.token("flooder", None);
    let http = hub.http;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pings, elapsed) = rt.block_on(async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(http).await.unwrap();
        let mut req = format!("ws://{http}/tunnel").into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let enc = |codec: Codec, f: &Frame| match codec.encode(f, &Limits::default()).unwrap() {
            WsMessage::Binary(b) => Message::Binary(b),
            WsMessage::Text(t) => Message::Text(t.into()),
        };
        let hello = Frame::Hello {
            slot: 0,
            slots: 1,
            agent_id: "flooder".into(),
            connectors: vec!["other".into()],
            codecs: vec!["v2".into()],
            window: 0,
        };
        ws.send(enc(Codec::V1, &hello)).await.unwrap();
        // The WELCOME, then never a read again.
        use futures_util::StreamExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
        let t0 = std::time::Instant::now();
        let mut pings = 0u64;
        // Until the hub stops reading (it closed the tunnel) or 20 s.
        'flood: while t0.elapsed() < Duration::from_secs(20) {
            for _ in 0..1000 {
                let m = enc(Codec::V2, &Frame::Ping { nonce: pings });
                if ws.feed(m).await.is_err() {
                    break 'flood;
                }
                pings += 1;
            }
            match tokio::time::timeout(Duration::from_secs(2), ws.flush()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        (pings, t0.elapsed())
    });
    eprintln!("{pings} pings in {elapsed:?}");
    assert!(pings > 50_000, "only {pings} pings were sent");
    let after = rss_kib(hub.proc.pid());
    eprintln!("hub RSS {before} KiB before, {after} KiB after");
    assert!(
        after < before + 64 * 1024,
        "hub RSS grew from {before} KiB to {after} KiB"
    );
    assert!(
        eventually(Duration::from_secs(5), || hub.metric(
            "nowconnect_security_events_total{kind=\"tunnel_output_budget\"}"
        ) == 1.0),
        "{}",
        hub.proc.log_text()
    );
    hub.proc
        .wait_log("does not read what it causes", Duration::from_secs(2));
    assert_eq!(hub.metric("nowconnect_agents_connected"), 1.0);
    assert_eq!(echo_roundtrip(hub.listener("echo"), data).unwrap(), want);
}

/// A hub with `listeners` (default configuration but for warn logs) and
/// one agent serving `idle` (a target that holds connections) and `ldap`
/// (a real slapd), attached; with the answer slapd gives directly to the
/// search every test repeats through the hub.
struct IdleAndLdap {
    hub: HubProc,
    _agent: AgentProc,
    _holder: Proc,
    _slapd: nowconnect_tests::ldap::Slapd,
    direct: (i32, String),
}

fn idle_and_ldap(env: &Env, listeners: &[(&str, &str)]) -> IdleAndLdap {
    let (holder, hold) = hold_target(env);
    let slapd = nowconnect_tests::ldap::Slapd::start(env.path());
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(listeners, "log:\n  level: warn\n"),
    );
    let agent = attached_agent(env, &hub, &[("idle", hold), ("ldap", slapd.addr)]);
    let direct = nowconnect_tests::ldap::search(slapd.addr, "(uid=alice)");
    assert_eq!(direct.0, 0);
    IdleAndLdap {
        hub,
        _agent: agent,
        _holder: holder,
        _slapd: slapd,
        direct,
    }
}

/// Idle clients of one listener cannot lock out another listener of the
/// same agent, with the default configuration: one client address gets at
/// most `max_connections_per_client` (256) connections on a listener, all
/// addresses together `max_connections` (1024); the rest are refused and
/// counted, and LDAP through the agent's other listener keeps working.
#[test]
fn idle_clients_of_one_listener_leave_the_agents_other_listeners_alone() {
    let env = Env::new();
    let IdleAndLdap { hub, direct, .. } =
        &idle_and_ldap(&env, &[("idle", "idle"), ("ldap", "ldap")]);
    let via = hub.listener("idle");
    // One address: 300 tries, 256 held (opened under the default rate of
    // new connections, each sending a byte within the first-byte timeout).
    let mut idle: Vec<TcpStream> = open_paced(1, via, 300);
    let refused = |r: &str| {
        hub.metric(&format!(
            "nowconnect_client_connections_refused_total{{reason=\"{r}\"}}"
        ))
    };
    assert!(
        eventually(Duration::from_secs(10), || refused("client_limit") == 44.0),
        "client_limit refusals: {}",
        refused("client_limit")
    );
    // Five more addresses, 256 tries each: the listener holds 1024 in all
    // (256 + 1280 tried, 512 refused).
    let more: Vec<_> = (2..=6)
        .map(|last| std::thread::spawn(move || open_paced(last, via, 256)))
        .collect();
    for t in more {
        idle.extend(t.join().unwrap());
    }
    assert!(
        eventually(Duration::from_secs(20), || refused("listener_limit")
            == 512.0
            && hub.metric("nowconnect_flows_active{connector=\"idle\"}")
                == 1024.0),
        "listener_limit refusals: {}, idle flows {}",
        refused("listener_limit"),
        hub.metric("nowconnect_flows_active{connector=\"idle\"}")
    );
    for i in 0..10 {
        assert_eq!(
            nowconnect_tests::ldap::search(hub.listener("ldap"), "(uid=alice)"),
            *direct,
            "search {i} through the other listener"
        );
    }
    assert_eq!(hub.get("/healthz"), (200, "ok".into()));
    // Refusals are logged with the client's network, not its address.
    let log = hub.proc.log_text();
    assert!(log.contains("peer=127.0.0.0/24"), "{log}");
    let full: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("client connection") && l.contains("peer=127.0.0.1:"))
        .collect();
    assert!(full.is_empty(), "client addresses in full: {full:?}");
    drop(idle);
}

fn refused(hub: &HubProc, reason: &str) -> f64 {
    hub.metric(&format!(
        "nowconnect_client_connections_refused_total{{reason=\"{reason}\"}}"
    ))
}

/// Whether the hub closed `s` (EOF or reset) within `within`.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// One echo round trip from `127.0.0.<last>`.
fn echo_from(last: u8, to: SocketAddr, prefix: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut s = connect_from(last, to)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(prefix)?;
    s.write_all(b"ping through the edge")?;
    let mut got = vec![0u8; 21];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// The rate of new connections: one client address opening connections as
/// fast as it can (eight threads), against a listener that takes 10 a
/// second from each address (the default is 500, the mechanism the same),
/// gets its burst of 10 and then 10 a second, the rest closed at accept
/// (`client_rate`), while another address connects at once; a listener's
/// own rate binds all its clients together (`listener_rate`, shown with a
/// listener set to 10 a second). A refusal takes no token.
#[test]
fn a_client_opening_connections_too_fast_is_refused_and_others_are_not() {
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("echo", "echo"), ("slow", "echo")],
            "log:\n  level: warn\n",
        )
        .replace(
            "name: slow, bind: '127.0.0.1:0', connector: echo }",
            "name: slow, bind: '127.0.0.1:0', connector: echo, max_new_connections_per_sec: 10 }",
        )
        // 10 a second per client keeps the bound far below the burst even
        // when a loaded hub accepts the burst seconds after the kernel
        // completed its handshakes.
        .replace(
            "name: echo, bind: '127.0.0.1:0', connector: echo }",
            "name: echo, bind: '127.0.0.1:0', connector: echo, max_new_connections_per_sec_per_client: 10 }",
        ),
    );
    let _agent = attached_agent(&env, &hub, &[("echo", echo)]);
    let via = hub.listener("echo");
    let started = Instant::now();
    let burst: Vec<TcpStream> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..100)
                    .map(|_| connect_from(3, via).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    // Wait until the hub has decided every connection of the burst (it
    // accepts them after the kernel completed their handshakes, seconds
    // later on a loaded machine): each is an open flow or a refusal.
    let rate_refused = || refused(&hub, "client_rate");
    let open = || hub.metric("nowconnect_flows_active{connector=\"echo\"}");
    assert!(
        eventually(Duration::from_secs(60), || rate_refused() + open() >= 800.0),
        "the hub decided {} of 800 connections",
        rate_refused() + open()
    );
    // Tokens came back at 10 a second for at most this long.
    let took = started.elapsed().as_secs_f64();
    let refusals = rate_refused();
    let most = 10.0 + (took * 10.0).ceil() + 1.0;
    eprintln!(
        "800 connections from one address, decided within {took:.3}s: {refusals} refused (client_rate)"
    );
    assert!(
        800.0 - refusals <= most,
        "{} of 800 connections within {took:.3}s passed; at most {most} may",
        800.0 - refusals
    );
    // Refusals are counted one by one but logged at most once a second a
    // listener, so a flood of them cannot flood the log.
    let lines = hub
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("listener limit reached"))
        .count();
    assert!(
        lines >= 1 && lines as f64 <= took.ceil() + 2.0,
        "{lines} log lines for {refusals} refusals in {took:.3}s"
    );
    // Another client is not slowed by the first one.
    assert_eq!(echo_from(4, via, b"").unwrap(), b"ping through the edge");
    drop(burst);
    let before =
        hub.settled_metric("nowconnect_client_connections_refused_total{reason=\"client_rate\"}");

    // The listener's own rate binds all its clients together: 100 new
    // connections from 10 addresses (10 each, far below their own rate)
    // against a listener that takes 10 a second.
    let slow = hub.listener("slow");
    let started = Instant::now();
    let many: Vec<TcpStream> = (10..20)
        .flat_map(|last| (0..10).map(move |_| connect_from(last, slow).unwrap()))
        .collect();
    let took = started.elapsed().as_secs_f64();
    let most = 10.0 + (took * 10.0).ceil() + 1.0;
    assert!(
        most < 100.0,
        "100 connections took {took:.3}s: too slow to test a rate of 10 a second"
    );
    assert!(
        eventually(Duration::from_secs(10), || refused(&hub, "listener_rate")
            >= 100.0 - most),
        "listener_rate refusals {} after 100 connections in {took:.3}s",
        refused(&hub, "listener_rate")
    );
    assert_eq!(
        refused(&hub, "client_rate"),
        before,
        "no client went past its own rate"
    );
    drop(many);
    assert_eq!(hub.get("/healthz"), (200, "ok".into()));
}

/// With the default configuration a client that connects and sends nothing
/// is closed after 10 s, and so is the agent's socket to the target; a
/// client that spoke once stays however long it then idles.
#[test]
fn a_client_that_never_sends_a_byte_is_closed_with_its_target_socket() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let env = Env::new();
    // A target that counts the connections it gets and those that end.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    {
        let (accepted, ended) = (accepted.clone(), ended.clone());
        std::thread::spawn(move || {
            for s in target.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                let ended = ended.clone();
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut b = [0u8; 64];
                    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
    }
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(&[("idle", "idle")], "log:\n  level: info\n"),
    );
    let _agent = attached_agent(&env, &hub, &[("idle", target_addr)]);
    let via = hub.listener("idle");
    let mut silent = connect_from(5, via).unwrap();
    let mut spoke = connect_from(6, via).unwrap();
    {
        use std::io::Write;
        spoke.write_all(b"0").unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || accepted.load(Ordering::SeqCst)
            == 2),
        "the target got {} connections",
        accepted.load(Ordering::SeqCst)
    );
    let connected = Instant::now();
    assert!(
        closed_by_peer(&mut silent, Duration::from_secs(15)),
        "the silent client was not closed"
    );
    let after = connected.elapsed();
    assert!(
        after >= Duration::from_secs(8),
        "closed after {after:?}, before the 10 s first-byte timeout"
    );
    assert!(
        eventually(Duration::from_secs(5), || ended.load(Ordering::SeqCst) == 1),
        "the agent's target socket of the silent client is still open"
    );
    assert_eq!(
        hub.metric("nowconnect_client_timeouts_total{kind=\"first_byte\"}"),
        1.0
    );
    // The one that spoke is still there, past the timeout, idle.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!closed_by_peer(&mut spoke, Duration::from_millis(200)));
    assert_eq!(ended.load(Ordering::SeqCst), 1);
    assert_eq!(
        hub.metric("nowconnect_flows_active{connector=\"idle\"}"),
        1.0
    );
    hub.proc.wait_log(
        "client sent nothing after connecting; closed",
        Duration::from_secs(1),
    );
}

/// Per-agent fairness between connectors, with the default configuration:
/// clients of four listeners of one connector (4 x 1024 allowed) cannot take
/// the 1024 flows (a quarter of 4096) the agent's other connector is owed;
/// past 3072 they are refused and counted, and LDAP through the other
/// connector keeps working.
#[test]
fn a_connector_keeps_its_share_of_the_agent_when_another_fills_every_listener() {
    let env = Env::new();
    let busy = ["idle1", "idle2", "idle3", "idle4"];
    let mut listeners: Vec<(&str, &str)> = busy.iter().map(|n| (*n, "idle")).collect();
    listeners.push(("ldap", "ldap"));
    let IdleAndLdap { hub, direct, .. } = &idle_and_ldap(&env, &listeners);
    // 3200 clients: 16 addresses, 200 each, four addresses a listener.
    let addrs: Vec<SocketAddr> = busy.iter().map(|n| hub.listener(n)).collect();
    let openers: Vec<_> = (0..16u8)
        .map(|i| {
            let to = addrs[usize::from(i % 4)];
            std::thread::spawn(move || open_paced(40 + i, to, 200))
        })
        .collect();
    let held: Vec<TcpStream> = openers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(held.len(), 3200);
    let share = || hub.metric("nowconnect_connector_share_refusals_total{connector=\"idle\"}");
    let active = || hub.metric("nowconnect_flows_active{connector=\"idle\"}");
    assert!(
        eventually(Duration::from_secs(30), || share() == 128.0
            && active() == 3072.0),
        "busy flows {}, share refusals {}",
        active(),
        share()
    );
    // Counted under their real cause, not as the agent being full.
    assert_eq!(refused(hub, "connector_share"), 128.0);
    assert_eq!(refused(hub, "limit_exceeded"), 0.0);
    for i in 0..10 {
        assert_eq!(
            nowconnect_tests::ldap::search(hub.listener("ldap"), "(uid=alice)"),
            *direct,
            "search {i} through the other connector"
        );
    }
    assert_eq!(hub.get("/healthz"), (200, "ok".into()));
    drop(held);
}

/// PROXY protocol on a listener: from the trusted balancer the client's
/// address is the one in the header (v1 and v2), and per-client limits and
/// logs see it; anyone else is refused, and so is a trusted connection
/// without a header.
#[test]
fn a_listener_behind_a_proxy_takes_client_addresses_from_its_header_and_no_one_else() {
    use std::io::Write;
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(&[("echo", "echo")], "log:\n  level: info\n")
            .replace(
                "connector: echo }",
                "connector: echo, max_connections_per_client: 2, \
             proxy_protocol: { trusted_proxies: [127.0.0.1/32] } }",
            ),
    );
    let _agent = attached_agent(&env, &hub, &[("echo", echo)]);
    let via = hub.listener("echo");
    let v1 = |src: &str| format!("PROXY TCP4 {src} 127.0.0.1 40000 389\r\n").into_bytes();
    // A v2 header (PROXY, TCP over IPv4) for 203.0.113.9:5000.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 9, 127, 0, 0, 1, 0x13, 0x88, 0x01, 0x85]);

    assert_eq!(
        echo_from(1, via, &v1("198.51.100.7")).unwrap(),
        b"ping through the edge"
    );
    assert_eq!(echo_from(1, via, &v2).unwrap(), b"ping through the edge");
    // The balancer's own check (no address) is served as the balancer.
    assert_eq!(
        echo_from(1, via, b"PROXY UNKNOWN\r\n").unwrap(),
        b"ping through the edge"
    );
    let active = || hub.metric("nowconnect_flows_active{connector=\"echo\"}");
    assert!(eventually(Duration::from_secs(5), || active() == 0.0));
    // Two held from 198.51.100.7, the third refused as that client's...
    let hold = |src: &str| {
        let mut s = connect_from(1, via).unwrap();
        s.write_all(&v1(src)).unwrap();
        s.write_all(b"x").unwrap();
        s
    };
    let held = [hold("198.51.100.7"), hold("198.51.100.7")];
    assert!(eventually(Duration::from_secs(5), || active() == 2.0));
    let mut third = hold("198.51.100.7");
    assert!(closed_by_peer(&mut third, Duration::from_secs(5)));
    assert_eq!(refused(&hub, "client_limit"), 1.0);
    // ... while another client behind the same balancer is served.
    assert_eq!(
        echo_from(1, via, &v1("198.51.100.8")).unwrap(),
        b"ping through the edge"
    );
    hub.proc
        .wait_log("peer=198.51.100.0/24", Duration::from_secs(2));

    // Not the balancer: refused, whatever it sends.
    let mut direct = connect_from(2, via).unwrap();
    let _ = direct.write_all(&v1("10.9.9.9"));
    assert!(closed_by_peer(&mut direct, Duration::from_secs(5)));
    assert_eq!(refused(&hub, "untrusted_proxy"), 1.0);
    // The balancer without a header: refused.
    let mut bare = connect_from(1, via).unwrap();
    bare.write_all(b"0\x0c\x02\x01\x01`\x07\x02\x01\x03\x04\x00\x80\x00")
        .unwrap();
    assert!(closed_by_peer(&mut bare, Duration::from_secs(5)));
    assert_eq!(refused(&hub, "proxy_header"), 1.0);
    // The served client's flow ends after its last byte (the gauge drops
    // once the hub tore it down); the two held ones stay.
    assert!(
        eventually(Duration::from_secs(5), || active() == 2.0),
        "active flows: {}",
        active()
    );
    drop(held);
}

/// The hub's client limit (`limits.max_client_connections`) counts a
/// connection from its accept: connections from the trusted balancer that
/// have not sent their PROXY header yet hold their slot, so one more is
/// closed at once (`limit_exceeded`) however fast they come; one that goes
/// away gives its slot back, and the next client is served.
#[test]
fn connections_still_sending_their_proxy_header_count_against_the_client_limit() {
    use std::io::Write;
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(
            &[("echo", "echo")],
            "limits:\n  max_client_connections: 3\nlog:\n  level: info\n",
        )
        .replace(
            "connector: echo }",
            "connector: echo, proxy_protocol: { trusted_proxies: [127.0.0.1/32] } }",
        ),
    );
    let _agent = attached_agent(&env, &hub, &[("echo", echo)]);
    let via = hub.listener("echo");
    // Three connections that have not sent their header yet...
    let mut pending: Vec<TcpStream> = (0..3).map(|_| connect_from(1, via).unwrap()).collect();
    // ... so a fourth is refused at accept (the listener accepts in order).
    let mut fourth = connect_from(1, via).unwrap();
    let _ = fourth.write_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 389\r\n");
    assert!(closed_by_peer(&mut fourth, Duration::from_secs(5)));
    assert_eq!(refused(&hub, "limit_exceeded"), 1.0);
    // One of them leaves without a header: its slot comes back.
    drop(pending.pop());
    assert!(eventually(Duration::from_secs(5), || refused(
        &hub,
        "proxy_header"
    ) == 1.0));
    assert_eq!(
        echo_from(1, via, b"PROXY TCP4 198.51.100.8 127.0.0.1 40000 389\r\n").unwrap(),
        b"ping through the edge"
    );
    assert_eq!(refused(&hub, "limit_exceeded"), 1.0);
    drop(pending);
}

/// A target whose connects hang: a listener with a backlog of one that
/// never accepts, its queue filled first, so further SYNs go unanswered.
fn hanging_target() -> (socket2::Socket, Vec<TcpStream>, SocketAddr) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fill.push(s),
            Err(_) => break,
        }
    }
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "the target's backlog did not fill: connects would not hang"
    );
    (l, fill, addr)
}

/// Clients that leave while the agent is still dialing their target give
/// the dial back: the dial is cancelled and no longer counts against the
/// agent's `max_pending_dials`, so clients that connect and leave at once
/// (to a target that never answers) cannot stop the agent's other flows.
#[test]
fn dials_of_clients_that_left_are_cancelled_and_free_their_slot() {
    use std::io::Write;
    let env = Env::new();
    let (_l, _fill, dead) = hanging_target();
    let echo = echo_server();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(&[("dead", "dead"), ("echo", "echo")], ""),
    );
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[hub.http],
            &[("dead", dead), ("echo", echo)],
            "max_pending_dials: 2\nconnect_timeout_sec: 60\n",
        ),
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
    let active = |c: &str| hub.metric(&format!("nowconnect_flows_active{{connector=\"{c}\"}}"));
    for round in 0..5 {
        // Two clients whose dials hang, then leave.
        let waiting: Vec<TcpStream> = (0..2)
            .map(|_| {
                let mut s = TcpStream::connect(hub.listener("dead")).unwrap();
                s.write_all(b"x").unwrap();
                s
            })
            .collect();
        assert!(
            eventually(Duration::from_secs(5), || active("dead") == 2.0),
            "round {round}: {} flows to the hanging target",
            active("dead")
        );
        for s in waiting {
            reset_close(s);
        }
        assert!(
            eventually(Duration::from_secs(5), || active("dead") == 0.0),
            "round {round}: flows left"
        );
        // Both dial slots are free again at once, not after the 60 s timeout.
        assert!(
            echo_once(hub.listener("echo"), b"the agent still dials"),
            "round {round}: echo refused; agent log:\n{}",
            agent.proc.log_text()
        );
    }
    assert!(
        !agent
            .proc
            .log_text()
            .contains("target dials already in progress"),
        "{}",
        agent.proc.log_text()
    );
}

/// When a hub dies, the agents it held redial the survivors within a few
/// hundred milliseconds: thousands of connections at once on `/tunnel`.
/// Each runtime's hub listens with a backlog of 4096 (capped by the
/// kernel's `net.core.somaxconn`), not its runtime's 128, past which the
/// kernel drops connections and TCP retries them only a second later.
/// `ss` shows a listening socket's backlog as its Send-Q.
#[test]
fn every_listener_of_a_hub_queues_a_reconnect_storm() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = somaxconn.min(4096).to_string();
    for rt in [Runtime::Tokio, Runtime::AsyncStd] {
        let env = Env::new();
        let hub = HubProc::start_on(
            rt,
            env.path(),
            "hub",
            &env.hub_yaml(&[("ldap", "ldap")], ""),
        );
        for (what, port) in [
            ("/tunnel", hub.http.port()),
            ("listener ldap", hub.listener("ldap").port()),
        ] {
            let out = Command::new("ss")
                .args(["-Hltn", &format!("sport = :{port}")])
                .output()
                .expect("ss (iproute2)");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let fields: Vec<&str> = text.split_whitespace().collect();
            assert_eq!(
                fields.get(2).copied(),
                Some(want.as_str()),
                "{} hub, {what} (port {port}): `ss` says {text:?}",
                rt.name()
            );
        }
    }
}
