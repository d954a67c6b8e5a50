//! One hub, real processes, real sockets: LDAP through the tunnel, bulk
//! integrity, per-flow isolation, bad tokens, dead targets, restarts,
//! configuration errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::ldap::{self, ADMIN_PW, SUFFIX, Slapd};
use nowconnect_tests::*;

/// Hub + agent serving `connectors`; waits until the agent is attached.
fn cluster(
    env: &Env,
    connectors: &[(&str, SocketAddr)],
    agent_extra: &str,
) -> (HubProc, AgentProc) {
    let listeners: Vec<(&str, &str)> = connectors.iter().map(|(n, _)| (*n, *n)).collect();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&listeners, ""));
    let agent_yaml = env.agent_yaml("agent-1", &[hub.http], connectors, agent_extra);
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &agent_yaml,
        &env.token("agent-1", None),
    );
    assert!(
        hub.agents_attached(1.0, Duration::from_secs(15)),
        "agent did not attach; hub log:\n{}\nagent log:\n{}",
        hub.proc.log_text(),
        agent.proc.log_text()
    );
    (hub, agent)
}

#[test]
fn ldap_through_the_tunnel_answers_like_slapd_directly() {
    let env = Env::new();
    let slapd = Slapd::start(env.path());
    let (hub, _agent) = cluster(&env, &[("ldap", slapd.addr)], "");
    let via = hub.listener("ldap");

    for filter in [
        "(objectClass=*)",
        "(uid=alice)",
        "(mail=*@example.com)",
        "(uid=nobody)",
    ] {
        let direct = ldap::search(slapd.addr, filter);
        let tunneled = ldap::search(via, filter);
        assert_eq!(direct.0, 0, "direct search failed: {}", direct.1);
        assert_eq!(
            tunneled, direct,
            "search {filter} differs through the tunnel"
        );
    }
    let direct = ldap::whoami(slapd.addr, ADMIN_PW);
    let tunneled = ldap::whoami(via, ADMIN_PW);
    assert_eq!(tunneled.0, 0, "{tunneled:?}");
    assert_eq!(tunneled.1, direct.1);
    assert!(tunneled.1.contains("dn:cn=admin,dc=example,dc=com"));
    // A wrong password still gives LDAP result 49 (invalid credentials).
    let bad = ldap::whoami(via, "wrong");
    assert_eq!(bad.0, 49, "{bad:?}");
    assert!(bad.2.contains("Invalid credentials"), "{bad:?}");

    // The ldap3 client: bind as a user, search, compare with direct.
    let entries = |addr: SocketAddr| {
        let mut c = ldap3::LdapConn::new(&format!("ldap://{addr}")).unwrap();
        c.simple_bind(&format!("uid=alice,ou=people,{SUFFIX}"), "alice-pw")
            .unwrap()
            .success()
            .unwrap();
        let (rs, _) = c
            .search(
                SUFFIX,
                ldap3::Scope::Subtree,
                "(objectClass=inetOrgPerson)",
                vec!["uid", "mail"],
            )
            .unwrap()
            .success()
            .unwrap();
        let mut v: Vec<String> = rs
            .into_iter()
            .map(|e| {
                let e = ldap3::SearchEntry::construct(e);
                let attrs: std::collections::BTreeMap<_, _> = e.attrs.into_iter().collect();
                format!("{} {attrs:?}", e.dn)
            })
            .collect();
        v.sort();
        let bad = c
            .simple_bind(&format!("uid=alice,ou=people,{SUFFIX}"), "nope")
            .unwrap();
        assert_eq!(bad.rc, 49);
        let _ = c.unbind();
        v
    };
    let d = entries(slapd.addr);
    assert_eq!(d.len(), 2);
    assert_eq!(entries(via), d);
    assert!(hub.metric("nowconnect_flows_total{connector=\"ldap\",route=\"local\"}") >= 7.0);
}

#[test]
fn bulk_data_arrives_intact_and_a_slow_reader_stalls_only_its_flow() {
    let env = Env::new();
    let echo = echo_server();
    let source = source_server();
    let (hub, _agent) = cluster(&env, &[("echo", echo), ("source", source)], "");
    let via = hub.listener("echo");

    // 64 MiB each way through one flow.
    let big = Arc::new(random_bytes(64 * 1024 * 1024));
    let want = sha256(&big);
    assert_eq!(
        echo_roundtrip(via, big).unwrap(),
        want,
        "64 MiB echo corrupted"
    );

    // A flow whose client never reads: the source target keeps sending.
    let mut stalled = TcpStream::connect(hub.listener("source")).unwrap();
    let mut first = [0u8; 1];
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stalled.read_exact(&mut first).unwrap();

    // 200 concurrent flows of 1 MiB each, while the stalled flow stays stalled.
    let start = Instant::now();
    concurrent_echoes_intact(via, 200, 1024 * 1024, "a 1 MiB flow");
    eprintln!(
        "200 × 1 MiB echoed in {:?} beside a stalled flow",
        start.elapsed()
    );
    // The stalled flow is still open (credit held it, nothing was dropped).
    stalled
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        stalled.read(&mut buf).unwrap() > 0,
        "stalled flow lost its data"
    );
    assert_eq!(hub.settled_metric("nowconnect_protocol_errors_total"), 0.0);
}

/// Send a WebSocket upgrade request to /tunnel; return the status line and body.
fn upgrade(hub: &HubProc, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(hub.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /tunnel HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n",
        hub.http
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn jwt(secret: &[u8], claims: serde_json::Value, alg: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[test]
fn bad_tokens_are_refused_before_upgrade_and_counted() {
    use base64::Engine as _;
    let env = Env::new();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[("ldap", "ldap")], ""));
    let now = nowconnect_tokio::jwt::unix_now();
    let good = serde_json::json!({"sub": "a1", "connectors": ["echo"], "aud": "nowconnect", "exp": now + 600});
    let s = env.secret.as_bytes();
    let hs = jsonwebtoken::Algorithm::HS256;
    let none = {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(good.to_string())
        )
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing_token", None),
        (
            "bad_signature",
            Some(jwt(b"another-secret-of-enough-length", good.clone(), hs)),
        ),
        ("malformed", Some(none)),
        (
            "wrong_audience",
            Some(jwt(
                s,
                serde_json::json!({"sub": "a1", "aud": "other", "exp": now + 600}),
                hs,
            )),
        ),
        (
            "expired",
            Some(jwt(
                s,
                serde_json::json!({"sub": "a1", "connectors": ["echo"], "aud": "nowconnect", "exp": now - 3600}),
                hs,
            )),
        ),
        (
            "not_yet_valid",
            Some(jwt(
                s,
                serde_json::json!({"sub": "a1", "connectors": ["echo"], "aud": "nowconnect", "exp": now + 7200, "nbf": now + 3600}),
                hs,
            )),
        ),
        (
            "algorithm_not_allowed",
            Some(jwt(s, good.clone(), jsonwebtoken::Algorithm::HS512)),
        ),
        (
            "missing_claim",
            Some(jwt(
                s,
                serde_json::json!({"aud": "nowconnect", "exp": now + 600}),
                hs,
            )),
        ),
    ];
    for (label, token) in &cases {
        let (status, text) = upgrade(&hub, token.as_deref());
        assert_eq!(status, 401, "{label}: {text}");
        assert!(
            text.contains(label),
            "{label}: the refusal does not name the reason: {text}"
        );
        let m = format!("nowconnect_tunnel_auth_failures_total{{reason=\"{label}\"}}");
        assert_eq!(hub.metric(&m), 1.0, "{m}");
    }
    // A valid token upgrades.
    let (status, _) = upgrade(&hub, Some(&jwt(s, good, hs)));
    assert_eq!(status, 101);
    let log = hub
        .proc
        .wait_log("nowconnect::security", Duration::from_secs(5));
    assert!(!log.contains(&env.secret), "the secret leaked into the log");
}

#[test]
fn connectors_outside_the_token_scope_and_wrong_agent_ids_are_refused() {
    let env = Env::new();
    let echo = echo_server();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[("echo", "echo")], ""));
    let yaml = env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], "");
    let scoped = env.token("agent-1", Some(vec!["ldap".into()]));
    let agent = AgentProc::start(env.path(), "scoped", &yaml, &scoped);
    assert!(
        eventually(Duration::from_secs(10), || agent
            .proc
            .log_text()
            .contains("outside the token's scope")),
        "{}",
        agent.proc.log_text()
    );
    assert_eq!(hub.metric("nowconnect_agents_connected"), 0.0);
    drop(agent);
    let other = env.token("agent-2", None);
    let agent = AgentProc::start(env.path(), "mismatch", &yaml, &other);
    assert!(eventually(Duration::from_secs(10), || hub.metric(
        "nowconnect_tunnel_auth_failures_total{reason=\"agent_mismatch\"}"
    ) >= 1.0));
    drop(agent);
}

#[test]
fn an_unreachable_target_closes_the_client_within_a_second() {
    let env = Env::new();
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (hub, agent) = cluster(&env, &[("dead", dead)], "");
    for _ in 0..3 {
        let mut c = TcpStream::connect(hub.listener("dead")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 16];
        let r = c.read(&mut buf);
        let took = start.elapsed();
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "client got data from a dead target: {r:?}"
        );
        assert!(
            took < Duration::from_secs(1),
            "client closed only after {took:?}"
        );
    }
    assert!(eventually(Duration::from_secs(5), || hub.metric(
        "nowconnect_flow_resets_total{code=\"target_unreachable\"}"
    ) >= 3.0));
    agent
        .proc
        .wait_log("Connection refused", Duration::from_secs(5));
}

#[test]
fn the_agent_comes_back_after_the_hub_is_killed_and_restarted() {
    let env = Env::new();
    let echo = echo_server();
    let http_port = free_port();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replace(
        "bind: 127.0.0.1:0\ntunnel",
        &format!("bind: 127.0.0.1:{http_port}\ntunnel"),
    );
    let mut hub = HubProc::start(env.path(), "hub1", &yaml);
    let agent_yaml = env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], "");
    let agent = AgentProc::start(
        env.path(),
        "agent",
        &agent_yaml,
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
    let data = Arc::new(random_bytes(100_000));
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        sha256(&data)
    );

    hub.proc.kill();
    let hub2 = HubProc::start(env.path(), "hub2", &yaml);
    let start = Instant::now();
    assert!(
        hub2.agents_attached(1.0, Duration::from_secs(20)),
        "agent did not come back: {}",
        agent.proc.log_text()
    );
    eprintln!(
        "agent re-attached {:?} after the new hub started",
        start.elapsed()
    );
    assert_eq!(
        echo_roundtrip(hub2.listener("echo"), data.clone()).unwrap(),
        sha256(&data)
    );
}

#[test]
fn sigterm_drains_open_flows_then_exits() {
    let env = Env::new();
    let echo = echo_server();
    let (mut hub, _agent) = cluster(&env, &[("echo", echo)], "");
    let mut c = TcpStream::connect(hub.listener("echo")).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    c.read_exact(&mut buf).unwrap();
    let pid = hub.proc.pid();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    // New connections are refused while draining (the listener is closed:
    // shutdown_delay_sec is 0); the open flow still works.
    let listener = hub.listener("echo");
    assert!(eventually(Duration::from_secs(5), || hub.get("/readyz").0 == 503));
    assert!(
        eventually(Duration::from_secs(5), || TcpStream::connect(listener)
            .is_err()),
        "the listener still takes connections while draining"
    );
    assert!(
        hub.proc.try_wait().is_none(),
        "the hub left before its flow ended"
    );
    c.write_all(b"during").unwrap();
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"during");
    drop(c);
    let st = hub
        .proc
        .terminate(Duration::from_secs(10))
        .expect("hub exits after the flow ended");
    assert!(st.success(), "{st:?}");
}

#[test]
fn a_v1_only_agent_is_served() {
    let env = Env::new();
    let slapd = Slapd::start(env.path());
    let (hub, _agent) = cluster(&env, &[("ldap", slapd.addr)], "v1_only: true\n");
    let direct = ldap::search(slapd.addr, "(uid=bob)");
    assert_eq!(ldap::search(hub.listener("ldap"), "(uid=bob)"), direct);
    assert!(
        hub.metric("nowconnect_tunnel_frames_total{dir=\"in\",type=\"DATA\"}") >= 1.0
            || eventually(Duration::from_secs(2), || hub
                .metric("nowconnect_tunnel_frames_total{dir=\"in\",type=\"DATA\"}")
                >= 1.0)
    );
}

/// `worker_threads` sizes the executor of hub and agent on both runtimes
/// (3 and 1, neither being the default on a 2-core machine), and flows work
/// with one thread. The hub's file watcher has a thread of its own.
#[test]
fn worker_threads_size_the_executor_of_hub_and_agent() {
    let env = Env::new();
    let echo = echo_server();
    let data = Arc::new(random_bytes(1 << 20));
    for rt in [Runtime::Tokio, Runtime::AsyncStd] {
        let hub = HubProc::start_on(
            rt,
            env.path(),
            &format!("hub-{}", rt.name()),
            &env.hub_yaml(&[("echo", "echo")], "worker_threads: 3\n"),
        );
        let agent = AgentProc::start_on(
            rt,
            env.path(),
            &format!("agent-{}", rt.name()),
            &env.agent_yaml(
                "agent-1",
                &[hub.http],
                &[("echo", echo)],
                "worker_threads: 1\n",
            ),
            &env.token("agent-1", None),
        );
        assert!(
            hub.agents_attached(1.0, Duration::from_secs(15)),
            "{}: agent did not attach",
            rt.name()
        );
        assert_eq!(rt.executor_threads(hub.proc.pid()), 3, "{} hub", rt.name());
        // The file watcher reads on its own thread, not on the executor.
        assert_eq!(
            threads_named(hub.proc.pid(), "nowconnect-watc"),
            1,
            "{} hub's file-watch thread",
            rt.name()
        );
        assert_eq!(
            rt.executor_threads(agent.proc.pid()),
            1,
            "{} agent",
            rt.name()
        );
        assert_eq!(
            echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
            sha256(&data),
            "{}",
            rt.name()
        );
    }
}

#[test]
fn configuration_errors_name_file_key_and_reason() {
    let env = Env::new();
    let cases = [
        (env.hub_yaml(&[], "bogus_key: 1\n"), "bogus_key"),
        (
            env.hub_yaml(&[("l", "c")], "")
                .replace("bind: '127.0.0.1:0'", "bind: 'nowhere'"),
            "listeners[0].bind",
        ),
        (
            env.hub_yaml(
                &[],
                "ha:\n  enabled: true\n  mode: sideways\n  replica_id: a\n",
            ),
            "ha.mode",
        ),
        (
            env.hub_yaml(&[], "")
                .replace("hs256_secret_file", "hs256_secret_fil"),
            "tunnel.jwt",
        ),
        (
            env.hub_yaml(&[], "shutdown_delay_sec: 5\n"),
            "shutdown_delay_sec",
        ),
        (
            env.hub_yaml(&[], "worker_threads: 5000\n"),
            "worker_threads",
        ),
        (
            env.hub_yaml(&[], "")
                .replace("tunnel:\n", "tunnel:\n  max_window_bytes: 65536\n"),
            "tunnel.max_window_bytes",
        ),
    ];
    for (i, (yaml, key)) in cases.iter().enumerate() {
        let f = env.path().join(format!("bad{i}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let out = Command::new(bin())
            .args(["hub", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} started");
        assert!(
            err.contains(&f.display().to_string()),
            "case {i}: no file in `{err}`"
        );
        assert!(err.contains(key), "case {i}: no key `{key}` in `{err}`");
    }
    // NC_CONFIG works for the path.
    let f = env.path().join("bad0.yaml");
    let out = Command::new(bin())
        .arg("hub")
        .env("NC_CONFIG", &f)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));
}

#[test]
fn metrics_expose_every_design_name_and_health_endpoints_answer() {
    let env = Env::new();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[], ""));
    let (status, body) = hub.get("/metrics");
    assert_eq!(status, 200);
    // Per-peer mesh series (links, backpressure, queue, inflight) appear once
    // a peer is configured; the HA tests check them.
    for name in [
        "nowconnect_mesh_frames_total",
        "nowconnect_mesh_rtt_seconds",
        "nowconnect_owner_epoch_mismatch_total",
        "nowconnect_cid_dedup_dropped_total",
        "nowconnect_flow_window_growths_total",
        "nowconnect_mesh_link_reconnects_total",
        "nowconnect_mesh_link_errors_total",
        "nowconnect_agents_connected",
        "nowconnect_registry_healthy",
        "nowconnect_bytes_total",
    ] {
        let family = name.trim_end_matches("_total");
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "missing {name} in:\n{body}"
        );
    }
    assert_eq!(hub.get("/healthz"), (200, "ok".into()));
    let (status, body) = hub.get("/readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ready\""));
}

#[test]
fn token_subcommand_mints_a_token_the_hub_accepts() {
    let env = Env::new();
    let out = Command::new(bin())
        .args(["token", "--secret-file"])
        .arg(&env.secret_file)
        .args([
            "--agent-id",
            "agent-7",
            "--connectors",
            "ldap,ssh",
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[], ""));
    assert_eq!(upgrade(&hub, Some(&token)).0, 101);
    let v = nowconnect_tokio::jwt::Verifier::from_config(&nowconnect_tokio::config::JwtConfig {
        audience: "nowconnect".into(),
        issuer: None,
        hs256_secret_file: Some(env.secret_file.clone()),
        public_key_file: None,
        jwks_file: None,
        algorithms: None,
        leeway_sec: 0,
        tenant_claim: "tenant".into(),
        max_ttl_sec: None,
    })
    .unwrap();
    let id = v.verify(&token).unwrap();
    assert_eq!(id.agent_id, "agent-7");
    assert_eq!(id.scope, Some(vec!["ldap".to_string(), "ssh".to_string()]));
    assert_eq!(id.tenant, nowconnect_tokio::jwt::DEFAULT_TENANT);
}

#[test]
fn token_subcommand_requires_connectors_and_takes_a_tenant() {
    let env = Env::new();
    let mint = |args: &[&str]| {
        Command::new(bin())
            .args(["token", "--secret-file"])
            .arg(&env.secret_file)
            .args(args)
            .output()
            .unwrap()
    };
    let out = mint(&["--agent-id", "agent-7"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--connectors"), "{err}");
    assert!(out.stdout.is_empty());
    let out = mint(&[
        "--agent-id",
        "agent-7",
        "--connectors",
        "ldap",
        "--tenant",
        "acme/x",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tenant"), "{err}");
    let out = mint(&[
        "--agent-id",
        "agent-7",
        "--connectors",
        "ldap",
        "--tenant",
        "acme",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let v = nowconnect_tokio::jwt::Verifier::from_config(&nowconnect_tokio::config::JwtConfig {
        audience: "nowconnect".into(),
        issuer: None,
        hs256_secret_file: Some(env.secret_file.clone()),
        public_key_file: None,
        jwks_file: None,
        algorithms: None,
        leeway_sec: 0,
        tenant_claim: "tenant".into(),
        max_ttl_sec: Some(15 * 60),
    })
    .unwrap();
    let id = v.verify(&token).unwrap();
    assert_eq!(
        (id.agent_id.as_str(), id.tenant.as_str()),
        ("agent-7", "acme")
    );
    assert_eq!(id.scope, Some(vec!["ldap".to_string()]));
}

/// Read the greeting line of a banner target through the tunnel.
fn greeting(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read_exact(&mut b).is_ok() && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn flows_spread_over_agents_and_a_leaving_agent_takes_only_its_own() {
    let env = Env::new();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[("svc", "svc")], ""));
    let mut agents = Vec::new();
    for name in ["agent-1", "agent-2"] {
        let target = banner_server(name);
        let yaml = env.agent_yaml(name, &[hub.http], &[("svc", target)], "");
        agents.push(AgentProc::start(
            env.path(),
            name,
            &yaml,
            &env.token(name, None),
        ));
    }
    assert!(hub.agents_attached(2.0, Duration::from_secs(15)));
    // Ten open flows: the least-loaded choice splits them evenly.
    let mut conns: Vec<(String, TcpStream)> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(hub.listener("svc")).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            (greeting(&mut s), s)
        })
        .collect();
    let on_1 = conns.iter().filter(|(g, _)| g == "agent-1").count();
    assert_eq!(
        on_1,
        5,
        "flows per agent: {:?}",
        conns.iter().map(|(g, _)| g.clone()).collect::<Vec<_>>()
    );

    // agent-1 goes away: its flows end, agent-2's flows keep working.
    agents[0].proc.kill();
    for (who, s) in conns.iter_mut() {
        let mut buf = [0u8; 4];
        if who == "agent-1" {
            let gone = s
                .write_all(b"ping")
                .and_then(|_| s.read(&mut buf))
                .map_or(true, |n| n == 0);
            assert!(gone, "a flow of the departed agent survived");
        } else {
            s.write_all(b"ping").unwrap();
            s.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
        }
    }
    assert!(hub.agents_attached(1.0, Duration::from_secs(5)));
    // New flows go to the agent that is left.
    let mut s = TcpStream::connect(hub.listener("svc")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(greeting(&mut s), "agent-2");
}

#[test]
fn a_token_from_another_issuer_is_refused_when_an_issuer_is_required() {
    let env = Env::new();
    let yaml = env.hub_yaml(&[], "").replace(
        "    hs256_secret_file:",
        "    issuer: corp-idp\n    hs256_secret_file:",
    );
    let hub = HubProc::start(env.path(), "hub", &yaml);
    let now = nowconnect_tokio::jwt::unix_now();
    let s = env.secret.as_bytes();
    let hs = jsonwebtoken::Algorithm::HS256;
    let other = jwt(
        s,
        serde_json::json!({"sub": "a1", "connectors": ["echo"], "aud": "nowconnect", "iss": "someone-else", "exp": now + 600}),
        hs,
    );
    let (status, text) = upgrade(&hub, Some(&other));
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("wrong_issuer"), "{text}");
    assert_eq!(
        hub.metric("nowconnect_tunnel_auth_failures_total{reason=\"wrong_issuer\"}"),
        1.0
    );
    let none = jwt(
        s,
        serde_json::json!({"sub": "a1", "connectors": ["echo"], "aud": "nowconnect", "exp": now + 600}),
        hs,
    );
    assert_eq!(
        upgrade(&hub, Some(&none)).0,
        401,
        "a token without `iss` must be refused too"
    );
    let right = jwt(
        s,
        serde_json::json!({"sub": "a1", "connectors": ["echo"], "aud": "nowconnect", "iss": "corp-idp", "exp": now + 600}),
        hs,
    );
    assert_eq!(upgrade(&hub, Some(&right)).0, 101);
}

#[test]
fn a_websocket_ping_flood_does_not_disturb_other_flows() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let env = Env::new();
    let echo = echo_server();
    let (hub, _agent) = cluster(&env, &[("echo", echo)], "");
    let data = Arc::new(random_bytes(200_000));
    let want = sha256(&data);
    let url = format!("ws://{}/tunnel", hub.http);
    let token = env.token("flooder", None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws.send(Message::Text(
            r#"{"type":"HELLO","agent_id":"flooder","connectors":["other"]}"#.into(),
        ))
        .await
        .unwrap();
        // 20,000 pings as fast as the socket takes them, without reading.
        for i in 0u32..20_000 {
            if ws
                .feed(Message::Ping(i.to_le_bytes().to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = ws.flush().await;
        // Meanwhile the real agent's flows work.
        let (d, w) = (data.clone(), want);
        let listener = hub.listener("echo");
        let ok = tokio::task::spawn_blocking(move || echo_roundtrip(listener, d).map(|h| h == w))
            .await
            .unwrap();
        assert!(ok.unwrap(), "a flow was disturbed by the ping flood");
        // The flooder gets its pongs and stays bounded in what it is owed.
        let mut pongs = 0;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            if matches!(m, Message::Pong(_)) {
                pongs += 1;
            }
        }
        eprintln!("pongs received: {pongs}");
    });
    assert_eq!(hub.get("/healthz").0, 200);
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        want
    );
}

/// Slowloris on the HTTP port: a connection that never completes its request
/// head, or sends nothing at all, is closed after `http.header_timeout_sec`,
/// while other requests are served meanwhile.
#[test]
fn slow_or_silent_http_clients_are_closed_after_the_header_timeout() {
    let env = Env::new();
    let yaml = env.hub_yaml(&[], "").replace(
        "bind: 127.0.0.1:0\ntunnel",
        "bind: 127.0.0.1:0\n  header_timeout_sec: 1\ntunnel",
    );
    let hub = HubProc::start(env.path(), "hub", &yaml);
    let mut slow = TcpStream::connect(hub.http).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
        .unwrap();
    let silent = TcpStream::connect(hub.http).unwrap();
    let start = Instant::now();
    // Served meanwhile.
    assert_eq!(hub.get("/healthz"), (200, "ok".into()));
    for (name, mut s) in [("partial head", slow), ("silent", silent)] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        let took = start.elapsed();
        assert!(
            r.is_ok() || matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{name}: {r:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{name}: connection held for {took:?}"
        );
        assert!(
            !String::from_utf8_lossy(&buf).contains("200 OK"),
            "{name}: got a response to an incomplete request"
        );
    }
}

/// After a response (other than a WebSocket upgrade) the hub closes the
/// connection: no idle keep-alive connection is held.
#[test]
fn http_connections_end_after_one_response() {
    let env = Env::new();
    let hub = HubProc::start(env.path(), "hub", &env.hub_yaml(&[], ""));
    let mut s = TcpStream::connect(hub.http).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .expect("the hub closes after the response");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}

/// SIGHUP re-reads `tunnel.jwt`: tokens signed with the new secret are
/// accepted, the old secret's are refused, the established tunnel and its
/// flows are untouched; a bad new secret keeps the running one and says why.
#[test]
fn sighup_rotates_the_jwt_secret_without_dropping_tunnels() {
    let env = Env::new();
    let echo = echo_server();
    let (hub, agent) = cluster(&env, &[("echo", echo)], "");
    let now = nowconnect_tokio::jwt::unix_now();
    let claims = serde_json::json!({"sub": "a2", "connectors": ["echo"], "aud": "nowconnect", "exp": now + 600});
    let hs = jsonwebtoken::Algorithm::HS256;
    let old_token = jwt(env.secret.as_bytes(), claims.clone(), hs);
    let new_secret = "a-brand-new-secret-for-rotation-0123456789";
    let new_token = jwt(new_secret.as_bytes(), claims, hs);
    assert_eq!(upgrade(&hub, Some(&old_token)).0, 101);
    assert_eq!(upgrade(&hub, Some(&new_token)).0, 401);

    let hup = |hub: &HubProc| {
        let st = Command::new("kill")
            .args(["-HUP", &hub.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    std::fs::write(&env.secret_file, new_secret).unwrap();
    hup(&hub);
    assert!(
        eventually(Duration::from_secs(5), || hub
            .proc
            .log_text()
            .contains("configuration reloaded")),
        "{}",
        hub.proc.log_text()
    );
    assert_eq!(upgrade(&hub, Some(&new_token)).0, 101);
    let (status, body) = upgrade(&hub, Some(&old_token));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bad_signature"), "{body}");
    // The agent attached with the old secret keeps its tunnel and flows.
    assert_eq!(hub.metric("nowconnect_agents_connected"), 1.0);
    let data = Arc::new(random_bytes(200_000));
    assert_eq!(
        echo_roundtrip(hub.listener("echo"), data.clone()).unwrap(),
        sha256(&data)
    );
    assert_eq!(
        agent.proc.log_text().matches("tunnel established").count(),
        1
    );

    // A secret too short to be valid: the reload is refused, with the reason,
    // and the running secret stays.
    std::fs::write(&env.secret_file, "short").unwrap();
    hup(&hub);
    assert!(
        eventually(Duration::from_secs(5), || hub
            .proc
            .log_text()
            .contains("configuration reload failed")),
        "{}",
        hub.proc.log_text()
    );
    let log = hub.proc.log_text();
    assert!(log.contains("tunnel.jwt"), "{log}");
    assert!(!log.contains(new_secret), "the secret must never be logged");
    assert_eq!(upgrade(&hub, Some(&new_token)).0, 101);
}

/// Secret rotation without restarting agents: the agent re-reads its
/// `token_file` on every hub connection, so a token written there before the
/// hub switches secrets (SIGHUP or restart) is the one it presents when it
/// next connects.
#[test]
fn an_agent_picks_up_a_rotated_token_file_when_it_reconnects() {
    let env = Env::new();
    let echo = echo_server();
    let http_port = free_port();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replace(
        "bind: 127.0.0.1:0\ntunnel",
        &format!("bind: 127.0.0.1:{http_port}\ntunnel"),
    );
    let mut hub = HubProc::start(env.path(), "hub1", &yaml);
    let token_file = env.path().join("agent.token");
    std::fs::write(&token_file, env.token("agent-1", None)).unwrap();
    let agent_yaml = env.agent_yaml(
        "agent-1",
        &[hub.http],
        &[("echo", echo)],
        &format!("token_file: {}\n", token_file.display()),
    );
    let agent = AgentProc::start(env.path(), "agent", &agent_yaml, "unused-env-token");
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));

    // Rotate: the agent's new token first, then the hub's secret.
    let new_secret = "rotated-secret-for-the-whole-fleet-0123456789";
    let new_token = nowconnect_tokio::jwt::mint(
        new_secret.as_bytes(),
        "agent-1",
        &["echo".to_string()],
        None,
        Duration::from_secs(600),
    )
    .unwrap();
    std::fs::write(&token_file, &new_token).unwrap();
    std::fs::write(&env.secret_file, new_secret).unwrap();
    // The hub restarts with the new secret; the agent reconnects by itself.
    hub.proc.kill();
    let hub2 = HubProc::start(env.path(), "hub2", &yaml);
    assert!(
        hub2.agents_attached(1.0, Duration::from_secs(20)),
        "agent did not come back with the rotated token: {}",
        agent.proc.log_text()
    );
    assert_eq!(
        hub2.metric("nowconnect_tunnel_auth_failures_total{reason=\"bad_signature\"}"),
        0.0
    );
    let data = Arc::new(random_bytes(100_000));
    assert_eq!(
        echo_roundtrip(hub2.listener("echo"), data.clone()).unwrap(),
        sha256(&data)
    );
}

/// `log.format: json`: one JSON object per line; security events carry the
/// stable target `nowconnect::security` with the reason and the peer, and
/// never the token.
#[test]
fn json_logs_carry_security_events_at_a_stable_target_without_secrets() {
    let env = Env::new();
    let hub = HubProc::start(
        env.path(),
        "hub",
        &env.hub_yaml(&[], "log:\n  format: json\n"),
    );
    let now = nowconnect_tokio::jwt::unix_now();
    let expired = jwt(
        env.secret.as_bytes(),
        serde_json::json!({"sub": "a1", "connectors": ["echo"], "aud": "nowconnect", "exp": now - 3600}),
        jsonwebtoken::Algorithm::HS256,
    );
    assert_eq!(upgrade(&hub, Some(&expired)).0, 401);
    assert!(eventually(Duration::from_secs(5), || hub
        .proc
        .log_text()
        .contains("nowconnect::security")));
    let log = hub.proc.log_text();
    let mut security = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["target"] == "nowconnect::security" {
            security += 1;
            assert_eq!(v["reason"], "expired", "{line}");
            assert!(
                v["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.1:")),
                "{line}"
            );
        }
    }
    assert_eq!(security, 1, "{log}");
    assert!(!log.contains(&expired), "a token reached the log");
    assert!(!log.contains(&env.secret), "the secret reached the log");
}
