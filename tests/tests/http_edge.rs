//! The hub's HTTP edge: native TLS on the `http.bind` port (`http.tls`,
//! agents dialing `wss://` with the CA in `tls.ca_bundle`, certificates
//! rotated on file change, broken replacements refused) and the separate
//! operations port (`http.ops_bind`), which keeps `/metrics`, `/readyz` and
//! `/healthz` off the public port. Every hub runs on [`hub_runtime`] (the
//! suite runs once per runtime), certificates are made in the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_tests::pki::{Ca, Leaf};
use nowconnect_tests::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// A hub whose `http.bind` port speaks TLS with `leaf`, a header timeout of
/// `header_timeout` seconds, the files checked every second, and `extra`
/// under `http:` (e.g. an ops port).
fn tls_hub(env: &Env, leaf: &Leaf, header_timeout: u64, http_extra: &str) -> HubProc {
    let yaml = env.hub_yaml(&[("echo", "echo")], "reload:\n  watch_interval_sec: 1\n");
    let yaml = yaml.replacen(
        "http:\n  bind: 127.0.0.1:0\n",
        &format!(
            "http:\n  bind: 127.0.0.1:0\n  header_timeout_sec: {header_timeout}\n  tls: {{ cert_file: '{}', key_file: '{}' }}\n{http_extra}",
            leaf.cert.display(),
            leaf.key.display()
        ),
        1,
    );
    HubProc::start(env.path(), "hub", &yaml)
}

/// An agent on the hub's runtime dialing `wss://` to `hub` and trusting the
/// CAs in `ca_bundle`, serving `echo` with `target`.
fn wss_agent(env: &Env, hub: &HubProc, ca_bundle: &Path, target: SocketAddr) -> AgentProc {
    let yaml = env
        .agent_yaml("agent-1", &[hub.http], &[("echo", target)], "")
        .replace("'ws://", "'wss://")
        + &format!("tls: {{ ca_bundle: '{}' }}\n", ca_bundle.display());
    AgentProc::start_on(
        hub_runtime(),
        env.path(),
        "agent",
        &yaml,
        &env.token("agent-1", None),
    )
}

/// A TLS client (ring, ALPN `http/1.1`) that trusts only the CAs in
/// `ca_bundle`.
fn client_config(ca_bundle: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_bundle).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A completed TLS handshake with `addr` as `127.0.0.1`, trusting
/// `ca_bundle`; `Err`: why it failed.
fn handshake(addr: SocketAddr, ca_bundle: &Path) -> Result<Tls, String> {
    let tcp =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(client_config(ca_bundle), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(tls)
}

/// The end-entity certificate `addr` presents to a client trusting
/// `ca_bundle`.
fn presented(addr: SocketAddr, ca_bundle: &Path) -> Result<Vec<u8>, String> {
    let tls = handshake(addr, ca_bundle)?;
    let chain = tls.conn.peer_certificates().ok_or("no certificate")?;
    Ok(chain[0].as_ref().to_vec())
}

/// The DER of the (first) certificate in a PEM file.
fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}

/// A GET over TLS: (status, body); status 0 when no HTTP answer came.
fn https_get(addr: SocketAddr, ca_bundle: &Path, path: &str) -> (u16, String) {
    let mut tls = handshake(addr, ca_bundle).expect("TLS handshake");
    http_get_over(&mut tls, addr, path)
}

/// How long until `s` is closed by the other end (a read gives 0 or an
/// error other than a timeout), within `within`; `None`: still open.
fn closed_within(s: &mut impl Read, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

const FAILED: &str = "nowconnect_http_tls_handshake_failures_total{reason=\"error\"}";
const TIMED_OUT: &str = "nowconnect_http_tls_handshake_failures_total{reason=\"timeout\"}";

#[test]
fn an_agent_tunnels_over_wss_and_the_tls_port_answers_only_tls() {
    let env = Env::new();
    let ca = Ca::new("http CA");
    let leaf = ca.issue(env.path(), "hub");
    let echo = echo_server();
    let hub = tls_hub(&env, &leaf, 1, "");
    let metric = |sample: &str| metric_value(&https_get(hub.http, &leaf.ca, "/metrics").1, sample);
    let _agent = wss_agent(&env, &hub, &leaf.ca, echo);
    assert!(
        eventually(Duration::from_secs(15), || metric(
            "nowconnect_agents_connected"
        ) == 1.0),
        "the agent did not attach over wss://; hub log:\n{}",
        hub.proc.log_text()
    );
    assert!(echo_once(hub.listener("echo"), b"through a TLS tunnel"));
    // Every endpoint over TLS, ALPN http/1.1.
    assert_eq!(
        https_get(hub.http, &leaf.ca, "/healthz"),
        (200, "ok".into())
    );
    assert_eq!(https_get(hub.http, &leaf.ca, "/readyz").0, 200);
    let tls = handshake(hub.http, &leaf.ca).unwrap();
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    drop(tls);

    // Plain HTTP to the TLS port: no HTTP answer, the handshake counted.
    let before = metric(FAILED);
    let mut plain = TcpStream::connect(hub.http).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        plain,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(eventually(Duration::from_secs(5), || metric(FAILED) > before));

    // Silent clients are closed after the header timeout (1 s): one that
    // never starts the handshake, one that completes it and sends nothing.
    let timeouts = metric(TIMED_OUT);
    let mut silent = TcpStream::connect(hub.http).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5));
    assert!(
        took.is_some_and(|t| t >= Duration::from_millis(800)),
        "a silent client: {took:?}"
    );
    assert!(eventually(Duration::from_secs(5), || metric(TIMED_OUT) > timeouts));
    let mut mute = handshake(hub.http, &leaf.ca).unwrap();
    mute.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let took = closed_within(&mut mute, Duration::from_secs(5));
    assert!(
        took.is_some_and(|t| t >= Duration::from_millis(800)),
        "a client silent after the handshake: {took:?}"
    );
    // The tunnel lives on.
    assert!(echo_once(hub.listener("echo"), b"still there"));
    assert_eq!(metric("nowconnect_agents_connected"), 1.0);
}

#[test]
fn an_agent_that_does_not_trust_the_hubs_ca_cannot_connect_and_is_counted() {
    let env = Env::new();
    let ca = Ca::new("http CA");
    let other = Ca::new("another CA");
    let leaf = ca.issue(env.path(), "hub");
    let stranger = other.issue(env.path(), "stranger");
    let hub = tls_hub(&env, &leaf, 5, "  ops_bind: 127.0.0.1:0\n");
    let agent = wss_agent(&env, &hub, &stranger.ca, echo_server());
    assert!(
        eventually(Duration::from_secs(15), || hub.metric(FAILED) >= 1.0),
        "no failed handshake counted; hub log:\n{}",
        hub.proc.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hub.metric("nowconnect_agents_connected"), 0.0);
    assert_eq!(
        hub.metric("nowconnect_tunnels_total{result=\"accepted\"}"),
        0.0
    );
    let log = agent.proc.log_text().to_lowercase();
    assert!(
        log.contains("certificate") || log.contains("unknownissuer"),
        "the agent does not say why: {log}"
    );
}

#[test]
fn certificates_rotate_on_file_change_and_sighup_and_a_broken_one_is_refused() {
    let env = Env::new();
    let ca1 = Ca::new("http CA 1");
    let ca2 = Ca::new("http CA 2");
    let leaf = ca1.issue(env.path(), "hub");
    let new_dir = env.path().join("new");
    std::fs::create_dir(&new_dir).unwrap();
    let new = ca2.issue(&new_dir, "hub");
    // The agent trusts both CAs, so only a dropped tunnel would reconnect.
    let both = env.path().join("both.pem");
    std::fs::write(&both, format!("{}{}", ca1.pem, ca2.pem)).unwrap();
    let hub = tls_hub(&env, &leaf, 5, "  ops_bind: 127.0.0.1:0\n");
    let _agent = wss_agent(&env, &hub, &both, echo_server());
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
    assert_eq!(presented(hub.http, &leaf.ca).unwrap(), der(&leaf.cert));
    let accepted = hub.metric("nowconnect_tunnels_total{result=\"accepted\"}");
    let reloads = |r: &str| {
        hub.metric(&format!(
            "nowconnect_config_reloads_total{{result=\"{r}\"}}"
        ))
    };
    // A flow open across the rotation.
    let mut flow = TcpStream::connect(hub.listener("echo")).unwrap();
    flow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut echo = |msg: &[u8]| {
        flow.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        flow.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    echo(b"before");

    // 1. Certificate and key from CA 2, each written whole (temporary file,
    //    rename), key first: the watcher reloads.
    let replace = |from: &Path, to: &Path| {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    };
    replace(&new.key, &leaf.key);
    replace(&new.cert, &leaf.cert);
    assert!(
        eventually(Duration::from_secs(10), || presented(hub.http, &new.ca)
            .is_ok_and(|c| c == der(&new.cert))),
        "the new certificate is not presented; hub log:\n{}",
        hub.proc.log_text()
    );
    assert!(reloads("ok") >= 1.0);
    assert!(
        presented(hub.http, &leaf.ca).is_err(),
        "a CA-1-only client still accepts the hub"
    );
    echo(b"after the rotation");
    assert_eq!(hub.metric("nowconnect_agents_connected"), 1.0);
    assert_eq!(
        hub.metric("nowconnect_tunnels_total{result=\"accepted\"}"),
        accepted,
        "the tunnel was re-established"
    );

    // 2. A broken certificate: refused (by the watcher, then by SIGHUP),
    //    reported, and the CA-2 certificate stays.
    let ok = reloads("ok");
    let errors = reloads("error");
    std::fs::write(&leaf.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || reloads("error") > errors),
        "the broken certificate was not reported; hub log:\n{}",
        hub.proc.log_text()
    );
    let errors = reloads("error");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &hub.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(eventually(Duration::from_secs(5), || reloads("error") > errors));
    let log = hub
        .proc
        .wait_log("http.tls.cert_file", Duration::from_secs(5));
    assert!(
        log.contains("configuration reload failed"),
        "SIGHUP's failure is not logged:\n{log}"
    );
    assert_eq!(reloads("ok"), ok);
    assert_eq!(presented(hub.http, &new.ca).unwrap(), der(&new.cert));
    echo(b"after the broken one");

    // 3. SIGHUP applies a good pair again (the watcher too, whichever comes
    //    first): back to CA 1's certificate.
    let back_dir = env.path().join("back");
    std::fs::create_dir(&back_dir).unwrap();
    let back = ca1.issue(&back_dir, "hub");
    replace(&back.key, &leaf.key);
    replace(&back.cert, &leaf.cert);
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &hub.proc.pid().to_string()])
        .status();
    assert!(eventually(Duration::from_secs(10), || presented(
        hub.http, &back.ca
    )
    .is_ok_and(|c| c == der(&back.cert))));
    echo(b"after the second rotation");

    // 4. Turning TLS off needs a restart: a configuration without
    //    `http.tls` is refused on reload and the port stays TLS.
    let cfg = env.path().join("hub.yaml");
    let plain: String = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("tls:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let errors = reloads("error");
    std::fs::write(&cfg, plain).unwrap();
    assert!(eventually(Duration::from_secs(10), || reloads("error") > errors));
    hub.proc
        .wait_log("cannot leave TLS without a restart", Duration::from_secs(5));
    assert_eq!(presented(hub.http, &back.ca).unwrap(), der(&back.cert));
    echo(b"at the end");
}

#[test]
fn with_an_ops_port_the_public_port_serves_only_the_tunnel() {
    let env = Env::new();
    let yaml = env.hub_yaml(&[("echo", "echo")], "").replacen(
        "http:\n  bind: 127.0.0.1:0\n",
        "http:\n  bind: 127.0.0.1:0\n  ops_bind: 127.0.0.1:0\n",
        1,
    );
    let hub = HubProc::start(env.path(), "hub", &yaml);
    let ops = hub.ops.expect("ops= in the ready line");
    assert_ne!(ops, hub.http);
    for path in ["/metrics", "/readyz", "/healthz"] {
        assert_eq!(hub.get(path).0, 404, "{path} on the public port");
    }
    let (code, body) = hub.ops_get("/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("nowconnect_agents_connected"));
    assert_eq!(hub.ops_get("/healthz"), (200, "ok".into()));
    assert_eq!(hub.ops_get("/readyz").0, 200);
    assert_eq!(hub.ops_get("/tunnel").0, 404, "/tunnel on the ops port");
    // The tunnel on the public port works.
    let _agent = AgentProc::start_on(
        hub_runtime(),
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("echo", echo_server())], ""),
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
    assert!(echo_once(hub.listener("echo"), b"through the public port"));
    let log = hub.proc.log_text();
    assert!(
        log.contains("ops port") && log.contains(&ops.to_string()),
        "the start log does not say where the ops endpoints are:\n{log}"
    );
}
