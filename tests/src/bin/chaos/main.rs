//! Chaos with real processes on a real (namespaced) network, checked like
//! Jepsen: three hubs, Redis, two multi-homed agents, `slapd` and a checked
//! target, each in its own Linux network namespace (see
//! `nowconnect_tests::netlab`), under a seeded schedule of partitions
//! (hub↔hub, agent↔hub, hub↔Redis; one-way and two-way), SIGKILLs and
//! restarts, SIGSTOP/SIGCONT pauses, delay/jitter/reordering and loss, and
//! Redis restarts with and without their data, while a workload runs
//! hash-checked streams both ways, LDAP searches and binds with the real
//! OpenLDAP clients, and a connection rate through every hub.
//!
//!   chaos run --duration 90s --seed 7 [--flows 4] [--runtimes tokio,async-std] [--logs DIR]
//!
//! Run as root (`scripts/chaos.sh` installs what it needs and builds).
//! Needs `NOWCONNECT_BIN` (and `NOWCONNECT_ASYNC_STD_BIN` for async-std).
//! Exits 1 on any violation, 2 when the harness itself fails (a fault it
//! could not make); the last line starts with `chaos:`.
//! (`chaos target` and `chaos netem` are the parts it runs inside the lab.)

mod cluster;
mod faults;
mod fencing;
mod netem;
mod stream;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cluster::{Cluster, HUBS, IDLE_SEC, NODES};
use nowconnect_tests::Runtime;
use nowconnect_tests::netlab::Lab;
use stream::{End, FlowRecord};

/// No byte moving for this long on a flow that is not closed is a hang:
/// the longest fault (6 s) + the tunnel idle timeout (4 s) + the agent's
/// reconnect backoff cap (2 s) + the lease (3 s), doubled for a loaded
/// machine.
const HANG_BOUND: Duration = Duration::from_secs(30);
/// After a fault is healed every hub serves new connections within this:
/// a restarted hub's start, the lease, the idle timeout and backoff.
const RECOVERY_BOUND: Duration = Duration::from_secs(25);
/// A hub stops opening flows on a fenced tunnel within this of Redis
/// naming a newer epoch for the slot: the tunnel's idle timeout (the agent
/// left it) or its next renewal (interval + registry timeout), whichever
/// comes first, plus a margin for the 100 ms Redis poll and log latency.
const FENCE_BOUND: Duration = Duration::from_millis(IDLE_SEC * 1000 + 1000);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    match args.first().map(String::as_str) {
        Some("target") => {
            let bind = opt("--bind").expect("--bind ADDR");
            stream::serve_target(bind.parse().expect("--bind ADDR"));
        }
        Some("netem") => {
            let num = |n: &str| opt(n).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let r = netem::run(netem::Params {
                queue: num("--queue") as u16,
                delay: Duration::from_millis(num("--delay-ms")),
                jitter: Duration::from_millis(num("--jitter-ms")),
                reorder_pct: num("--reorder-pct") as u32,
                seed: num("--seed"),
            });
            if let Err(e) = r {
                eprintln!("chaos netem: {e}");
                std::process::exit(1);
            }
        }
        Some("run") => {
            let duration = opt("--duration")
                .map(|d| parse_duration(&d).unwrap_or_else(|e| usage(&e)))
                .unwrap_or(Duration::from_secs(90));
            let seed = opt("--seed")
                .map(|s| s.parse().unwrap_or_else(|_| usage("--seed takes a number")))
                .unwrap_or_else(rand::random::<u64>);
            let flows = opt("--flows")
                .map(|s| {
                    s.parse()
                        .unwrap_or_else(|_| usage("--flows takes a number"))
                })
                .unwrap_or(4usize);
            let runtimes = Runtime::parse_list(&opt("--runtimes").unwrap_or("tokio".into()));
            let logs = opt("--logs");
            std::process::exit(run(duration, seed, flows, runtimes, logs.as_deref()));
        }
        _ => usage("a subcommand: run | target | netem"),
    }
}

fn usage(e: &str) -> ! {
    eprintln!(
        "error: {e}\nusage: chaos run [--duration 90s|10m|1h] [--seed N] [--flows N] [--runtimes tokio,async-std] [--logs DIR]"
    );
    std::process::exit(2)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("bad duration `{s}`"))?;
    Ok(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("bad duration `{s}` (use 90s, 10m, 1h)")),
    }))
}

/// Outcome of one new connection (a probe) through a hub.
struct Probe {
    hub: usize,
    at: Instant,
    ok: bool,
}

/// One fault as it happened.
struct Applied {
    label: String,
    kind: &'static str,
    from: Instant,
    healed: Instant,
    /// Time from healing until every hub served a new connection.
    recovery: Option<Duration>,
}

#[derive(Default)]
struct Ldap {
    ok: u64,
    failed: u64,
    wrong: Vec<String>,
}

fn run(
    duration: Duration,
    seed: u64,
    flows: usize,
    runtimes: Vec<Runtime>,
    logs: Option<&str>,
) -> i32 {
    if nowconnect_tests::netlab::run("id", &["-u"]).map(|s| s.trim() == "0") != Ok(true) {
        eprintln!("chaos: run as root (network namespaces, nft, NFQUEUE)");
        return 2;
    }
    println!(
        "chaos: seed {seed}, {duration:?}, replay with `scripts/chaos.sh --duration {}s --seed {seed}`",
        duration.as_secs()
    );
    let stale = Lab::remove_stale();
    if stale > 0 {
        println!("removed {stale} namespaces a killed run left behind");
    }
    let lab = match Lab::create(std::process::id(), &NODES) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("chaos: cannot build the lab network: {e}");
            return 2;
        }
    };
    let t0 = Instant::now();
    let mut c = Cluster::start(lab, runtimes);
    // Ready: every hub serves, every agent holds its two tunnels.
    let ready = nowconnect_tests::eventually(Duration::from_secs(30), || {
        let tunnels: f64 = c
            .hubs
            .iter()
            .flatten()
            .map(|h| h.metric("nowconnect_agents_connected"))
            .sum();
        tunnels >= 4.0
            && (0..HUBS.len())
                .all(|h| stream::probe(c.echo_addr(h), 1, Duration::from_secs(2)).is_ok())
    });
    if !ready {
        eprintln!(
            "chaos: the cluster did not come up within 30 s; logs in {}",
            keep_logs(&c, logs)
        );
        return 2;
    }
    println!("cluster up in {:.1} s", t0.elapsed().as_secs_f64());

    let stop = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let records: Arc<Mutex<Vec<FlowRecord>>> = Arc::default();
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let ldap: Arc<Mutex<Ldap>> = Arc::default();
    let owners: fencing::Owners = Arc::default();
    let mut threads = Vec::new();
    let mut seeds = StdRng::seed_from_u64(seed ^ 0x5eed);
    // Long-lived checked streams, both directions.
    for k in 0..flows {
        let (stop, checked, records) = (stop.clone(), checked.clone(), records.clone());
        let addrs: Vec<_> = (0..HUBS.len()).map(|h| c.echo_addr(h)).collect();
        let mut rng = StdRng::seed_from_u64(seeds.random());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let hub = rng.random_range(0..addrs.len());
                let mode = [stream::ECHO, stream::SOURCE, stream::SINK][k % 3];
                let life = Duration::from_millis(rng.random_range(3000..15000));
                let spec = stream::FlowSpec {
                    hub,
                    addr: addrs[hub],
                    mode,
                    seed: rng.random(),
                    life,
                    rate: 256 * 1024,
                    hang: HANG_BOUND,
                };
                let r = stream::run_flow(spec, &checked);
                if matches!(r.end, End::NotOpened(_)) {
                    std::thread::sleep(Duration::from_millis(200));
                }
                records.lock().expect("records").push(r);
            }
        }));
    }
    // A connection rate through every hub: 10 new connections a second each.
    for hub in 0..HUBS.len() {
        let (stop, probes) = (stop.clone(), probes.clone());
        let addr = c.echo_addr(hub);
        let mut rng = StdRng::seed_from_u64(seeds.random());
        let ldap = ldap.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let at = Instant::now();
                let r = stream::probe(addr, rng.random(), Duration::from_secs(2));
                if let Err(e) = &r
                    && e.starts_with("wrong:")
                {
                    ldap.lock()
                        .expect("ldap")
                        .wrong
                        .push(format!("hub{} probe: {e}", hub + 1));
                }
                probes.lock().expect("probes").push(Probe {
                    hub,
                    at,
                    ok: r.is_ok(),
                });
                std::thread::sleep(Duration::from_millis(100).saturating_sub(at.elapsed()));
            }
        }));
    }
    // Short LDAP searches and binds with the real OpenLDAP clients.
    {
        let (stop, ldap) = (stop.clone(), ldap.clone());
        let addrs: Vec<_> = (0..HUBS.len()).map(|h| c.ldap_addr(h)).collect();
        let mut rng = StdRng::seed_from_u64(seeds.random());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let hub = rng.random_range(0..addrs.len());
                let r = ldap_op(addrs[hub], n.is_multiple_of(2));
                let mut l = ldap.lock().expect("ldap");
                match r {
                    Ok(()) => l.ok += 1,
                    Err(LdapErr::Failed) => l.failed += 1,
                    Err(LdapErr::Wrong(w)) => l.wrong.push(format!("hub{}: {w}", hub + 1)),
                }
                drop(l);
                std::thread::sleep(Duration::from_millis(250));
            }
        }));
    }
    {
        let (stop, owners) = (stop.clone(), owners.clone());
        let redis = c.redis_addr();
        threads.push(std::thread::spawn(move || {
            fencing::poll_owners(redis, owners, stop)
        }));
    }

    // The nemesis.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut applied: Vec<Applied> = Vec::new();
    let mut violations: Vec<String> = Vec::new();
    // The harness failing to make a fault is not the product's fault: it
    // ends the run (exit 2), apart from violations.
    let mut harness_errors: Vec<String> = Vec::new();
    let end = Instant::now() + duration;
    std::thread::sleep(Duration::from_secs(2));
    while Instant::now() < end {
        let fault = faults::Fault::draw(&mut rng);
        let lasts = fault.duration(&mut rng);
        let (label, kind) = (fault.label(), fault.kind());
        println!(
            "{:>6.1}s  {label}: {fault:?} for {lasts:?}",
            t0.elapsed().as_secs_f64()
        );
        let from = Instant::now();
        let active = match faults::apply(&mut c, fault, &mut rng) {
            Ok(a) => a,
            Err(e) => {
                harness_errors.push(format!("applying {label}: {e}"));
                break;
            }
        };
        std::thread::sleep(lasts);
        // Recovery counts from the start of healing: a killed process's
        // restart is part of it.
        let healed = Instant::now();
        if let Err(e) = faults::heal(&mut c, active) {
            harness_errors.push(format!("healing {label}: {e}"));
            break;
        }
        let recovery = recover(&c, healed);
        match recovery {
            Some(r) => println!("        healed; every hub served again after {:.2} s", r.as_secs_f64()),
            None => violations.push(format!(
                "after {label} was healed, not every hub served a new connection within {RECOVERY_BOUND:?}"
            )),
        }
        applied.push(Applied {
            label,
            kind,
            from,
            healed,
            recovery,
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
    }
    // Quiet end: let the last flows finish, then check.
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let records = std::mem::take(&mut *records.lock().expect("records"));
    let probes = std::mem::take(&mut *probes.lock().expect("probes"));
    let ldap = std::mem::take(&mut *ldap.lock().expect("ldap"));
    for r in &records {
        match &r.end {
            End::Corrupt(why) => violations.push(format!(
                "flow via hub{} (mode {}, seed {}): corrupt: {why}",
                r.hub + 1,
                r.mode,
                r.seed
            )),
            End::Hung(why) => violations.push(format!(
                "flow via hub{} (mode {}, seed {}): hung: {why}",
                r.hub + 1,
                r.mode,
                r.seed
            )),
            _ => {}
        }
    }
    violations.extend(ldap.wrong.iter().map(|w| format!("wrong answer: {w}")));
    let opened = fencing::opened_flows(&c.hub_logs());
    let (fenced, fence_checked, unplaced) =
        fencing::check(&opened, &owners.lock().expect("owners"), FENCE_BOUND);
    violations.extend(fenced);

    // Report.
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_label: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for a in &applied {
        *by_kind.entry(a.kind).or_default() += 1;
        if let Some(r) = a.recovery {
            by_label.entry(&a.label).or_default().push(r.as_secs_f64());
        }
    }
    // New connections served during the faults of each label.
    let served_in = |label: &str| {
        let (n, ok) = probes
            .iter()
            .filter(|p| {
                applied
                    .iter()
                    .any(|a| a.label == label && p.at >= a.from && p.at < a.healed)
            })
            .fold((0u64, 0u64), |(n, ok), p| (n + 1, ok + u64::from(p.ok)));
        if n == 0 {
            100.0
        } else {
            ok as f64 * 100.0 / n as f64
        }
    };
    println!(
        "\n| fault | count | new connections served during it | recovery after healing, median / max (s) |"
    );
    println!("|---|---|---|---|");
    for (label, mut v) in by_label {
        v.sort_by(f64::total_cmp);
        println!(
            "| {label} | {} | {:.1}% | {:.2} / {:.2} |",
            v.len(),
            served_in(label),
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
    let in_fault = |p: &Probe| applied.iter().any(|a| p.at >= a.from && p.at < a.healed);
    let avail = |sel: &dyn Fn(&Probe) -> bool| {
        let (n, ok) = probes
            .iter()
            .filter(|p| sel(p))
            .fold((0u64, 0u64), |(n, ok), p| (n + 1, ok + u64::from(p.ok)));
        (n, if n == 0 { 1.0 } else { ok as f64 / n as f64 })
    };
    let (nf, af) = avail(&|p| in_fault(p));
    let (nq, aq) = avail(&|p| !in_fault(p));
    println!(
        "new connections: {:.1}% of {nf} served during faults, {:.1}% of {nq} outside them",
        af * 100.0,
        aq * 100.0
    );
    for h in 0..HUBS.len() {
        let (n, a) = avail(&|p| p.hub == h && in_fault(p));
        println!("  via hub{}: {:.1}% of {n} during faults", h + 1, a * 100.0);
    }
    let count = |f: &dyn Fn(&End) -> bool| records.iter().filter(|r| f(&r.end)).count();
    let intact = count(&|e| *e == End::Intact);
    let reset = count(&|e| matches!(e, End::Reset(_)));
    let not_opened = count(&|e| matches!(e, End::NotOpened(_)));
    let reset_bytes: u64 = records
        .iter()
        .filter(|r| matches!(r.end, End::Reset(_)))
        .map(|r| r.checked)
        .sum();
    println!(
        "streams: {} ({intact} intact, {reset} reset with every byte before the reset right ({reset_bytes} bytes), {not_opened} not opened)",
        records.len()
    );
    println!(
        "ldap: {} answered right, {} failed (outage), {} wrong",
        ldap.ok,
        ldap.failed,
        ldap.wrong.len()
    );
    println!(
        "fencing: {} tunnel flow opens checked against Redis epochs ({unplaced} on epochs never seen between polls)",
        fence_checked
    );
    for v in &violations {
        println!("VIOLATION: {v}");
    }
    for e in &harness_errors {
        println!("HARNESS ERROR: {e}");
    }
    let kept = if violations.is_empty() && harness_errors.is_empty() {
        logs.map(|_| keep_logs(&c, logs))
    } else {
        Some(keep_logs(&c, logs))
    };
    if let Some(dir) = kept {
        println!("logs: {dir}");
    }
    let k = |n: &str| by_kind.get(n).copied().unwrap_or(0);
    println!(
        "chaos: seed={seed} duration={}s faults={} partitions={} kills={} pauses={} netem={} redis_losses={} flows={} bytes_checked={} probes={} ldap_ops={} violations={} harness_errors={}",
        duration.as_secs(),
        applied.len(),
        k("partition"),
        k("kill"),
        k("pause"),
        k("netem"),
        k("redis"),
        records.len(),
        checked.load(Ordering::SeqCst),
        probes.len(),
        ldap.ok + ldap.failed + ldap.wrong.len() as u64,
        violations.len(),
        harness_errors.len()
    );
    if !violations.is_empty() {
        1
    } else if !harness_errors.is_empty() {
        2
    } else {
        0
    }
}

/// After a heal: the time until every hub served a new connection (probes
/// started after the heal), or None past [`RECOVERY_BOUND`].
fn recover(c: &Cluster, healed: Instant) -> Option<Duration> {
    let mut pending: Vec<usize> = (0..HUBS.len()).collect();
    let mut n = 0u64;
    while healed.elapsed() < RECOVERY_BOUND {
        n += 1;
        pending.retain(|&h| stream::probe(c.echo_addr(h), n, Duration::from_millis(1500)).is_err());
        if pending.is_empty() {
            return Some(healed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

enum LdapErr {
    /// No answer (the path was down): an outage, counted.
    Failed,
    /// An answer, and a wrong one: a violation.
    Wrong(String),
}

/// A search (admin bind, `uid=alice`'s mail) or a user bind (`bob`'s
/// whoami) through a hub, with the OpenLDAP clients, bounded by `timeout`.
fn ldap_op(addr: std::net::SocketAddr, search: bool) -> Result<(), LdapErr> {
    use nowconnect_tests::ldap::{ADMIN_DN, ADMIN_PW, SUFFIX};
    let url = format!("ldap://{addr}");
    let (tool, args, want): (&str, Vec<String>, String) = if search {
        (
            "ldapsearch",
            [
                "-x",
                "-LLL",
                "-o",
                "nettimeout=5",
                "-H",
                &url,
                "-D",
                ADMIN_DN,
                "-w",
                ADMIN_PW,
                "-b",
                SUFFIX,
                "(uid=alice)",
                "mail",
            ]
            .map(String::from)
            .to_vec(),
            "mail: alice@example.com".into(),
        )
    } else {
        let dn = format!("uid=bob,ou=people,{SUFFIX}");
        (
            "ldapwhoami",
            [
                "-x",
                "-o",
                "nettimeout=5",
                "-H",
                &url,
                "-D",
                &dn,
                "-w",
                "bob-pw",
            ]
            .map(String::from)
            .to_vec(),
            format!("dn:{dn}"),
        )
    };
    let out = std::process::Command::new("timeout")
        .arg("10")
        .arg(tool)
        .args(&args)
        .output()
        .map_err(|_| LdapErr::Failed)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(LdapErr::Failed);
    }
    if text.lines().any(|l| l.trim() == want) {
        Ok(())
    } else {
        Err(LdapErr::Wrong(format!(
            "{tool} answered {:?}, expected `{want}`",
            text.trim()
        )))
    }
}

/// Copy the run's logs to `dir` (or a fresh one under /tmp); its path.
fn keep_logs(c: &Cluster, dir: Option<&str>) -> String {
    let to = dir.map_or_else(
        || format!("/tmp/chaos-logs-{}", std::process::id()),
        str::to_string,
    );
    let _ = std::fs::create_dir_all(&to);
    let _ = std::process::Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", c.dir().display()))
        .arg(&to)
        .status();
    to
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(super::parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(super::parse_duration("75"), Ok(Duration::from_secs(75)));
        assert_eq!(super::parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(super::parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(super::parse_duration("1d").is_err());
        assert!(super::parse_duration("soon").is_err());
    }
}
