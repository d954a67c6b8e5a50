//! The agent's own HTTP endpoint (`http.bind` in `premise.yaml`), with
//! real agent processes on both runtimes: `/healthz`, `/readyz` following
//! the agent's tunnels with the reasons, `/metrics` counting flows, bytes
//! and dial errors of configured connectors only (a hub's connector names
//! never become labels), a bad `http` section refused at start, and the
//! endpoint's bounds against slow or hostile clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nowconnect_core::{Cid, Codec, Epoch, ErrorCode, Frame, Limits, WsMessage};
use nowconnect_tests::*;

const RUNTIMES: [Runtime; 2] = [Runtime::Tokio, Runtime::AsyncStd];
const HTTP: &str = "http: { bind: '127.0.0.1:0' }\n";

fn start_agent(
    rt: Runtime,
    env: &Env,
    hubs: &[SocketAddr],
    connectors: &[(&str, SocketAddr)],
) -> AgentProc {
    AgentProc::start_on(
        rt,
        env.path(),
        &format!("agent-{}", rt.name()),
        &env.agent_yaml("agent-1", hubs, connectors, HTTP),
        &env.token("agent-1", None),
    )
}

/// A loopback address nothing listens on.
fn closed_port() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

#[test]
fn readyz_is_degraded_with_the_reason_until_a_hub_is_up_and_again_once_it_is_gone() {
    for rt in RUNTIMES {
        let env = Env::new();
        let hub_addr = closed_port();
        let url = format!("ws://{hub_addr}/tunnel");
        let agent = start_agent(rt, &env, &[hub_addr], &[("echo", echo_server())]);
        assert_eq!(agent.get("/healthz"), (200, "ok".into()), "{}", rt.name());

        // No hub yet: degraded, naming the hub and why its dial failed.
        let degraded = |needle: &str| {
            let (status, body) = agent.get("/readyz");
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            status == 503
                && v["status"] == "degraded"
                && v["reasons"].as_array().is_some_and(|r| {
                    r.iter().any(|r| {
                        r.as_str().is_some_and(|r| {
                            r.starts_with(&url) && r.to_lowercase().contains(needle)
                        })
                    })
                })
        };
        assert!(
            eventually(Duration::from_secs(10), || degraded("refused")),
            "{}: {:?}",
            rt.name(),
            agent.get("/readyz")
        );
        let established =
            format!("nowconnect_agent_tunnels{{hub=\"{url}\",state=\"established\"}}");
        assert_eq!(agent.metric("nowconnect_agent_tunnels_established"), 0.0);
        assert_eq!(agent.metric(&established), 0.0);

        // The hub comes up on that address: ready.
        let yaml =
            env.hub_yaml(&[("l1", "echo")], "")
                .replacen("127.0.0.1:0", &hub_addr.to_string(), 1);
        let mut hub = HubProc::start(env.path(), &format!("hub-{}", rt.name()), &yaml);
        assert!(
            eventually(Duration::from_secs(15), || agent.get("/readyz")
                == (200, r#"{"status":"ready"}"#.into())),
            "{}: {:?}",
            rt.name(),
            agent.get("/readyz")
        );
        assert_eq!(agent.metric("nowconnect_agent_tunnels_established"), 1.0);
        assert_eq!(agent.metric(&established), 1.0);
        assert_eq!(agent.metric("nowconnect_agent_tunnels_wanted"), 1.0);

        // The hub is gone: degraded again, the tunnel no longer established.
        hub.proc.kill();
        assert!(
            eventually(Duration::from_secs(15), || degraded("")),
            "{}: {:?}",
            rt.name(),
            agent.get("/readyz")
        );
        assert_eq!(agent.metric(&established), 0.0);
        assert!(
            agent.metric(&format!(
                "nowconnect_agent_reconnects_total{{hub=\"{url}\"}}"
            )) >= 1.0
        );
    }
}

#[test]
fn metrics_count_flows_bytes_and_dial_errors_per_configured_connector() {
    let echo = echo_server();
    for rt in RUNTIMES {
        let env = Env::new();
        let hub = HubProc::start(
            env.path(),
            &format!("hub-{}", rt.name()),
            &env.hub_yaml(&[("l-echo", "echo"), ("l-dead", "dead")], ""),
        );
        let agent = start_agent(
            rt,
            &env,
            &[hub.http],
            &[("echo", echo), ("dead", closed_port())],
        );
        assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
        let m = |s: &str| agent.metric(s);
        let flows = |c: &str| {
            m(&format!(
                "nowconnect_agent_flows_total{{connector=\"{c}\"}}"
            ))
        };
        let active = |c: &str| {
            m(&format!(
                "nowconnect_agent_flows_active{{connector=\"{c}\"}}"
            ))
        };
        let bytes = |dir: &str| {
            m(&format!(
                "nowconnect_agent_bytes_total{{connector=\"echo\",dir=\"{dir}\"}}"
            ))
        };
        let refused =
            "nowconnect_agent_target_dial_errors_total{connector=\"dead\",reason=\"refused\"}";
        let (_, text) = agent.get("/metrics");
        // Every series of a configured connector exists from the start.
        for sample in [
            "nowconnect_agent_flows_total{connector=\"echo\"} 0",
            "nowconnect_agent_bytes_total{connector=\"dead\",dir=\"down\"} 0",
            &format!("{refused} 0"),
            "nowconnect_agent_target_dial_errors_total{connector=\"echo\",reason=\"timeout\"} 0",
        ] {
            assert!(
                text.contains(sample),
                "{}: {sample} missing:\n{text}",
                rt.name()
            );
        }
        // An agent exports no hub series.
        let foreign: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nowconnect_") && !l.starts_with("nowconnect_agent_"))
            .collect();
        assert!(foreign.is_empty(), "{}: {foreign:?}", rt.name());

        // Flows through the hub's listener: counted, bytes both ways.
        let data = Arc::new(random_bytes(300_000));
        for n in 1..=2 {
            let digest = echo_roundtrip(hub.listener("l-echo"), data.clone()).unwrap();
            assert_eq!(digest, sha256(&data));
            let want = (n * data.len()) as f64;
            assert!(
                eventually(Duration::from_secs(10), || flows("echo") == n as f64
                    && bytes("up") == want
                    && bytes("down") == want
                    && active("echo") == 0.0),
                "{} flow {n}: flows {} up {} down {} active {}",
                rt.name(),
                flows("echo"),
                bytes("up"),
                bytes("down"),
                active("echo")
            );
        }
        assert_eq!(
            m("nowconnect_agent_target_dial_seconds_count{connector=\"echo\"}"),
            2.0
        );

        // A flow of a connector whose target refuses: a dial error, refused.
        let mut c = TcpStream::connect(hub.listener("l-dead")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(b"hello");
        let _ = c.read(&mut [0u8; 16]);
        assert!(
            eventually(Duration::from_secs(10), || m(refused) == 1.0
                && flows("dead") == 1.0
                && active("dead") == 0.0),
            "{}: {}",
            rt.name(),
            agent.get("/metrics").1
        );
        assert_eq!(flows("echo"), 2.0, "no other connector counted it");
    }
}

/// A fake hub at the returned address: it takes one agent tunnel, answers
/// its HELLO with a v1 WELCOME, opens a flow for `connector`, and sends
/// every frame the agent sends back down the channel.
fn fake_hub_opening(connector: &'static str) -> (SocketAddr, std::sync::mpsc::Receiver<Frame>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let (tcp, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let limits = Limits::default();
            let _hello = ws.next().await;
            for frame in [
                Frame::Welcome {
                    epoch: Epoch(1),
                    codec: "v1".into(),
                    window: 0,
                    max_frame: limits.max_frame as u32,
                    replica_id: "fake".into(),
                },
                Frame::Open {
                    cid: Cid(1),
                    connector: connector.into(),
                },
            ] {
                let WsMessage::Text(t) = Codec::V1.encode(&frame, &limits).unwrap() else {
                    unreachable!("v1 is text")
                };
                ws.send(Message::Text(t.into())).await.unwrap();
            }
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg
                    && let Ok(f) =
                        nowconnect_core::codec::decode(&WsMessage::Text(t.to_string()), &limits)
                {
                    let _ = tx.send(f);
                }
            }
        });
    });
    (addr, rx)
}

#[test]
fn a_hub_that_opens_a_connector_the_agent_does_not_serve_creates_no_series() {
    for rt in RUNTIMES {
        let env = Env::new();
        let (hub, frames) = fake_hub_opening("ghost");
        let agent = start_agent(rt, &env, &[hub], &[("echo", echo_server())]);
        // The agent refuses the flow: the OPEN was taken and answered.
        let rst = (0..50)
            .filter_map(|_| frames.recv_timeout(Duration::from_secs(15)).ok())
            .find(|f| matches!(f, Frame::Rst { .. }));
        assert!(
            matches!(
                rst,
                Some(Frame::Rst {
                    cid: Cid(1),
                    code: ErrorCode::UnknownConnector,
                    ..
                })
            ),
            "{}: {rst:?}",
            rt.name()
        );
        assert_eq!(agent.metric("nowconnect_agent_tunnels_established"), 1.0);
        let (_, text) = agent.get("/metrics");
        assert!(
            !text.contains("ghost"),
            "{}: a hub's name became a label:\n{text}",
            rt.name()
        );
        let connectors: std::collections::BTreeSet<&str> = text
            .split("connector=\"")
            .skip(1)
            .filter_map(|t| t.split('"').next())
            .collect();
        assert_eq!(connectors, ["echo"].into(), "{}", rt.name());
        assert_eq!(
            agent.metric("nowconnect_agent_flows_total{connector=\"echo\"}"),
            0.0
        );
    }
}

#[test]
fn a_bad_http_section_is_refused_at_start_naming_the_file_and_key() {
    let env = Env::new();
    let base = env.agent_yaml("agent-1", &[closed_port()], &[("echo", closed_port())], "");
    let cases = [
        (
            "http: { bind: nonsense }\n",
            "http.bind",
            "`nonsense` is not an address",
        ),
        (
            "http: { bind: '127.0.0.1:0', tls: {} }\n",
            "http.tls",
            "unknown field",
        ),
    ];
    for rt in RUNTIMES {
        for (i, (http, key, reason)) in cases.iter().enumerate() {
            let f = env.path().join(format!("bad-{}-{i}.yaml", rt.name()));
            std::fs::write(&f, format!("{base}{http}")).unwrap();
            let out = Command::new(rt.bin())
                .args(["agent", "--config"])
                .arg(&f)
                .env("NC_TOKEN", env.token("agent-1", None))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{} case {i} started", rt.name());
            for needle in [&f.display().to_string(), *key, *reason] {
                assert!(
                    err.contains(needle),
                    "{} case {i}: no `{needle}` in `{err}`",
                    rt.name()
                );
            }
        }
    }
}

/// Whether the peer closes `s` within `within` (it sends nothing).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    use std::io::ErrorKind::{TimedOut, WouldBlock};
    s.set_read_timeout(Some(within)).unwrap();
    match s.read(&mut [0u8; 64]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), WouldBlock | TimedOut),
    }
}

#[test]
fn slow_clients_neither_block_others_nor_the_tunnels_and_are_bounded() {
    let echo = echo_server();
    let data = Arc::new(random_bytes(200_000));
    for rt in RUNTIMES {
        let env = Env::new();
        let hub = HubProc::start(
            env.path(),
            &format!("hub-{}", rt.name()),
            &env.hub_yaml(&[("l-echo", "echo")], ""),
        );
        let agent = start_agent(rt, &env, &[hub.http], &[("echo", echo)]);
        assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
        // The hub counts the tunnel at its accept; the agent once WELCOME
        // arrived (just after).
        assert!(eventually(Duration::from_secs(5), || {
            agent.metric("nowconnect_agent_tunnels_established") == 1.0
        }));
        let addr = agent.http.unwrap();

        // Slowloris: connections that never finish (or never start) a head.
        let mut slow: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        slow[0]
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        // Others are answered meanwhile, and flows go on.
        let (status, body) = agent.get("/metrics");
        assert_eq!(status, 200, "{}", rt.name());
        assert!(
            body.contains("nowconnect_agent_tunnels_established 1"),
            "{body}"
        );
        assert_eq!(
            echo_roundtrip(hub.listener("l-echo"), data.clone()).unwrap(),
            sha256(&data)
        );
        // A head that does not come within the head timeout ends its
        // connection.
        for s in &mut slow {
            assert!(closed_within(s, Duration::from_secs(15)), "{}", rt.name());
        }

        // Beyond the cap of open connections, one more is closed at once;
        // once the idle ones time out, requests are answered again.
        let mut idle: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut extra = TcpStream::connect(addr).unwrap();
        assert!(
            closed_within(&mut extra, Duration::from_secs(3)),
            "{}",
            rt.name()
        );
        for s in &mut idle {
            assert!(closed_within(s, Duration::from_secs(15)), "{}", rt.name());
        }
        assert_eq!(agent.get("/healthz"), (200, "ok".into()), "{}", rt.name());
    }
}
