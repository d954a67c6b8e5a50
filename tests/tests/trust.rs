//! The trust model, played by the party that holds one credential and tries
//! to go beyond it (real hub and agent processes, real slapd, tokens made in
//! the test): an agent token serves exactly its connectors in its tenant, a
//! listener reaches only its tenant's (and pinned) agents, and a tunnel
//! lives no longer than its token.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nowconnect_tests::ldap::{self, Slapd};
use nowconnect_tests::*;

/// A TCP server that first writes `tag` and a newline, then echoes; counts
/// its connections. It stands for "whose target is this".
fn tag_server(tag: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            c2.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                if w.write_all(format!("{tag}\n").as_bytes()).is_err() {
                    return;
                }
                let mut r = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, count)
}

/// One flow through `listener`: the tag of the target it reached (or
/// `None` when the hub closed it), with `n` random bytes echoed intact.
fn tagged_flow(listener: SocketAddr, n: usize) -> Option<String> {
    let mut s = TcpStream::connect(listener).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut tag = String::new();
    if r.read_line(&mut tag).ok()? == 0 {
        return None;
    }
    let sent: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    s.write_all(&sent).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), sent.len(), "echo length through {listener}");
    assert!(got == sent, "echoed bytes differ through {listener}");
    Some(tag.trim_end().to_string())
}

/// The takeover, tried with the default configuration: a second
/// agent whose token names no connectors, or other connectors, announces
/// `ldap` beside the real agent in front of slapd. Both are refused at the
/// tunnel, and every LDAP search reaches the real directory.
#[test]
fn another_token_cannot_take_over_a_connector() {
    let env = Env::new();
    let slapd = Slapd::start(env.path());
    let (fake, fake_hits) = tag_server("fake-directory");
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[("ldap", "ldap")], ""));
    let _real = AgentProc::start(
        env.path(),
        "real",
        &env.agent_yaml("agent-1", &[hub.http], &[("ldap", slapd.addr)], ""),
        &env.token("agent-1", Some(vec!["ldap".into()])),
    );
    assert!(eventually(Duration::from_secs(10), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));
    let evil_yaml = env.agent_yaml("evil", &[hub.http], &[("ldap", fake)], "");
    // A token without a connectors claim: refused before the upgrade.
    let unscoped = AgentProc::start(
        env.path(),
        "evil-unscoped",
        &evil_yaml,
        &env.unscoped_token("evil"),
    );
    assert!(
        eventually(Duration::from_secs(10), || hub.metric(
            "nowconnect_tunnel_auth_failures_total{reason=\"unscoped_token\"}"
        ) >= 1.0),
        "{}",
        hub.proc.log_text()
    );
    unscoped
        .proc
        .wait_log("names no connectors", Duration::from_secs(5));
    // A token scoped to other connectors: refused at HELLO.
    let _scoped = AgentProc::start(
        env.path(),
        "evil-scoped",
        &evil_yaml,
        &env.token("evil", Some(vec!["other".into()])),
    );
    assert!(eventually(Duration::from_secs(10), || hub.metric(
        "nowconnect_security_events_total{kind=\"connector_outside_scope\"}"
    ) >= 1.0));
    let direct = ldap::search(slapd.addr, "(uid=alice)");
    assert_eq!(direct.0, 0, "{direct:?}");
    for i in 0..30 {
        assert_eq!(
            ldap::search(hub.listener("ldap"), "(uid=alice)"),
            direct,
            "search {i}"
        );
    }
    assert_eq!(
        fake_hits.load(Ordering::SeqCst),
        0,
        "the fake directory was reached"
    );
    assert_eq!(hub.metric("nowconnect_agents_connected"), 1.0);
}

/// Two tenants each run an agent called `agent-1` serving a connector
/// called `svc`; each tenant's listener reaches only its own agent, over
/// hundreds of interleaved flows with every byte checked. A listener of a
/// third tenant with no agent is refused, never served by the others.
#[test]
fn two_tenants_with_the_same_names_each_reach_only_their_own_agent() {
    let env = Env::new();
    let (acme_target, _) = tag_server("acme");
    let (globex_target, _) = tag_server("globex");
    let listeners = "  - { name: l-acme, bind: '127.0.0.1:0', connector: svc, tenant: acme }\n  \
                     - { name: l-globex, bind: '127.0.0.1:0', connector: svc, tenant: globex }\n  \
                     - { name: l-initech, bind: '127.0.0.1:0', connector: svc, tenant: initech }\n  \
                     - { name: l-default, bind: '127.0.0.1:0', connector: svc }\n";
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[], listeners));
    let _acme = AgentProc::start(
        env.path(),
        "acme",
        &env.agent_yaml("agent-1", &[hub.http], &[("svc", acme_target)], ""),
        &env.tenant_token("acme", "agent-1", &["svc"]),
    );
    let _globex = AgentProc::start(
        env.path(),
        "globex",
        &env.agent_yaml("agent-1", &[hub.http], &[("svc", globex_target)], ""),
        &env.tenant_token("globex", "agent-1", &["svc"]),
    );
    assert!(
        eventually(Duration::from_secs(10), || hub
            .metric("nowconnect_agents_connected")
            == 2.0),
        "{}",
        hub.proc.log_text()
    );
    let (acme, globex) = (hub.listener("l-acme"), hub.listener("l-globex"));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..40 {
                    let (l, want) = if (t + i) % 2 == 0 {
                        (acme, "acme")
                    } else {
                        (globex, "globex")
                    };
                    assert_eq!(tagged_flow(l, 4096 + i * 37).as_deref(), Some(want));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for l in ["l-initech", "l-default"] {
        assert_eq!(tagged_flow(hub.listener(l), 16), None, "{l} was served");
    }
    assert_eq!(
        hub.metric("nowconnect_flows_total{connector=\"acme/svc\",route=\"local\"}"),
        160.0
    );
    assert_eq!(
        hub.metric("nowconnect_flows_total{connector=\"globex/svc\",route=\"local\"}"),
        160.0
    );
}

/// A listener that names its agents is served by those only, even when
/// another agent of the tenant serves the connector with less load, and is
/// refused when they are gone.
#[test]
fn a_listener_pinned_to_agents_is_served_only_by_them() {
    let env = Env::new();
    let (one, _) = tag_server("agent-1");
    let (two, _) = tag_server("agent-2");
    let listeners = "  - { name: pinned, bind: '127.0.0.1:0', connector: svc, agents: [agent-2] }\n  \
                     - { name: open, bind: '127.0.0.1:0', connector: svc }\n";
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[], listeners));
    let _a1 = AgentProc::start(
        env.path(),
        "a1",
        &env.agent_yaml("agent-1", &[hub.http], &[("svc", one)], ""),
        &env.token("agent-1", Some(vec!["svc".into()])),
    );
    let a2 = AgentProc::start(
        env.path(),
        "a2",
        &env.agent_yaml("agent-2", &[hub.http], &[("svc", two)], ""),
        &env.token("agent-2", Some(vec!["svc".into()])),
    );
    assert!(eventually(Duration::from_secs(10), || hub
        .metric("nowconnect_agents_connected")
        == 2.0));
    // Hold flows open on agent-2 so the least-loaded choice would be agent-1.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let s = TcpStream::connect(hub.listener("pinned")).unwrap();
            let mut tag = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut tag)
                .unwrap();
            assert_eq!(tag, "agent-2\n");
            s
        })
        .collect();
    for _ in 0..10 {
        assert_eq!(
            tagged_flow(hub.listener("pinned"), 100).as_deref(),
            Some("agent-2")
        );
    }
    assert_eq!(
        tagged_flow(hub.listener("open"), 100).as_deref(),
        Some("agent-1")
    );
    drop(held);
    drop(a2);
    assert!(eventually(Duration::from_secs(10), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));
    assert_eq!(tagged_flow(hub.listener("pinned"), 16), None);
}

/// A tunnel lives no longer than its token: at `exp` the hub closes it
/// (`refused`, `token_expired`) with its flows, counts it, and the agent,
/// still holding the expired token, cannot come back.
#[test]
fn a_tunnel_is_closed_when_its_token_expires() {
    let env = Env::new();
    let echo = echo_server();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replace(
        "    hs256_secret_file:",
        "    leeway_sec: 0\n    hs256_secret_file:",
    );
    let hub = HubProc::start(env.path(), "hub", &yaml);
    let token = env.mint(
        "agent-1",
        Some(vec!["echo".into()]),
        None,
        Duration::from_secs(4),
    );
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], ""),
        &token,
    );
    assert!(eventually(Duration::from_secs(5), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));
    // A flow open across the expiry ends with its tunnel.
    let mut s = TcpStream::connect(hub.listener("echo")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert!(
        eventually(Duration::from_secs(8), || hub.metric(
            "nowconnect_security_events_total{kind=\"tunnel_token_expired\"}"
        ) == 1.0),
        "{}",
        hub.proc.log_text()
    );
    let mut rest = Vec::new();
    let end = s.read_to_end(&mut rest);
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?} {rest:?}");
    assert!(eventually(Duration::from_secs(5), || hub
        .metric("nowconnect_agents_connected")
        == 0.0));
    agent.proc.wait_log("token_expired", Duration::from_secs(5));
    // The agent's reconnects with the expired token are refused at the door.
    assert!(eventually(Duration::from_secs(10), || hub.metric(
        "nowconnect_tunnel_auth_failures_total{reason=\"expired\"}"
    ) >= 1.0));
    assert_eq!(hub.metric("nowconnect_agents_connected"), 0.0);
}

/// Revoking an agent in `tunnel.revocation_file` (hot-reloaded) closes its
/// live tunnel within about a second (`refused`, `revoked`) and refuses its
/// reconnects, while another agent's flow on the same hub goes on.
#[test]
fn revoking_an_agent_closes_its_tunnel_and_leaves_the_others() {
    let env = Env::new();
    let echo = echo_server();
    let revoked = env.path().join("revoked.txt");
    std::fs::write(&revoked, "# nobody yet\n").unwrap();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replace(
        "tunnel:\n",
        &format!("tunnel:\n  revocation_file: {}\n", revoked.display()),
    );
    let hub = HubProc::start(env.path(), "hub", &yaml);
    let agent = |id: &str| {
        AgentProc::start(
            env.path(),
            id,
            &env.agent_yaml(id, &[hub.http], &[("echo", echo)], ""),
            &env.token(id, Some(vec!["echo".into()])),
        )
    };
    let a1 = agent("agent-1");
    assert!(eventually(Duration::from_secs(10), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));
    let _a2 = agent("agent-2");
    assert!(eventually(Duration::from_secs(10), || hub
        .metric("nowconnect_agents_connected")
        == 2.0));
    // Flows on both agents (least-loaded: the second goes to the other one).
    let open = |n: u8| {
        let mut s = TcpStream::connect(hub.listener("echo")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[n]).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        s
    };
    let (mut f1, mut f2) = (open(1), open(2));
    std::fs::write(&revoked, "agent:agent-1  # lost laptop\n").unwrap();
    let start = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || hub.metric(
            "nowconnect_security_events_total{kind=\"tunnel_revoked\"}"
        ) == 1.0),
        "{}",
        hub.proc.log_text()
    );
    let took = start.elapsed();
    eprintln!("revocation closed the tunnel after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    hub.proc
        .wait_log("its token is revoked", Duration::from_secs(2));
    // Exactly one of the two flows was agent-1's: it ends; the other echoes.
    let alive = |s: &mut TcpStream| {
        s.write_all(b"x").is_ok() && {
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(1))
        }
    };
    let (l1, l2) = (alive(&mut f1), alive(&mut f2));
    assert!(l1 != l2, "exactly one flow survives: {l1} {l2}");
    assert!(eventually(Duration::from_secs(5), || hub.metric(
        "nowconnect_tunnel_auth_failures_total{reason=\"revoked\"}"
    ) >= 1.0));
    assert_eq!(hub.metric("nowconnect_agents_connected"), 1.0);
    a1.proc.wait_log("revoked", Duration::from_secs(5));
    // New flows go to agent-2.
    for i in 0..5 {
        let mut s = open(10 + i);
        s.write_all(b"ok").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ok");
    }
}

/// Make-before-break on the same tunnel: the agent's token lives 10 s, a
/// fresh one lands in its `token_file` once the tunnel is up; before the old one
/// expires the agent hands the fresh one to the hub (REAUTH), and the
/// tunnel, a flow that runs across the old expiry and a stream of new
/// flows all go on: no reconnect, no failed flow.
#[test]
fn a_token_renewed_in_token_file_keeps_the_tunnel_and_every_flow() {
    token_renewal_keeps_every_flow(Runtime::Tokio);
}

/// The same with the agent on the async-std runtime.
#[test]
fn a_token_renewed_in_token_file_keeps_every_flow_of_an_async_std_agent() {
    token_renewal_keeps_every_flow(Runtime::AsyncStd);
}

fn token_renewal_keeps_every_flow(agent_rt: Runtime) {
    let env = Env::new();
    let echo = echo_server();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replace(
        "    hs256_secret_file:",
        "    leeway_sec: 0\n    hs256_secret_file:",
    );
    let hub = HubProc::start(env.path(), "hub", &yaml);
    let token_file = env.path().join("agent.jwt");
    let scope = || Some(vec!["echo".to_string()]);
    let minted = std::time::Instant::now();
    std::fs::write(
        &token_file,
        env.mint("agent-1", scope(), None, Duration::from_secs(10)),
    )
    .unwrap();
    let agent = AgentProc::start_on(
        agent_rt,
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[hub.http],
            &[("echo", echo)],
            &format!("token_file: {}\n", token_file.display()),
        ),
        "unused-the-token-file-wins",
    );
    assert!(eventually(Duration::from_secs(8), || hub
        .metric("nowconnect_agents_connected")
        == 1.0));
    let started = minted;
    // Written atomically (a rename), as an operator's token refresher does.
    let fresh = env.path().join("agent.jwt.new");
    std::fs::write(
        &fresh,
        env.mint("agent-1", scope(), None, Duration::from_secs(3600)),
    )
    .unwrap();
    std::fs::rename(&fresh, &token_file).unwrap();
    // One flow across the old token's expiry, and new flows meanwhile.
    let mut long = TcpStream::connect(hub.listener("echo")).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut flows = 0;
    // Until well past the first token's expiry (10 s after it was minted).
    while started.elapsed() < Duration::from_secs(13) {
        let msg = format!("tick {flows}");
        long.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        long.read_exact(&mut back).unwrap_or_else(|e| {
            panic!(
                "long flow broke at {:?}: {e}\n{}",
                started.elapsed(),
                hub.proc.log_text()
            )
        });
        assert_eq!(back, msg.as_bytes());
        let mut short = TcpStream::connect(hub.listener("echo")).unwrap();
        short
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        short.write_all(b"new").unwrap();
        let mut b = [0u8; 3];
        short
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("new flow {flows} failed at {:?}: {e}", started.elapsed()));
        flows += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(flows > 10, "{flows}");
    hub.proc
        .wait_log("agent token renewed on the tunnel", Duration::from_secs(1));
    agent
        .proc
        .wait_log("renewed token sent to the hub", Duration::from_secs(1));
    assert_eq!(
        hub.metric("nowconnect_security_events_total{kind=\"tunnel_token_expired\"}"),
        0.0
    );
    assert_eq!(
        hub.metric("nowconnect_tunnels_total{result=\"accepted\"}"),
        1.0
    );
    assert_eq!(hub.metric("nowconnect_agents_connected"), 1.0);
}

/// Tenants across the mesh: two tenants' agents called `agent-1` serving
/// `svc` are held by hub-a; clients of each tenant's listener on hub-b
/// cross the mesh (the M_OPEN names the tenant-qualified connector and
/// agent) and reach only their own tenant's target, every byte checked.
#[test]
fn tenants_stay_apart_across_the_mesh() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let ca = pki::Ca::new("mesh CA");
    let (acme_target, acme_hits) = tag_server("acme");
    let (globex_target, globex_hits) = tag_server("globex");
    let listeners = "listeners:\n  \
                     - { name: l-acme, bind: '127.0.0.1:0', connector: svc, tenant: acme }\n  \
                     - { name: l-globex, bind: '127.0.0.1:0', connector: svc, tenant: globex }\n";
    let (a, b, _, _) = meshed_pair_with([hub_runtime(); 2], &env, "active", &redis, &ca, &|y| {
        y.replacen("listeners:\n", listeners, 1)
    });
    let _acme = AgentProc::start(
        env.path(),
        "acme",
        &env.agent_yaml("agent-1", &[a.http], &[("svc", acme_target)], ""),
        &env.tenant_token("acme", "agent-1", &["svc"]),
    );
    let _globex = AgentProc::start(
        env.path(),
        "globex",
        &env.agent_yaml("agent-1", &[a.http], &[("svc", globex_target)], ""),
        &env.tenant_token("globex", "agent-1", &["svc"]),
    );
    assert!(
        eventually(Duration::from_secs(15), || a
            .metric("nowconnect_agents_connected")
            == 2.0
            && mesh_established(&a, "hub-b")
            && mesh_established(&b, "hub-a")),
        "hub-a:\n{}",
        a.proc.log_text()
    );
    let (acme, globex) = (b.listener("l-acme"), b.listener("l-globex"));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..25 {
                    let (l, want) = if (t + i) % 2 == 0 {
                        (acme, "acme")
                    } else {
                        (globex, "globex")
                    };
                    assert_eq!(tagged_flow(l, 2048 + i * 53).as_deref(), Some(want));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(acme_hits.load(Ordering::SeqCst), 50);
    assert_eq!(globex_hits.load(Ordering::SeqCst), 50);
    for tenant in ["acme", "globex"] {
        assert_eq!(
            b.metric(&format!(
                "nowconnect_flows_total{{connector=\"{tenant}/svc\",route=\"mesh\"}}"
            )),
            50.0,
            "{tenant}"
        );
    }
}

/// A secret file every user of the machine may read (mode 0644) is
/// reported at start, by the hub (logged and counted) and by the agent
/// (logged); files readable by their owner only are not.
#[test]
fn world_readable_secret_files_are_reported_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let quiet = HubProc::start(env.path(), "quiet", &env.hub_yaml(&[], ""));
    let kind = "nowconnect_security_events_total{kind=\"key_file_world_readable\"}";
    assert_eq!(quiet.metric(kind), 0.0);
    assert!(!quiet.proc.log_text().contains("readable by every user"));
    std::fs::set_permissions(&env.secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[], ""));
    assert_eq!(hub.metric(kind), 1.0);
    let log = hub
        .proc
        .wait_log("readable by every user", Duration::from_secs(5));
    assert!(log.contains("tunnel.jwt.hs256_secret_file"), "{log}");
    let token = env.path().join("agent.token");
    std::fs::write(&token, env.token("agent-1", None)).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (target, _) = tag_server("t");
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[hub.http],
            &[("svc", target)],
            &format!("token_file: {}\n", token.display()),
        ),
        "",
    );
    let log = agent
        .proc
        .wait_log("readable by every user", Duration::from_secs(5));
    assert!(log.contains("token_file"), "{log}");
}
