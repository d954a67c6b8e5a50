//! The hub's mesh series as an operator reads them, against real hub
//! processes and a real redis-server: one series set per peer, labelled by
//! its replica id, gone when the peer leaves the cluster; a cross-replica
//! flow counted once; mesh bytes by peer and direction; a peer that stops
//! reading fills the sending hub's queue to `send_queue_depth` and no
//! further; and the design's minimal `cloud.yaml` starts a hub.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

const NAMES: [&str; 3] = ["hub-a", "hub-b", "hub-c"];

/// The `mesh_links` samples of `text` that are not `established` and set:
/// what `max by (peer) (nowconnect_mesh_links{state!="established"})`
/// would see as 1.
fn down_series(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("nowconnect_mesh_links{"))
        .filter(|l| !l.contains("state=\"established\"") && !l.ends_with(" 0"))
        .map(str::to_string)
        .collect()
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Three hubs find each other through the registry (each announces its
/// URL; hub-a also lists hub-c under another URL as a configured peer). hub-c is scaled
/// in with SIGTERM: within a lease and a few discoveries hub-a and hub-b
/// export no series of it, none that is not established, and hub-b (which
/// only discovered hub-c) stops dialing it; hub-a keeps redialing its
/// configured peer with backoff without exporting a series for it. At no
/// time is a URL or `inbound` a peer label.
#[test]
fn scaling_a_cluster_in_leaves_no_series_of_the_departed_hub() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let ca = Ca::new("mesh CA");
    let ports = [free_port(), free_port(), free_port()];
    // hub-a's configured URL for hub-c is not the one hub-c announces, so
    // it stays a configured peer (identified by its M_HELLO) beside the
    // discovered one.
    let configured = format!("    peers: ['wss://localhost:{}/mesh']\n", ports[2]);
    let yaml = |i: usize| {
        mesh_hub_yaml(
            &env,
            NAMES[i],
            "active",
            &redis,
            ports[i],
            &[],
            &ca.issue(env.path(), NAMES[i]),
        )
        .replace(
            "    peers: []\n",
            if i == 0 {
                &configured
            } else {
                "    peers: []\n"
            },
        )
        .replace(
            "    require_mtls: true\n",
            &format!(
                "    require_mtls: true\n    advertise_url: 'wss://127.0.0.1:{}/mesh'\n",
                ports[i]
            ),
        )
    };
    let a = Arc::new(HubProc::start(env.path(), NAMES[0], &yaml(0)));
    let b = Arc::new(HubProc::start(env.path(), NAMES[1], &yaml(1)));
    let mut c = HubProc::start(env.path(), NAMES[2], &yaml(2));

    // Watch every peer label of hub-a and hub-b for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                seen.extend(peer_labels(&a));
                seen.extend(peer_labels(&b));
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let all_up = || {
        mesh_established(&a, "hub-b")
            && mesh_established(&a, "hub-c")
            && mesh_established(&b, "hub-a")
            && mesh_established(&b, "hub-c")
            && mesh_established(&c, "hub-a")
            && mesh_established(&c, "hub-b")
    };
    assert!(
        eventually(Duration::from_secs(20), all_up),
        "hub-a:\n{}\nhub-c:\n{}",
        a.proc.log_text(),
        c.proc.log_text()
    );
    // One series set per peer, however many links it has (hub-a has three
    // to hub-c: its configured and its discovered dial, and hub-c's).
    let text = a.get("/metrics").1;
    for peer in ["hub-b", "hub-c"] {
        let sets = text
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "nowconnect_mesh_links{{peer=\"{peer}\",state=\"established\"}}"
                ))
            })
            .count();
        assert_eq!(sets, 1, "{peer}:\n{text}");
    }
    assert!(down_series(&text).is_empty(), "{:?}", down_series(&text));

    assert!(c.proc.terminate(Duration::from_secs(15)).is_some());
    let t0 = Instant::now();
    // Lease 3 s: the record lapses, then a whole lease of listings without
    // it; discovery runs every renew interval (1 s).
    let departed = |h: &HubProc| {
        let text = h.get("/metrics").1;
        !peer_labels_in(&text).contains("hub-c")
            && down_series(&text).is_empty()
            && h.metric("nowconnect_mesh_peers_departed_total") == 1.0
    };
    assert!(
        eventually(Duration::from_secs(25), || departed(&a) && departed(&b)),
        "after {:?}\nhub-a:\n{}\nhub-b:\n{}",
        t0.elapsed(),
        a.get("/metrics").1,
        b.get("/metrics").1
    );
    // It stays so: hub-b forgot the discovered URL (no more dials), hub-a
    // redials its configured peer without a series for it.
    let b_dials = b.metric("nowconnect_mesh_link_reconnects_total");
    let a_dials = a.metric("nowconnect_mesh_link_reconnects_total");
    std::thread::sleep(Duration::from_secs(4));
    assert!(departed(&a) && departed(&b));
    assert_eq!(
        b.metric("nowconnect_mesh_link_reconnects_total"),
        b_dials,
        "hub-b still dials the departed hub-c:\n{}",
        b.proc.log_text()
    );
    assert!(
        a.metric("nowconnect_mesh_link_reconnects_total") > a_dials,
        "hub-a stopped redialing its configured peer:\n{}",
        a.proc.log_text()
    );
    assert!(mesh_established(&a, "hub-b") && mesh_established(&b, "hub-a"));

    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    let names: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
    assert!(
        seen.is_subset(&names) && seen.contains("hub-c"),
        "peer labels seen: {seen:?}"
    );
}

/// A flow from a client of hub-b to the agent on hub-a is one flow in
/// `nowconnect_flows_active` summed over the cluster, counted by hub-b
/// (where the client is); the bytes it moves show in
/// `nowconnect_mesh_bytes_total` by peer and direction on both hubs.
#[test]
fn a_cross_replica_flow_counts_once_and_its_mesh_bytes_by_peer() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let ca = Ca::new("mesh CA");
    let (a, b, _, _) = meshed_pair(&env, "active", &redis, &ca);
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[a.http], &[("ldap", echo_server())], ""),
        &env.token("agent-1", None),
    );
    assert!(
        eventually(Duration::from_secs(15), || pair_ready(&a, &b)),
        "{}",
        b.proc.log_text()
    );
    let bytes = |h: &HubProc, peer: &str, dir: &str| {
        h.metric(&format!(
            "nowconnect_mesh_bytes_total{{peer=\"{peer}\",dir=\"{dir}\"}}"
        ))
    };
    let before = [
        bytes(&b, "hub-a", "out"),
        bytes(&a, "hub-b", "in"),
        bytes(&a, "hub-b", "out"),
        bytes(&b, "hub-a", "in"),
    ];
    const N: usize = 3 * 1024 * 1024;
    let data = random_bytes(N);
    let mut flow = TcpStream::connect(b.listener("ldap")).unwrap();
    flow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = flow.try_clone().unwrap();
    let echoed = std::thread::spawn(move || {
        let mut back = vec![0u8; N];
        reader.read_exact(&mut back).map(|_| back)
    });
    flow.write_all(&data).unwrap();
    assert!(echoed.join().unwrap().unwrap() == data, "echo differs");
    // The flow is still open.
    let active = |h: &HubProc| h.metric("nowconnect_flows_active{connector=\"ldap\"}");
    assert!(
        eventually(Duration::from_secs(2), || active(&b) == 1.0),
        "hub-b: {}",
        active(&b)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        active(&a) + active(&b),
        1.0,
        "hub-a {} hub-b {}",
        active(&a),
        active(&b)
    );
    let after = [
        (&b, "hub-a", "out"),
        (&a, "hub-b", "in"),
        (&a, "hub-b", "out"),
        (&b, "hub-a", "in"),
    ];
    for (i, (h, peer, dir)) in after.into_iter().enumerate() {
        assert!(
            eventually(Duration::from_secs(3), || bytes(h, peer, dir) - before[i]
                >= N as f64),
            "mesh_bytes{{peer={peer},dir={dir}}}: {} (before {})",
            bytes(h, peer, dir),
            before[i]
        );
    }
    drop(flow);
    for h in [&a, &b] {
        assert!(eventually(Duration::from_secs(5), || active(h) == 0.0));
    }
}

/// hub-b (the entry hub of two bulk flows from the agent on hub-a) stops
/// reading (SIGSTOP): hub-a's queue to it rises to `send_queue_depth` and
/// no further (the socket writer holds only a few hundred frames more),
/// and hub-a counts backpressure towards hub-b. After SIGCONT the flows
/// move again and the queue drains.
#[test]
fn a_peer_that_stops_reading_fills_the_queue_to_its_depth_and_recovers() {
    const DEPTH: f64 = 64.0;
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let ca = Ca::new("mesh CA");
    // Windows large enough that credit does not stop the flows before the
    // sockets and the queue are full.
    let (a, mut b, _, _) = meshed_pair_with(
        [hub_runtime(); 2],
        &env,
        "active",
        &redis,
        &ca,
        &|y| {
            y.replace(
                "tunnel:\n",
                "tunnel:\n  window_bytes: 134217728\n  max_window_bytes: 134217728\n",
            )
            .replace(
                "    require_mtls: true\n",
                "    require_mtls: true\n    send_queue_depth: 64\n    per_link_max_inflight_bytes: 1073741824\n",
            )
        },
    );
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[a.http],
            &[("ldap", source_server())],
            "window_bytes: 134217728\nmax_window_bytes: 134217728\n",
        ),
        &env.token("agent-1", None),
    );
    assert!(
        eventually(Duration::from_secs(15), || pair_ready(&a, &b)),
        "{}",
        b.proc.log_text()
    );
    let received = Arc::new(AtomicU64::new(0));
    let flows: Vec<TcpStream> = (0..2)
        .map(|_| {
            let s = TcpStream::connect(b.listener("ldap")).unwrap();
            let mut r = s.try_clone().unwrap();
            let got = received.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n @ 1..) = r.read(&mut buf) {
                    got.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
            s
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || received.load(Ordering::Relaxed)
            > 8 << 20),
        "the flows do not move: {}",
        b.proc.log_text()
    );
    let queue = || a.metric("nowconnect_mesh_link_queue_frames{peer=\"hub-b\"}");
    let drops = || {
        a.metric("nowconnect_mesh_backpressure_drops_total{peer=\"hub-b\",reason=\"queue_full\"}")
            + a.metric(
                "nowconnect_mesh_backpressure_drops_total{peer=\"hub-b\",reason=\"inflight_cap\"}",
            )
    };
    let drops_before = drops();

    signal(b.proc.pid(), "-STOP");
    let mut highest = 0.0f64;
    let full = eventually(Duration::from_secs(10), || {
        let q = queue();
        highest = highest.max(q);
        q >= DEPTH
    });
    // A few more seconds stalled: the queue stays at its bound. Besides
    // the data queue (at most DEPTH) only control frames wait: a ping per
    // ping interval (5 s).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        highest = highest.max(queue());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stalled_drops = drops();
    signal(b.proc.pid(), "-CONT");
    assert!(
        full,
        "queue to hub-b at most {highest} while it did not read"
    );
    assert!(highest <= DEPTH + 4.0, "queue to hub-b reached {highest}");
    assert!(
        stalled_drops > drops_before,
        "no backpressure counted towards hub-b"
    );

    // Recovery: the flows move again, the link stays up, the queue drains
    // once the flows end.
    let resumed = received.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || received.load(Ordering::Relaxed)
            > resumed + (8 << 20)),
        "the flows did not resume: {}",
        b.proc.log_text()
    );
    assert!(mesh_established(&a, "hub-b"));
    drop(flows);
    assert!(
        eventually(Duration::from_secs(10), || queue() == 0.0),
        "queue {}",
        queue()
    );
    b.proc.kill();
}

/// DESIGN.md's example `cloud.yaml` without `http` (the original design's
/// minimal file; `tunnel` added): a hub starts and serves on the default
/// `127.0.0.1:8080`. Only the paths (secret, certificates, Redis) and the
/// listener and mesh ports are the test's. When another process holds
/// 127.0.0.1:8080 the start cannot be shown here (the parse of the default
/// is `config_http.rs`'s); the test says so and ends.
#[test]
fn the_designs_minimal_cloud_yaml_starts_a_hub_on_127_0_0_1_8080() {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let leaf = Ca::new("mesh CA").issue(env.path(), "hub-a");
    let yaml = format!(
        "tunnel:
  jwt:
    audience: nowconnect
    hs256_secret_file: {secret}
listeners:
  - {{ name: l1, bind: '127.0.0.1:{listener}', connector: 'ldap' }}
ha:
  enabled: true
  mode: active
  replica_id: hub-a
  redis_url: {redis}
  mesh:
    listen: 127.0.0.1:{mesh}
    peers: [\"wss://hub-b.example:9400/mesh\"]
    require_mtls: true
    tls: {{ ca_bundle: {ca}, cert_file: {cert}, key_file: {key} }}
    send_queue_depth: 1000
    per_link_max_inflight_bytes: 8388608
    connect_backoff_max_sec: 30
",
        secret = env.secret_file.display(),
        listener = free_port(),
        redis = redis.url(),
        mesh = free_port(),
        ca = leaf.ca.display(),
        cert = leaf.cert.display(),
        key = leaf.key.display(),
    );
    match std::net::TcpListener::bind("127.0.0.1:8080") {
        Ok(probe) => drop(probe),
        Err(e) => {
            eprintln!("127.0.0.1:8080 is taken ({e}): the hub's start on it is not shown");
            return;
        }
    }
    let hub = HubProc::start(env.path(), "hub-a", &yaml);
    assert_eq!(hub.http, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(hub.get("/healthz"), (200, "ok".to_string()));
    let (status, metrics) = hub.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("nowconnect_registry_healthy"), "{metrics}");
}
