//! Mesh capacity: aggregate throughput across the mesh as a function of the
//! mesh round trip, `ha.mesh.per_link_max_inflight_bytes`,
//! `ha.mesh.send_queue_depth` and the number of parallel flows (issue #22).
//!
//! For each mesh delay D (one way, ms; a round trip of 2D), one cluster per
//! (inflight cap, queue depth) pair measured (one factor at a time: each cap
//! at queue depth 1000, each depth at the 8-MiB cap; every pair with
//! `--full-grid`): Redis, hub-a and hub-b meshed with each
//! other, an agent on hub-a serving a sink. With D > 0 each hub's
//! `ha.mesh.peers` URL names a delay proxy in front of the other hub's mesh
//! port (`wan_proxy`: the TLS bytes passed on D ms later, in each
//! direction, with up to 64 MiB held per direction).
//! Clients connect to hub-b, so every byte crosses the mesh from hub-b (the
//! entry hub, whose mesh link sends the data) to hub-a (the owner).
//!
//! Every measurement sends `--bytes` in total, split over F parallel flows,
//! and reports the aggregate MiB/s. The clusters of one delay are all up at
//! once and measured in alternating rounds (the order of the clusters
//! rotates each round), so that load from elsewhere on the machine spreads
//! over all of them. During each run the entry hub's `/metrics` and both
//! hubs' `/proc/<pid>/status` are sampled every 100 ms: the peak mesh queue
//! (`nowconnect_mesh_link_queue_frames`), the peak inflight bytes
//! (`nowconnect_mesh_link_inflight_bytes`) and the peak resident memory;
//! backpressure refusals (`nowconnect_mesh_backpressure_drops_total` by
//! reason) are the entry hub's counter deltas over the measured runs.
//!
//!   NOWCONNECT_BIN=target/e2e/release/nowconnect target/e2e/release/mesh-capacity \
//!     [--mesh-delays 0,5,20,50] [--flows 1,8] [--inflight-mib 4,8,16] [--queue 500,1000,2000] \
//!     [--full-grid] [--bytes N] [--rounds N] [--windows BYTES,BYTES] [--max-window BYTES] [--runtime tokio|async-std]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nowconnect_tests::pki::Ca;
use nowconnect_tests::{
    AgentProc, Env, HubProc, RedisProc, Runtime, bulk_throughput, eventually, http_get,
    meshed_pair_with, metric_sum, proc_status_kib, sink_server, wan_proxy,
};

const MIB: f64 = 1048576.0;

/// One cluster: its settings, processes, and what its runs measured.
struct Cluster {
    inflight: u64,
    queue: usize,
    _redis: RedisProc,
    entry: HubProc,
    owner: HubProc,
    _agent: AgentProc,
    idle_rss_kib: [u64; 2],
    /// Per flow count (index into the `--flows` list).
    results: Vec<Measured>,
}

#[derive(Default, Clone)]
struct Measured {
    rates: Vec<f64>,
    queue_full: f64,
    inflight_cap: f64,
    peak_queue: f64,
    peak_inflight: f64,
    /// Peak sampled VmRSS, entry and owner hub.
    peak_rss_kib: [u64; 2],
}

/// The entry hub's metrics text (`/metrics` on the ops port if it has one).
fn metrics(h: &HubProc) -> String {
    http_get(h.ops.unwrap_or(h.http), "/metrics").1
}

fn drops(text: &str, reason: &str) -> f64 {
    metric_sum(
        text,
        "nowconnect_mesh_backpressure_drops_total",
        Some(&format!("reason=\"{reason}\"")),
    )
}

/// Whether the cluster carries a flow: the agent is on hub-a, both hubs
/// have an established mesh link (whatever the peer label says), and a
/// small transfer through hub-b reaches the sink.
fn ready(c: &Cluster) -> bool {
    let established = |h: &HubProc| {
        metric_sum(
            &metrics(h),
            "nowconnect_mesh_links",
            Some("state=\"established\""),
        ) >= 1.0
    };
    c.owner.metric("nowconnect_agents_connected") == 1.0
        && established(&c.owner)
        && established(&c.entry)
        && sink_reachable(c.entry.listener("ldap"))
}

/// Whether 64 KiB sent to `addr` reach the sink (no panic on failure: a
/// cluster still coming up refuses the client).
fn sink_reachable(addr: SocketAddr) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&[0u8; 65536])?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut got = [0u8; 8];
        s.read_exact(&mut got)?;
        Ok(u64::from_le_bytes(got) == 65536)
    };
    probe().unwrap_or(false)
}

/// F parallel flows of `bytes / F` each into `addr`: aggregate bytes/s
/// from the first connect to the last count received.
fn parallel_throughput(addr: SocketAddr, flows: usize, bytes: u64) -> f64 {
    let per = bytes / flows as u64;
    let start = Instant::now();
    let handles: Vec<_> = (0..flows)
        .map(|_| std::thread::spawn(move || bulk_throughput(addr, per)))
        .collect();
    for h in handles {
        h.join().expect("a flow failed");
    }
    (per * flows as u64) as f64 / start.elapsed().as_secs_f64()
}

/// One measured run on `c` with `flows` flows, sampling while it runs.
fn measure(c: &Cluster, flows: usize, bytes: u64, m: &mut Measured) {
    let before = metrics(&c.entry);
    let done = Arc::new(AtomicBool::new(false));
    let entry_addr = c.entry.ops.unwrap_or(c.entry.http);
    let pids = [c.entry.proc.pid(), c.owner.proc.pid()];
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut q, mut inf, mut rss) = (0f64, 0f64, [0u64; 2]);
            while !done.load(Ordering::Relaxed) {
                let t = http_get(entry_addr, "/metrics").1;
                q = q.max(metric_sum(&t, "nowconnect_mesh_link_queue_frames", None));
                inf = inf.max(metric_sum(&t, "nowconnect_mesh_link_inflight_bytes", None));
                for (r, p) in rss.iter_mut().zip(pids) {
                    *r = (*r).max(proc_status_kib(p, "VmRSS"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (q, inf, rss)
        })
    };
    m.rates
        .push(parallel_throughput(c.entry.listener("ldap"), flows, bytes));
    done.store(true, Ordering::Relaxed);
    let (q, inf, rss) = sampler.join().unwrap();
    // The hub exports link counters at most every 250 ms.
    std::thread::sleep(Duration::from_millis(300));
    let after = metrics(&c.entry);
    m.queue_full += drops(&after, "queue_full") - drops(&before, "queue_full");
    m.inflight_cap += drops(&after, "inflight_cap") - drops(&before, "inflight_cap");
    m.peak_queue = m.peak_queue.max(q);
    m.peak_inflight = m.peak_inflight.max(inf);
    for (p, r) in m.peak_rss_kib.iter_mut().zip(rss) {
        *p = (*p).max(r);
    }
}

/// The (inflight MiB, queue depth) pairs measured: every pair with
/// `full`, else one factor at a time: each inflight cap at the default
/// queue depth (1000) and each queue depth at the default cap (8 MiB),
/// when the lists hold them (else at the first of the list),
/// which is all the queue dimension needs while queue depth changes
/// nothing (see `docs/performance.md`, issue #22).
fn grid(inflights: &[u64], queues: &[usize], full: bool) -> Vec<(u64, usize)> {
    // The defaults when listed, else the first of each list.
    let base_i = if inflights.contains(&8) {
        8
    } else {
        inflights[0]
    };
    let base_q = if queues.contains(&1000) {
        1000
    } else {
        queues[0]
    };
    let mut g = Vec::new();
    for &i in inflights {
        for &q in queues {
            if full || q == base_q || i == base_i {
                g.push((i, q));
            }
        }
    }
    g
}

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Vec<T> {
    s.split(',')
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{what}: {v}")))
        .collect()
}

fn median_spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn main() {
    let mut delays: Vec<u64> = vec![0, 5, 20, 50];
    let mut flow_counts: Vec<usize> = vec![1, 8];
    let mut inflights: Vec<u64> = vec![4, 8, 16];
    let mut queues: Vec<usize> = vec![500, 1000, 2000];
    let mut bytes: u64 = 256 << 20;
    let mut rounds = 3;
    // Each flow's starting window (`tunnel.window_bytes`): the default,
    // and 1 MiB, with which 8 flows want more than the smaller caps allow.
    let mut windows: Vec<u32> = vec![262144, 1048576];
    let mut max_window: Option<u32> = None;
    let mut rt = Runtime::Tokio;
    let mut full_grid = false;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).map(String::as_str).unwrap_or("");
        match args[i].as_str() {
            "--full-grid" => {
                full_grid = true;
                i += 1;
                continue;
            }
            "--mesh-delays" => delays = list(v, "--mesh-delays D,D,..."),
            "--flows" => flow_counts = list(v, "--flows F,F,..."),
            "--inflight-mib" => inflights = list(v, "--inflight-mib M,M,..."),
            "--queue" => queues = list(v, "--queue Q,Q,..."),
            "--bytes" => bytes = v.parse().expect("--bytes N"),
            "--rounds" => rounds = v.parse().expect("--rounds N"),
            "--windows" => windows = list(v, "--windows W,W,..."),
            "--max-window" => max_window = Some(v.parse().expect("--max-window BYTES")),
            "--runtime" => rt = Runtime::parse_list(v)[0],
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let env = Env::new();
    let sink = sink_server();
    let started = Instant::now();
    println!(
        "# mesh capacity: {} MiB per run, {rounds} alternating rounds, hubs and agent on {}; tunnel.max_window_bytes {}",
        bytes >> 20,
        rt.name(),
        max_window.map_or("default (4 MiB)".to_string(), |m| m.to_string())
    );
    for (&window, &delay_ms) in windows
        .iter()
        .flat_map(|w| delays.iter().map(move |d| (w, d)))
    {
        let mut tunnel_keys = format!("  window_bytes: {window}\n");
        if let Some(m) = max_window {
            tunnel_keys += &format!("  max_window_bytes: {}\n", m.max(window));
        }
        let delay = Duration::from_millis(delay_ms);
        let mut clusters = Vec::new();
        for (inflight_mib, queue) in grid(&inflights, &queues, full_grid) {
            let inflight = inflight_mib << 20;
            let name = format!("w{window}-d{delay_ms}-i{inflight_mib}-q{queue}");
            let dir = env.path().join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let redis = RedisProc::start(&dir);
            let mesh_keys = format!(
                "  mesh:\n    send_queue_depth: {queue}\n    per_link_max_inflight_bytes: {inflight}\n"
            );
            // Each hub's peer URL names a delay proxy in front of the
            // other hub's mesh port.
            let edit = |y: String| {
                let mut y = y
                    .replace("  mesh:\n", &mesh_keys)
                    .replace("tunnel:\n", &format!("tunnel:\n{tunnel_keys}"));
                if !delay.is_zero() {
                    let at = y.find("wss://127.0.0.1:").expect("peer URL") + 16;
                    let port: u16 = y[at..at + 5].split('/').next().unwrap().parse().unwrap();
                    let proxy =
                        wan_proxy(SocketAddr::from(([127, 0, 0, 1], port)), delay, 64 << 20);
                    y = y.replace(
                        &format!("wss://127.0.0.1:{port}/mesh"),
                        &format!("wss://127.0.0.1:{}/mesh", proxy.port()),
                    );
                }
                y + "log:\n  level: warn\n"
            };
            let (owner, entry, _, _) = meshed_pair_with(
                [rt; 2],
                &env,
                "active",
                &redis,
                &Ca::new("capacity mesh CA"),
                &edit,
            );
            let id = format!("cap-{name}");
            let agent = AgentProc::start_on(
                rt,
                &dir,
                &id,
                &(env.agent_yaml(
                    &id,
                    &[owner.http],
                    &[("ldap", sink)],
                    "log:\n  level: warn\n",
                ) + &tunnel_keys.replace("  ", "")),
                &env.token(&id, None),
            );
            clusters.push(Cluster {
                inflight,
                queue,
                _redis: redis,
                entry,
                owner,
                _agent: agent,
                idle_rss_kib: [0; 2],
                results: vec![Measured::default(); flow_counts.len()],
            });
        }
        for c in &clusters {
            assert!(
                eventually(Duration::from_secs(30), || ready(c)),
                "cluster inflight {} queue {} did not come up",
                c.inflight,
                c.queue
            );
        }
        // A mesh link pings every 4-5 s; a flow's window grows only once a
        // ping has measured a round trip of 1 ms or more.
        if !delay.is_zero() {
            std::thread::sleep(Duration::from_secs(6));
        }
        for c in clusters.iter_mut() {
            c.idle_rss_kib = [
                proc_status_kib(c.entry.proc.pid(), "VmRSS"),
                proc_status_kib(c.owner.proc.pid(), "VmRSS"),
            ];
            parallel_throughput(c.entry.listener("ldap"), 1, bytes / 8);
        }
        for round in 0..rounds {
            for (k, &flows) in flow_counts.iter().enumerate() {
                for j in 0..clusters.len() {
                    let n = clusters.len();
                    let c = &mut clusters[(j + round) % n];
                    let mut m = std::mem::take(&mut c.results[k]);
                    measure(c, flows, bytes, &mut m);
                    c.results[k] = m;
                }
            }
            eprintln!(
                "window {window}, mesh delay {delay_ms} ms: round {} of {rounds} done ({:.0} s)",
                round + 1,
                started.elapsed().as_secs_f64()
            );
        }
        let rtt = 2 * delay_ms;
        println!();
        println!(
            "## mesh round trip {rtt} ms{}, flow window {} KiB at the start",
            if delay_ms == 0 {
                " (loopback, no proxy)".to_string()
            } else {
                format!(" (delay proxy, {delay_ms} ms each way)")
            },
            window / 1024
        );
        println!();
        println!(
            "| flows | inflight cap | queue depth | MiB/s (median, min–max) | cap / RTT | queue_full | inflight_cap | peak queue frames | peak inflight MiB | entry hub RSS idle → peak (VmHWM) MiB | owner hub RSS idle → peak MiB |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for (k, flows) in flow_counts.iter().enumerate() {
            for c in &clusters {
                let m = &c.results[k];
                let (med, lo, hi) = median_spread(&m.rates);
                let ceiling = if rtt == 0 {
                    "–".to_string()
                } else {
                    format!("{:.0}", c.inflight as f64 / MIB / (rtt as f64 / 1000.0))
                };
                let kib = |v: u64| v as f64 / 1024.0;
                println!(
                    "| {flows} | {} MiB | {} | {:.0} ({:.0}–{:.0}) | {ceiling} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} → {:.0} ({:.0}) | {:.0} → {:.0} |",
                    c.inflight >> 20,
                    c.queue,
                    med / MIB,
                    lo / MIB,
                    hi / MIB,
                    m.queue_full,
                    m.inflight_cap,
                    m.peak_queue,
                    m.peak_inflight / MIB,
                    kib(c.idle_rss_kib[0]),
                    kib(m.peak_rss_kib[0]),
                    kib(proc_status_kib(c.entry.proc.pid(), "VmHWM")),
                    kib(c.idle_rss_kib[1]),
                    kib(m.peak_rss_kib[1]),
                );
            }
        }
    }
    println!();
    println!(
        "(whole sweep: {:.0} s; load average at the end: {})",
        started.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
