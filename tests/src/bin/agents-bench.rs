//! Scale in agents (issue #24), with real processes: a `redis-server`, tokio
//! hubs in HA mode with the product's lease settings, and one
//! `nowconnect perf agents` process holding N real agent tunnels (distinct
//! ids, a token each).
//!
//! `idle --count N`: one hub. Its `VmRSS` before the agents and once all N
//! are connected and settled (KiB per agent); then, over `--idle-secs`,
//! Redis commands per second per agent (`INFO stats`
//! `total_commands_processed`, which counts the commands a Lua script runs
//! as well as the `EVALSHA` itself; the `INFO commandstats` breakdown
//! shows which), Redis CPU, the hub's CPU as a share of one core
//! (`/proc/<pid>/stat`), and the agents process's own `VmRSS`.
//!
//! `failover --count N`: three hubs meshed over mTLS, every agent listing
//! hub-a, hub-b, hub-c in that order and single-homed (so hub-a owns them
//! all), held `--stable-secs` (past the agents' 10 s after which a backoff
//! starts over), then hub-a is killed with SIGKILL. From the agents' own
//! timestamps: each agent's re-home time (kill → WELCOME of a survivor),
//! p50/p99/max; every redial against the floor of the agent's backoff.
//! From the survivors: `nowconnect_registry_errors_total` and Redis's
//! `rejected_connections` and `total_error_replies`. Throughout, one prober
//! per survivor opens a new flow every 100 ms through its listener to the
//! agents' echo target (16 bytes there and back): successes and failures
//! before the kill, until the first agent re-homed, until all did, after.
//!
//!   cargo build --release -p nowconnect-tokio --bin nowconnect
//!   cargo build --release -p nowconnect-tests --bin agents-bench
//!   NOWCONNECT_BIN=target/release/nowconnect target/release/agents-bench idle --count 10000 \
//!     [--idle-secs 60] [--settle-secs 15] [--ramp 500] [--hub-worker-threads N] [--json F] [--markdown F]
//!   NOWCONNECT_BIN=target/release/nowconnect target/release/agents-bench failover --count 5000 \
//!     [--ramp 500] [--stable-secs 12] [--after-secs 10] [--json F] [--markdown F]
//!
//! `AGENTS_BENCH_KEEP=1` keeps the run's directory (every process's log).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nowconnect_tests::pki::{Ca, Leaf};
use nowconnect_tests::*;
use serde_json::{Value, json};

const CONNECTOR: &str = "perf";

struct Opts {
    mode: String,
    count: usize,
    ramp: f64,
    idle_secs: u64,
    settle_secs: u64,
    stable_secs: u64,
    after_secs: u64,
    json: Option<String>,
    markdown: Option<String>,
    /// The hubs' `worker_threads` (their default, one per CPU, when not given).
    hub_threads: Option<usize>,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    if mode != "idle" && mode != "failover" {
        eprintln!("usage: agents-bench idle|failover --count N [options] (see the file's header)");
        std::process::exit(2);
    }
    let mut o = Opts {
        mode,
        count: 1000,
        ramp: 500.0,
        idle_secs: 60,
        settle_secs: 15,
        stable_secs: 12,
        after_secs: 10,
        json: None,
        markdown: None,
        hub_threads: None,
    };
    let mut i = 1;
    while i < args.len() {
        let v = args
            .get(i + 1)
            .cloned()
            .unwrap_or_else(|| panic!("{} needs a value", args[i]));
        let num = |what: &str| -> u64 { v.parse().unwrap_or_else(|_| panic!("{what} N")) };
        match args[i].as_str() {
            "--count" => o.count = num("--count") as usize,
            "--ramp" => o.ramp = v.parse().expect("--ramp PER_SEC"),
            "--idle-secs" => o.idle_secs = num("--idle-secs"),
            "--settle-secs" => o.settle_secs = num("--settle-secs"),
            "--stable-secs" => o.stable_secs = num("--stable-secs"),
            "--after-secs" => o.after_secs = num("--after-secs"),
            "--json" => o.json = Some(v),
            "--markdown" => o.markdown = Some(v),
            "--hub-worker-threads" => o.hub_threads = Some(num("--hub-worker-threads") as usize),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    assert!(
        o.count > 0 && o.ramp > 0.0,
        "--count and --ramp must be > 0"
    );
    o
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1000.0
}

/// The soft open-file limit of a running process (`/proc/<pid>/limits`).
fn nofile_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0)
}

/// `ListenOverflows` and `ListenDrops` of the kernel (`/proc/net/netstat`,
/// this network namespace): SYNs dropped because an accept queue was full.
fn listen_drops() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
        return (0.0, 0.0);
    };
    let m: BTreeMap<&str, f64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    (m["ListenOverflows"], m["ListenDrops"])
}

/// `INFO commandstats` as command → calls.
fn command_calls(url: &str) -> BTreeMap<String, f64> {
    redis_cli(url, &["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

/// A hub of the benchmark: HA `active` against `redis` with the product's
/// lease, renewal and registry timeout, one listener for the agents'
/// connector, room for `count` agents; meshed over mTLS when `mesh` is set;
/// `threads` worker threads when given (the default: one per CPU).
fn hub_yaml(
    env: &Env,
    replica: &str,
    redis: &RedisProc,
    count: usize,
    mesh: Option<(u16, &[u16], &Leaf)>,
    threads: Option<usize>,
) -> String {
    let mut y = env.hub_yaml(&[(CONNECTOR, CONNECTOR)], "");
    if let Some(n) = threads {
        y += &format!("worker_threads: {n}\n");
    }
    // Above N: the default (1024) refuses the rest with `limit_exceeded`.
    y += &format!("limits:\n  max_agents: {}\n", count + 1024);
    y += &format!(
        "ha:\n  enabled: true\n  mode: active\n  replica_id: {replica}\n  redis_url: {}\n",
        redis.url()
    );
    if let Some((port, peers, leaf)) = mesh {
        let peers: Vec<String> = peers
            .iter()
            .map(|p| format!("'wss://127.0.0.1:{p}/mesh'"))
            .collect();
        y += &format!(
            "  mesh:\n    listen: 127.0.0.1:{port}\n    peers: [{}]\n    require_mtls: true\n    tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n",
            peers.join(", "),
            leaf.ca.display(),
            leaf.cert.display(),
            leaf.key.display()
        );
    }
    y
}

fn start_hub(env: &Env, name: &str, yaml: &str) -> HubProc {
    HubProc::start_with(Command::new(bin()), env.path(), name, yaml)
}

/// `nowconnect perf agents` holding `count` agents on `hubs` (in order),
/// each serving the connector with `target`; its report goes to `report`.
/// It holds them until it is terminated (or for an hour).
fn start_agents(
    env: &Env,
    hubs: &[&HubProc],
    count: usize,
    ramp: f64,
    ha: Option<u8>,
    target: SocketAddr,
    report: &Path,
) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.args(["perf", "agents", "--count", &count.to_string()])
        .args(["--ramp", &ramp.to_string(), "--duration", "1h"])
        .args(["--connector", CONNECTOR, "--target", &target.to_string()])
        .arg("--jwt-key")
        .arg(&env.secret_file)
        .arg("--json")
        .arg(report)
        .args(["--progress", "5s"])
        .env("RUST_LOG", "warn");
    for h in hubs {
        cmd.args(["--hub", &format!("ws://{}/tunnel", h.http)]);
    }
    if let Some(n) = ha {
        cmd.args(["--ha-connections", &n.to_string()]);
    }
    Proc::spawn("agents", cmd, env.path())
}

/// Stop the agents (SIGTERM: they write their report) and read the report.
fn finish_agents(mut agents: Proc, report: &Path) -> Value {
    let st = agents.terminate(Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()),
        "perf agents did not exit cleanly ({st:?}); log:\n{}",
        tail(&agents.log_text(), 30)
    );
    let line = agents.wait_line("perf-agents:", Duration::from_secs(5));
    eprintln!("{line}");
    let text = std::fs::read_to_string(report).expect("perf agents report");
    serde_json::from_str(&text).expect("perf agents report is JSON")
}

/// Why tunnels ended or dials failed while the agents were held (before
/// they were told to stop), with their counts; `from_ms` on the agents'
/// clock.
fn end_reasons(r: &Value, from_ms: f64) -> BTreeMap<String, u64> {
    let stop = r["stop_ms"].as_f64().unwrap_or(f64::MAX);
    let mut out = BTreeMap::new();
    for a in r["agents"].as_array().into_iter().flatten() {
        for e in a["events"].as_array().into_iter().flatten() {
            let t = e["t_ms"].as_f64().unwrap_or(0.0);
            let kind = e["kind"].as_str().unwrap_or("");
            if t >= from_ms && t < stop && (kind == "down" || kind == "dial_failed") {
                let why = e["reason"].as_str().unwrap_or("?");
                *out.entry(format!("{kind}: {why}")).or_default() += 1;
            }
        }
    }
    out
}

fn reasons_line(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .take(6)
        .map(|(k, n)| format!("{n}× {k}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Wait (bounded) until `f` says all are there, printing progress.
fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> (f64, f64)) -> Option<Duration> {
    let start = Instant::now();
    let mut last = Instant::now();
    loop {
        let (have, want) = f();
        if have >= want {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            eprintln!("agents-bench: {what}: {have}/{want} after {within:?}, giving up");
            return None;
        }
        if last.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "agents-bench: {what}: {have}/{want} after {:.0} s",
                start.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// With `AGENTS_BENCH_KEEP=1` the run's directory (hub, Redis and agents
/// logs, the agents' report) is kept and named.
fn keep_dir(env: Env) {
    if std::env::var("AGENTS_BENCH_KEEP").is_ok_and(|v| v == "1") {
        eprintln!("agents-bench: kept {}", env.dir.keep().display());
    }
}

fn write_outputs(o: &Opts, md: &str, report: &Value) {
    println!("{md}");
    if let Some(p) = &o.markdown {
        std::fs::write(p, md).expect("write --markdown");
    }
    if let Some(p) = &o.json {
        std::fs::write(p, serde_json::to_string_pretty(report).unwrap()).expect("write --json");
    }
}

// ---------------------------------------------------------------- idle

fn idle(o: &Opts) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let url = redis.url();
    let hub = start_hub(
        &env,
        "hub",
        &hub_yaml(&env, "hub", &redis, o.count, None, o.hub_threads),
    );
    let echo = echo_server();
    std::thread::sleep(Duration::from_secs(2));
    let rss_before = proc_status_kib(hub.proc.pid(), "VmRSS");
    let hub_nofile = nofile_of(hub.proc.pid());
    eprintln!(
        "agents-bench: hub up (VmRSS {:.1} MiB, open files {hub_nofile}); starting {} agents at {}/s",
        mib(rss_before),
        o.count,
        o.ramp
    );
    let report_path = env.path().join("agents.json");
    let drops0 = listen_drops();
    let agents = start_agents(&env, &[&hub], o.count, o.ramp, None, echo, &report_path);
    let bound = Duration::from_secs_f64(o.count as f64 / o.ramp + 120.0);
    let connected = |h: &HubProc| h.metric("nowconnect_agents_connected");
    let all_in = wait_for("agents on the hub", bound, || {
        (connected(&hub), o.count as f64)
    });
    if all_in.is_none() {
        eprintln!("hub log tail:\n{}", tail(&hub.proc.log_text(), 20));
        eprintln!("agents log tail:\n{}", tail(&agents.log_text(), 20));
    }
    let drops1 = listen_drops();
    let connect_drops = (drops1.0 - drops0.0, drops1.1 - drops0.1);
    eprintln!(
        "agents-bench: {} agents on the hub; settling {} s, then {} s idle",
        connected(&hub),
        o.settle_secs,
        o.idle_secs
    );
    std::thread::sleep(Duration::from_secs(o.settle_secs));

    let pid = hub.proc.pid();
    let accepted = |h: &HubProc| h.metric("nowconnect_tunnels_total{result=\"accepted\"}");
    let (acc0, err0) = (
        accepted(&hub),
        hub.metric("nowconnect_registry_errors_total"),
    );
    let (cmds0, calls0, rcpu0) = (
        redis_info(&url, "stats")["total_commands_processed"],
        command_calls(&url),
        redis_cpu(&url),
    );
    let (cpu0, t0) = (cpu_secs(pid), Instant::now());
    let rss_settled = proc_status_kib(pid, "VmRSS");
    std::thread::sleep(Duration::from_secs(o.idle_secs));
    let (cpu1, secs) = (cpu_secs(pid), t0.elapsed().as_secs_f64());
    let calls1 = command_calls(&url);
    let (cmds1, rcpu1) = (
        redis_info(&url, "stats")["total_commands_processed"],
        redis_cpu(&url),
    );
    let rss_after = proc_status_kib(pid, "VmRSS");
    let hwm = proc_status_kib(pid, "VmHWM");
    let agents_rss = proc_status_kib(agents.pid(), "VmRSS");
    let agents_nofile = nofile_of(agents.pid());
    let on_hub = connected(&hub);
    let churn = accepted(&hub) - acc0;
    let reg_errors = hub.metric("nowconnect_registry_errors_total") - err0;
    let healthy = hub.metric("nowconnect_registry_healthy");

    // The bench's own INFO calls are not the hub's.
    let mut breakdown: Vec<(String, f64)> = calls1
        .iter()
        .filter(|(k, _)| k.as_str() != "info")
        .map(|(k, v)| (k.clone(), v - calls0.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    breakdown.sort_by(|a, b| b.1.total_cmp(&a.1));
    let info_calls =
        calls1.get("info").copied().unwrap_or(0.0) - calls0.get("info").unwrap_or(&0.0);
    let cmds = cmds1 - cmds0 - info_calls;
    let n = o.count as f64;
    let cmds_per_sec = cmds / secs;
    let per_agent = cmds_per_sec / n;
    let hub_cpu_pct = (cpu1 - cpu0) / secs * 100.0;
    let redis_cpu_pct = (rcpu1 - rcpu0) / secs * 100.0;
    let kib_per_agent = (rss_after.max(rss_settled) as f64 - rss_before as f64) / n;

    let r = finish_agents(agents, &report_path);
    let all_connected_s = r["all_connected_ms"].as_f64().map(|v| v / 1000.0);
    let started_all_s = r["started_all_ms"].as_f64().unwrap_or(0.0) / 1000.0;
    let reasons = end_reasons(&r, 0.0);

    let top: Vec<String> = breakdown
        .iter()
        .take(8)
        .map(|(k, v)| format!("{k} {:.3}", v / secs / n))
        .collect();
    let mut md = String::new();
    md += &format!(
        "### {} idle agents on one hub (tokio, HA active, lease 15 s, renewal 5 s, worker threads {})\n\n",
        o.count,
        o.hub_threads
            .map_or_else(|| "one per CPU".to_string(), |n| n.to_string())
    );
    md += "| figure | value | target |\n|---|---|---|\n";
    md += &format!(
        "| hub VmRSS before agents / settled / after idle (MiB) | {:.1} / {:.1} / {:.1} (peak {:.1}) | |\n",
        mib(rss_before),
        mib(rss_settled),
        mib(rss_after),
        mib(hwm)
    );
    md += &format!("| hub RSS per agent | {kib_per_agent:.1} KiB | ≤ 48 KiB |\n");
    md += &format!(
        "| Redis commands/s (all, scripts' inner commands included) | {cmds_per_sec:.1} | |\n"
    );
    md += &format!("| Redis commands/s per agent | {per_agent:.4} | ≤ 0.5 |\n");
    md += &format!(
        "| per agent per second, by command | {} | |\n",
        top.join(", ")
    );
    md += &format!("| Redis CPU | {redis_cpu_pct:.2} % of one core | |\n");
    md += &format!("| hub CPU while idle | {hub_cpu_pct:.2} % of one core | ≤ 5 % |\n");
    md += &format!(
        "| all connected (perf agents' clock; ramp {}/s, last started at {started_all_s:.1} s) | {} | |\n",
        o.ramp,
        all_connected_s.map_or("never".into(), |s| format!("{s:.1} s"))
    );
    md += &format!(
        "| agents process VmRSS | {:.1} MiB ({:.1} KiB per agent) | |\n",
        mib(agents_rss),
        agents_rss as f64 / n
    );
    md += &format!(
        "| dials / failed dials / tunnels lost while held; why | {} / {} / {}; {} | |\n",
        r["dials"],
        r["dial_failures"],
        reasons
            .iter()
            .filter(|(k, _)| k.starts_with("down"))
            .map(|(_, n)| n)
            .sum::<u64>(),
        reasons_line(&reasons)
    );
    md += &format!(
        "| SYNs dropped on full accept queues while connecting (kernel ListenOverflows / ListenDrops) | {} / {} | |\n",
        connect_drops.0, connect_drops.1
    );
    md += &format!(
        "| checks | on the hub at the end {on_hub}; tunnels accepted during the idle window {churn}; registry errors {reg_errors}, registry healthy {healthy}; open-file limit hub {hub_nofile}, agents {agents_nofile} | |\n"
    );
    md += &format!(
        "\nIdle window {secs:.1} s after {} s settling.\n",
        o.settle_secs
    );
    let report = json!({
        "mode": "idle",
        "count": o.count,
        "ramp_per_sec": o.ramp,
        "idle_secs": secs,
        "settle_secs": o.settle_secs,
        "hub_worker_threads": o.hub_threads,
        "hub_rss_kib": {"before": rss_before, "settled": rss_settled, "after": rss_after, "peak": hwm},
        "hub_kib_per_agent": kib_per_agent,
        "redis_commands_per_sec": cmds_per_sec,
        "redis_commands_per_sec_per_agent": per_agent,
        "redis_commandstats_delta": breakdown.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "redis_cpu_pct": redis_cpu_pct,
        "hub_cpu_pct": hub_cpu_pct,
        "agents_rss_kib": agents_rss,
        "on_hub_at_end": on_hub,
        "tunnels_accepted_while_idle": churn,
        "registry_errors_while_idle": reg_errors,
        "registry_healthy": healthy,
        "listen_overflows_while_connecting": connect_drops.0,
        "listen_drops_while_connecting": connect_drops.1,
        "nofile": {"hub": hub_nofile, "agents": agents_nofile},
        "all_connected_s": all_connected_s,
        "started_all_s": started_all_s,
        "agents_connected_samples": r["samples"],
        "perf_agents": {
            "dials": r["dials"], "dial_failures": r["dial_failures"],
            "end_reasons": reasons,
            "tunnels_ended": r["tunnels_ended"], "backoff": r["backoff"],
        },
    });
    write_outputs(o, &md, &report);
    drop((hub, redis));
    keep_dir(env);
}

// ---------------------------------------------------------------- failover

/// One new flow through a listener: connect, 16 bytes to the echo target
/// and back.
fn probe(addr: SocketAddr) -> Result<f64, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let msg = *b"agents-bench-16b";
    s.write_all(&msg).map_err(|e| format!("write: {e}"))?;
    let mut got = [0u8; 16];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != msg {
        return Err("echo differs".into());
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// A probe's outcome: started at `t`, done at `end` (Unix ms).
#[derive(Clone)]
struct Probe {
    t: f64,
    end: f64,
    ok: bool,
    ms: f64,
    err: String,
}

/// A prober: a new flow through `addr` every 100 ms until `stop`.
fn prober(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Probe>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = unix_ms();
            let r = probe(addr);
            out.push(Probe {
                t,
                end: unix_ms(),
                ok: r.is_ok(),
                ms: *r.as_ref().unwrap_or(&0.0),
                err: r.err().unwrap_or_default(),
            });
            let spent = unix_ms() - t;
            std::thread::sleep(Duration::from_secs_f64((100.0 - spent).max(0.0) / 1000.0));
        }
        out
    })
}

fn failover(o: &Opts) {
    let env = Env::new();
    let redis = RedisProc::start(env.path());
    let url = redis.url();
    let ca = Ca::new("mesh CA");
    let names = ["hub-a", "hub-b", "hub-c"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let mut hubs: Vec<HubProc> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let peers: Vec<u16> = (0..3).filter(|j| *j != i).map(|j| ports[j]).collect();
            let leaf = ca.issue(env.path(), name);
            let mesh = Some((ports[i], &peers[..], &leaf));
            let yaml = hub_yaml(&env, name, &redis, o.count, mesh, o.hub_threads);
            start_hub(&env, name, &yaml)
        })
        .collect();
    let meshed = eventually(Duration::from_secs(30), || {
        (0..3).all(|i| {
            (0..3)
                .filter(|j| *j != i)
                .all(|j| mesh_established(&hubs[i], names[j]))
        })
    });
    assert!(meshed, "the three hubs did not mesh within 30 s");
    let echo = echo_server();
    let report_path = env.path().join("agents.json");
    eprintln!(
        "agents-bench: 3 hubs meshed; starting {} single-homed agents (hub-a, hub-b, hub-c) at {}/s",
        o.count, o.ramp
    );
    let agents = start_agents(
        &env,
        &[&hubs[0], &hubs[1], &hubs[2]],
        o.count,
        o.ramp,
        Some(1),
        echo,
        &report_path,
    );
    let bound = Duration::from_secs_f64(o.count as f64 / o.ramp + 120.0);
    let connected = |h: &HubProc| h.metric("nowconnect_agents_connected");
    // Every agent dials hub-a first; one whose tunnel there failed has
    // moved on to hub-b (its next hub) and stays there: the orphans of the
    // kill are the agents on hub-a at the kill, counted from their events.
    let all_up = wait_for("agents connected (any hub)", bound, || {
        (hubs.iter().map(connected).sum::<f64>(), o.count as f64)
    });
    assert!(
        all_up.is_some(),
        "not all agents connected; hub-a log:\n{}\nagents log:\n{}",
        tail(&hubs[0].proc.log_text(), 20),
        tail(&agents.log_text(), 20)
    );
    eprintln!(
        "agents-bench: {} agents on hub-a ({} elsewhere); holding {} s before the kill",
        connected(&hubs[0]),
        o.count as f64 - connected(&hubs[0]),
        o.stable_secs
    );
    std::thread::sleep(Duration::from_secs(o.stable_secs.saturating_sub(2)));

    let stop = Arc::new(AtomicBool::new(false));
    let probers: Vec<_> = hubs[1..]
        .iter()
        .map(|h| prober(h.listener(CONNECTOR), stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let survivors_errors = |hs: &[HubProc]| -> f64 {
        hs[1..]
            .iter()
            .map(|h| h.metric("nowconnect_registry_errors_total"))
            .sum()
    };
    let reg_err0 = survivors_errors(&hubs);
    let stats0 = redis_info(&url, "stats");
    let cpu0: Vec<f64> = hubs[1..].iter().map(|h| cpu_secs(h.proc.pid())).collect();

    let drops0 = listen_drops();
    let kill_ms = unix_ms();
    hubs[0].proc.kill();
    let killed = Instant::now();
    eprintln!("agents-bench: hub-a killed (SIGKILL)");
    let mut min_registry_healthy = 1.0f64;
    let rehomed = wait_for("agents on hub-b + hub-c", Duration::from_secs(120), || {
        min_registry_healthy = hubs[1..]
            .iter()
            .map(|h| h.metric("nowconnect_registry_healthy"))
            .fold(min_registry_healthy, f64::min);
        (hubs[1..].iter().map(connected).sum::<f64>(), o.count as f64)
    });
    let rehomed_by_metrics = rehomed.map(|_| killed.elapsed());
    let drops1 = listen_drops();
    let kill_drops = (drops1.0 - drops0.0, drops1.1 - drops0.1);
    std::thread::sleep(Duration::from_secs(o.after_secs));
    stop.store(true, Ordering::Relaxed);
    let probes: Vec<Vec<Probe>> = probers.into_iter().map(|p| p.join().unwrap()).collect();
    let on_survivors: Vec<f64> = hubs[1..].iter().map(connected).collect();
    let reg_errors = survivors_errors(&hubs) - reg_err0;
    let stats1 = redis_info(&url, "stats");
    let delta = |k: &str| stats1.get(k).unwrap_or(&0.0) - stats0.get(k).unwrap_or(&0.0);
    let (rejected, error_replies) = (delta("rejected_connections"), delta("total_error_replies"));
    let survivors_cpu: Vec<f64> = hubs[1..]
        .iter()
        .zip(&cpu0)
        .map(|(h, c0)| cpu_secs(h.proc.pid()) - c0)
        .collect();
    let survivors_rss: Vec<u64> = hubs[1..]
        .iter()
        .map(|h| proc_status_kib(h.proc.pid(), "VmRSS"))
        .collect();

    let r = finish_agents(agents, &report_path);
    // Each agent's timeline is in ms after the agents' start.
    let kill_t = kill_ms - r["start_unix_ms"].as_f64().expect("start_unix_ms");
    let mut rehome = Vec::new();
    let mut detect = Vec::new();
    let mut first_dial = Vec::new();
    let mut dials_after = 0u64;
    let mut not_rehomed = Vec::new();
    let mut on_hub: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_up_on: BTreeMap<String, f64> = BTreeMap::new();
    let mut orphans = 0usize;
    for a in r["agents"].as_array().expect("agents") {
        let id = a["id"].as_str().unwrap_or("?");
        let events = a["events"].as_array().expect("events");
        let t = |e: &Value| e["t_ms"].as_f64().unwrap_or(0.0);
        let kind = |e: &Value| e["kind"].as_str().unwrap_or("").to_string();
        // On hub-a at the kill: its last tunnel event before the kill is
        // an `up` from hub-a.
        let last = events
            .iter()
            .rfind(|e| t(e) <= kill_t && matches!(kind(e).as_str(), "up" | "down"));
        if !last.is_some_and(|e| kind(e) == "up" && e["replica"] == "hub-a") {
            continue;
        }
        orphans += 1;
        let after: Vec<&Value> = events.iter().filter(|e| t(e) > kill_t).collect();
        if let Some(d) = after.iter().find(|e| kind(e) == "down") {
            detect.push(t(d) - kill_t);
        }
        if let Some(d) = after.iter().find(|e| kind(e) == "dial") {
            first_dial.push(t(d) - kill_t);
        }
        dials_after += after.iter().filter(|e| kind(e) == "dial").count() as u64;
        match after.iter().find(|e| kind(e) == "up") {
            Some(u) => {
                let dt = t(u) - kill_t;
                rehome.push(dt);
                let replica = u["replica"].as_str().unwrap_or("?").to_string();
                let first = first_up_on.entry(replica.clone()).or_insert(dt);
                *first = first.min(dt);
                *on_hub.entry(replica).or_default() += 1;
            }
            None => not_rehomed.push(id.to_string()),
        }
    }
    for v in [&mut rehome, &mut detect, &mut first_dial] {
        v.sort_by(f64::total_cmp);
    }
    let reasons_after_kill = end_reasons(&r, kill_t);
    let all_rehomed_t =
        (not_rehomed.is_empty() && !rehome.is_empty()).then(|| rehome[rehome.len() - 1]);

    // Probes by phase: before the kill; kill → the first re-homed agent on
    // that hub; → all re-homed; after.
    let mut probe_rows = Vec::new();
    let mut probe_json = Vec::new();
    for (k, ps) in probes.iter().enumerate() {
        let name = names[k + 1];
        let first_local = first_up_on.get(name).copied();
        let first_any = rehome.first().copied();
        // A probe belongs to the phase it started in, but one that started
        // before the kill and ended after it was in flight at the kill.
        let in_flight: Vec<&Probe> = ps
            .iter()
            .filter(|p| p.t < kill_ms && p.end >= kill_ms)
            .collect();
        let phases: [(&str, f64, f64); 4] = [
            ("before the kill", f64::MIN, 0.0),
            (
                "kill → first agent re-homed (anywhere)",
                0.0,
                first_any.unwrap_or(f64::MAX),
            ),
            (
                "first re-homed → all re-homed",
                first_any.unwrap_or(f64::MAX),
                all_rehomed_t.unwrap_or(f64::MAX),
            ),
            (
                "after all re-homed",
                all_rehomed_t.unwrap_or(f64::MAX),
                f64::MAX,
            ),
        ];
        let mut cells = Vec::new();
        let mut pj = serde_json::Map::new();
        for (label, from, to) in phases {
            let inside: Vec<&Probe> = ps
                .iter()
                .filter(|p| {
                    let rel = p.t - kill_ms;
                    rel >= from && rel < to && !(p.t < kill_ms && p.end >= kill_ms)
                })
                .collect();
            let ok = inside.iter().filter(|p| p.ok).count();
            cells.push(format!("{ok}/{}", inside.len()));
            pj.insert(label.into(), json!({"ok": ok, "total": inside.len()}));
        }
        let in_flight_ok = in_flight.iter().filter(|p| p.ok).count();
        cells.insert(1, format!("{in_flight_ok}/{}", in_flight.len()));
        pj.insert(
            "in flight at the kill".into(),
            json!({"ok": in_flight_ok, "total": in_flight.len()}),
        );
        let failures: Vec<&Probe> = ps.iter().filter(|p| !p.ok).collect();
        let last_fail = failures
            .iter()
            .rev()
            .find(|p| p.t >= kill_ms)
            .map(|p| p.t - kill_ms);
        let mut errs: BTreeMap<String, u32> = BTreeMap::new();
        for f in &failures {
            *errs.entry(f.err.clone()).or_default() += 1;
        }
        let mut lat: Vec<f64> = ps.iter().filter(|p| p.ok).map(|p| p.ms).collect();
        lat.sort_by(f64::total_cmp);
        probe_rows.push(format!(
            "| {name} | {} | {} | {} | {:.1} / {:.1} | {} |",
            cells.join(" | "),
            last_fail.map_or("none".into(), |t| format!("{:.0} ms", t)),
            first_local.map_or("-".into(), |t| format!("{t:.0} ms")),
            quantile(&lat, 0.5),
            lat.last().copied().unwrap_or(f64::NAN),
            errs.iter()
                .map(|(e, n)| format!("{n}× {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
        pj.insert("last_failure_after_kill_ms".into(), json!(last_fail));
        pj.insert("first_local_rehome_ms".into(), json!(first_local));
        pj.insert("errors".into(), json!(errs));
        probe_json.push((name, Value::Object(pj)));
    }

    let backoff = &r["backoff"];
    let q = |v: &[f64]| {
        format!(
            "{:.0} / {:.0} / {:.0}",
            quantile(v, 0.5),
            quantile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        )
    };
    let mut md = String::new();
    md += &format!(
        "### {} single-homed agents on hub-a of three meshed hubs; hub-a SIGKILLed (tokio, HA active, lease 15 s)\n\n",
        o.count
    );
    md += "| figure | value | target |\n|---|---|---|\n";
    md += &format!(
        "| re-homed on a survivor, kill → WELCOME, p50 / p99 / max (ms) | {} ({} of the {orphans} on hub-a at the kill; {} agents in all) | all within 10 s |\n",
        q(&rehome),
        rehome.len(),
        o.count
    );
    md += &format!(
        "| kill → tunnel seen down, p50 / p99 / max (ms) | {} | |\n",
        q(&detect)
    );
    md += &format!(
        "| kill → first redial, p50 / p99 / max (ms) | {} | |\n",
        q(&first_dial)
    );
    md += &format!(
        "| all re-homed by the survivors' `nowconnect_agents_connected` | {} | |\n",
        rehomed_by_metrics.map_or("not within 120 s".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1000.0
        ))
    );
    md += &format!(
        "| re-homed after more than 1 s | {} | |\n",
        rehome.iter().filter(|t| **t > 1000.0).count()
    );
    md += &format!(
        "| SYNs dropped on full accept queues until all re-homed (kernel ListenOverflows / ListenDrops) | {} / {} | |\n",
        kill_drops.0, kill_drops.1
    );
    md += &format!(
        "| where they went | {} | |\n",
        on_hub
            .iter()
            .map(|(h, n)| format!("{h} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    md += &format!(
        "| dials after the kill | {dials_after} ({:.2} per agent) | |\n",
        dials_after as f64 / o.count as f64
    );
    md += &format!(
        "| failed dials and lost tunnels after the kill, why | {} | |\n",
        reasons_line(&reasons_after_kill)
    );
    md += &format!(
        "| redials below the backoff floor (whole run) | {} of {} (shortest gap {} ms) | 0 |\n",
        backoff["below_floor"],
        backoff["redials"],
        backoff["min_gap_ms"]
            .as_f64()
            .map_or("-".into(), |g| format!("{g:.1}"))
    );
    md += &format!(
        "| Redis refusing: rejected connections, error replies; survivors' registry errors; lowest registry_healthy seen | {rejected}, {error_replies}; {reg_errors}; {min_registry_healthy} | 0, 0; 0 |\n"
    );
    md += &format!(
        "| survivors after: agents, VmRSS (MiB), CPU s since the kill | hub-b {} / {:.1} / {:.1}, hub-c {} / {:.1} / {:.1} | |\n",
        on_survivors[0],
        mib(survivors_rss[0]),
        survivors_cpu[0],
        on_survivors[1],
        mib(survivors_rss[1]),
        survivors_cpu[1]
    );
    md += "\nNew flows every 100 ms through each survivor's listener (ok/total by phase; time after the kill):\n\n";
    md += "| via | before the kill | in flight at the kill | kill → first re-homed | first → all re-homed | after all re-homed | last failure (started after the kill) | first agent re-homed on this hub | ok latency p50 / max (ms) | failures |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for row in &probe_rows {
        md += row;
        md += "\n";
    }
    if !not_rehomed.is_empty() {
        md += &format!(
            "\nNot re-homed: {} agents (e.g. {}).\n",
            not_rehomed.len(),
            not_rehomed
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let report = json!({
        "mode": "failover",
        "count": o.count,
        "ramp_per_sec": o.ramp,
        "stable_secs": o.stable_secs,
        "rehome_ms": {"p50": quantile(&rehome, 0.5), "p99": quantile(&rehome, 0.99), "max": rehome.last(), "n": rehome.len()},
        "detect_ms": {"p50": quantile(&detect, 0.5), "p99": quantile(&detect, 0.99), "max": detect.last()},
        "first_redial_ms": {"p50": quantile(&first_dial, 0.5), "p99": quantile(&first_dial, 0.99), "max": first_dial.last()},
        "all_rehomed_by_metrics_ms": rehomed_by_metrics.map(|d| d.as_secs_f64() * 1000.0),
        "orphans": orphans,
        "rehomed_on": on_hub,
        "rehomed_after_1s": rehome.iter().filter(|t| **t > 1000.0).count(),
        "rehome_ms_p90": quantile(&rehome, 0.9),
        "rehome_ms_p95": quantile(&rehome, 0.95),
        "listen_overflows_after_kill": kill_drops.0,
        "listen_drops_after_kill": kill_drops.1,
        "not_rehomed": not_rehomed,
        "dials_after_kill": dials_after,
        "end_reasons_after_kill": reasons_after_kill,
        "backoff": backoff,
        "redis_rejected_connections": rejected,
        "redis_error_replies": error_replies,
        "survivors_registry_errors": reg_errors,
        "min_registry_healthy": min_registry_healthy,
        "survivors_agents": on_survivors,
        "survivors_rss_kib": survivors_rss,
        "survivors_cpu_secs_since_kill": survivors_cpu,
        "probes": probe_json.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<serde_json::Map<_, _>>(),
        "all_connected_s": r["all_connected_ms"].as_f64().map(|v| v / 1000.0),
        "agents_connected_samples": r["samples"],
    });
    write_outputs(o, &md, &report);
    drop((hubs, redis));
    keep_dir(env);
}

fn main() {
    let o = parse_opts();
    // Children hold a socket per agent and inherit this limit (a hub built
    // before hubs raised their own limit included).
    if let Err(e) = nowconnect_tokio::nofile::raise_to_hard() {
        eprintln!("agents-bench: {e}");
    }
    match o.mode.as_str() {
        "idle" => idle(&o),
        _ => failover(&o),
    }
}
