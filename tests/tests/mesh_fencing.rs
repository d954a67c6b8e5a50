//! A hand-driven mesh client against a real hub: stale-epoch opens and
//! frames are refused and counted, and a client without a certificate never
//! gets a mesh link.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nowconnect_core::codec::{self, Codec};
use nowconnect_core::{Cid, Epoch, ErrorCode, Frame, Limits, MeshHeader, WsMessage};
use nowconnect_tests::pki::{Ca, Leaf};
use nowconnect_tests::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn client_tls(leaf: &Leaf, with_cert: bool) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&leaf.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    Arc::new(if with_cert {
        let certs: Vec<_> = CertificateDer::pem_file_iter(&leaf.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        b.with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(&leaf.key).unwrap())
            .unwrap()
    } else {
        b.with_no_client_auth()
    })
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn mesh_connect(port: u16, tls: Arc<rustls::ClientConfig>) -> Result<Ws, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("wss://127.0.0.1:{port}/mesh")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "nowconnect.mesh.v2".parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn send(ws: &mut Ws, f: &Frame) {
    let WsMessage::Binary(b) = Codec::V2.encode(f, &Limits::default()).unwrap() else {
        unreachable!()
    };
    ws.send(Message::Binary(b)).await.unwrap();
}

async fn recv(ws: &mut Ws) -> Frame {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frame within 5 s")
            .unwrap()
            .unwrap();
        if let Message::Binary(b) = m {
            let f = codec::decode(&WsMessage::Binary(b), &Limits::default()).unwrap();
            if !matches!(f, Frame::MPing { .. } | Frame::MPong { .. }) {
                return f;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_are_refused_and_counted_and_certless_peers_get_no_link() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = Ca::new("mesh CA");
    let port = free_port();
    let leaf_a = ca.issue(env.path(), "hub-a");
    let yaml = env.hub_yaml(
        &[("echo", "echo")],
        &format!(
            "ha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n  redis_url: {}\n  lease_sec: 3\n  renew_interval_sec: 1\n  mesh:\n    listen: 127.0.0.1:{port}\n    require_mtls: true\n    handshake_timeout_sec: 1\n    allowed_replicas: [hub-x]\n    tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n",
            redis.url(),
            leaf_a.ca.display(),
            leaf_a.cert.display(),
            leaf_a.key.display()
        ),
    )
    // One flow at a time on the agent's tunnel: a second mesh open finds
    // the tunnel full.
    .replace("tunnel:\n  jwt:", "tunnel:\n  max_flows_per_agent: 1\n  jwt:");
    let dir = env.path().to_path_buf();
    let hub = tokio::task::spawn_blocking(move || HubProc::start(&dir, "hub-a", &yaml))
        .await
        .unwrap();
    let agent_yaml = env.agent_yaml("agent-1", &[hub.http], &[("echo", echo)], "");
    let dir = env.path().to_path_buf();
    let token = env.token("agent-1", None);
    let _agent =
        tokio::task::spawn_blocking(move || AgentProc::start(&dir, "agent", &agent_yaml, &token))
            .await
            .unwrap();
    let hub = Arc::new(hub);
    let metric = |name: &'static str| {
        let hub = hub.clone();
        async move {
            tokio::task::spawn_blocking(move || hub.metric(name))
                .await
                .unwrap()
        }
    };
    let attached = {
        let hub = hub.clone();
        tokio::task::spawn_blocking(move || {
            eventually(Duration::from_secs(15), || {
                hub.metric("nowconnect_agents_connected") == 1.0
            })
        })
    };
    assert!(attached.await.unwrap());
    // The agent's current epoch, from the hub's log.
    let log = hub.proc.log_text();
    let epoch = *epochs_in_log(&log, "agent tunnel established")
        .last()
        .expect("epoch in the hub log");

    // Plaintext to the TLS port: the handshake fails, the connection closes,
    // the hub says why and keeps serving.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        plain
            .write_all(b"GET /mesh HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
            .await
            .expect("closed within 5 s");
        assert!(
            !matches!(&r, Ok(n) if *n > 0 && buf[..*n].starts_with(b"HTTP")),
            "plaintext got an HTTP answer: {r:?}"
        );
    }
    // A connection that never starts its TLS handshake is closed after
    // `ha.mesh.handshake_timeout_sec` (1 s here), and logged.
    {
        use tokio::io::AsyncReadExt;
        let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("a silent mesh connection is closed within 5 s");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
        hub.proc.wait_log(
            "TLS handshake not completed within 1s",
            Duration::from_secs(5),
        );
    }
    // A peer with no client certificate: the TLS handshake is refused.
    let no_cert = mesh_connect(port, client_tls(&ca.issue(env.path(), "nocert"), false)).await;
    let refused = match no_cert {
        Err(_) => true,
        // TLS 1.3 reports the refusal on first use of the connection.
        Ok(mut ws) => {
            send(
                &mut ws,
                &Frame::MHello {
                    replica_id: "x".into(),
                    window: 0,
                },
            )
            .await;
            matches!(
                tokio::time::timeout(Duration::from_secs(5), ws.next()).await,
                Ok(None | Some(Err(_)))
            )
        }
    };
    assert!(refused, "a mesh peer without a certificate got a link");

    // A peer with a valid certificate.
    let mut ws = mesh_connect(port, client_tls(&ca.issue(env.path(), "hub-x"), true))
        .await
        .unwrap();
    send(
        &mut ws,
        &Frame::MHello {
            replica_id: "hub-x".into(),
            window: 0,
        },
    )
    .await;
    assert!(
        matches!(recv(&mut ws).await, Frame::MHello { replica_id, .. } if replica_id == "hub-a")
    );
    let hdr = |cid, epoch| MeshHeader {
        cid,
        connector: "echo".into(),
        agent_id: "agent-1".into(),
        seq: 0,
        epoch: Epoch(epoch),
    };
    // A stale epoch: refused, and the refusal does not tell the current
    // epoch (a peer must not learn what to replay).
    send(
        &mut ws,
        &Frame::MOpen {
            h: hdr(Cid(1), epoch - 1),
        },
    )
    .await;
    match recv(&mut ws).await {
        Frame::MOpenAck {
            ok: false,
            code: ErrorCode::StaleEpoch,
            reason,
            ..
        } => {
            assert!(reason.contains("not owned"), "{reason}");
            assert!(!reason.contains(&epoch.to_string()), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The current epoch, but a connector the agent never announced: refused
    // and counted, before any byte reaches the agent.
    send(
        &mut ws,
        &Frame::MOpen {
            h: MeshHeader {
                connector: "ldap".into(),
                ..hdr(Cid(3), epoch)
            },
        },
    )
    .await;
    match recv(&mut ws).await {
        Frame::MOpenAck {
            ok: false,
            code: ErrorCode::Refused,
            reason,
            ..
        } => assert!(
            reason.contains("does not serve connector `ldap`"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        metric("nowconnect_security_events_total{kind=\"mesh_open_connector_not_served\"}").await,
        1.0
    );
    // The current epoch: accepted, and data flows to the agent's target.
    send(
        &mut ws,
        &Frame::MOpen {
            h: hdr(Cid(5), epoch),
        },
    )
    .await;
    assert!(matches!(
        recv(&mut ws).await,
        Frame::MOpenAck { ok: true, .. }
    ));
    send(
        &mut ws,
        &Frame::MData {
            h: hdr(Cid(5), epoch),
            payload: bytes::Bytes::from_static(b"ping"),
        },
    )
    .await;
    match recv(&mut ws).await {
        Frame::MData { payload, .. } => assert_eq!(&payload[..], b"ping"),
        other => panic!("{other:?}"),
    }
    // While that flow holds the tunnel's only flow, another open is refused
    // with the tunnel's reason: the owner accepts an open only once the
    // agent's tunnel has taken it (never accepted, then reset).
    send(
        &mut ws,
        &Frame::MOpen {
            h: hdr(Cid(7), epoch),
        },
    )
    .await;
    loop {
        match recv(&mut ws).await {
            Frame::MOpenAck {
                h,
                ok,
                code,
                reason,
            } if h.cid == Cid(7) => {
                assert!(!ok, "accepted an open the agent's tunnel could not take");
                assert_eq!(code, ErrorCode::LimitExceeded, "{reason}");
                break;
            }
            Frame::MCredit { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // A later frame of that flow with a stale epoch never reaches the target:
    // the flow is reset with stale_epoch.
    // A cid used before on this connection (the refused open's) is refused
    // as such: nothing still in flight for the old flow may meet a new one.
    send(
        &mut ws,
        &Frame::MOpen {
            h: hdr(Cid(3), epoch),
        },
    )
    .await;
    loop {
        match recv(&mut ws).await {
            Frame::MOpenAck { h, ok, code, .. } if h.cid == Cid(3) => {
                assert!(!ok, "accepted a cid used before on the connection");
                assert_eq!(code, ErrorCode::ProtocolError);
                break;
            }
            Frame::MCredit { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let mut stale = hdr(Cid(5), epoch - 1);
    stale.seq = 1;
    send(
        &mut ws,
        &Frame::MData {
            h: stale,
            payload: bytes::Bytes::from_static(b"evil"),
        },
    )
    .await;
    match recv(&mut ws).await {
        Frame::MRst {
            code: ErrorCode::StaleEpoch,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    hub.proc
        .wait_log("TLS handshake failed", Duration::from_secs(5));
    // Both refusals were counted.
    assert!(metric("nowconnect_owner_epoch_mismatch_total").await >= 2.0);
    hub.proc
        .wait_log("mesh open refused", Duration::from_secs(5));
}

/// Whether a fresh mesh connection to `port` with these credentials gets
/// through TLS and the WebSocket upgrade.
fn mesh_handshake(rt: &tokio::runtime::Runtime, port: u16, leaf: &Leaf) -> Result<(), String> {
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            mesh_connect(port, client_tls(leaf, true)),
        )
        .await
        .map_err(|_| "timed out".to_string())?
        .map(drop)
    })
}

/// Mesh certificate rotation while the cluster runs: a second CA is added
/// to the bundles, the leaf certificates are replaced, the first CA is
/// removed, each picked up by the file watcher (no restart, no signal). The
/// established mesh link and a flow across it survive; new connections need
/// the new certificates; a broken certificate file is refused by the reload
/// and the running certificates stay.
#[test]
fn mesh_certificates_rotate_on_file_change_without_dropping_the_link() {
    use std::io::{Read, Write};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca1 = Ca::new("mesh CA 1");
    let (pa, pb) = (free_port(), free_port());
    let watch = "reload:\n  watch_interval_sec: 1\n";
    let leaf_a = ca1.issue(env.path(), "hub-a");
    let leaf_b = ca1.issue(env.path(), "hub-b");
    let a = HubProc::start(
        env.path(),
        "hub-a",
        &(mesh_hub_yaml(&env, "hub-a", "active", &redis, pa, &[pb], &leaf_a) + watch),
    );
    let b = HubProc::start(
        env.path(),
        "hub-b",
        &(mesh_hub_yaml(&env, "hub-b", "active", &redis, pb, &[pa], &leaf_b) + watch),
    );
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    // Both links up (each hub's own dial), so that neither reconnects
    // later for a reason of its own.
    assert!(eventually(Duration::from_secs(15), || {
        a.metric("nowconnect_agents_connected") == 1.0
            && dialed_link_up(&a, pb)
            && dialed_link_up(&b, pa)
    }));
    // A long-lived flow across the mesh: client → hub-b → hub-a → agent.
    let mut flow = std::net::TcpStream::connect(b.listener("ldap")).unwrap();
    flow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut echo_once = |msg: &[u8]| {
        flow.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        flow.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    echo_once(b"before the rotation");
    let reconnects = |h: &HubProc| h.metric("nowconnect_mesh_link_reconnects_total");
    let (ra, rb) = (reconnects(&a), reconnects(&b));
    let reloads = |h: &HubProc, r: &str| {
        h.metric(&format!(
            "nowconnect_config_reloads_total{{result=\"{r}\"}}"
        ))
    };
    // Keep the CA-1 credentials for the checks below.
    let old = env.path().join("old");
    std::fs::create_dir(&old).unwrap();
    let keep = |p: &std::path::Path| {
        let to = old.join(p.file_name().unwrap());
        std::fs::copy(p, &to).unwrap();
        to
    };
    let old_leaf = Leaf {
        ca: keep(&leaf_a.ca),
        cert: keep(&leaf_a.cert),
        key: keep(&leaf_a.key),
    };
    let ca2 = Ca::new("mesh CA 2");
    let new = env.path().join("new");
    std::fs::create_dir(&new).unwrap();
    let new_a = ca2.issue(&new, "hub-a");
    let new_b = ca2.issue(&new, "hub-b");
    let both = format!("{}{}", ca1.pem, ca2.pem);
    let wait_reloads = |n: f64| {
        assert!(
            eventually(Duration::from_secs(10), || reloads(&a, "ok") >= n
                && reloads(&b, "ok") >= n),
            "reload {n} not seen; hub-a log:\n{}",
            a.proc.log_text()
        );
    };

    // 1. Trust both CAs.
    for l in [&leaf_a, &leaf_b] {
        std::fs::write(&l.ca, &both).unwrap();
    }
    wait_reloads(1.0);
    // 2. New leaf certificates (key and certificate together, so the
    //    watcher never sees a mismatched pair).
    for (l, n) in [(&leaf_a, &new_a), (&leaf_b, &new_b)] {
        let (cert, key) = (
            std::fs::read(&n.cert).unwrap(),
            std::fs::read(&n.key).unwrap(),
        );
        let tmp_c = l.cert.with_extension("tmp-c");
        let tmp_k = l.key.with_extension("tmp-k");
        std::fs::write(&tmp_c, cert).unwrap();
        std::fs::write(&tmp_k, key).unwrap();
        std::fs::rename(&tmp_k, &l.key).unwrap();
        std::fs::rename(&tmp_c, &l.cert).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || mesh_handshake(&rt, pa, &new_a)
            .is_ok()),
        "hub-a does not present its new certificate; log:\n{}",
        a.proc.log_text()
    );
    // 3. Drop the old CA.
    for l in [&leaf_a, &leaf_b] {
        std::fs::write(&l.ca, &ca2.pem).unwrap();
    }
    let refused_old = Leaf {
        ca: new_a.ca.clone(),
        cert: old_leaf.cert.clone(),
        key: old_leaf.key.clone(),
    };
    assert!(
        eventually(Duration::from_secs(10), || mesh_handshake(
            &rt,
            pa,
            &refused_old
        )
        .is_err()),
        "a CA-1 client certificate is still accepted after CA 1 left the bundle"
    );
    assert!(
        mesh_handshake(&rt, pa, &old_leaf).is_err(),
        "a client trusting only CA 1 must not accept hub-a's new certificate"
    );
    mesh_handshake(&rt, pa, &new_a).expect("the new credentials work");

    // The established link and the flow on it lived through all of it.
    echo_once(b"after the rotation");
    assert_eq!(
        (reconnects(&a), reconnects(&b)),
        (ra, rb),
        "a mesh link was re-established"
    );
    assert!(mesh_established(&a, "hub-b") && mesh_established(&b, "hub-a"));
    let data = Arc::new(random_bytes(100_000));
    assert_eq!(
        echo_roundtrip(b.listener("ldap"), data.clone()).unwrap(),
        sha256(&data),
        "a new flow across the mesh"
    );

    // A broken certificate file: the reload fails, says why, and the
    // running certificates stay.
    let errors = reloads(&a, "error");
    std::fs::write(&leaf_a.cert, "not a certificate").unwrap();
    assert!(eventually(Duration::from_secs(10), || reloads(&a, "error") > errors));
    let log = a.proc.wait_log("reload failed", Duration::from_secs(5));
    assert!(log.contains("ha.mesh.tls"), "{log}");
    mesh_handshake(&rt, pa, &new_a).expect("the running certificates stay");
    echo_once(b"after a failed reload");
}

/// Whether the hub closes a mesh link opened with `leaf` that claims to be
/// `claim` in its M_HELLO, before any flow: the link ends (close frame, end
/// of stream or error) within 5 s, and an M_OPEN sent meanwhile is never
/// accepted.
async fn claim_is_refused(port: u16, leaf: &Leaf, claim: &str, agent: &str) -> bool {
    let Ok(mut ws) = mesh_connect(port, client_tls(leaf, true)).await else {
        return true;
    };
    send(
        &mut ws,
        &Frame::MHello {
            replica_id: claim.into(),
            window: 0,
        },
    )
    .await;
    let h = MeshHeader {
        cid: Cid(1),
        connector: "ldap".into(),
        agent_id: agent.into(),
        seq: 0,
        epoch: Epoch(1),
    };
    let _ = ws
        .send(Message::Binary(
            match Codec::V2
                .encode(&Frame::MOpen { h }, &Limits::default())
                .unwrap()
            {
                WsMessage::Binary(b) => b,
                WsMessage::Text(_) => unreachable!(),
            },
        ))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false, // still open after 5 s
            Ok(None | Some(Err(_))) => return true,
            Ok(Some(Ok(m))) => m,
        };
        match m {
            Message::Close(_) => return true,
            Message::Binary(b) => match codec::decode(&WsMessage::Binary(b), &Limits::default()) {
                Ok(Frame::MOpenAck { ok: true, .. }) | Ok(Frame::MData { .. }) => return false,
                _ => {}
            },
            _ => {}
        }
    }
}

/// The trust model's mesh line: a certificate from the cluster's CA lets a
/// hub act only as the replica id it names, and only while that replica is
/// registered. An impostor holding a valid certificate for `evil` claims to
/// be `hub-b`, then `evil` itself; both links are closed before any flow,
/// logged and counted, while LDAP through the real mesh keeps working.
#[test]
fn an_impostor_with_a_valid_ca_certificate_is_refused_and_receives_no_flow() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let slapd = nowconnect_tests::ldap::Slapd::start(env.path());
    let ca = Ca::new("mesh CA");
    let (a, b, pa, _) = meshed_pair(&env, "active", &redis, &ca);
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", slapd.addr)], ""),
        &env.token("agent-1", Some(vec!["ldap".into()])),
    );
    assert!(
        eventually(Duration::from_secs(15), || pair_ready(&a, &b)),
        "hub-a:\n{}\nhub-b:\n{}",
        a.proc.log_text(),
        b.proc.log_text()
    );
    let direct = nowconnect_tests::ldap::search(slapd.addr, "(uid=alice)");
    assert_eq!(direct.0, 0);
    let evil = ca.issue(env.path(), "evil");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for round in 0..3 {
        // Claiming another replica's id: the certificate does not name it.
        assert!(
            rt.block_on(claim_is_refused(pa, &evil, "hub-b", "agent-1")),
            "round {round}: the impostor claiming hub-b kept its link\n{}",
            a.proc.log_text()
        );
        // Claiming its own name: valid, but not a registered replica.
        assert!(
            rt.block_on(claim_is_refused(pa, &evil, "evil", "agent-1")),
            "round {round}: an unregistered replica kept its link"
        );
        // Claiming the dialed hub's own id.
        let a_leaf = ca.issue(env.path(), "hub-a-copy");
        assert!(rt.block_on(claim_is_refused(pa, &a_leaf, "hub-a", "agent-1")));
        // Meanwhile the real mesh carries LDAP from hub-b to the agent on hub-a.
        assert_eq!(
            nowconnect_tests::ldap::search(b.listener("ldap"), "(uid=alice)"),
            direct,
            "round {round}: LDAP through the mesh"
        );
    }
    let kind = |k: &str| a.metric(&format!("nowconnect_security_events_total{{kind=\"{k}\"}}"));
    // Each refusal is logged: the log says which link a count came from.
    for k in [
        "mesh_peer_certificate_mismatch",
        "mesh_peer_not_registered",
        "mesh_peer_unexpected_replica",
    ] {
        assert_eq!(kind(k), 3.0, "{k}; hub-a log:\n{}", a.proc.log_text());
    }
    a.proc.wait_log(
        "the peer claims replica `hub-b` but its certificate names",
        Duration::from_secs(2),
    );
    assert!(mesh_established(&a, "hub-b") && mesh_established(&b, "hub-a"));
    // Nine refused links made no series: label values come only from
    // admitted, registered replicas.
    let peers = peer_labels(&a);
    assert_eq!(
        peers,
        ["hub-b".to_string()].into(),
        "hub-a exports series for {peers:?}"
    );
}

/// Whether the hub ends the mesh link `ws` within `within` (close frame,
/// end of stream or error); pings are answered meanwhile.
async fn closed_within(ws: &mut Ws, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(Message::Binary(b)))) => {
                if let Ok(Frame::MPing { nonce }) =
                    codec::decode(&WsMessage::Binary(b), &Limits::default())
                {
                    send(ws, &Frame::MPong { nonce }).await;
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Redis holds ownership, not authority. A party with write access to
/// Redis plants a replica `hub-c` announcing a plain `ws://` URL: with
/// mesh TLS configured no hub dials it (refused once, logged and counted).
/// A peer with a valid certificate for `hub-c` is served only while `hub-c`
/// is registered: once its record is gone for a whole lease the hub closes
/// its link, and a new one is refused, while the real mesh stays up.
#[test]
fn a_planted_ws_url_is_not_dialed_and_a_departed_replica_loses_its_link() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let ca = Ca::new("mesh CA");
    let (a, b, pa, _) = meshed_pair(&env, "active", &redis, &ca);
    assert!(
        eventually(Duration::from_secs(15), || mesh_established(&a, "hub-b")
            && mesh_established(&b, "hub-a")),
        "hub-a:\n{}",
        a.proc.log_text()
    );
    // A listener that would see the dial of the planted URL.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let planted = format!("ws://127.0.0.1:{}/mesh", trap.local_addr().unwrap().port());
    let url = redis.url();
    redis_cli(
        &url,
        &["ZADD", "nowconnect:replicas", "9000000000000", "hub-c"],
    );
    redis_cli(&url, &["SET", "nowconnect:replica:hub-c:url", &planted]);
    let refused =
        |h: &HubProc| h.metric("nowconnect_security_events_total{kind=\"mesh_url_refused\"}");
    assert!(
        eventually(Duration::from_secs(10), || refused(&a) == 1.0
            && refused(&b) == 1.0),
        "hub-a:\n{}",
        a.proc.log_text()
    );
    a.proc.wait_log(
        "mesh peer URL from the registry refused",
        Duration::from_secs(2),
    );
    std::thread::sleep(Duration::from_secs(2)); // two more discoveries
    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a hub dialed the planted ws:// URL"
    );
    assert_eq!(refused(&a), 1.0, "refused once, not once per discovery");

    // hub-c, registered, with a certificate naming it: served.
    let c = ca.issue(env.path(), "hub-c");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let still_open = rt.block_on(async {
        let mut ws = mesh_connect(pa, client_tls(&c, true)).await.unwrap();
        send(
            &mut ws,
            &Frame::MHello {
                replica_id: "hub-c".into(),
                window: 0,
            },
        )
        .await;
        assert!(
            matches!(recv(&mut ws).await, Frame::MHello { replica_id, .. } if replica_id == "hub-a")
        );
        let served = !closed_within(&mut ws, Duration::from_secs(2)).await;
        // Admitted and registered: its series exist, by its replica id.
        let labelled = mesh_established(&a, "hub-c");
        // Its record is removed (it stopped announcing itself): within a
        // lease (3 s) and a discovery (1 s) the link is closed.
        redis_cli(&url, &["ZREM", "nowconnect:replicas", "hub-c"]);
        redis_cli(&url, &["DEL", "nowconnect:replica:hub-c:url"]);
        let t0 = std::time::Instant::now();
        let closed = closed_within(&mut ws, Duration::from_secs(10)).await;
        (served, closed, t0.elapsed(), labelled)
    });
    assert!(
        still_open.0,
        "a registered hub-c was refused:\n{}",
        a.proc.log_text()
    );
    assert!(
        still_open.1,
        "hub-a kept the link of a replica that left the registry:\n{}",
        a.proc.log_text()
    );
    assert!(
        still_open.2 >= Duration::from_millis(1500),
        "closed before a lease: {:?}",
        still_open.2
    );
    assert!(still_open.3, "{:?}", peer_labels(&a));
    assert_eq!(a.metric("nowconnect_mesh_peers_departed_total"), 1.0);
    // Departed: its series are gone, and stay gone while it is refused.
    assert!(!peer_labels(&a).contains("hub-c"), "{:?}", peer_labels(&a));
    a.proc
        .wait_log("mesh peer left the registry", Duration::from_secs(2));
    // Coming back under the same name is refused while it is not registered.
    assert!(rt.block_on(claim_is_refused(pa, &c, "hub-c", "agent-1")));
    assert!(mesh_established(&a, "hub-b") && mesh_established(&b, "hub-a"));
    assert_eq!(peer_labels(&a), ["hub-b".to_string()].into());
}
