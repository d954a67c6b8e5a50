//! One flow through a real hub and agent (separate processes) against a
//! direct loopback connection, measured in the same run: bulk throughput
//! (client → sink), 64 concurrent flows (aggregate, and the least flow
//! against its fair share) and 1 KiB echo latency.
//!
//! Each runtime (tokio and async-std by default) gets a hub and an agent of
//! its own, both on that runtime, so the runtimes are measured side by side
//! in one process. The run is `--rounds` rounds (3 by default); in each,
//! every workload runs once on every path, the paths in turn (the order
//! rotated by one each round). Figures are medians over the rounds with
//! [min–max]; ratios are taken per round, then their median.
//!
//! With `--mesh`, each runtime then also gets Redis, two meshed hubs and an
//! agent on hub-a, and one flow into hub-b is measured across the mesh,
//! then the 1 KiB echo across the mesh (against the echo service directly
//! and, with `--reference`, through mesh-shaped relays in front of it), one
//! path at a time.
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
//! With `--peers`, the same workloads also run through rathole and bore
//! (issue #24), each as a server process and a client process on loopback,
//! plain TCP between them, in the same rounds: client → peer server → peer
//! client → the same sink and echo service. Their binaries live in a cache
//! outside the repository (`$NOWCONNECT_PEERS_DIR`, else
//! `~/.cache/nowconnect/peers`) and are installed there with `cargo install`
//! when missing; the report names their versions, the install command and
//! the command lines and configuration they ran with.
//!
//! `--json PATH` also writes every per-round figure, the ratios and the
//! #24 targets as JSON.
//!
//!   cargo run --release -p nowconnect-tests --bin tunnel-bench -- [--bytes N] [--echoes N] [--rounds N] [--flows N] [--flow-secs S] [--runtimes tokio,async-std] [--mesh] [--reference] [--peers] [--json PATH] [--window BYTES] [--max-window BYTES] [--worker-threads N] [--delay-ms D]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nowconnect_tests::pki::Ca;
use nowconnect_tests::{
    AgentProc, Env, HubProc, Proc, RedisProc, Runtime, bulk_throughput, cpu_secs, delay_proxy,
    echo_once, echo_server, eventually, free_port, meshed_pair_with, pair_ready, wait_port,
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

/// One measured transfer of `bytes` to `addr`: its throughput (bytes/s)
/// and the CPU seconds per GiB each of `pids` used meanwhile.
fn measured_run(addr: SocketAddr, bytes: u64, pids: &[u32]) -> (f64, Vec<f64>) {
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let rate = bulk_throughput(addr, bytes);
    let gib = bytes as f64 / GIB;
    let cpu = pids
        .iter()
        .zip(before)
        .map(|(p, b)| (cpu_secs(*p) - b) / gib)
        .collect();
    (rate, cpu)
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// A sink like [`nowconnect_tests::sink_server`] (it reads until EOF, then
/// writes back the count as 8 little-endian bytes) whose connections also
/// keep a running count each, in the order they were accepted, so that the
/// bytes every flow delivers can be read while the flows run.
struct MeteredSink {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<AtomicU64>>>>,
}

impl MeteredSink {
    fn start() -> MeteredSink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
        let registry = conns.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().map_while(Result::ok) {
                let count = Arc::new(AtomicU64::new(0));
                registry.lock().unwrap().push(count.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut n = 0u64;
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                n += k as u64;
                                count.store(n, Ordering::Relaxed);
                            }
                        }
                    }
                    let _ = s.write_all(&n.to_le_bytes());
                });
            }
        });
        MeteredSink { addr, conns }
    }

    fn accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

/// What one run of concurrent flows gave.
struct FlowsRun {
    /// Bytes per second the sink got on all flows together over the window.
    aggregate: f64,
    /// The bytes of the flow that got least over the window ÷ the mean.
    min_share: f64,
    /// CPU seconds per GiB of each process, over the whole run.
    cpu: Vec<f64>,
}

/// The time every flow runs before the window opens.
const RAMP: Duration = Duration::from_millis(500);

/// `flows` concurrent flows to `addr` (a path to `sink`), each writing as
/// fast as it can. Once every flow has reached the sink and [`RAMP`] has
/// passed, the bytes the sink gets on each flow over `window`: their sum ÷
/// the window is the aggregate, the least ÷ the mean (the fair share) the
/// min share. Every flow is then closed and its count checked by the sink.
fn many_flows(
    addr: SocketAddr,
    sink: &MeteredSink,
    flows: usize,
    window: Duration,
    pids: &[u32],
) -> FlowsRun {
    let first = sink.accepted();
    let stop = Arc::new(AtomicBool::new(false));
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let clients: Vec<_> = (0..flows)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(Duration::from_secs(30)))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let buf = vec![0x5au8; 64 * 1024];
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut got = [0u8; 8];
                s.read_exact(&mut got)?;
                let got = u64::from_le_bytes(got);
                if got != sent {
                    return Err(std::io::Error::other(format!(
                        "the sink got {got} of {sent} bytes"
                    )));
                }
                Ok(sent)
            })
        })
        .collect();
    let all_in = eventually(Duration::from_secs(30), || sink.accepted() >= first + flows);
    if !all_in {
        stop.store(true, Ordering::Relaxed);
        panic!(
            "{addr}: {} of {flows} flows reached the sink within 30 s",
            sink.accepted() - first
        );
    }
    std::thread::sleep(RAMP);
    let counters: Vec<Arc<AtomicU64>> = sink.conns.lock().unwrap()[first..first + flows].to_vec();
    let read = || -> Vec<u64> { counters.iter().map(|c| c.load(Ordering::Relaxed)).collect() };
    let (t0, c0) = (Instant::now(), read());
    std::thread::sleep(window);
    let (c1, secs) = (read(), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    for c in clients {
        total += c
            .join()
            .expect("flow thread")
            .unwrap_or_else(|e| panic!("a flow through {addr} failed: {e}"));
    }
    let gib = total as f64 / GIB;
    let cpu = pids
        .iter()
        .zip(before)
        .map(|(p, b)| (cpu_secs(*p) - b) / gib)
        .collect();
    let got: Vec<u64> = c1.iter().zip(&c0).map(|(a, b)| a - b).collect();
    let sum: u64 = got.iter().sum();
    let least = got.iter().copied().min().unwrap_or(0);
    FlowsRun {
        aggregate: sum as f64 / secs,
        min_share: least as f64 / (sum as f64 / flows as f64),
        cpu,
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

/// A peer tunnel (issue #24) crate on crates.io and how it is installed.
struct PeerCrate {
    /// The binary `cargo install` puts in `<root>/bin`.
    bin: &'static str,
    /// `name@version`: the latest release of the series #24 names.
    spec: &'static str,
    /// `--locked` where the crate's lockfile builds with this toolchain.
    /// rathole 0.5.0's pins `time` 0.3.29, which no longer compiles
    /// (E0282 since Rust 1.80), so it resolves its dependencies afresh.
    locked: bool,
}

const PEER_CRATES: [PeerCrate; 2] = [
    PeerCrate {
        bin: "rathole",
        spec: "rathole@0.5.0",
        locked: false,
    },
    PeerCrate {
        bin: "bore",
        spec: "bore-cli@0.6.0",
        locked: true,
    },
];

/// Where the peers' binaries are kept: outside the repository.
fn peer_root() -> PathBuf {
    if let Some(d) = std::env::var_os("NOWCONNECT_PEERS_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").expect("HOME (or NOWCONNECT_PEERS_DIR) is not set");
    Path::new(&home).join(".cache/nowconnect/peers")
}

/// The peers' binaries, installed if missing, with what `--version` says.
struct PeerBins {
    rathole: PathBuf,
    bore: PathBuf,
    /// The command that installs each (run in this run or before it).
    install: Vec<String>,
    /// Whether this run installed any.
    installed_now: bool,
    versions: Vec<(String, String)>,
}

fn peers_installed() -> PeerBins {
    let root = peer_root();
    let mut install = Vec::new();
    let mut installed_now = false;
    for c in &PEER_CRATES {
        let mut args = vec!["-n", "10", "cargo", "install"];
        if c.locked {
            args.push("--locked");
        }
        let root_s = root.display().to_string();
        args.extend(["--root", &root_s, c.spec]);
        let line = format!("nice {}", args.join(" "));
        if !root.join("bin").join(c.bin).exists() {
            eprintln!("installing {}: {line}", c.spec);
            let mut child = Command::new("nice")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("run cargo install");
            // Bounded: a cold build of either takes a few minutes.
            let end = Instant::now() + Duration::from_secs(1800);
            let status = loop {
                if let Some(st) = child.try_wait().expect("cargo install") {
                    break st;
                }
                if Instant::now() > end {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("`{line}` did not finish within 30 minutes");
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            assert!(status.success(), "`{line}` failed");
            installed_now = true;
        }
        install.push(line);
    }
    let bin = |name: &str| root.join("bin").join(name);
    let versions = PEER_CRATES
        .iter()
        .map(|c| {
            let out = Command::new(bin(c.bin))
                .arg("--version")
                .output()
                .unwrap_or_else(|e| panic!("{} --version: {e}", bin(c.bin).display()));
            // rathole prints a block (`Build Version: 0.5.0`, `cargo
            // Features: …`), bore one line (`bore-cli 0.6.0`).
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            let v = match (field("Build Version:"), field("cargo Features:")) {
                (Some(v), Some(f)) => format!("{} {v} (features: {f})", c.bin),
                (Some(v), None) => format!("{} {v}", c.bin),
                _ => text.lines().next().unwrap_or("").trim().to_string(),
            };
            (c.bin.to_string(), v)
        })
        .collect();
    PeerBins {
        rathole: bin("rathole"),
        bore: bin("bore"),
        install,
        installed_now,
        versions,
    }
}

/// A peer tunnel running in front of the sink and the echo service.
struct Peer {
    name: &'static str,
    sink: SocketAddr,
    echo: SocketAddr,
    /// Its processes (killed on drop), the one carrying sink flows by role.
    procs: Vec<Proc>,
    roles: Vec<(String, usize)>,
    /// The command lines it was started with, and its configuration files.
    commands: Vec<String>,
    files: Vec<(String, String)>,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn secret() -> String {
    (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// `TOKIO_WORKER_THREADS=N` for a peer (both are `#[tokio::main]`) when the
/// bench pins worker threads; the prefix shown in its command line.
fn peer_threads(cmd: &mut Command, threads: Option<usize>) -> String {
    match threads {
        Some(n) => {
            cmd.env("TOKIO_WORKER_THREADS", n.to_string());
            format!("TOKIO_WORKER_THREADS={n} ")
        }
        None => String::new(),
    }
}

/// A rathole server and client: services `sink` and `echo` on the server,
/// forwarded by the client to the targets; plain TCP transport (rathole's
/// default; no TLS or Noise, as the bench's hubs are plain `ws://`), log
/// level `warn` as the hubs and agents.
fn start_rathole(
    bin: &Path,
    dir: &Path,
    sink: SocketAddr,
    echo: SocketAddr,
    threads: Option<usize>,
) -> Peer {
    let dir = dir.join("rathole");
    std::fs::create_dir_all(&dir).unwrap();
    let control = loopback(free_port());
    let (psink, pecho) = (loopback(free_port()), loopback(free_port()));
    let token = secret();
    let server_toml = format!(
        "[server]\nbind_addr = \"{control}\"\ndefault_token = \"{token}\"\n\n[server.transport]\ntype = \"tcp\"\n\n[server.services.sink]\nbind_addr = \"{psink}\"\n\n[server.services.echo]\nbind_addr = \"{pecho}\"\n"
    );
    let client_toml = format!(
        "[client]\nremote_addr = \"{control}\"\ndefault_token = \"{token}\"\n\n[client.transport]\ntype = \"tcp\"\n\n[client.services.sink]\nlocal_addr = \"{sink}\"\n\n[client.services.echo]\nlocal_addr = \"{echo}\"\n"
    );
    let (sp, cp) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(&sp, &server_toml).unwrap();
    std::fs::write(&cp, &client_toml).unwrap();
    let mut commands = Vec::new();
    let mut start = |name: &str, mode: &str, file: &Path| {
        let mut cmd = Command::new(bin);
        let prefix = peer_threads(&mut cmd, threads);
        cmd.env("RUST_LOG", "warn").arg(mode).arg(file);
        commands.push(format!(
            "{prefix}RUST_LOG=warn {} {mode} {}",
            bin.display(),
            file.display()
        ));
        Proc::spawn(name, cmd, &dir)
    };
    let server = start("rathole-server", "--server", &sp);
    assert!(
        wait_port(control, Duration::from_secs(10)),
        "rathole server not listening on {control}; log:\n{}",
        server.log_text()
    );
    let client = start("rathole-client", "--client", &cp);
    assert!(
        eventually(Duration::from_secs(20), || echo_once(pecho, b"rathole up")),
        "no echo through rathole within 20 s; server log:\n{}\nclient log:\n{}",
        server.log_text(),
        client.log_text()
    );
    assert!(wait_port(psink, Duration::from_secs(10)));
    Peer {
        name: "rathole",
        sink: psink,
        echo: pecho,
        procs: vec![server, client],
        roles: vec![("server".into(), 0), ("client".into(), 1)],
        commands,
        files: vec![
            (
                "server.toml".into(),
                server_toml.replace(&token, "<random per run>"),
            ),
            (
                "client.toml".into(),
                client_toml.replace(&token, "<random per run>"),
            ),
        ],
    }
}

/// bore's control port: fixed in bore (`CONTROL_PORT`), not configurable.
const BORE_CONTROL_PORT: u16 = 7835;

/// `s` without ANSI colour sequences (bore's log is coloured).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A bore server on loopback and one `bore local` per target (bore forwards
/// one port per client); each client's public port is read from its log
/// (`listening at 127.0.0.1:PORT`). bore logs at `info` (it reads no
/// `RUST_LOG`), one line per connection.
fn start_bore(
    bin: &Path,
    dir: &Path,
    sink: SocketAddr,
    echo: SocketAddr,
    threads: Option<usize>,
) -> Peer {
    let dir = dir.join("bore");
    std::fs::create_dir_all(&dir).unwrap();
    let control = loopback(BORE_CONTROL_PORT);
    assert!(
        TcpListener::bind(control).is_ok(),
        "{control} (bore's fixed control port) is taken: is another bore server running?"
    );
    let key = secret();
    let mut commands = Vec::new();
    let mut start = |name: &str, args: &[String]| {
        let mut cmd = Command::new(bin);
        let prefix = peer_threads(&mut cmd, threads);
        cmd.args(args).args(["--secret", &key]);
        commands.push(format!(
            "{prefix}{} {} --secret <random per run>",
            bin.display(),
            args.join(" ")
        ));
        Proc::spawn(name, cmd, &dir)
    };
    // Tunnel ports above Linux's ephemeral range (32768–60999).
    let server = start(
        "bore-server",
        &[
            "server".into(),
            "--min-port".into(),
            "61000".into(),
            "--max-port".into(),
            "65000".into(),
            "--bind-addr".into(),
            "127.0.0.1".into(),
        ],
    );
    assert!(
        wait_port(control, Duration::from_secs(10)),
        "bore server not listening on {control}; log:\n{}",
        server.log_text()
    );
    let mut local = |name: &str, to: SocketAddr| -> (Proc, SocketAddr) {
        let p = start(
            name,
            &[
                "local".into(),
                to.port().to_string(),
                "--local-host".into(),
                to.ip().to_string(),
                "--to".into(),
                "127.0.0.1".into(),
            ],
        );
        let mut port = None;
        let found = eventually(Duration::from_secs(10), || {
            let lines = p.stdout_lines.lock().unwrap();
            port = lines.iter().find_map(|l| {
                let l = strip_ansi(l);
                let (_, rest) = l.split_once("listening at ")?;
                rest.trim().rsplit_once(':')?.1.parse::<u16>().ok()
            });
            port.is_some()
        });
        assert!(
            found,
            "{name}: no `listening at` line within 10 s; stdout:\n{}\nstderr:\n{}",
            p.stdout_lines.lock().unwrap().join("\n"),
            p.log_text()
        );
        (p, loopback(port.unwrap()))
    };
    let (sink_client, psink) = local("bore-local-sink", sink);
    let (echo_client, pecho) = local("bore-local-echo", echo);
    assert!(
        eventually(Duration::from_secs(20), || echo_once(pecho, b"bore up")),
        "no echo through bore within 20 s; server log:\n{}",
        server.log_text()
    );
    Peer {
        name: "bore",
        sink: psink,
        echo: pecho,
        procs: vec![server, sink_client, echo_client],
        roles: vec![("server".into(), 0), ("client".into(), 1)],
        commands,
        files: Vec::new(),
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// A path the workloads run through, and its per-round figures.
struct BenchPath {
    name: String,
    sink: SocketAddr,
    echo: SocketAddr,
    /// The processes carrying its sink flows, by role, for CPU s/GiB.
    procs: Vec<(String, u32)>,
    /// One-flow throughput (bytes/s) and each process's CPU s/GiB.
    one_flow: Vec<f64>,
    one_flow_cpu: Vec<Vec<f64>>,
    /// Concurrent flows: aggregate (bytes/s), least flow ÷ fair share, CPU.
    flows: Vec<f64>,
    min_share: Vec<f64>,
    flows_cpu: Vec<Vec<f64>>,
    /// 1 KiB echo, µs.
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl BenchPath {
    fn new(name: &str, sink: SocketAddr, echo: SocketAddr, procs: Vec<(String, u32)>) -> Self {
        BenchPath {
            name: name.to_string(),
            sink,
            echo,
            procs,
            one_flow: Vec::new(),
            one_flow_cpu: Vec::new(),
            flows: Vec::new(),
            min_share: Vec::new(),
            flows_cpu: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|(_, p)| *p).collect()
    }

    fn is_nowconnect(&self) -> bool {
        self.name.starts_with("NowConnect")
    }
}

/// Median, least and greatest of per-round figures.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

fn median(v: &[f64]) -> f64 {
    stats(v).0
}

/// `median [min–max]` of `v` scaled by `scale`, `prec` decimals.
fn spread(v: &[f64], scale: f64, prec: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, lo, hi) = stats(v);
    format!(
        "{:.prec$} [{:.prec$}–{:.prec$}]",
        m / scale,
        lo / scale,
        hi / scale
    )
}

fn per_round(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// `a` minus `b`, round by round.
fn per_round_minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Per-process CPU s/GiB, the median over rounds of each.
fn cpu_medians(rounds: &[Vec<f64>], roles: &[(String, u32)]) -> String {
    roles
        .iter()
        .enumerate()
        .map(|(i, (role, _))| {
            let v: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
            format!("{role} {:.2}", median(&v))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The load averages, as `/proc/loadavg` gives them (1, 5, 15 minutes).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU seconds all CPUs of the machine have spent busy since boot, from
/// the first line of `/proc/stat` (in USER_HZ, 100 per second on Linux).
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal: all but idle, iowait.
    (at(0) + at(1) + at(2) + at(5) + at(6) + at(7)) as f64 / 100.0
}

/// CPU seconds of this process and its live children (every process the
/// bench starts is its direct child).
fn own_cpu_secs() -> f64 {
    let me = std::process::id();
    let children: f64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(me)
        })
        .map(cpu_secs)
        .sum();
    cpu_secs(me) + children
}

/// What the rest of the machine used while the bench ran: CPUs kept busy
/// by other processes on average, from the machine's busy time less the
/// bench's own (its own threads, sink, echo and every process it started).
struct OthersMeter {
    at: Instant,
    busy: f64,
    own: f64,
}

impl OthersMeter {
    fn start() -> OthersMeter {
        OthersMeter {
            at: Instant::now(),
            busy: machine_busy_secs(),
            own: own_cpu_secs(),
        }
    }

    /// Other processes' CPUs busy since `start`, on average.
    fn cpus(&self) -> f64 {
        let busy = machine_busy_secs() - self.busy;
        let own = own_cpu_secs() - self.own;
        ((busy - own) / self.at.elapsed().as_secs_f64()).max(0.0)
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default()
}

/// One of issue #24's targets for one NowConnect path.
struct Target {
    what: String,
    /// Per-round values (ratios, or the min share).
    values: Vec<f64>,
    goal: f64,
    /// Met when the figure is at least `goal` (else at most).
    at_least: bool,
    /// Judged on the worst round rather than the median.
    worst: bool,
}

impl Target {
    fn figure(&self) -> f64 {
        let (m, lo, hi) = stats(&self.values);
        match (self.worst, self.at_least) {
            (false, _) => m,
            (true, true) => lo,
            (true, false) => hi,
        }
    }

    fn met(&self) -> bool {
        let f = self.figure();
        if self.at_least {
            f >= self.goal
        } else {
            f <= self.goal
        }
    }
}

fn main() {
    let mut bytes: u64 = 2 * 1024 * 1024 * 1024;
    let mut echoes = 20_000;
    let mut rounds = 3;
    let mut flows = 64;
    let mut flow_secs = 5.0;
    let mut window: u32 = 256 * 1024;
    // Unset: the binaries' default (4 MiB), and no key in their files, so
    // that binaries from before window growth run too.
    let mut max_window: Option<u32> = None;
    let mut mesh = false;
    let mut threads = String::new();
    let mut thread_count: Option<usize> = None;
    let mut reference = false;
    let mut peers = false;
    let mut json_out: Option<PathBuf> = None;
    let mut delay = Duration::ZERO;
    let mut runtimes = vec![Runtime::Tokio, Runtime::AsyncStd];
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--bytes" => bytes = args[i + 1].parse().expect("--bytes N"),
            "--echoes" => echoes = args[i + 1].parse().expect("--echoes N"),
            "--rounds" => rounds = args[i + 1].parse().expect("--rounds N"),
            "--flows" => flows = args[i + 1].parse().expect("--flows N (0: none)"),
            "--flow-secs" => flow_secs = args[i + 1].parse().expect("--flow-secs S"),
            "--json" => json_out = Some(PathBuf::from(&args[i + 1])),
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
            "--peers" => {
                peers = true;
                i += 1;
                continue;
            }
            "--runtimes" | "--agents" => runtimes = Runtime::parse_list(&args[i + 1]),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    assert!(rounds >= 1, "--rounds must be at least 1");
    assert!(
        !peers || delay.is_zero(),
        "--peers with --delay-ms: bore's control port is fixed, so its client cannot dial through the delay proxy"
    );
    let flow_window = Duration::from_secs_f64(flow_secs);
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
    // Installed (if missing) before anything runs, so that no build
    // overlaps a measurement.
    let peer_bins = peers.then(peers_installed);
    let load_before = loadavg();
    let env = Env::new();
    let sink = MeteredSink::start();
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
            &[(s.as_str(), sink.addr), (e.as_str(), echo)],
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
    let ref_sink = reference.then(|| hub_shaped_chain(sink.addr, thread_count));
    let ref_echo = reference.then(|| hub_shaped_chain(echo, thread_count));
    let peer_procs: Vec<Peer> = match &peer_bins {
        Some(b) => vec![
            start_rathole(&b.rathole, env.path(), sink.addr, echo, thread_count),
            start_bore(&b.bore, env.path(), sink.addr, echo, thread_count),
        ],
        None => Vec::new(),
    };

    let mut paths = vec![BenchPath::new("direct", sink.addr, echo, Vec::new())];
    for (k, (rt, (s, e))) in runtimes.iter().zip(&names).enumerate() {
        paths.push(BenchPath::new(
            &format!("NowConnect {}", rt.name()),
            listener(s),
            listener(e),
            vec![
                ("hub".into(), hubs[k].proc.pid()),
                ("agent".into(), agents[k].proc.pid()),
            ],
        ));
    }
    if let (Some(s), Some(e)) = (&ref_sink, &ref_echo) {
        paths.push(BenchPath::new(
            "bare relays",
            s[0].addr,
            e[0].addr,
            vec![
                ("relay in the hub's place".into(), s[0].pid()),
                ("in the agent's".into(), s[1].pid()),
            ],
        ));
    }
    for p in &peer_procs {
        paths.push(BenchPath::new(
            p.name,
            p.sink,
            p.echo,
            p.roles
                .iter()
                .map(|(r, i)| (r.clone(), p.procs[*i].pid()))
                .collect(),
        ));
    }

    // Warm up every path, then the rounds: each workload on every path in
    // turn, the order rotated by one each round.
    for p in &paths {
        bulk_throughput(p.sink, bytes / 8);
    }
    let n = paths.len();
    let mut round_loads = Vec::new();
    let mut round_others = Vec::new();
    let started = Instant::now();
    let whole_run = OthersMeter::start();
    for round in 0..rounds {
        round_loads.push(loadavg());
        let this_round = OthersMeter::start();
        let order: Vec<usize> = (0..n).map(|k| (k + round) % n).collect();
        for &k in &order {
            let p = &mut paths[k];
            let (rate, cpu) = measured_run(p.sink, bytes, &p.pids());
            p.one_flow.push(rate);
            p.one_flow_cpu.push(cpu);
        }
        if flows > 0 {
            for &k in &order {
                let p = &mut paths[k];
                let r = many_flows(p.sink, &sink, flows, flow_window, &p.pids());
                p.flows.push(r.aggregate);
                p.min_share.push(r.min_share);
                p.flows_cpu.push(r.cpu);
            }
        }
        // One path at a time: the direct path then runs on CPUs that go
        // idle between round trips, as a lone client's would.
        for &k in &order {
            let p = &mut paths[k];
            let h = &echo_latencies(&[p.echo], echoes)[0];
            p.p50.push(us(h.value_at_quantile(0.5)));
            p.p99.push(us(h.value_at_quantile(0.99)));
        }
        round_others.push(this_round.cpus());
        eprintln!(
            "round {} of {rounds} done after {:.0} s; other processes kept {:.2} CPUs busy",
            round + 1,
            started.elapsed().as_secs_f64(),
            round_others[round]
        );
    }
    // Interleaved, one round trip per path in turn: every path sees the
    // same moments, but the direct round trips run on CPUs kept awake by
    // the tunnelled ones, which makes the direct baseline much faster on a
    // VM whose idle CPUs wake slowly (and so the "added" figure larger).
    let interleaved = echo_latencies(&paths.iter().map(|p| p.echo).collect::<Vec<_>>(), echoes);
    let load_after = loadavg();
    let others_cpus = whole_run.cpus();

    let mut md = String::new();
    let mut line = |s: String| {
        md += &s;
        md.push('\n');
    };
    line("# tunnel-bench".into());
    line(String::new());
    line(format!(
        "Machine: {} × {}; {rounds} rounds in {:.0} s. Other processes kept {others_cpus:.2} CPUs busy on average over the rounds (per round: {}). Load average (1, 5, 15 min; it counts the bench's own runnable threads, up to 2 × flows) before the run {load_before}, at each round's start {}, after {load_after}.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        started.elapsed().as_secs_f64(),
        round_others
            .iter()
            .map(|c| format!("{c:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        round_loads.join(" / "),
    ));
    line(String::new());
    if !delay.is_zero() {
        let rtt = 2.0 * delay.as_secs_f64();
        line(format!(
            "Agent to hub: {} ms each way (round trip {:.0} ms); a flow's ceiling, window / round trip: {:.1} MiB/s at the starting window, {:.1} MiB/s at the most it may grow to.",
            delay.as_millis(),
            rtt * 1000.0,
            f64::from(window) / rtt / MIB,
            f64::from(max_window) / rtt / MIB
        ));
        line(String::new());
    }
    line(format!(
        "Per-flow window: {window} bytes, growing up to {max_window}; {}; hub and agent on: {}.",
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
    ));
    line(String::new());
    if let Some(b) = &peer_bins {
        line(format!(
            "Peers: {} ({}, cached in {}). Install: {}.",
            b.versions
                .iter()
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if b.installed_now {
                "installed by this run"
            } else {
                "already installed"
            },
            peer_root().display(),
            b.install
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(" and ")
        ));
        line(String::new());
        for p in &peer_procs {
            line(format!("{} started as:", p.name));
            line(String::new());
            for c in &p.commands {
                line(format!("    {c}"));
            }
            for (f, text) in &p.files {
                line(String::new());
                line(format!("    # {f}"));
                for l in text.lines() {
                    line(if l.is_empty() {
                        String::new()
                    } else {
                        format!("    {l}")
                    });
                }
            }
            line(String::new());
        }
    }
    let d = 0; // the direct path
    line(format!(
        "## One flow ({} MiB per transfer; median of {rounds} rounds [min–max])",
        bytes >> 20
    ));
    line(String::new());
    line("| path | MiB/s | ÷ direct | CPU s/GiB |".into());
    line("|---|---|---|---|".into());
    for p in &paths {
        line(format!(
            "| {} | {} | {} | {} |",
            p.name,
            spread(&p.one_flow, MIB, 1),
            spread(&per_round(&p.one_flow, &paths[d].one_flow), 1.0, 3),
            cpu_medians(&p.one_flow_cpu, &p.procs)
        ));
    }
    line(String::new());
    if flows > 0 {
        line(format!(
            "## {flows} concurrent flows ({flow_secs} s window after {} ms; median of {rounds} rounds [min–max])",
            RAMP.as_millis()
        ));
        line(String::new());
        line("| path | aggregate MiB/s | ÷ direct | least flow ÷ fair share | CPU s/GiB |".into());
        line("|---|---|---|---|---|".into());
        for p in &paths {
            line(format!(
                "| {} | {} | {} | {} | {} |",
                p.name,
                spread(&p.flows, MIB, 1),
                spread(&per_round(&p.flows, &paths[d].flows), 1.0, 3),
                spread(&p.min_share, 1.0, 3),
                cpu_medians(&p.flows_cpu, &p.procs)
            ));
        }
        line(String::new());
    }
    line(format!(
        "## 1 KiB echo ({echoes} round trips per path per round, one path at a time, µs; median of {rounds} rounds [min–max])"
    ));
    line(String::new());
    line("| path | p50 | p99 | added p50 | added p99 |".into());
    line("|---|---|---|---|---|".into());
    for p in &paths {
        line(format!(
            "| {} | {} | {} | {} | {} |",
            p.name,
            spread(&p.p50, 1.0, 1),
            spread(&p.p99, 1.0, 1),
            spread(&per_round_minus(&p.p50, &paths[d].p50), 1.0, 1),
            spread(&per_round_minus(&p.p99, &paths[d].p99), 1.0, 1)
        ));
    }
    line(String::new());
    line(format!(
        "## 1 KiB echo, interleaved ({echoes} round trips per path, one to each path in turn, once, µs)"
    ));
    line(String::new());
    line("| path | p50 | p90 | p99 | max |".into());
    line("|---|---|---|---|---|".into());
    for (p, h) in paths.iter().zip(&interleaved) {
        line(format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            p.name,
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.9)),
            us(h.value_at_quantile(0.99)),
            us(h.max())
        ));
    }
    line(String::new());

    // NowConnect ÷ each other path, per round, then the median.
    let others: Vec<usize> = (1..n).filter(|k| !paths[*k].is_nowconnect()).collect();
    let mut ratio_json = Vec::new();
    let mut targets: Vec<(String, Target)> = Vec::new();
    if !others.is_empty() {
        line(format!(
            "## NowConnect ÷ each other path (per round, then the median of {rounds} [min–max]; for latency below 1 is better)"
        ));
        line(String::new());
        line("| path | ÷ | one flow | concurrent flows | echo p50 | echo p99 |".into());
        line("|---|---|---|---|---|---|".into());
    }
    for a in paths.iter().filter(|p| p.is_nowconnect()) {
        for &k in &others {
            let b = &paths[k];
            let r = [
                per_round(&a.one_flow, &b.one_flow),
                per_round(&a.flows, &b.flows),
                per_round(&a.p50, &b.p50),
                per_round(&a.p99, &b.p99),
            ];
            line(format!(
                "| {} | {} | {} | {} | {} | {} |",
                a.name,
                b.name,
                spread(&r[0], 1.0, 3),
                spread(&r[1], 1.0, 3),
                spread(&r[2], 1.0, 3),
                spread(&r[3], 1.0, 3)
            ));
            ratio_json.push(serde_json::json!({
                "path": a.name, "over": b.name,
                "one_flow": r[0], "flows": r[1], "echo_p50": r[2], "echo_p99": r[3],
                "median": {"one_flow": median(&r[0]), "flows": median(&r[1]),
                           "echo_p50": median(&r[2]), "echo_p99": median(&r[3])},
            }));
            let t = |what: String, values: &Vec<f64>, goal, at_least| Target {
                what,
                values: values.clone(),
                goal,
                at_least,
                worst: false,
            };
            match b.name.as_str() {
                "rathole" | "bore" => {
                    targets.push((
                        a.name.clone(),
                        t(format!("echo p50 ÷ {}", b.name), &r[2], 1.0, false),
                    ));
                    targets.push((
                        a.name.clone(),
                        t(format!("echo p99 ÷ {}", b.name), &r[3], 1.0, false),
                    ));
                    targets.push((
                        a.name.clone(),
                        t(format!("one flow ÷ {}", b.name), &r[0], 1.6, true),
                    ));
                }
                "bare relays" => {
                    targets.push((
                        a.name.clone(),
                        t("one flow ÷ bare relays".into(), &r[0], 0.9, true),
                    ));
                    if flows > 0 {
                        targets.push((
                            a.name.clone(),
                            t(
                                format!("{flows} flows aggregate ÷ bare relays"),
                                &r[1],
                                0.85,
                                true,
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
        if flows > 0 {
            targets.push((
                a.name.clone(),
                Target {
                    what: format!("least of {flows} flows ÷ fair share (worst round)"),
                    values: a.min_share.clone(),
                    goal: 0.5,
                    at_least: true,
                    worst: true,
                },
            ));
        }
    }
    if !others.is_empty() {
        line(String::new());
    }
    if !targets.is_empty() {
        line("## Issue #24 targets (the median of the per-round ratios unless marked)".into());
        line(String::new());
        line("| path | figure | goal | value [min–max] | |".into());
        line("|---|---|---|---|---|".into());
        for (path, t) in &targets {
            line(format!(
                "| {path} | {} | {} {} | {:.3} [{}] | {} |",
                t.what,
                if t.at_least { "≥" } else { "≤" },
                t.goal,
                t.figure(),
                {
                    let (_, lo, hi) = stats(&t.values);
                    format!("{lo:.3}–{hi:.3}")
                },
                if t.met() { "met" } else { "not met" }
            ));
        }
        line(String::new());
    }
    print!("{md}");
    if let Some(out) = &json_out {
        let path_json: Vec<serde_json::Value> = paths
            .iter()
            .zip(&interleaved)
            .map(|(p, h)| {
                serde_json::json!({
                    "name": p.name,
                    "processes": p.procs.iter().map(|(r, _)| r).collect::<Vec<_>>(),
                    "one_flow_bytes_per_sec": p.one_flow,
                    "one_flow_cpu_s_per_gib": p.one_flow_cpu,
                    "flows_aggregate_bytes_per_sec": p.flows,
                    "flows_min_share": p.min_share,
                    "flows_cpu_s_per_gib": p.flows_cpu,
                    "echo_p50_us": p.p50,
                    "echo_p99_us": p.p99,
                    "median": {
                        "one_flow_mib_per_sec": median(&p.one_flow) / MIB,
                        "flows_aggregate_mib_per_sec": median(&p.flows) / MIB,
                        "flows_min_share": median(&p.min_share),
                        "echo_p50_us": median(&p.p50),
                        "echo_p99_us": median(&p.p99),
                    },
                    "interleaved_echo_us": {
                        "p50": us(h.value_at_quantile(0.5)),
                        "p90": us(h.value_at_quantile(0.9)),
                        "p99": us(h.value_at_quantile(0.99)),
                        "max": us(h.max()),
                    },
                })
            })
            .collect();
        let v = serde_json::json!({
            "machine": {
                "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
                "cpu_model": cpu_model(),
                "load_before": load_before,
                "load_at_rounds": round_loads,
                "other_processes_cpus": others_cpus,
                "other_processes_cpus_per_round": round_others,
                "load_after": load_after,
            },
            "settings": {
                "bytes": bytes, "echoes": echoes, "rounds": rounds, "flows": flows,
                "flow_secs": flow_secs, "ramp_ms": RAMP.as_millis() as u64,
                "window": window, "max_window": max_window,
                "worker_threads": thread_count, "delay_ms": delay.as_millis() as u64,
                "runtimes": runtimes.iter().map(|r| r.name()).collect::<Vec<_>>(),
                "reference": reference, "peers": peers,
            },
            "peers": peer_bins.as_ref().map(|b| serde_json::json!({
                "versions": b.versions.iter().map(|(n, v)| (n.clone(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
                "install": b.install,
                "installed_by_this_run": b.installed_now,
                "cache": peer_root(),
                "commands": peer_procs.iter().map(|p| (p.name.to_string(), serde_json::json!({
                    "commands": p.commands,
                    "files": p.files.iter().map(|(f, t)| (f.clone(), t.clone())).collect::<std::collections::BTreeMap<_, _>>(),
                }))).collect::<std::collections::BTreeMap<_, _>>(),
            })),
            "paths": path_json,
            "ratios": ratio_json,
            "targets": targets.iter().map(|(p, t)| serde_json::json!({
                "path": p, "what": t.what, "goal": t.goal,
                "at_least": t.at_least, "judged_on_worst_round": t.worst,
                "values": t.values, "figure": t.figure(), "met": t.met(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(out, serde_json::to_string_pretty(&v).unwrap()).expect("write --json");
    }
    drop(peer_procs);
    if mesh {
        // Per runtime, one after the other: Redis, two meshed hubs, an agent
        // on hub-a; one flow into hub-b crosses the mesh to hub-a.
        drop(agents);
        drop(hubs);
        drop(ref_sink);
        drop(ref_echo);
        let ref_mesh = reference.then(|| mesh_shaped_chain(sink.addr, thread_count, env.path()));
        if let Some(chain) = &ref_mesh {
            bulk_throughput(chain[0].addr, bytes / 8);
        }
        // The same shape in front of the echo service, for echo across the
        // mesh against relays (#24: p99 at most the relays' + 100 µs).
        let ref_mesh_echo = reference.then(|| {
            let dir = env.path().join("reference-echo");
            std::fs::create_dir_all(&dir).unwrap();
            mesh_shaped_chain(echo, thread_count, &dir)
        });
        let mut mesh_echo_lines = Vec::new();
        println!(
            "## One flow across the mesh ({} MiB per transfer, median of {rounds} rounds)",
            bytes >> 20
        );
        println!();
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
                &|y| {
                    y.replace("tunnel:\n", &format!("tunnel:\n{}", windows("  ")))
                        .replace(
                            "listeners:\n",
                            "listeners:\n  - { name: echo, bind: '127.0.0.1:0', connector: echo }\n",
                        )
                        + &threads
                },
            );
            let id = format!("mesh-{}", rt.name());
            let agent = AgentProc::start_on(
                *rt,
                &dir,
                &id,
                &(env.agent_yaml(
                    &id,
                    &[dial(a.http)],
                    &[("ldap", sink.addr), ("echo", echo)],
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
            let (mut d, mut m, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
            let pids = [b.proc.pid(), a.proc.pid(), agent.proc.pid()];
            let (mut r, mut rcpu) = (Vec::new(), Vec::new());
            // The bare relays in the hubs' and agent's places.
            let rpids: Vec<u32> = ref_mesh.iter().flatten().map(Relay::pid).collect();
            for _ in 0..rounds {
                d.push(bulk_throughput(sink.addr, bytes));
                let (rate, c) = measured_run(via, bytes, &pids);
                m.push(rate);
                cpu.push(c);
                if let Some(chain) = &ref_mesh {
                    let (rate, c) = measured_run(chain[0].addr, bytes, &rpids);
                    r.push(rate);
                    rcpu.push(c);
                }
            }
            let cpu_of = |rounds: &[Vec<f64>], i: usize| {
                median(&rounds.iter().map(|c| c[i]).collect::<Vec<_>>())
            };
            let (d, m) = (median(&d), median(&m));
            let cpu: Vec<f64> = (0..3).map(|i| cpu_of(&cpu, i)).collect();
            if !r.is_empty() {
                let r = median(&r);
                let rcpu: Vec<f64> = (0..3).map(|i| cpu_of(&rcpu, i)).collect();
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
            mesh_echo_lines.extend(mesh_echo(
                rt.name(),
                b.listener("echo"),
                echo,
                ref_mesh_echo.as_ref().map(|c| c[0].addr),
                echoes,
                rounds,
            ));
        }
        println!();
        println!(
            "## 1 KiB echo across the mesh ({echoes} round trips per path per round, one path at a time, µs; median of {rounds} rounds [min–max])"
        );
        println!();
        for l in mesh_echo_lines {
            println!("{l}");
        }
    }
}

/// Echo across the mesh (into hub-b, agent on hub-a) against the echo
/// service directly and, when given, through the mesh-shaped bare relays:
/// one path at a time, the order rotated each round. The table's rows, then
/// #24's target on the added p99.
fn mesh_echo(
    rt: &str,
    via: SocketAddr,
    echo: SocketAddr,
    relays: Option<SocketAddr>,
    echoes: usize,
    rounds: usize,
) -> Vec<String> {
    let mut paths: Vec<(String, SocketAddr)> = vec![
        ("direct".into(), echo),
        (format!("NowConnect {rt} across the mesh"), via),
    ];
    if let Some(r) = relays {
        paths.push(("3 bare relays (TLS between the first two)".into(), r));
    }
    let (mut p50, mut p99) = (vec![Vec::new(); paths.len()], vec![Vec::new(); paths.len()]);
    for round in 0..rounds {
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let h = &echo_latencies(&[paths[i].1], echoes)[0];
            p50[i].push(us(h.value_at_quantile(0.5)));
            p99[i].push(us(h.value_at_quantile(0.99)));
        }
    }
    let mut lines = vec![
        "| path | p50 | p99 | added p99 over direct |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    for (i, (name, _)) in paths.iter().enumerate() {
        lines.push(format!(
            "| {name} | {} | {} | {} |",
            spread(&p50[i], 1.0, 1),
            spread(&p99[i], 1.0, 1),
            spread(&per_round_minus(&p99[i], &p99[0]), 1.0, 1)
        ));
    }
    if relays.is_some() {
        let over = per_round_minus(&p99[1], &p99[2]);
        let m = median(&over);
        lines.push(String::new());
        lines.push(format!(
            "NowConnect {rt} p99 minus the relays' p99, per round: {} µs (#24: ≤ 100 µs): {}",
            spread(&over, 1.0, 1),
            if m <= 100.0 { "met" } else { "not met" }
        ));
    }
    lines.push(String::new());
    lines
}
