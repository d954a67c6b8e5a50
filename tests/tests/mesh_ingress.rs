//! Mesh mTLS terminated by a real nginx (`ha.mesh.tls_terminated_by_proxy`):
//! nginx verifies the peer's client certificate and forwards it URL-encoded
//! in `ssl-client-cert` (`$ssl_client_escaped_cert`) to hub-a's plain mesh
//! port. hub-b dials hub-a through nginx and the mesh carries flows both
//! ways; nobody outside `trusted_proxies` is served, and from the trusted
//! address a forged header fares as a forged TLS certificate would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nowconnect_core::codec::{self, Codec};
use nowconnect_core::{Cid, Epoch, Frame, Limits, MeshHeader, WsMessage};
use nowconnect_tests::pki::{Ca, Leaf};
use nowconnect_tests::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// nginx from `PATH` or `/usr/sbin` (Debian's nginx-light).
fn nginx_bin() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .expect("nginx is needed (Debian: apt-get install nginx-light)")
}

/// A TLS-terminating nginx in front of a hub's mesh port, as an operator
/// would run it: client certificates required and verified against the
/// mesh CA, `/mesh` proxied as a WebSocket with the verified certificate in
/// `ssl-client-cert`. Everything it writes stays in its own directory; it
/// is stopped when dropped.
struct Nginx {
    proc: Proc,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, server: &Leaf, upstream: SocketAddr) -> Nginx {
        let dir = dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        let d = dir.display();
        // Only a master running as root may (and, to read the 0600 key
        // files the tests write, must) name the workers' user.
        let user = if running_as_root() {
            "user root;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}worker_processes 1;
error_log {d}/error.log info;
events {{ worker_connections 128; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location /mesh {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection \"upgrade\";
            proxy_set_header ssl-client-cert $ssl_client_escaped_cert;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
",
            cert = server.cert.display(),
            key = server.key.display(),
            ca = server.ca.display(),
        );
        let conf_file = dir.join("nginx.conf");
        std::fs::write(&conf_file, conf).unwrap();
        let mut cmd = Command::new(nginx_bin());
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_file)
            .arg("-g")
            .arg(format!("daemon off; pid {d}/nginx.pid;"));
        let proc = Proc::spawn("nginx", cmd, &dir);
        let ngx = Nginx { proc, port, dir };
        assert!(
            wait_port(
                SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(10)
            ),
            "nginx did not listen on {port}:\n{}",
            ngx.error_log()
        );
        ngx
    }

    fn url(&self) -> String {
        format!("wss://127.0.0.1:{}/mesh", self.port)
    }

    fn error_log(&self) -> String {
        format!(
            "{}\n{}",
            self.proc.log_text(),
            std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM is nginx' fast shutdown: master and worker exit.
        self.proc.terminate(Duration::from_secs(5));
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A hub of the cluster with an echo-style listener `svc` (connector
/// `svc`) and `back` (connector `back`), the Redis registry, and `mesh`
/// (indented 4) as the rest of its `ha.mesh`.
fn hub_yaml(env: &Env, replica: &str, redis: &RedisProc, leaf: &Leaf, mesh: &str) -> String {
    env.hub_yaml(
        &[("svc", "svc"), ("back", "back")],
        &format!(
            "ha:\n  enabled: true\n  mode: active\n  replica_id: {replica}\n  redis_url: {}\n  lease_sec: 3\n  renew_interval_sec: 1\n  registry_timeout_ms: 300\n  mesh:\n    require_mtls: true\n    connect_backoff_max_sec: 1\n    tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n{mesh}",
            redis.url(),
            leaf.ca.display(),
            leaf.cert.display(),
            leaf.key.display()
        ),
    )
}

/// hub-a behind nginx in proxy mode (it dials nobody, so the only link is
/// the one hub-b dials through nginx), hub-b dialing nginx's `wss://` URL,
/// an agent on each hub: `agent-a` on hub-a serving `svc`, `agent-b` on
/// hub-b serving `back`, both echo servers.
struct Cluster {
    env: Env,
    _redis: RedisProc,
    ca: Ca,
    a: HubProc,
    b: HubProc,
    nginx: Nginx,
    a_mesh: u16,
    b_mesh: u16,
    _agents: Vec<AgentProc>,
}

fn cluster() -> Cluster {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let ca = Ca::new("mesh CA");
    let a_leaf = ca.issue(env.path(), "hub-a");
    let b_leaf = ca.issue(env.path(), "hub-b");
    let a_mesh = free_port();
    let a = HubProc::start(
        env.path(),
        "hub-a",
        &hub_yaml(
            &env,
            "hub-a",
            &redis,
            &a_leaf,
            &format!(
                "    listen: 127.0.0.1:{a_mesh}\n    tls_terminated_by_proxy: true\n    trusted_proxies: [127.0.0.1/32]\n    client_cert_header: {{ name: ssl-client-cert, format: nginx }}\n"
            ),
        ),
    );
    // nginx presents hub-a's certificate: hub-b checks that the hub it
    // dialed is hub-a, as it would against hub-a's own TLS.
    let nginx = Nginx::start(
        env.path(),
        &a_leaf,
        SocketAddr::from(([127, 0, 0, 1], a_mesh)),
    );
    let b_mesh = free_port();
    let b = HubProc::start(
        env.path(),
        "hub-b",
        &hub_yaml(
            &env,
            "hub-b",
            &redis,
            &b_leaf,
            &format!(
                "    listen: 127.0.0.1:{b_mesh}\n    peers: ['{}']\n",
                nginx.url()
            ),
        ),
    );
    let agents = vec![
        AgentProc::start(
            env.path(),
            "agent-a",
            &env.agent_yaml("agent-a", &[a.http], &[("svc", echo_server())], ""),
            &env.token("agent-a", Some(vec!["svc".into()])),
        ),
        AgentProc::start(
            env.path(),
            "agent-b",
            &env.agent_yaml("agent-b", &[b.http], &[("back", echo_server())], ""),
            &env.token("agent-b", Some(vec!["back".into()])),
        ),
    ];
    Cluster {
        env,
        _redis: redis,
        ca,
        a,
        b,
        nginx,
        a_mesh,
        b_mesh,
        _agents: agents,
    }
}

impl Cluster {
    /// Both agents attached and the link through nginx up on both hubs.
    fn ready(&self) -> bool {
        self.a.metric("nowconnect_agents_connected") == 1.0
            && self.b.metric("nowconnect_agents_connected") == 1.0
            && self
                .a
                .metric("nowconnect_mesh_links{peer=\"hub-b\",state=\"established\"}")
                == 1.0
            && self
                .b
                .metric("nowconnect_mesh_links{peer=\"hub-a\",state=\"established\"}")
                == 1.0
    }

    fn logs(&self) -> String {
        format!(
            "hub-a:\n{}\nhub-b:\n{}\nnginx:\n{}",
            self.a.proc.log_text(),
            self.b.proc.log_text(),
            self.nginx.error_log()
        )
    }

    fn security(&self, kind: &str) -> f64 {
        self.a.metric(&format!(
            "nowconnect_security_events_total{{kind=\"{kind}\"}}"
        ))
    }
}

/// Echo `n` random bytes through `listener` and compare.
fn echo_ok(listener: SocketAddr, n: usize) -> bool {
    let data = Arc::new(random_bytes(n));
    let want = sha256(&data);
    matches!(echo_roundtrip_within(listener, data, Duration::from_secs(10)), Ok(h) if h == want)
}

/// (a) hub-b dials hub-a through nginx; the link comes up on both sides,
/// hub-a knows it as hub-b (the certificate from the header named it), and
/// flows cross it both ways: a client on hub-b reaches hub-a's agent, a
/// client on hub-a reaches hub-b's agent.
#[test]
fn a_mesh_link_through_a_tls_terminating_nginx_carries_flows_both_ways() {
    let c = cluster();
    assert!(
        eventually(Duration::from_secs(20), || c.ready()),
        "the mesh link through nginx did not come up\n{}",
        c.logs()
    );
    for round in 0..3 {
        assert!(
            eventually(Duration::from_secs(10), || echo_ok(
                c.b.listener("svc"),
                300_000
            )),
            "round {round}: client on hub-b, agent on hub-a\n{}",
            c.logs()
        );
        assert!(
            eventually(Duration::from_secs(10), || echo_ok(
                c.a.listener("back"),
                300_000
            )),
            "round {round}: client on hub-a, agent on hub-b\n{}",
            c.logs()
        );
    }
    assert!(
        c.a.metric("nowconnect_flows_total{connector=\"back\",route=\"mesh\"}") >= 1.0,
        "{}",
        c.a.get("/metrics").1
    );
    assert!(c.b.metric("nowconnect_flows_total{connector=\"svc\",route=\"mesh\"}") >= 1.0);
    // hub-a does no TLS and dials nobody: the link hub-b holds to nginx's
    // URL is the only one, and hub-a knows its peer as hub-b from the
    // forwarded certificate.
    c.a.proc.wait_log(
        "mesh link established peer=hub-b link=inbound",
        Duration::from_secs(2),
    );
    for k in [
        "mesh_proxy_untrusted_source",
        "mesh_client_cert_header_refused",
        "mesh_peer_certificate_mismatch",
    ] {
        assert_eq!(c.security(k), 0.0, "{k}\n{}", c.logs());
    }
}

/// The URL-encoded PEM of `leaf`'s certificate, as nginx'
/// `$ssl_client_escaped_cert` writes it.
fn escaped_cert(leaf: &Leaf) -> String {
    let pem = std::fs::read_to_string(&leaf.cert).unwrap();
    let mut out = String::new();
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// A raw `/mesh` upgrade request to `to` from the local address `from`,
/// with `header` (name, value) when given; the hub's answer, empty when it
/// closed the connection without one.
fn raw_upgrade(from: [u8; 4], to: SocketAddr, header: Option<(&str, &str)>) -> String {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!(
        "GET /mesh HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: nowconnect.mesh.v2\r\n"
    );
    if let Some((n, v)) = header {
        req += &format!("{n}: {v}\r\n");
    }
    req += "\r\n";
    // The hub may close before reading: a failed write is an answer too.
    let _ = s.write_all(req.as_bytes());
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// (b) Only the proxies may speak to a proxy-mode mesh port: a client at
/// 127.0.0.2 (outside `trusted_proxies: [127.0.0.1/32]`) with a header
/// carrying hub-b's valid certificate is closed before the WebSocket
/// handshake, logged and counted; the same request from 127.0.0.1 is
/// upgraded, so the refusal is the source's doing.
#[test]
fn a_forged_certificate_header_from_an_untrusted_address_is_refused_before_the_handshake() {
    let c = cluster();
    assert!(
        eventually(Duration::from_secs(20), || c.ready()),
        "{}",
        c.logs()
    );
    let hub_b = c.ca.issue_for(c.env.path(), "hub-b-copy", &["hub-b"]);
    let forged = escaped_cert(&hub_b);
    let mesh = SocketAddr::from(([127, 0, 0, 1], c.a_mesh));
    for round in 1..=3 {
        let answer = raw_upgrade([127, 0, 0, 2], mesh, Some(("ssl-client-cert", &forged)));
        assert_eq!(
            answer, "",
            "round {round}: an untrusted source got an answer"
        );
        assert!(
            eventually(Duration::from_secs(5), || c
                .security("mesh_proxy_untrusted_source")
                == f64::from(round)),
            "round {round}\n{}",
            c.logs()
        );
    }
    c.a.proc
        .wait_log("not from a trusted proxy", Duration::from_secs(2));
    let answer = raw_upgrade([127, 0, 0, 1], mesh, Some(("ssl-client-cert", &forged)));
    assert!(
        answer.starts_with("HTTP/1.1 101"),
        "the trusted source was not upgraded: {answer:?}\n{}",
        c.logs()
    );
    assert_eq!(c.security("mesh_proxy_untrusted_source"), 3.0);
    assert_eq!(c.security("mesh_client_cert_header_refused"), 0.0);
    // The trusted sources cannot be widened by a reload (the listener
    // checks them as it started): refused, and 127.0.0.2 stays untrusted.
    let cfg = c.env.path().join("hub-a.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let errors =
        c.a.metric("nowconnect_config_reloads_total{result=\"error\"}");
    std::fs::write(
        &cfg,
        text.replace(
            "trusted_proxies: [127.0.0.1/32]",
            "trusted_proxies: [127.0.0.0/8]",
        ),
    )
    .unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &c.a.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(
        eventually(Duration::from_secs(10), || c
            .a
            .metric("nowconnect_config_reloads_total{result=\"error\"}")
            > errors),
        "{}",
        c.logs()
    );
    c.a.proc.wait_log(
        "ha.mesh.tls_terminated_by_proxy and ha.mesh.trusted_proxies cannot change without a restart",
        Duration::from_secs(5),
    );
    let answer = raw_upgrade([127, 0, 0, 2], mesh, Some(("ssl-client-cert", &forged)));
    assert_eq!(
        answer, "",
        "an untrusted source got an answer after the reload"
    );
    assert!(eventually(Duration::from_secs(5), || c
        .security("mesh_proxy_untrusted_source")
        == 4.0));
    // The real link through nginx is untouched.
    assert!(c.ready(), "{}", c.logs());
    assert!(echo_ok(c.b.listener("svc"), 100_000));
}

type PlainWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;
type TlsWs =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A mesh WebSocket straight to hub-a's port from 127.0.0.1 (a trusted
/// source) with `header` as the certificate header.
async fn plain_mesh(port: u16, header: &str) -> Result<PlainWs, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("ws://127.0.0.1:{port}/mesh")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "nowconnect.mesh.v2".parse().unwrap(),
    );
    req.headers_mut()
        .insert("ssl-client-cert", header.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// A mesh WebSocket over TLS to `port` (nginx, or a hub doing its own
/// mTLS) with `leaf` as the TLS client certificate, sending `forged` as its
/// own `ssl-client-cert` header.
async fn tls_mesh(port: u16, leaf: &Leaf, forged: &str) -> Result<TlsWs, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&leaf.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(&leaf.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, PrivateKeyDer::from_pem_file(&leaf.key).unwrap())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("wss://127.0.0.1:{port}/mesh")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "nowconnect.mesh.v2".parse().unwrap(),
    );
    req.headers_mut()
        .insert("ssl-client-cert", forged.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

fn binary(f: &Frame) -> Message {
    match Codec::V2.encode(f, &Limits::default()).unwrap() {
        WsMessage::Binary(b) => Message::Binary(b),
        WsMessage::Text(_) => unreachable!(),
    }
}

/// Whether hub-a closes a mesh link that claims replica `claim` before any
/// flow: the M_OPEN sent after the M_HELLO is never accepted and the link
/// ends within 5 s.
async fn claim_is_refused<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, claim: &str) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let hello = Frame::MHello {
        replica_id: claim.into(),
        window: 0,
    };
    let h = MeshHeader {
        cid: Cid(1),
        connector: "svc".into(),
        agent_id: "agent-a".into(),
        seq: 0,
        epoch: Epoch(1),
    };
    let _ = ws.send(binary(&hello)).await;
    let _ = ws.send(binary(&Frame::MOpen { h })).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_))) => return true,
            Ok(Some(Ok(m))) => m,
        };
        match m {
            Message::Close(_) => return true,
            Message::Binary(b) => {
                if let Ok(Frame::MOpenAck { ok: true, .. } | Frame::MData { .. }) =
                    codec::decode(&WsMessage::Binary(b), &Limits::default())
                {
                    return false;
                }
            }
            _ => {}
        }
    }
}

/// (c) From the trusted address, the header is the credential and is held
/// to what a TLS client certificate is held to: missing, malformed, or from
/// another CA, the upgrade is refused (403, logged with the reason,
/// `mesh_client_cert_header_refused`); a valid certificate of the mesh CA
/// naming `evil` that claims to be hub-b is refused as native mTLS refuses
/// it (`mesh_peer_certificate_mismatch`), whether sent straight or through
/// nginx, where the header the client sent is replaced by the certificate
/// it showed nginx.
#[test]
fn forged_certificate_headers_from_the_trusted_address_are_refused_as_forged_certificates() {
    let c = cluster();
    assert!(
        eventually(Duration::from_secs(20), || c.ready()),
        "{}",
        c.logs()
    );
    let other_ca = Ca::new("another CA");
    let stranger = other_ca.issue(c.env.path(), "hub-b-other-ca");
    let evil = c.ca.issue(c.env.path(), "evil");
    let hub_b = c.ca.issue_for(c.env.path(), "hub-b-copy", &["hub-b"]);
    let mesh = SocketAddr::from(([127, 0, 0, 1], c.a_mesh));
    let refusals: [(Option<String>, &str); 4] = [
        (None, "no client certificate header `ssl-client-cert`"),
        (Some("not-a-certificate".into()), "holds no PEM certificate"),
        (
            Some(escaped_cert(&stranger)),
            "is not a valid client certificate of ha.mesh.tls.ca_bundle",
        ),
        // hub-b's certificate twice: only one certificate is taken.
        (Some(escaped_cert(&hub_b).repeat(2)), "holds 2 certificates"),
    ];
    for (i, (header, reason)) in refusals.iter().enumerate() {
        let answer = raw_upgrade(
            [127, 0, 0, 1],
            mesh,
            header.as_deref().map(|h| ("ssl-client-cert", h)),
        );
        assert!(
            answer.starts_with("HTTP/1.1 403"),
            "{reason}: answered {answer:?}\n{}",
            c.logs()
        );
        c.a.proc.wait_log(reason, Duration::from_secs(5));
        assert!(
            eventually(Duration::from_secs(5), || c
                .security("mesh_client_cert_header_refused")
                == (i + 1) as f64),
            "{reason}\n{}",
            c.logs()
        );
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A valid certificate for `evil`, straight to the port, claiming hub-b.
    let ws = rt
        .block_on(plain_mesh(c.a_mesh, &escaped_cert(&evil)))
        .expect("a valid certificate of the mesh CA is upgraded");
    assert!(rt.block_on(claim_is_refused(ws, "hub-b")), "{}", c.logs());
    // Through nginx: TLS as `evil`, hub-b's certificate forged in the
    // header; nginx replaces the header, the hub sees `evil`.
    let ws = rt
        .block_on(tls_mesh(c.nginx.port, &evil, &escaped_cert(&hub_b)))
        .unwrap_or_else(|e| panic!("through nginx: {e}\n{}", c.logs()));
    assert!(rt.block_on(claim_is_refused(ws, "hub-b")), "{}", c.logs());
    assert!(
        eventually(Duration::from_secs(5), || c
            .security("mesh_peer_certificate_mismatch")
            == 2.0),
        "{}",
        c.logs()
    );
    c.a.proc.wait_log(
        "the peer claims replica `hub-b` but its certificate names [\"localhost\", \"evil\"]",
        Duration::from_secs(2),
    );
    assert_eq!(c.security("mesh_client_cert_header_refused"), 4.0);
    assert_eq!(c.security("mesh_proxy_untrusted_source"), 0.0);
    // hub-b terminates mTLS itself: a certificate header means nothing
    // there. `evil` forging hub-a's certificate in it and claiming hub-a
    // is refused for what its TLS certificate names.
    let hub_a = c.ca.issue_for(c.env.path(), "hub-a-copy", &["hub-a"]);
    let ws = rt
        .block_on(tls_mesh(c.b_mesh, &evil, &escaped_cert(&hub_a)))
        .unwrap_or_else(|e| panic!("to hub-b: {e}\n{}", c.logs()));
    assert!(rt.block_on(claim_is_refused(ws, "hub-a")), "{}", c.logs());
    let b_kind = |k: &str| {
        c.b.metric(&format!("nowconnect_security_events_total{{kind=\"{k}\"}}"))
    };
    assert!(
        eventually(Duration::from_secs(5), || b_kind(
            "mesh_peer_certificate_mismatch"
        ) == 1.0),
        "{}",
        c.logs()
    );
    assert_eq!(b_kind("mesh_client_cert_header_refused"), 0.0);
    // The real link through nginx kept working throughout.
    assert!(c.ready(), "{}", c.logs());
    assert!(echo_ok(c.b.listener("svc"), 100_000));
}
