//! The end-to-end benchmark behind `docs/performance.md`: starts the real
//! pieces (OpenLDAP `slapd`, an echo service and, per runtime, its own
//! `redis-server`, two meshed hubs with mTLS and an agent, all on that
//! runtime), runs `nowconnect perf ldap` and `nowconnect perf
//! tcp` on the local route (the agent's own hub), the cross-replica route
//! (the other hub, through the mesh) and the direct baseline in the same
//! run, open latency included (the agent's `open` connector targets the
//! address `perf tcp --open-target` listens on), reads the mesh RTT from
//! the hubs' metrics, and writes the section between the `perf-report`
//! markers of the Markdown file given.
//!
//!   NOWCONNECT_BIN=target/e2e/release/nowconnect \
//!   NOWCONNECT_ASYNC_STD_BIN=target/e2e/release/nowconnect-async-std \
//!   cargo run --release -p nowconnect-tests --bin perf-report -- \
//!       [--runtimes tokio,async-std] [--out docs/performance.md] [--ldap-secs 60] [--clients 64] \
//!       [--conn-rate 1000] [--conn-secs 30] [--bytes 268435456] [--idle-secs 30] \
//!       [--opens 1000] [--open-rate 200] [--worker-threads 0]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nowconnect_tests::ldap::{ADMIN_DN, ADMIN_PW, SUFFIX, Slapd};
use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;

const START: &str = "<!-- perf-report:start -->";
const END: &str = "<!-- perf-report:end -->";
/// The throughput targets (≥ 0.25× one hub, ≥ 0.18× mesh) are against a raw
/// loopback connection to a sink; the echo service here is slower than that
/// (its direct figure is the baseline), so its ratio is not the target's.
const ECHO_BASELINE: &str =
    "echo baseline, not the target's: against a raw sink see *One flow through one hub*";

struct Opts {
    out: PathBuf,
    ldap_secs: u64,
    clients: usize,
    conn_rate: u64,
    conn_secs: u64,
    bytes: u64,
    idle_secs: u64,
    /// Opens per side and route for open latency, and their rate.
    opens: u64,
    open_rate: u64,
    runtimes: Vec<Runtime>,
    /// `worker_threads` of every hub and agent (0: the runtime's default).
    worker_threads: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        out: PathBuf::from("docs/performance.md"),
        ldap_secs: 60,
        clients: 64,
        conn_rate: 1000,
        conn_secs: 30,
        bytes: 256 << 20,
        idle_secs: 30,
        opens: 1000,
        open_rate: 200,
        worker_threads: 0,
        runtimes: vec![Runtime::Tokio, Runtime::AsyncStd],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        let n = || {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{}: a number", args[i]))
        };
        match args[i].as_str() {
            "--out" => o.out = PathBuf::from(&v),
            "--ldap-secs" => o.ldap_secs = n(),
            "--clients" => o.clients = n() as usize,
            "--conn-rate" => o.conn_rate = n(),
            "--conn-secs" => o.conn_secs = n(),
            "--bytes" => o.bytes = n(),
            "--idle-secs" => o.idle_secs = n(),
            "--opens" => o.opens = n(),
            "--open-rate" => o.open_rate = n(),
            "--runtimes" => o.runtimes = Runtime::parse_list(&v),
            "--worker-threads" => o.worker_threads = n() as usize,
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    o
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn hardware() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} cores ({cpu}), Linux {}, {}",
        sh("nproc", &[]),
        sh("uname", &["-r"]),
        sh(
            "sh",
            &[
                "-c",
                "grep MemTotal /proc/meminfo | awk '{printf \"%.0f GiB RAM\", $2/1048576}'"
            ]
        )
    )
}

/// Run `nowconnect perf ...`; returns the JSON report and the Markdown.
fn perf(dir: &Path, name: &str, args: &[String]) -> (serde_json::Value, String) {
    let json = dir.join(format!("{name}.json"));
    let md = dir.join(format!("{name}.md"));
    let mut cmd = Command::new(bin());
    cmd.arg("perf").args(args).args([
        "--json".as_ref(),
        json.as_os_str(),
        "--markdown".as_ref(),
        md.as_os_str(),
    ]);
    eprintln!("perf-report: {name}: nowconnect perf {}", args.join(" "));
    let out = cmd.output().expect("run nowconnect perf");
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (v, std::fs::read_to_string(&md).unwrap())
}

/// The cumulative mesh RTT histogram of a hub (`nowconnect_mesh_rtt_seconds`
/// buckets: upper bound, count).
fn mesh_rtt_buckets(h: &HubProc) -> Vec<(f64, f64)> {
    let (_, text) = h.get("/metrics");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("nowconnect_mesh_rtt_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Both hubs' histograms summed, minus `since` (an earlier reading).
fn mesh_rtt_window(hubs: &[&HubProc], since: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for h in hubs {
        for (i, (le, c)) in mesh_rtt_buckets(h).into_iter().enumerate() {
            match sum.get_mut(i) {
                Some(x) => x.1 += c,
                None => sum.push((le, c)),
            }
        }
    }
    for (i, (_, c)) in since.iter().enumerate() {
        if let Some(x) = sum.get_mut(i) {
            x.1 -= c;
        }
    }
    sum
}

/// The smallest bucket bound under which `q` of the samples fall, and the
/// sample count.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<(f64, u64)> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| (*le, total as u64))
}

/// The direct baseline for the idle mesh RTT: plain loopback TCP
/// ping-pongs (32 bytes, `TCP_NODELAY`) with an echo in another process (this
/// binary again, `--echo-child`), shaped like the mesh's pings: four
/// connections (a hub pair has four links), each pinging every `every`,
/// staggered, for `window`. An idle machine's wake-up latency is in both
/// figures; only what the mesh adds is ours.
fn direct_idle_rtt(every: Duration, window: Duration) -> Vec<Duration> {
    use std::io::{BufRead, Read, Write};
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg("--echo-child")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("echo child");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("child stdout"))
        .read_line(&mut line)
        .expect("echo child port");
    let addr: std::net::SocketAddr = line.trim().parse().expect("echo child address");
    let pingers: Vec<_> = (0..4u32)
        .map(|k| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).expect("echo child");
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let start = std::time::Instant::now();
                std::thread::sleep(every * k / 4);
                let mut out = Vec::new();
                let mut buf = [0u8; 32];
                while start.elapsed() + every <= window {
                    std::thread::sleep(every);
                    let t = std::time::Instant::now();
                    if s.write_all(&[7u8; 32]).is_err() || s.read_exact(&mut buf).is_err() {
                        break;
                    }
                    out.push(t.elapsed());
                }
                out
            })
        })
        .collect();
    let mut out: Vec<Duration> = pingers
        .into_iter()
        .flat_map(|p| p.join().expect("pinger"))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    out.sort();
    out
}

/// `--echo-child`: echo every connection, print the address first; ends
/// when its stdin closes (the parent kills it, or the parent is gone).
fn echo_child() {
    let addr = echo_server();
    println!("{addr}");
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
}

/// p95 of sorted samples (nearest rank), and the sample count.
fn sample_p95(sorted: &[Duration]) -> Option<(Duration, usize)> {
    let n = sorted.len();
    let rank = (n as f64 * 0.95).ceil() as usize;
    sorted.get(rank.max(1) - 1).map(|d| (*d, n))
}

/// Open latency of a `perf tcp` report against its p99 target (µs): p50,
/// p99, the direct p99 and the errors.
fn open_cell(v: &serde_json::Value, p99_max: u64) -> String {
    let (t, d) = (&v["through"], &v["direct"]);
    match (t["open"]["p99_us"].as_u64(), t["open_errors"].as_u64()) {
        (Some(p99), Some(errors)) => format!(
            "p50 {} µs, p99 {p99} µs (direct p99 {} µs), {errors} errors: {}",
            t["open"]["p50_us"],
            d["open"]["p99_us"],
            if p99 <= p99_max && errors == 0 && t["open"]["count"].as_u64() > Some(0) {
                "met"
            } else {
                "**not met**"
            }
        ),
        _ => "not measured".into(),
    }
}

fn fmt_rtt(r: Option<(f64, u64)>) -> String {
    r.map_or("no samples".to_string(), |(le, n)| {
        format!("≤ {:.2} ms ({n} pings)", le * 1000.0)
    })
}

/// One runtime's figures (hubs and agent on that runtime).
struct RunResult {
    rt: Runtime,
    ldap_local: (serde_json::Value, String),
    ldap_mesh: (serde_json::Value, String),
    tcp_local: (serde_json::Value, String),
    tcp_mesh: (serde_json::Value, String),
    idle_rtt: Option<(f64, u64)>,
    /// The direct loopback ping-pong in the same idle window.
    idle_direct: Option<(Duration, usize)>,
    loaded_rtt: Option<(f64, u64)>,
}

/// Start a cluster on `rt` (its own Redis, two meshed hubs, an agent on
/// hub-a) and run every measurement against it; the cluster is stopped on
/// return.
fn run_on(
    o: &Opts,
    env: &Env,
    slapd: &Slapd,
    echo: std::net::SocketAddr,
    rt: Runtime,
) -> RunResult {
    let dir = env.path().join(rt.name());
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.as_path();
    let redis = RedisProc::start(dir);
    let ca = Ca::new("bench mesh CA");
    let (pa, pb) = (free_port(), free_port());
    // perf tcp listens here during its open-latency runs: the `open`
    // connector's target.
    let open_target: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("loopback address");
    let threads = format!("worker_threads: {}\n", o.worker_threads);
    let with_echo = |y: String| {
        y.replacen(
            "listeners:\n",
            // Every client of the connection-rate load and of the opens
            // comes from one address: it may open as many a second as the
            // listener takes.
            "listeners:\n  - { name: echo, bind: '127.0.0.1:0', connector: echo, max_new_connections_per_sec_per_client: 2000 }\n  \
             - { name: open, bind: '127.0.0.1:0', connector: open, max_new_connections_per_sec_per_client: 2000 }\n",
            1,
        ) + &threads
    };
    let a = HubProc::start_on(
        rt,
        dir,
        "hub-a",
        &with_echo(mesh_hub_yaml(
            env,
            "hub-a",
            "active",
            &redis,
            pa,
            &[pb],
            &ca.issue(dir, "hub-a"),
        )),
    );
    let b = HubProc::start_on(
        rt,
        dir,
        "hub-b",
        &with_echo(mesh_hub_yaml(
            env,
            "hub-b",
            "active",
            &redis,
            pb,
            &[pa],
            &ca.issue(dir, "hub-b"),
        )),
    );
    let _agent = AgentProc::start_on(
        rt,
        dir,
        "agent",
        &env.agent_yaml(
            "agent-1",
            &[a.http],
            &[("ldap", slapd.addr), ("echo", echo), ("open", open_target)],
            &threads,
        ),
        &env.token(
            "agent-1",
            Some(["ldap", "echo", "open"].map(String::from).to_vec()),
        ),
    );
    assert!(
        eventually(Duration::from_secs(20), || pair_ready(&a, &b)),
        "{} cluster did not come up",
        rt.name()
    );
    // Mesh RTT on the idle cluster first (pings every 5 s on each link).
    eprintln!(
        "perf-report: {}: idle mesh RTT for {} s",
        rt.name(),
        o.idle_secs
    );
    let before = mesh_rtt_window(&[&a, &b], &[]);
    let window = Duration::from_secs(o.idle_secs);
    let direct = std::thread::spawn(move || direct_idle_rtt(Duration::from_secs(5), window));
    std::thread::sleep(window);
    let idle_direct = sample_p95(&direct.join().expect("direct ping thread"));
    let idle_rtt = quantile(&mesh_rtt_window(&[&a, &b], &before), 0.95);
    let loaded_from = mesh_rtt_window(&[&a, &b], &[]);
    let pw = dir.join("pw");
    std::fs::write(&pw, ADMIN_PW).unwrap();
    let ldap = |name: &str, listener: std::net::SocketAddr| {
        perf(
            dir,
            name,
            &[
                "ldap".into(),
                "--url".into(),
                format!("ldap://{listener}"),
                "--direct".into(),
                format!("ldap://{}", slapd.addr),
                "--bind-dn".into(),
                ADMIN_DN.into(),
                "--password-file".into(),
                pw.display().to_string(),
                "--base".into(),
                SUFFIX.into(),
                "--filter".into(),
                "(uid=alice)".into(),
                "--concurrency".into(),
                o.clients.to_string(),
                "--duration".into(),
                format!("{}s", o.ldap_secs),
                "--error-budget".into(),
                "0".into(),
                "--quiet".into(),
            ],
        )
    };
    let tcp = |name: &str, listener: std::net::SocketAddr, open: std::net::SocketAddr| {
        perf(
            dir,
            name,
            &[
                "tcp".into(),
                "--through".into(),
                listener.to_string(),
                "--direct".into(),
                echo.to_string(),
                "--bytes".into(),
                o.bytes.to_string(),
                "--flows".into(),
                "8".into(),
                "--echoes".into(),
                "5000".into(),
                "--conn-rate".into(),
                o.conn_rate.to_string(),
                "--conn-duration".into(),
                format!("{}s", o.conn_secs),
                "--open-target".into(),
                open_target.to_string(),
                "--open-through".into(),
                open.to_string(),
                "--opens".into(),
                o.opens.to_string(),
                "--open-rate".into(),
                o.open_rate.to_string(),
            ],
        )
    };
    let ldap_local = ldap("ldap-local", a.listener("ldap"));
    let ldap_mesh = ldap("ldap-cross-replica", b.listener("ldap"));
    let tcp_local = tcp("tcp-local", a.listener("echo"), a.listener("open"));
    let tcp_mesh = tcp("tcp-cross-replica", b.listener("echo"), b.listener("open"));
    let loaded_rtt = quantile(&mesh_rtt_window(&[&a, &b], &loaded_from), 0.95);
    RunResult {
        rt,
        ldap_local,
        ldap_mesh,
        tcp_local,
        tcp_mesh,
        idle_rtt,
        idle_direct,
        loaded_rtt,
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--echo-child") {
        return echo_child();
    }
    let o = opts();
    let env = Env::new();
    let slapd = Slapd::start(env.path());
    let echo = echo_server();
    let runs: Vec<RunResult> = o
        .runtimes
        .iter()
        .map(|rt| run_on(&o, &env, &slapd, echo, *rt))
        .collect();

    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let target = |ok: bool| if ok { "met" } else { "**not met**" };
    let names: Vec<&str> = runs.iter().map(|r| r.rt.name()).collect();
    let mut s = format!(
        "{START}\n\n## End to end: LDAP and TCP through the tunnel, local and across the mesh, per runtime\n\n\
         Generated by `tests/src/bin/perf-report.rs`, which starts real `slapd`, an echo service and, \
         for each runtime in turn ({}), its own `redis-server`, two hubs meshed over mTLS and one \
         agent (attached to hub-a), all on that runtime, and runs `nowconnect perf` against each \
         route and the direct target in the same run:\n\n\
         ```\ncargo build --release -p nowconnect-tokio --bin nowconnect --target-dir target/e2e\n\
         cargo build --release -p nowconnect-async-std --bin nowconnect-async-std --target-dir target/e2e\n\
         NOWCONNECT_BIN=target/e2e/release/nowconnect NOWCONNECT_ASYNC_STD_BIN=target/e2e/release/nowconnect-async-std \\\n  \
         cargo run --release -p nowconnect-tests --bin perf-report -- --runtimes {} --ldap-secs {} --clients {} \
         --conn-rate {} --conn-secs {} --bytes {} --idle-secs {} --opens {} --open-rate {} --worker-threads {}\n```\n\n\
         Hardware: {}. Everything (clients, hubs, agent, slapd, echo) shares these cores, so the \
         ratios, measured in one run, are what to compare.\n\n",
        names.join(", "),
        names.join(","),
        o.ldap_secs,
        o.clients,
        o.conn_rate,
        o.conn_secs,
        o.bytes,
        o.idle_secs,
        o.opens,
        o.open_rate,
        o.worker_threads,
        hardware(),
    );
    s += &format!(
        "| target | {} |\n|---|{}\n",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    type Row<'a> = (String, Box<dyn Fn(&RunResult) -> String + 'a>);
    let rows: Vec<Row> = vec![
        (
            format!(
                "LDAP bind+search, {} clients, {} s, local route ≥ 0.8× direct",
                o.clients, o.ldap_secs
            ),
            Box::new(|r: &RunResult| {
                let (v, _) = &r.ldap_local;
                let ratio = f(&v["throughput_ratio"]);
                format!(
                    "{ratio:.2}× ({} errors): {}",
                    v["through"]["errors"],
                    target(ratio >= 0.8 && v["through"]["errors"] == 0)
                )
            }),
        ),
        (
            "LDAP, cross-replica route (no target)".into(),
            Box::new(|r: &RunResult| {
                let (v, _) = &r.ldap_mesh;
                format!(
                    "{:.2}× ({} errors)",
                    f(&v["throughput_ratio"]),
                    v["through"]["errors"]
                )
            }),
        ),
        (
            format!("one-flow echo throughput through one hub ({ECHO_BASELINE})"),
            Box::new(|r: &RunResult| format!("{:.3}×", f(&r.tcp_local.0["one_flow_ratio"]))),
        ),
        (
            "one-flow echo throughput across the mesh (same baseline)".into(),
            Box::new(|r: &RunResult| format!("{:.3}×", f(&r.tcp_mesh.0["one_flow_ratio"]))),
        ),
        (
            "added echo p99 (1 KiB) ≤ 300 µs local".into(),
            Box::new(|r: &RunResult| {
                let p = f(&r.tcp_local.0["added_echo_p99_us"]);
                format!("{p:.0} µs: {}", target(p <= 300.0))
            }),
        ),
        (
            "added echo p99 ≤ 600 µs cross-replica".into(),
            Box::new(|r: &RunResult| {
                let p = f(&r.tcp_mesh.0["added_echo_p99_us"]);
                format!("{p:.0} µs: {}", target(p <= 600.0))
            }),
        ),
        (
            format!(
                "{} new connections/s for {} s, no errors (local)",
                o.conn_rate, o.conn_secs
            ),
            Box::new(|r: &RunResult| {
                let t = &r.tcp_local.0["through"];
                let ok = t["conn_errors"] == 0
                    && f(&t["conn_rate_achieved"]) >= 0.95 * o.conn_rate as f64;
                format!(
                    "{:.0}/s, {} errors: {}",
                    f(&t["conn_rate_achieved"]),
                    t["conn_errors"],
                    target(ok)
                )
            }),
        ),
        (
            format!(
                "open latency p99 ≤ 1 ms local ({} opens at {}/s; connect to first byte at the target)",
                o.opens, o.open_rate
            ),
            Box::new(|r: &RunResult| open_cell(&r.tcp_local.0, 1000)),
        ),
        (
            "open latency p99 ≤ 2 ms cross-replica".into(),
            Box::new(|r: &RunResult| open_cell(&r.tcp_mesh.0, 2000)),
        ),
        (
            format!("mesh RTT p95 ≤ 1 ms, idle cluster ({} s)", o.idle_secs),
            Box::new(|r: &RunResult| {
                format!(
                    "{}: {}",
                    fmt_rtt(r.idle_rtt),
                    target(r.idle_rtt.is_some_and(|(le, _)| le <= 0.001))
                )
            }),
        ),
        (
            "direct loopback RTT p95, same idle window and cadence (baseline)".into(),
            Box::new(|r: &RunResult| {
                r.idle_direct.map_or("no samples".into(), |(d, n)| {
                    format!("{:.2} ms ({n} pings)", d.as_secs_f64() * 1000.0)
                })
            }),
        ),
        (
            "mesh RTT p95 during the benchmark load (no target)".into(),
            Box::new(|r: &RunResult| fmt_rtt(r.loaded_rtt)),
        ),
    ];
    for (title, cell) in &rows {
        let cells: Vec<String> = runs.iter().map(cell).collect();
        s += &format!("| {title} | {} |\n", cells.join(" | "));
    }
    s += "\nMesh RTT is read from the hubs' `nowconnect_mesh_rtt_seconds` histograms (both \
          links, a ping every 5 s each), so the figure is the histogram bucket bound. The direct \
          baseline is plain loopback TCP ping-pongs (32 bytes, `TCP_NODELAY`) between the report \
          and an echo in another process, shaped like the mesh's pings (four connections, one \
          ping every 5 s each) in the same idle window: on a machine whose idle CPUs are slow to \
          wake, both figures carry that wake-up time.\n\n";
    for r in &runs {
        for (title, md) in [
            ("LDAP, local route (hub-a)", &r.ldap_local.1),
            (
                "LDAP, cross-replica route (hub-b → mesh → hub-a)",
                &r.ldap_mesh.1,
            ),
            ("TCP, local route (hub-a)", &r.tcp_local.1),
            (
                "TCP, cross-replica route (hub-b → mesh → hub-a)",
                &r.tcp_mesh.1,
            ),
        ] {
            s += &format!(
                "### {}: {title}\n\n{}\n\n",
                r.rt.name(),
                md.replacen("## ", "#### ", 1)
            );
        }
    }
    s += END;
    let doc = std::fs::read_to_string(&o.out).unwrap_or_default();
    let doc = match (doc.find(START), doc.find(END)) {
        (Some(i), Some(j)) if j > i => format!("{}{s}{}", &doc[..i], &doc[j + END.len()..]),
        _ => format!("{}\n{s}\n", doc.trim_end()),
    };
    std::fs::write(&o.out, doc).unwrap();
    eprintln!("perf-report: wrote {}", o.out.display());
}
