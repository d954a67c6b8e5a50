//! One flow through a real hub and agent (separate processes) against a
//! direct loopback connection, measured in the same run:
//! bulk throughput (client → sink) and 1 KiB echo latency.
//!
//! Each runtime (tokio and async-std by default) gets a hub and an agent of
//! its own, both on that runtime, so the runtimes are measured side by side
//! in one process, alternating with the direct runs.
//!
//! With `--mesh`, each runtime then also gets Redis, two meshed hubs and an
//! agent on hub-a, and one flow into hub-b is measured across the mesh.
//!
//! With `--delay-ms D`, each agent reaches its hub through a proxy that holds
//! every chunk D ms in each direction (a round trip of 2D, as across a WAN,
//! with no bandwidth limit and no TCP window of its own), so that the flow's
//! credit window (`--window`) is what bounds its throughput.
//!
//! With `--reference`, the same measurements also run through a chain of
//! bare relays (the `relay` binary, one process each) shaped like each path:
//! two plain relays for one hub and agent; for the mesh a relay that dials
//! the next over TLS, one that accepts TLS, and a plain one (entry hub, owner
//! hub, agent). The relays only copy bytes, so the chain shows what the
//! processes, TCP hops and TLS ends of a path cost on this machine before
//! any of NowConnect's own work: the reachable ceiling for its ratios.
//!
//!   cargo run --release -p nowconnect-tests --bin tunnel-bench -- [--bytes N] [--echoes N] [--runtimes tokio,async-std] [--mesh] [--reference] [--window BYTES] [--max-window BYTES] [--worker-threads N] [--delay-ms D]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nowconnect_tests::pki::Ca;
use nowconnect_tests::{
    AgentProc, Env, HubProc, RedisProc, Runtime, bulk_throughput, delay_proxy, echo_server,
    eventually, meshed_pair_with, pair_ready, sink_server,
};

/// 1 KiB echo latency of each address over one connection each, one round
/// trip to each in turn (after 200 unrecorded ones).
fn echo_latencies(addrs: &[SocketAddr], n: usize) -> Vec<Histogram<u64>> {
    let mut conns: Vec<(TcpStream, Histogram<u64>)> = addrs
        .iter()
        .map(|a| {
            let s = TcpStream::connect(a).unwrap();
            s.set_nodelay(true).unwrap();
            (s, Histogram::<u64>::new(3).unwrap())
        })
        .collect();
    let req = vec![0xa5u8; 1024];
    let mut resp = vec![0u8; 1024];
    for i in 0..n + 200 {
        for (s, h) in conns.iter_mut() {
            let t = Instant::now();
            s.write_all(&req).unwrap();
            s.read_exact(&mut resp).unwrap();
            if i >= 200 {
                h.record(t.elapsed().as_nanos() as u64).unwrap();
            }
        }
    }
    conns.into_iter().map(|(_, h)| h).collect()
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat` (in USER_HZ, 100 per second on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Measured transfers per path: throughput is their median, CPU their mean.
const RUNS: usize = 3;

/// One measured transfer of `bytes` to `addr`: its throughput joins
/// `rates`, and the CPU seconds per GiB each of `pids` used meanwhile, over
/// [`RUNS`], is added to its entry of `cpu`.
fn measured_run(addr: SocketAddr, bytes: u64, pids: &[u32], rates: &mut Vec<f64>, cpu: &mut [f64]) {
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    rates.push(bulk_throughput(addr, bytes));
    let gib = bytes as f64 / (1u64 << 30) as f64;
    for ((c, p), b) in cpu.iter_mut().zip(pids).zip(before) {
        *c += (cpu_secs(*p) - b) / gib / RUNS as f64;
    }
}

/// One `relay` process (see its source), killed when dropped.
struct Relay {
    child: Child,
    addr: SocketAddr,
}

impl Relay {
    /// `mode` and its arguments, then `--threads N` when the bench pins
    /// worker threads.
    fn start(args: &[&str], threads: Option<usize>) -> Relay {
        let bin = std::env::current_exe()
            .expect("current exe")
            .with_file_name("relay");
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(n) = threads {
            cmd.args(["--threads", &n.to_string()]);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); build it with `cargo build --release -p nowconnect-tests --bins`",
                bin.display()
            )
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("relay output");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("relay printed {line:?}"));
        Relay { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two plain relays in front of `to`: the shape of one hub and an agent.
fn hub_shaped_chain(to: SocketAddr, threads: Option<usize>) -> Vec<Relay> {
    let agent = Relay::start(&["plain", &to.to_string()], threads);
    let hub = Relay::start(&["plain", &agent.addr.to_string()], threads);
    vec![hub, agent]
}

/// The mesh's shape in front of `to`: an entry relay that dials the next
/// over TLS, an owner relay that accepts TLS, and a plain agent relay.
fn mesh_shaped_chain(to: SocketAddr, threads: Option<usize>, dir: &Path) -> Vec<Relay> {
    let leaf = Ca::new("bench reference CA").issue(dir, "reference");
    let (ca, cert, key) = (
        leaf.ca.display().to_string(),
        leaf.cert.display().to_string(),
        leaf.key.display().to_string(),
    );
    let agent = Relay::start(&["plain", &to.to_string()], threads);
    let owner = Relay::start(
        &["tls-in", &agent.addr.to_string(), &ca, &cert, &key],
        threads,
    );
    let entry = Relay::start(
        &["tls-out", &owner.addr.to_string(), &ca, &cert, &key],
        threads,
    );
    vec![entry, owner, agent]
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() {
    let mut bytes: u64 = 2 * 1024 * 1024 * 1024;
    let mut echoes = 20_000;
    let mut window: u32 = 256 * 1024;
    // Unset: the binaries' default (4 MiB), and no key in their files, so
    // that binaries from before window growth run too.
    let mut max_window: Option<u32> = None;
    let mut mesh = false;
    let mut threads = String::new();
    let mut thread_count: Option<usize> = None;
    let mut reference = false;
    let mut delay = Duration::ZERO;
    let mut runtimes = vec![Runtime::Tokio, Runtime::AsyncStd];
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--bytes" => bytes = args[i + 1].parse().expect("--bytes N"),
            "--echoes" => echoes = args[i + 1].parse().expect("--echoes N"),
            "--window" => window = args[i + 1].parse().expect("--window BYTES"),
            "--max-window" => {
                max_window = Some(args[i + 1].parse().expect("--max-window BYTES"));
            }
            "--worker-threads" => {
                let n: usize = args[i + 1].parse().expect("--worker-threads N");
                threads = format!("worker_threads: {n}\n");
                thread_count = (n > 0).then_some(n);
            }
            "--delay-ms" => {
                delay = Duration::from_millis(args[i + 1].parse().expect("--delay-ms D"));
            }
            "--mesh" => {
                mesh = true;
                i += 1;
                continue;
            }
            "--reference" => {
                reference = true;
                i += 1;
                continue;
            }
            "--runtimes" | "--agents" => runtimes = Runtime::parse_list(&args[i + 1]),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let max_window_key = max_window.map(|m| m.max(window));
    let max_window =
        max_window_key.unwrap_or(nowconnect_core::tunnel::DEFAULT_MAX_WINDOW.max(window));
    // The window keys of a hub's `tunnel` section (indented) or an agent file.
    let windows = |indent: &str| {
        let mut y = format!("{indent}window_bytes: {window}\n");
        if let Some(m) = max_window_key {
            y += &format!("{indent}max_window_bytes: {m}\n");
        }
        y
    };
    // The address an agent dials for a hub: through the delay proxy if asked.
    let dial = |hub: SocketAddr| {
        if delay.is_zero() {
            hub
        } else {
            delay_proxy(hub, delay)
        }
    };
    let env = Env::new();
    let sink = sink_server();
    let echo = echo_server();
    // One hub and one agent per runtime, each pair on its runtime.
    let names: Vec<(String, String)> = runtimes
        .iter()
        .map(|r| (format!("sink-{}", r.name()), format!("echo-{}", r.name())))
        .collect();
    let mut hubs = Vec::new();
    let mut agents = Vec::new();
    for (rt, (s, e)) in runtimes.iter().zip(&names) {
        let hub = HubProc::start_on(
            *rt,
            env.path(),
            &format!("hub-{}", rt.name()),
            &(env
                .hub_yaml(&[(s, s), (e, e)], "log:\n  level: warn\n")
                .replace("tunnel:\n", &format!("tunnel:\n{}", windows("  ")))
                + &threads),
        );
        let id = format!("bench-{}", rt.name());
        let yaml = env.agent_yaml(
            &id,
            &[dial(hub.http)],
            &[(s.as_str(), sink), (e.as_str(), echo)],
            "log:\n  level: warn\n",
        ) + &windows("")
            + &threads;
        agents.push(AgentProc::start_on(
            *rt,
            env.path(),
            &id,
            &yaml,
            // Scoped to its own two connectors (hubs refuse others).
            &env.token(&id, Some(vec![s.clone(), e.clone()])),
        ));
        assert!(hub.agents_attached(1.0, Duration::from_secs(15)));
        hubs.push(hub);
    }
    if !delay.is_zero() {
        // Flow windows grow once a tunnel's first ping (1 s after it is up)
        // has measured the round trip.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let listener = |name: &str| {
        hubs.iter()
            .find_map(|h| h.listeners.iter().find(|(n, _)| n == name).map(|(_, a)| *a))
            .expect("listener")
    };

    // Bare relays in the shape of one hub and agent, to the sink and to the
    // echo service.
    let ref_sink = reference.then(|| hub_shaped_chain(sink, thread_count));
    let ref_echo = reference.then(|| hub_shaped_chain(echo, thread_count));

    // Warm up every path, then alternate direct and tunnel runs.
    bulk_throughput(sink, bytes / 8);
    for (s, _) in &names {
        bulk_throughput(listener(s), bytes / 8);
    }
    if let Some(chain) = &ref_sink {
        bulk_throughput(chain[0].addr, bytes / 8);
    }
    let mut direct = Vec::new();
    let mut tunnel: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut cpu: Vec<Vec<f64>> = vec![vec![0.0; 2]; names.len()];
    let mut relayed = Vec::new();
    let mut relay_cpu = [0.0; 2];
    for _ in 0..RUNS {
        direct.push(bulk_throughput(sink, bytes));
        for (k, (s, _)) in names.iter().enumerate() {
            let pids = [hubs[k].proc.pid(), agents[k].proc.pid()];
            measured_run(listener(s), bytes, &pids, &mut tunnel[k], &mut cpu[k]);
        }
        if let Some(chain) = &ref_sink {
            let pids: Vec<u32> = chain.iter().map(Relay::pid).collect();
            measured_run(chain[0].addr, bytes, &pids, &mut relayed, &mut relay_cpu);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let d = med(&mut direct);
    if !delay.is_zero() {
        let rtt = 2.0 * delay.as_secs_f64();
        println!(
            "agent to hub: {} ms each way (round trip {:.0} ms); a flow's ceiling, window / round trip: {:.1} MiB/s at the starting window, {:.1} MiB/s at the most it may grow to",
            delay.as_millis(),
            rtt * 1000.0,
            f64::from(window) / rtt / 1048576.0,
            f64::from(max_window) / rtt / 1048576.0
        );
    }
    println!(
        "per-flow window: {window} bytes, growing up to {max_window}; {}; hub and agent on: {}",
        if threads.is_empty() {
            "worker threads: the runtime's default".to_string()
        } else {
            threads.trim().replace('_', " ")
        },
        runtimes
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "## one-flow throughput ({} MiB per run, median of {RUNS})",
        bytes >> 20
    );
    println!(
        "direct loopback              : {:>8.1} MiB/s",
        d / 1048576.0
    );
    for (k, rt) in runtimes.iter().enumerate() {
        let t = med(&mut tunnel[k]);
        println!(
            "through the hub, {:<9}      : {:>8.1} MiB/s  ratio {:.3}x  CPU s/GiB: hub {:.2}, agent {:.2}",
            rt.name(),
            t / 1048576.0,
            t / d,
            cpu[k][0],
            cpu[k][1]
        );
    }
    if !relayed.is_empty() {
        let t = med(&mut relayed);
        println!(
            "through 2 bare relays          : {:>8.1} MiB/s  ratio {:.3}x  CPU s/GiB: relay in the hub's place {:.2}, in the agent's {:.2}",
            t / 1048576.0,
            t / d,
            relay_cpu[0],
            relay_cpu[1]
        );
    }

    let mut paths = vec![echo];
    paths.extend(names.iter().map(|(_, e)| listener(e)));
    let mut path_names: Vec<&str> = runtimes.iter().map(|r| r.name()).collect();
    if let Some(chain) = &ref_echo {
        paths.push(chain[0].addr);
        path_names.push("bare relays");
    }
    // Two ways, both printed. One path at a time: the direct path then runs
    // on CPUs that go idle between round trips, as a lone client's would.
    // Interleaved, one round trip per path in turn: every path sees the same
    // moments, but the direct round trips run on CPUs kept awake by the
    // tunnelled ones, which makes the direct baseline much faster on a VM
    // whose idle CPUs wake slowly (and so the "added" figure larger).
    let sequential: Vec<Histogram<u64>> = paths
        .iter()
        .flat_map(|p| echo_latencies(&[*p], echoes))
        .collect();
    let interleaved = echo_latencies(&paths, echoes);
    for (how, hs) in [
        ("one path at a time", sequential),
        ("interleaved", interleaved),
    ] {
        let hd = &hs[0];
        println!("## 1 KiB echo latency ({echoes} round trips per path, {how}, µs)");
        println!("path               p50      p90      p99      max   added p50  added p99");
        let row = |name: &str, h: &Histogram<u64>| {
            println!(
                "{name:<16} {:>7.1}  {:>7.1}  {:>7.1}  {:>7.1}  {:>9.1}  {:>9.1}",
                us(h.value_at_quantile(0.5)),
                us(h.value_at_quantile(0.9)),
                us(h.value_at_quantile(0.99)),
                us(h.max()),
                us(h.value_at_quantile(0.5)) - us(hd.value_at_quantile(0.5)),
                us(h.value_at_quantile(0.99)) - us(hd.value_at_quantile(0.99)),
            );
        };
        row("direct", hd);
        for (name, ht) in path_names.iter().zip(&hs[1..]) {
            row(name, ht);
        }
    }
    if mesh {
        // Per runtime, one after the other: Redis, two meshed hubs, an agent
        // on hub-a; one flow into hub-b crosses the mesh to hub-a.
        drop(agents);
        drop(hubs);
        drop(ref_sink);
        drop(ref_echo);
        let ref_mesh = reference.then(|| mesh_shaped_chain(sink, thread_count, env.path()));
        if let Some(chain) = &ref_mesh {
            bulk_throughput(chain[0].addr, bytes / 8);
        }
        println!(
            "## one-flow throughput across the mesh ({} MiB per run, median of {RUNS})",
            bytes >> 20
        );
        for rt in &runtimes {
            let dir = env.path().join(format!("mesh-{}", rt.name()));
            std::fs::create_dir_all(&dir).unwrap();
            let redis = RedisProc::start(&dir);
            let (a, b, _, _) = meshed_pair_with(
                [*rt; 2],
                &env,
                "active",
                &redis,
                &Ca::new("bench mesh CA"),
                &|y| y.replace("tunnel:\n", &format!("tunnel:\n{}", windows("  "))) + &threads,
            );
            let id = format!("mesh-{}", rt.name());
            let agent = AgentProc::start_on(
                *rt,
                &dir,
                &id,
                &(env.agent_yaml(
                    &id,
                    &[dial(a.http)],
                    &[("ldap", sink)],
                    "log:\n  level: warn\n",
                ) + &windows("")
                    + &threads),
                &env.token(&id, None),
            );
            assert!(
                eventually(Duration::from_secs(20), || pair_ready(&a, &b)),
                "{} mesh cluster did not come up",
                rt.name()
            );
            if !delay.is_zero() {
                std::thread::sleep(Duration::from_millis(1500));
            }
            let via = b.listener("ldap");
            bulk_throughput(via, bytes / 8);
            let (mut d, mut m) = (Vec::new(), Vec::new());
            let pids = [b.proc.pid(), a.proc.pid(), agent.proc.pid()];
            let mut cpu = [0.0; 3];
            let mut r = Vec::new();
            let mut rcpu = [0.0; 3];
            // The bare relays in the hubs' and agent's places.
            let rpids: Vec<u32> = ref_mesh.iter().flatten().map(Relay::pid).collect();
            for _ in 0..RUNS {
                d.push(bulk_throughput(sink, bytes));
                measured_run(via, bytes, &pids, &mut m, &mut cpu);
                if let Some(chain) = &ref_mesh {
                    measured_run(chain[0].addr, bytes, &rpids, &mut r, &mut rcpu);
                }
            }
            let (d, m) = (med(&mut d), med(&mut m));
            if !r.is_empty() {
                let r = med(&mut r);
                println!(
                    "direct {:>8.1} MiB/s, through 3 bare relays (TLS between the first two): {:>8.1} MiB/s  ratio {:.3}x  CPU s/GiB: entry {:.2}, owner {:.2}, agent {:.2}",
                    d / 1048576.0,
                    r / 1048576.0,
                    r / d,
                    rcpu[0],
                    rcpu[1],
                    rcpu[2]
                );
            }
            println!(
                "direct {:>8.1} MiB/s, across the mesh ({:<9}): {:>8.1} MiB/s  ratio {:.3}x  CPU s/GiB: entry hub {:.2}, owner hub {:.2}, agent {:.2}",
                d / 1048576.0,
                rt.name(),
                m / 1048576.0,
                m / d,
                cpu[0],
                cpu[1],
                cpu[2]
            );
        }
    }
}
