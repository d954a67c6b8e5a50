//! The shipped dashboard and alert rules against a real Prometheus
//! (Debian's `prometheus` package, the one `promtool` comes from).
//!
//! Prometheus scrapes two meshed hubs (hub-a on tokio, hub-b on async-std)
//! and an agent while clients keep flowing through both hubs. The test
//! evaluates every dashboard panel's query and every recording rule through
//! Prometheus' HTTP API and asserts each returns data; then it causes each
//! alert's condition, asserts the alert reaches `firing`, heals, and asserts
//! it resolves. The rules are the shipped `deploy/prometheus/alerts.yml`
//! with shorter windows (see [`shortened_rules`]); the queries are the
//! dashboard's, unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nowconnect_tests::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// How long an alert's `for:` lasts in this test. Production windows are
/// minutes; here every range `[Nm]` becomes [`WINDOW`] and every `for:`
/// becomes [`FOR`], except the link-down alert (see [`LINK_DOWN_FOR`]).
const FOR: &str = "5s";
const WINDOW: &str = "[10s]";
/// `NowConnectMeshLinkDown` must not fire for a peer that left the cluster:
/// a departed replica is forgotten within two registry leases (its record
/// lapses after one lease; it is declared gone after a whole lease absent).
/// In production that is at most 2 × 15 s (`ha.lease_sec` default) plus a
/// renew interval, well inside the alert's `for: 1m`; this test's cluster
/// runs `lease_sec: 3`, so 15 s keeps the same relation.
const LINK_DOWN_FOR: &str = "15s";

/// `alerts.yml` with every range shortened to [`WINDOW`] and every `for:`
/// to [`FOR`] (or [`LINK_DOWN_FOR`]); also returns the alert and record
/// names. Panics when a rule's window or `for:` has a form it does not
/// know, so no rule keeps a production window unnoticed.
fn shortened_rules(text: &str) -> (String, Vec<String>, Vec<String>) {
    let mut out = String::new();
    let (mut alerts, mut records) = (Vec::new(), Vec::new());
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            current = name.trim().to_string();
            alerts.push(current.clone());
        } else if let Some(name) = t.strip_prefix("- record:") {
            current = name.trim().to_string();
            records.push(current.clone());
        }
        let line = if let Some(v) = t.strip_prefix("for:") {
            let v = v.trim();
            assert!(
                v.ends_with('m') || v.ends_with('s'),
                "{current}: unexpected for: {v}"
            );
            let indent = &line[..line.len() - t.len()];
            let d = if current == "NowConnectMeshLinkDown" {
                LINK_DOWN_FOR
            } else {
                FOR
            };
            format!("{indent}for: {d}")
        } else {
            shorten_ranges(line)
        };
        out.push_str(&line);
        out.push('\n');
    }
    (out, alerts, records)
}

/// Every `[<n>m]` or `[<n>h]` range selector becomes [`WINDOW`].
fn shorten_ranges(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let end = after.find(']').expect("a closed range selector");
        let inner = &after[1..end];
        let is_range = inner.len() > 1
            && inner[..inner.len() - 1].chars().all(|c| c.is_ascii_digit())
            && (inner.ends_with('m') || inner.ends_with('h'));
        if is_range {
            out.push_str(WINDOW);
        } else {
            out.push_str(&after[..=end]);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn the_rule_shortening_covers_every_rule() {
    let text = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    let (short, alerts, records) = shortened_rules(&text);
    assert!(!alerts.is_empty() && !records.is_empty());
    for line in short.lines() {
        let t = line.trim_start();
        if t.starts_with('#') {
            continue;
        }
        assert!(
            !t.contains("m])") && !t.contains("m]))") && !t.contains("h])"),
            "a production window is left: {line}"
        );
        if let Some(v) = t.strip_prefix("for:") {
            assert!(matches!(v.trim(), FOR | LINK_DOWN_FOR), "{line}");
        }
    }
    // The production relation the test's LINK_DOWN_FOR keeps: the shipped
    // link-down alert waits longer than a departed peer takes to be
    // forgotten (2 leases of 15 s and a renew interval of 5 s).
    let prod_for = text
        .split("- alert: NowConnectMeshLinkDown")
        .nth(1)
        .and_then(|r| r.lines().find_map(|l| l.trim().strip_prefix("for:")))
        .map(|v| v.trim().to_string())
        .expect("NowConnectMeshLinkDown has a for:");
    let secs = match prod_for.strip_suffix('m') {
        Some(m) => m.parse::<u64>().unwrap() * 60,
        None => prod_for.trim_end_matches('s').parse().unwrap(),
    };
    assert!(secs > 2 * 15 + 5, "for: {prod_for}");
}

// ---- Prometheus, its HTTP API

struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, rules: &str, jobs: &[(&str, Vec<SocketAddr>)]) -> Prometheus {
        let rules_file = dir.join("rules.yml");
        std::fs::write(&rules_file, rules).unwrap();
        let mut cfg = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nrule_files: ['{}']\nscrape_configs:\n",
            rules_file.display()
        );
        for (job, targets) in jobs {
            let t: Vec<String> = targets.iter().map(|a| format!("'{a}'")).collect();
            cfg += &format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
                t.join(", ")
            );
        }
        let cfg_file = dir.join("prometheus.yml");
        std::fs::write(&cfg_file, cfg).unwrap();
        let port = free_port();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", cfg_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", cmd, dir);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let p = Prometheus { _proc: proc, addr };
        assert!(
            eventually(Duration::from_secs(30), || {
                wait_port(addr, Duration::from_millis(100)) && p.get_raw("/-/ready").0 == 200
            }),
            "prometheus did not become ready: {}",
            p._proc.log_text()
        );
        p
    }

    /// One HTTP/1.0 GET (so the answer is not chunked): status and body.
    fn get_raw(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        http_request_over(&mut s, self.addr, path, "HTTP/1.0")
    }

    fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get_raw(path);
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {status} {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query: its result vector.
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)));
        match &data["result"] {
            serde_json::Value::Array(a) => a.clone(),
            other => panic!("{expr}: not a vector: {other}"),
        }
    }

    /// Alerts that are pending or firing: name → states (one per series).
    fn alerts(&self) -> BTreeMap<String, Vec<(String, serde_json::Value)>> {
        let data = self.api("/api/v1/alerts");
        let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for a in data["alerts"].as_array().unwrap() {
            let name = a["labels"]["alertname"].as_str().unwrap().to_string();
            let state = a["state"].as_str().unwrap().to_string();
            out.entry(name)
                .or_default()
                .push((state, a["labels"].clone()));
        }
        out
    }

    fn firing(&self) -> BTreeSet<String> {
        self.alerts()
            .into_iter()
            .filter(|(_, s)| s.iter().any(|(st, _)| st == "firing"))
            .map(|(n, _)| n)
            .collect()
    }

    /// Every rule Prometheus loaded, with its evaluation health.
    fn rules(&self) -> Vec<(String, String, String)> {
        let data = self.api("/api/v1/rules");
        let mut out = Vec::new();
        for g in data["groups"].as_array().unwrap() {
            for r in g["rules"].as_array().unwrap() {
                out.push((
                    r["name"].as_str().unwrap().to_string(),
                    r["health"].as_str().unwrap_or("").to_string(),
                    r["lastError"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        out
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

// ---- load

/// Clients through both hubs: `mesh_percent` of them through hub-b (whose
/// flows cross the mesh to the agent's hub), the rest through hub-a.
struct Load {
    stop: Arc<AtomicBool>,
    mesh_percent: Arc<AtomicU32>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(local: SocketAddr, mesh: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mesh_percent = Arc::new(AtomicU32::new(20));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for worker in 0..4u64 {
            let (stop, pct, ok, failed) = (
                stop.clone(),
                mesh_percent.clone(),
                ok.clone(),
                failed.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    // Every tenth flow of each hundred picks its hub by the
                    // share: deterministic, so the share is exact.
                    let through_mesh = (i % 100) < u64::from(pct.load(Ordering::Relaxed));
                    let to = if through_mesh { mesh } else { local };
                    if echo_once(to, b"prometheus load: a small LDAP-sized request") {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 7;
                    std::thread::sleep(Duration::from_millis(40));
                }
            }));
        }
        Load {
            stop,
            mesh_percent,
            ok,
            failed,
            threads,
        }
    }

    fn set_mesh_percent(&self, p: u32) {
        self.mesh_percent.store(p, Ordering::Relaxed);
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `flows` clients each pushing `bytes` through `to` and reading the echo,
/// until `stop`.
fn bulk(to: SocketAddr, flows: usize, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..flows)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(s) = TcpStream::connect(to) else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    let mut r = s.try_clone().unwrap();
                    let reader = std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
                    });
                    let mut w = s;
                    for _ in 0..16 {
                        if stop.load(Ordering::Relaxed) || w.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                    let _ = w.shutdown(std::net::Shutdown::Write);
                    let _ = reader.join();
                }
            })
        })
        .collect()
}

/// Bad-token `/tunnel` upgrades on `hub` at about `per_sec`, until `stop`.
fn bad_tokens(hub: SocketAddr, per_sec: u64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut s) = TcpStream::connect(hub) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = write!(
                    s,
                    "GET /tunnel HTTP/1.1\r\nHost: {hub}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer not.a.token\r\n\r\n"
                );
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
            }
            std::thread::sleep(Duration::from_millis(1000 / per_sec));
        }
    })
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Wait until every alert of `names` has been seen firing (not all at
/// once: an alert on a single event, a failed reload say, resolves once the
/// event leaves its window); the panic names those never seen, with what
/// Prometheus shows and the samples of `context`.
fn until_firing(prom: &Prometheus, names: &[&str], within: Duration, what: &str, context: &[&str]) {
    let mut seen = BTreeSet::new();
    let t = Instant::now();
    let ok = eventually(within, || {
        seen.extend(prom.firing());
        names.iter().all(|n| seen.contains(*n))
    });
    eprintln!(
        "{what}: {} alerts seen firing in {:?}",
        seen.len(),
        t.elapsed()
    );
    if !ok {
        let missing: Vec<&&str> = names.iter().filter(|n| !seen.contains(**n)).collect();
        let samples: Vec<(&str, Vec<serde_json::Value>)> =
            context.iter().map(|q| (*q, prom.query(q))).collect();
        panic!(
            "{what}: never firing within {within:?}: {missing:?}; alerts now: {:?}; samples: {samples:#?}",
            prom.alerts()
        );
    }
}

/// Wait until none of `names` is pending or firing.
fn until_resolved(prom: &Prometheus, names: &[&str], within: Duration, what: &str) {
    let t = Instant::now();
    let ok = eventually(within, || {
        let a = prom.alerts();
        names.iter().all(|n| !a.contains_key(*n))
    });
    eprintln!("{what}: resolved in {:?}", t.elapsed());
    assert!(
        ok,
        "{what}: still active after {within:?}: {:?}",
        prom.alerts()
    );
}

#[test]
fn every_panel_and_rule_returns_data_and_every_alert_fires_and_resolves() {
    let t0 = Instant::now();
    let env = Env::new();
    let mut redis = RedisProc::start(env.path());
    let echo = echo_server();
    let ca = pki::Ca::new("mesh CA");
    let (pa, pb) = (free_port(), free_port());
    let a_addr: SocketAddr = format!("127.0.0.1:{pa}").parse().unwrap();
    let b_addr: SocketAddr = format!("127.0.0.1:{pb}").parse().unwrap();
    // Each hub reaches the other's mesh port through a gate: a partition
    // and a slow network, on demand.
    let gate_a = Gate::start(a_addr, Duration::ZERO);
    let gate_b = Gate::start(b_addr, Duration::ZERO);
    // A small mesh inflight cap, so bulk flows across the mesh meet
    // backpressure while the light load never does.
    let small = |y: String| {
        y.replace("tunnel:\n  jwt:", "tunnel:\n  window_bytes: 65536\n  jwt:")
            .replace(
                "    connect_backoff_max_sec: 1\n",
                "    connect_backoff_max_sec: 1\n    per_link_max_inflight_bytes: 65536\n",
            )
    };
    // hub-b also has a listener whose agent's target is a closed port.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let start = |rt: Runtime, name: &str, port: u16, peer: u16| {
        let leaf = ca.issue(env.path(), name);
        let mut yaml = small(mesh_hub_yaml(
            &env,
            name,
            "active",
            &redis,
            port,
            &[peer],
            &leaf,
        ));
        assert!(
            yaml.contains("per_link_max_inflight_bytes: 65536"),
            "{yaml}"
        );
        if name == "hub-b" {
            yaml = yaml.replacen(
                "listeners:\n",
                "listeners:\n  - { name: dead, bind: '127.0.0.1:0', connector: dead }\n",
                1,
            );
        }
        HubProc::start_on(rt, env.path(), name, &yaml)
    };
    let hub_a = start(Runtime::Tokio, "hub-a", pa, gate_b.addr.port());
    let hub_b = start(Runtime::AsyncStd, "hub-b", pb, gate_a.addr.port());
    // Two agents, each with its endpoint on a fixed port (a restarted agent
    // is scraped where it was): agent-1 serves `ldap` on hub-a through a
    // gate; agent-2 is multi-homed (hub-a, and hub-b through a gate) and
    // serves `dead`, whose target is a closed port.
    let gate_ta = Gate::start(hub_a.http, Duration::ZERO);
    let gate_tb = Gate::start(hub_b.http, Duration::ZERO);
    let (http_1, http_2) = (free_port(), free_port());
    let agent_1_yaml = env.agent_yaml(
        "agent-1",
        &[gate_ta.addr],
        &[("ldap", echo)],
        &format!("http: {{ bind: '127.0.0.1:{http_1}' }}\n"),
    );
    let agent_2_yaml = env.agent_yaml(
        "agent-2",
        &[hub_a.http, gate_tb.addr],
        &[("dead", dead)],
        &format!("ha_connections: 2\nhttp: {{ bind: '127.0.0.1:{http_2}' }}\n"),
    );
    let start_agent = |n: u32, yaml: &str| {
        let id = format!("agent-{n}");
        AgentProc::start(env.path(), &id, yaml, &env.token(&id, None))
    };
    let agent_1 = start_agent(1, &agent_1_yaml);
    let mut agent_2 = start_agent(2, &agent_2_yaml);
    let attached = || {
        eventually(Duration::from_secs(20), || {
            hub_a.metric("nowconnect_agents_connected") == 2.0
                && hub_b.metric("nowconnect_agents_connected") == 1.0
        })
    };
    assert!(attached(), "agents attached");
    eprintln!("cluster up in {:?}", t0.elapsed());

    let rules_text = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    let (rules, alert_names, record_names) = shortened_rules(&rules_text);
    let prom = Prometheus::start(
        env.path(),
        &rules,
        &[
            ("nowconnect-hub", vec![hub_a.http, hub_b.http]),
            (
                "nowconnect-agent",
                vec![
                    format!("127.0.0.1:{http_1}").parse().unwrap(),
                    format!("127.0.0.1:{http_2}").parse().unwrap(),
                ],
            ),
        ],
    );
    let load = Load::start(hub_a.listener("ldap"), hub_b.listener("ldap"));
    eprintln!("prometheus up in {:?}", t0.elapsed());

    // Every target is scraped.
    assert!(
        eventually(Duration::from_secs(20), || {
            let up = prom.query("up == 1");
            up.len() == 4
        }),
        "targets up: {:?}",
        prom.query("up")
    );
    // Every rule loaded and evaluates without error.
    let loaded = prom.rules();
    for name in alert_names.iter().chain(&record_names) {
        assert!(
            loaded.iter().any(|(n, _, _)| n == name),
            "rule {name} not loaded: {loaded:?}"
        );
    }

    // 1. Healthy, under load: every panel's query and every recording rule
    // returns data, every rule is healthy, no alert fires.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/nowconnect.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let started = Instant::now();
    let mut empty: Vec<(String, String)> = exprs.clone();
    let records: Vec<(String, String)> = record_names
        .iter()
        .map(|r| (format!("record {r}"), r.clone()))
        .collect();
    empty.extend(records);
    // Data comes as the load runs: rates need two scrapes, RTT a few pings.
    while !empty.is_empty() && started.elapsed() < Duration::from_secs(60) {
        empty.retain(|(_, e)| prom.query(e).is_empty());
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "healthy: every query has data after {:?}",
        started.elapsed()
    );
    assert!(
        empty.is_empty(),
        "queries with no data after {:?} of load (ok {} failed {}): {empty:#?}",
        started.elapsed(),
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed)
    );
    for (name, health, err) in prom.rules() {
        assert!(
            health == "ok" && err.is_empty(),
            "rule {name}: {health} {err}"
        );
    }
    assert!(
        prom.firing().is_empty(),
        "alerts fire on a healthy cluster: {:?}",
        prom.alerts()
    );
    assert_eq!(
        load.failed.load(Ordering::Relaxed),
        0,
        "healthy load failed"
    );

    // 2. Trouble that keeps the cluster up: a failed reload, a fenced
    // owner, backpressure, a slow mesh, bad tokens, flows crossing hubs.
    let cfg_a = env.path().join("hub-a.yaml");
    let good_cfg = std::fs::read_to_string(&cfg_a).unwrap();
    std::fs::write(&cfg_a, format!("{good_cfg}not_a_key: 1\n")).unwrap();
    signal(hub_a.proc.pid(), "-HUP");
    let fake_owner = redis_cli(
        &redis.url(),
        &[
            "SET",
            "nowconnect:agent:agent-1:owner",
            "hub-z|99999999999999",
            "PX",
            "30000",
        ],
    );
    assert!(fake_owner.contains("OK"), "{fake_owner}");
    let stop = Arc::new(AtomicBool::new(false));
    let bulk_flows = bulk(hub_b.listener("ldap"), 2, stop.clone());
    let bad = bad_tokens(hub_a.http, 5, stop.clone());
    let dead_clients = {
        let (stop, to) = (stop.clone(), hub_b.listener("dead"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = echo_once(to, b"x");
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    gate_tb.close();
    gate_a.set_delay(Duration::from_millis(40));
    gate_b.set_delay(Duration::from_millis(40));
    load.set_mesh_percent(100);
    let trouble = [
        "NowConnectConfigReloadFailed",
        "NowConnectEpochMismatches",
        "NowConnectMeshBackpressureDrops",
        "NowConnectMeshHighRTT",
        "NowConnectTunnelAuthFailures",
        "NowConnectCrossReplicaShareHigh",
        "NowConnectAgentHaDegraded",
        "NowConnectAgentTargetDialErrors",
    ];
    until_firing(
        &prom,
        &trouble,
        Duration::from_secs(60),
        "trouble",
        &[
            "nowconnect_config_reloads_total",
            "nowconnect_owner_epoch_mismatch_total",
            "nowconnect_mesh_backpressure_drops_total",
            "nowconnect_mesh_link_inflight_bytes",
            "nowconnect_tunnel_auth_failures_total",
            "nowconnect_agent_tunnels_established",
            "nowconnect_agent_target_dial_errors_total",
            "nowconnect:flows_cross_replica:ratio_rate5m",
            "sum by (instance, route) (rate(nowconnect_flows_total[10s]))",
        ],
    );
    std::fs::write(&cfg_a, &good_cfg).unwrap();
    signal(hub_a.proc.pid(), "-HUP");
    stop.store(true, Ordering::Relaxed);
    for t in bulk_flows {
        t.join().unwrap();
    }
    bad.join().unwrap();
    dead_clients.join().unwrap();
    gate_tb.open();
    gate_a.set_delay(Duration::ZERO);
    gate_b.set_delay(Duration::ZERO);
    load.set_mesh_percent(20);
    assert!(attached(), "agents attached again");
    until_resolved(&prom, &trouble, Duration::from_secs(60), "trouble healed");

    // 3. Outages: Redis down, the mesh partitioned, the agent gone.
    redis.kill();
    gate_a.close();
    gate_b.close();
    gate_ta.close();
    agent_2.proc.kill();
    let outages = [
        "NowConnectRegistryUnhealthy",
        "NowConnectMeshLinkDown",
        "NowConnectNoAgents",
        "NowConnectAgentDown",
        "NowConnectAgentNoTunnel",
        "NowConnectAvailabilitySloBreached",
    ];
    until_firing(
        &prom,
        &outages,
        Duration::from_secs(60),
        "outages",
        &[
            "nowconnect_registry_healthy",
            "nowconnect_mesh_links",
            "nowconnect_agents_connected",
            "up",
            "nowconnect:flow_availability:ratio_rate5m",
        ],
    );
    redis.restart();
    gate_a.open();
    gate_b.open();
    gate_ta.open();
    agent_2 = start_agent(2, &agent_2_yaml);
    assert!(attached(), "agents attached after the outages");
    // Healed: every alert of the file resolves, those of the first phase
    // that these outages raised again included.
    let all: Vec<&str> = alert_names.iter().map(String::as_str).collect();
    until_resolved(&prom, &all, Duration::from_secs(90), "outages healed");

    // Every alert of the file was seen firing in one phase or the other.
    let seen: BTreeSet<&str> = trouble.iter().chain(&outages).copied().collect();
    let never: Vec<&String> = alert_names
        .iter()
        .filter(|n| !seen.contains(n.as_str()))
        .collect();
    assert!(never.is_empty(), "alerts this test never fires: {never:?}");
    drop(load);
    drop((agent_1, agent_2));
    eprintln!("done in {:?}", t0.elapsed());
}
