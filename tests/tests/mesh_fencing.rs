//! A hand-driven mesh client against a real hub: stale-epoch opens and
//! frames are refused and counted, and a client without a certificate never
//! gets a mesh link.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nowconnect_core::codec::{self, Codec};
use nowconnect_core::{Epoch, ErrorCode, Frame, Limits, MeshHeader, WsMessage};
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
            "ha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n  redis_url: {}\n  lease_sec: 3\n  renew_interval_sec: 1\n  mesh:\n    listen: 127.0.0.1:{port}\n    require_mtls: true\n    handshake_timeout_sec: 1\n    tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n",
            redis.url(),
            leaf_a.ca.display(),
            leaf_a.cert.display(),
            leaf_a.key.display()
        ),
    );
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
        let log = hub.proc.log_text();
        assert!(
            log.contains("TLS handshake not completed within 1s"),
            "{log}"
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
    // A stale epoch: refused with the reason.
    send(
        &mut ws,
        &Frame::MOpen {
            h: hdr(1, epoch - 1),
        },
    )
    .await;
    match recv(&mut ws).await {
        Frame::MOpenAck {
            ok: false,
            code: ErrorCode::StaleEpoch,
            reason,
            ..
        } => assert!(reason.contains("stale"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The current epoch: accepted, and data flows to the agent's target.
    send(&mut ws, &Frame::MOpen { h: hdr(3, epoch) }).await;
    assert!(matches!(
        recv(&mut ws).await,
        Frame::MOpenAck { ok: true, .. }
    ));
    send(
        &mut ws,
        &Frame::MData {
            h: hdr(3, epoch),
            payload: bytes::Bytes::from_static(b"ping"),
        },
    )
    .await;
    match recv(&mut ws).await {
        Frame::MData { payload, .. } => assert_eq!(&payload[..], b"ping"),
        other => panic!("{other:?}"),
    }
    // A later frame of that flow with a stale epoch never reaches the target:
    // the flow is reset with stale_epoch.
    let mut stale = hdr(3, epoch - 1);
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
    assert!(hub.proc.log_text().contains("TLS handshake failed"));
    // Both refusals were counted.
    assert!(metric("nowconnect_owner_epoch_mismatch_total").await >= 2.0);
    assert!(hub.proc.log_text().contains("mesh open refused"));
}
