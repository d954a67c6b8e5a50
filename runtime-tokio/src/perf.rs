//! `nowconnect perf`: load runners that measure a listener the way an
//! operator would, with the same measurement against a direct target in the
//! same run so the report is a ratio, not a guess.
//!
//! - `perf ldap`: bind + search with the ldap3 client; concurrency, duration
//!   or request count, optional target rate (open loop: latency counts from
//!   when a request was due, so a stall is not hidden); p50..max latency
//!   (hdrhistogram), throughput, errors; `--p99-max` and `--error-budget`
//!   set the exit code; JSON, Markdown and an SVG latency plot.
//! - `perf tcp`: against an echo service: one-flow and N-flow throughput,
//!   echo latency, and a connection rate; with `--open-target`, open
//!   latency (a client's connect to the first byte at the target), perf
//!   itself being the target.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// Exit code when an assertion (`--p99-max`, `--error-budget`) fails.
pub const EXIT_ASSERTION: u8 = 3;

/// Latency summary in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn us(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Percentile curve points (percentile, µs) for the SVG plot.
fn curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    [
        0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
    ]
    .iter()
    .map(|p| (*p, h.value_at_quantile(p / 100.0)))
    .collect()
}

// ---------------------------------------------------------------- ldap

#[derive(Clone, Debug)]
pub struct LdapArgs {
    pub url: String,
    pub direct: Option<String>,
    pub bind_dn: String,
    pub password: String,
    pub base: String,
    pub filter: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub requests: Option<u64>,
    pub rate: Option<f64>,
    pub p99_max: Option<Duration>,
    /// Largest allowed error fraction (0.001 = 0.1 %).
    pub error_budget: Option<f64>,
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub quiet: bool,
}

/// One run of the LDAP load against one URL.
#[derive(Clone, Debug, Serialize)]
pub struct LdapRun {
    pub url: String,
    pub concurrency: usize,
    pub elapsed_s: f64,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub throughput_rps: f64,
    pub latency: Latency,
    /// The first few distinct error messages.
    pub error_samples: Vec<String>,
    #[serde(skip)]
    pub curve: Vec<(f64, u64)>,
}

#[derive(Debug, Serialize)]
pub struct LdapReport {
    pub kind: &'static str,
    pub operation: &'static str,
    /// Target rate (open loop), if one was set.
    pub rate: Option<f64>,
    pub through: LdapRun,
    pub direct: Option<LdapRun>,
    /// through throughput / direct throughput.
    pub throughput_ratio: Option<f64>,
    /// through p99 − direct p99, µs.
    pub added_p99_us: Option<i64>,
    pub assertions: Vec<Assertion>,
    pub passed: bool,
}

#[derive(Debug, Serialize)]
pub struct Assertion {
    pub name: String,
    pub limit: String,
    pub measured: String,
    pub passed: bool,
}

struct Shared {
    next: AtomicU64,
    stop: AtomicBool,
    ok: AtomicU64,
    errors: AtomicU64,
}

/// One bind + search on `ldap`; errors as text.
async fn bind_search(ldap: &mut ldap3::Ldap, a: &LdapArgs) -> Result<(), String> {
    ldap.simple_bind(&a.bind_dn, &a.password)
        .await
        .map_err(|e| format!("bind: {e}"))?
        .success()
        .map_err(|e| format!("bind: {e}"))?;
    let (entries, _) = ldap
        .search(&a.base, ldap3::Scope::Subtree, &a.filter, vec!["dn"])
        .await
        .map_err(|e| format!("search: {e}"))?
        .success()
        .map_err(|e| format!("search: {e}"))?;
    if entries.is_empty() {
        return Err(format!("search: no entry matches `{}`", a.filter));
    }
    Ok(())
}

async fn connect_ldap(url: &str) -> Result<ldap3::Ldap, String> {
    let settings = ldap3::LdapConnSettings::new().set_conn_timeout(Duration::from_secs(5));
    let (conn, ldap) = ldap3::LdapConnAsync::with_settings(settings, url)
        .await
        .map_err(|e| format!("connect {url}: {e}"))?;
    ldap3::drive!(conn);
    Ok(ldap)
}

/// Run the LDAP load against `url` with the settings of `a`.
pub async fn run_ldap(url: &str, a: &LdapArgs, label: &str) -> Result<LdapRun, String> {
    // Fail fast with a clear message when nothing answers at all.
    let mut probe = connect_ldap(url).await?;
    bind_search(&mut probe, a)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = probe.unbind().await;

    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.concurrency.max(1) {
        let (a, url, shared) = (a.clone(), url.to_string(), shared.clone());
        workers.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut samples: Vec<String> = Vec::new();
            let mut ldap = None;
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if a.requests.is_some_and(|n| i >= n) {
                    break;
                }
                // Open loop: request i is due at start + i / rate.
                let due = match a.rate {
                    Some(r) if r > 0.0 => {
                        let due = start + Duration::from_secs_f64(i as f64 / r);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    _ => Instant::now(),
                };
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                let res = async {
                    if ldap.is_none() {
                        ldap = Some(connect_ldap(&url).await?);
                    }
                    bind_search(ldap.as_mut().expect("connected"), &a).await
                }
                .await;
                match res {
                    Ok(()) => {
                        let _ = h.record(us(due.elapsed()));
                        shared.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        if samples.len() < 5 && !samples.contains(&e) {
                            samples.push(e);
                        }
                        // Start over on a fresh connection.
                        if let Some(mut l) = ldap.take() {
                            let _ = l.unbind().await;
                        }
                    }
                }
            }
            if let Some(mut l) = ldap.take() {
                let _ = l.unbind().await;
            }
            (h, samples)
        }));
    }
    // Progress, and the clock for duration-bound runs.
    let progress = {
        let (shared, quiet, label) = (shared.clone(), a.quiet, label.to_string());
        let (duration, requests) = (a.duration, a.requests);
        tokio::spawn(async move {
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut last = 0;
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick += 1;
                let (ok, err) = (
                    shared.ok.load(Ordering::Relaxed),
                    shared.errors.load(Ordering::Relaxed),
                );
                if requests.is_none() && start.elapsed() >= duration {
                    shared.stop.store(true, Ordering::Relaxed);
                }
                if !quiet && (tty || tick.is_multiple_of(5)) {
                    let total = match requests {
                        Some(n) => format!("{}/{n} requests", ok + err),
                        None => format!("{}s/{}s", start.elapsed().as_secs(), duration.as_secs()),
                    };
                    let line = format!(
                        "perf ldap [{label}] {total}: {ok} ok, {err} errors, {} req/s",
                        (ok + err).saturating_sub(last)
                    );
                    if tty {
                        eprint!("\r{line}   ");
                    } else {
                        eprintln!("{line}");
                    }
                }
                last = ok + err;
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        })
    };
    let mut h = histogram();
    let mut samples = Vec::new();
    for w in workers {
        let (wh, ws) = w.await.map_err(|e| format!("worker: {e}"))?;
        h.add(&wh).map_err(|e| format!("histogram: {e}"))?;
        for s in ws {
            if samples.len() < 5 && !samples.contains(&s) {
                samples.push(s);
            }
        }
    }
    let elapsed = start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    progress.abort();
    if !a.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    let ok = shared.ok.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let requests = ok + errors;
    Ok(LdapRun {
        url: url.to_string(),
        concurrency: a.concurrency,
        elapsed_s: elapsed.as_secs_f64(),
        requests,
        errors,
        error_rate: if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        },
        throughput_rps: ok as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: Latency::of(&h),
        error_samples: samples,
        curve: curve(&h),
    })
}

/// `nowconnect perf ldap`: returns the report; the caller prints it and
/// picks the exit code from `passed`.
pub async fn perf_ldap(a: &LdapArgs) -> Result<LdapReport, String> {
    let through = run_ldap(&a.url, a, "through").await?;
    let direct = match &a.direct {
        Some(d) => Some(run_ldap(d, a, "direct").await?),
        None => None,
    };
    let mut assertions = Vec::new();
    if let Some(max) = a.p99_max {
        let got = Duration::from_micros(through.latency.p99_us);
        assertions.push(Assertion {
            name: "p99".into(),
            limit: format!("<= {max:?}"),
            measured: format!("{got:?}"),
            passed: got <= max,
        });
    }
    if let Some(budget) = a.error_budget {
        assertions.push(Assertion {
            name: "error rate".into(),
            limit: format!("<= {:.4} %", budget * 100.0),
            measured: format!(
                "{:.4} % ({} of {})",
                through.error_rate * 100.0,
                through.errors,
                through.requests
            ),
            passed: through.error_rate <= budget,
        });
    }
    let passed = assertions.iter().all(|x| x.passed);
    let throughput_ratio = direct
        .as_ref()
        .map(|d| through.throughput_rps / d.throughput_rps.max(1e-9));
    let added_p99_us = direct
        .as_ref()
        .map(|d| through.latency.p99_us as i64 - d.latency.p99_us as i64);
    let report = LdapReport {
        kind: "ldap",
        operation: "bind + search",
        rate: a.rate,
        through,
        direct,
        throughput_ratio,
        added_p99_us,
        assertions,
        passed,
    };
    write_outputs(
        &report,
        a.json.as_ref(),
        a.markdown.as_ref(),
        a.svg.as_ref(),
        ldap_markdown,
        |r| {
            let mut series = vec![("through".to_string(), r.through.curve.clone())];
            if let Some(d) = &r.direct {
                series.push(("direct".to_string(), d.curve.clone()));
            }
            series
        },
    )?;
    Ok(report)
}

fn ldap_markdown(r: &LdapReport, svg: Option<&str>) -> String {
    let pacing = match r.rate {
        Some(rate) => {
            format!("open loop at {rate} requests/s; latency counts from when each request was due")
        }
        None => "closed loop: each client sends its next request when the previous one is \
                 answered"
            .to_string(),
    };
    let mut s = format!(
        "## LDAP load ({})\n\n{} concurrent clients, one connection each; {pacing}.\n\n\
         | target | requests | errors | throughput (req/s) | p50 | p90 | p95 | p99 | p99.9 | max |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        r.operation, r.through.concurrency
    );
    let row = |name: &str, x: &LdapRun| {
        format!(
            "| {name} `{}` | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |\n",
            x.url,
            x.requests,
            x.errors,
            x.throughput_rps,
            fmt_us(x.latency.p50_us),
            fmt_us(x.latency.p90_us),
            fmt_us(x.latency.p95_us),
            fmt_us(x.latency.p99_us),
            fmt_us(x.latency.p999_us),
            fmt_us(x.latency.max_us)
        )
    };
    s += &row("through", &r.through);
    if let Some(d) = &r.direct {
        s += &row("direct", d);
    }
    if let Some(ratio) = r.throughput_ratio {
        s += &format!("\nThroughput through / direct: **{ratio:.2}×**");
        if let Some(p) = r.added_p99_us {
            s += &format!("; added p99: **{} µs**", p);
        }
        s += "\n";
    }
    if !r.assertions.is_empty() {
        s += "\n| assertion | limit | measured | result |\n|---|---|---|---|\n";
        for x in &r.assertions {
            s += &format!(
                "| {} | {} | {} | {} |\n",
                x.name,
                x.limit,
                x.measured,
                if x.passed { "pass" } else { "FAIL" }
            );
        }
    }
    for e in &r.through.error_samples {
        s += &format!("\nerror: `{e}`");
    }
    if let Some(svg) = svg {
        s += &format!("\n\n![latency distribution]({svg})\n");
    }
    s
}

fn fmt_us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

/// Write the JSON, the Markdown (linking the SVG when there is one) and the
/// SVG of a report.
fn write_outputs<R: Serialize>(
    report: &R,
    json: Option<&PathBuf>,
    markdown: Option<&PathBuf>,
    svg: Option<&PathBuf>,
    md: impl Fn(&R, Option<&str>) -> String,
    series: impl Fn(&R) -> Vec<(String, Vec<(f64, u64)>)>,
) -> Result<(), String> {
    let write = |p: &PathBuf, text: String| {
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        write(p, text + "\n")?;
    }
    if let Some(p) = svg {
        write(p, latency_svg(&series(report)))?;
    }
    if let Some(p) = markdown {
        let name = svg
            .and_then(|s| s.file_name())
            .map(|n| n.to_string_lossy().to_string());
        write(p, md(report, name.as_deref()))?;
    }
    Ok(())
}

/// A latency-by-percentile plot (x: percentile on a log scale of 1/(1-p),
/// y: latency), one line per series.
pub fn latency_svg(series: &[(String, Vec<(f64, u64)>)]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 400.0, 70.0, 50.0, 30.0, 20.0);
    let max_us = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    // x: 0 → 0, 90 → 1, 99 → 2, 99.9 → 3, 99.99 → 4, 100 → 4.3
    let xv = |p: f64| {
        if p >= 100.0 {
            4.3
        } else {
            (1.0 / (1.0 - p / 100.0)).log10()
        }
    };
    let x = |p: f64| left + xv(p) / 4.3 * (w - left - right);
    let y = |v: u64| h - bottom - (v as f64 / max_us) * (h - bottom - top);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"18\" text-anchor=\"middle\">Latency by percentile</text>\n",
        w / 2.0
    );
    // Axes and grid.
    s += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for p in [0.0, 90.0, 99.0, 99.9, 99.99] {
        s += &format!(
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#ddd\"/>\
             <text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">p{p}</text>\n",
            x(p),
            h - bottom,
            h - bottom + 18.0
        );
    }
    for i in 0..=4 {
        let v = (max_us * i as f64 / 4.0) as u64;
        s += &format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#eee\"/>\
             <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>\n",
            y(v),
            w - right,
            left - 6.0,
            y(v) + 4.0,
            fmt_us(v)
        );
    }
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(p, v)| format!("{:.1},{:.1}", x(*p), y(*v)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{c}\">{name}</text>\n",
            path.join(" "),
            left + 10.0,
            top + 16.0 * (i as f64 + 1.0)
        );
    }
    s += "</svg>\n";
    s
}

// ---------------------------------------------------------------- tcp

#[derive(Clone, Debug)]
pub struct TcpArgs {
    pub through: SocketAddr,
    pub direct: Option<SocketAddr>,
    pub bytes: u64,
    pub flows: usize,
    pub echoes: u64,
    pub echo_size: usize,
    pub conn_rate: f64,
    pub conn_duration: Duration,
    /// Open latency, when `--open-target` is given.
    pub open: Option<OpenArgs>,
    pub json: Option<PathBuf>,
    pub markdown: Option<PathBuf>,
    pub svg: Option<PathBuf>,
}

/// Open latency: perf listens on `target` itself, and a connector's target
/// must point there; each open connects to `through` (the listener in front
/// of that connector) and is timed until its first bytes arrive at `target`.
#[derive(Clone, Debug)]
pub struct OpenArgs {
    pub target: SocketAddr,
    pub through: SocketAddr,
    pub opens: u64,
    /// Opens per second (open loop).
    pub rate: f64,
    /// An open whose first bytes are not at the target by then fails.
    pub timeout: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct TcpRun {
    pub addr: String,
    /// MiB/s of echoed bytes through one flow.
    pub one_flow_mib_s: f64,
    /// MiB/s over `flows` concurrent flows.
    pub n_flows_mib_s: f64,
    pub echo: Latency,
    /// Connections per second achieved, each a connect + 16-byte echo + close.
    pub conn_rate_achieved: f64,
    pub conn_errors: u64,
    pub conn_latency: Latency,
    /// The address each open connected to (the open target itself on the
    /// direct side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_addr: Option<String>,
    /// From just before the client's connect to its first 8 bytes read at
    /// the open target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_errors: Option<u64>,
    /// The first few distinct open errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub open_error_samples: Vec<String>,
    #[serde(skip)]
    pub curve: Vec<(f64, u64)>,
}

#[derive(Debug, Serialize)]
pub struct TcpReport {
    pub kind: &'static str,
    pub bytes_per_run: u64,
    pub flows: usize,
    pub echo_size: usize,
    pub conn_rate_target: f64,
    pub through: TcpRun,
    pub direct: Option<TcpRun>,
    pub one_flow_ratio: Option<f64>,
    pub n_flows_ratio: Option<f64>,
    pub added_echo_p50_us: Option<i64>,
    pub added_echo_p99_us: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_target: Option<String>,
    /// Opens per side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_rate: Option<f64>,
    /// Connections to the open target that sent fewer than 8 bytes, or an
    /// id no open of this run was waiting for (a late open's included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_strays: Option<u64>,
    /// through open p99 − direct open p99, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_open_p99_us: Option<i64>,
}

/// Send `n` bytes on one connection while reading the echo back.
async fn pump(addr: SocketAddr, n: u64) -> Result<(), String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; 256 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            w.write_all(&buf[..k]).await?;
            left -= k as u64;
        }
        w.shutdown().await
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let k = r
            .read(&mut buf)
            .await
            .map_err(|e| format!("read {addr}: {e}"))?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("write {addr}: {e}"))?;
    if got != n {
        return Err(format!("{addr}: {got} of {n} bytes came back"));
    }
    Ok(())
}

async fn throughput(addr: SocketAddr, total: u64, flows: usize) -> Result<f64, String> {
    let start = Instant::now();
    let per = total / flows as u64;
    let tasks: Vec<_> = (0..flows).map(|_| tokio::spawn(pump(addr, per))).collect();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok((per * flows as u64) as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64())
}

async fn echo_latency(addr: SocketAddr, n: u64, size: usize) -> Result<Histogram<u64>, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut h = histogram();
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg)
            .await
            .map_err(|e| format!("write {addr}: {e}"))?;
        s.read_exact(&mut back)
            .await
            .map_err(|e| format!("read {addr}: {e}"))?;
        let _ = h.record(us(t.elapsed()));
    }
    Ok(h)
}

/// Open connections at `rate` per second for `duration` (open loop), each
/// a connect, a 16-byte echo and a close; returns (achieved rate, errors,
/// latency).
/// Start `n` tasks at `rate` per second (open loop: each starts when due,
/// whatever the earlier ones do); `start(due)` spawns one.
async fn spawn_paced<T>(
    n: u64,
    rate: f64,
    mut start: impl FnMut(Instant) -> tokio::task::JoinHandle<T>,
) -> Vec<tokio::task::JoinHandle<T>> {
    let origin = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = origin + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        tasks.push(start(due));
    }
    tasks
}

async fn conn_rate(addr: SocketAddr, rate: f64, duration: Duration) -> (f64, u64, Histogram<u64>) {
    let start = Instant::now();
    let n = (rate * duration.as_secs_f64()).ceil() as u64;
    let tasks = spawn_paced(n, rate, |due| {
        tokio::spawn(async move {
            let one = async {
                let mut s = TcpStream::connect(addr).await?;
                let _ = s.set_nodelay(true);
                s.write_all(b"0123456789abcdef").await?;
                let mut b = [0u8; 16];
                s.read_exact(&mut b).await?;
                s.shutdown().await?;
                std::io::Result::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(10), one).await {
                Ok(Ok(())) => Ok(us(due.elapsed())),
                _ => Err(()),
            }
        })
    })
    .await;
    let mut h = histogram();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(v)) => {
                let _ = h.record(v);
            }
            _ => errors += 1,
        }
    }
    let achieved = h.len() as f64 / start.elapsed().as_secs_f64();
    (achieved, errors, h)
}

/// Opens waiting for their first bytes at the open target: id → (t0, where
/// to send t1 − t0). Bounded by the opens in flight: each open removes its
/// entry when it ends, answered or not.
type Pending = Arc<Mutex<HashMap<u64, (Instant, oneshot::Sender<Duration>)>>>;

/// Connections the open target reads at once; past this a new one is a
/// stray, dropped unread (opens arrive with their id and are read at once,
/// so only idle strays pile up).
const OPEN_READERS_MAX: usize = 4096;

/// perf's own listener at the open target: it reads the 8-byte id of each
/// connection and answers the open waiting for it, in this process, so t0
/// and t1 are read off the same clock.
struct OpenTarget {
    addr: SocketAddr,
    pending: Pending,
    next_id: AtomicU64,
    strays: Arc<AtomicU64>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for OpenTarget {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl OpenTarget {
    async fn bind(addr: SocketAddr, timeout: Duration) -> Result<OpenTarget, String> {
        let err = |what: &str, e: std::io::Error| format!("open target {addr}: {what}: {e}");
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| err("socket", e))?;
        // A previous run's connections in TIME_WAIT must not keep this one
        // from binding the same port.
        socket
            .set_reuseaddr(true)
            .map_err(|e| err("reuseaddr", e))?;
        socket.bind(addr).map_err(|e| err("bind", e))?;
        // A burst of opens must not overflow the accept queue: that would
        // time the kernel's SYN retry, not the tunnel.
        let listener = socket.listen(1024).map_err(|e| err("listen", e))?;
        let pending: Pending = Arc::default();
        let strays = Arc::new(AtomicU64::new(0));
        let readers = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (pending, strays) = (pending.clone(), strays.clone());
            tokio::spawn(async move {
                loop {
                    let s = match listener.accept().await {
                        Ok((s, _)) => s,
                        Err(_) => {
                            // Out of descriptors or the like: keep serving.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if readers.fetch_add(1, Ordering::Relaxed) >= OPEN_READERS_MAX {
                        readers.fetch_sub(1, Ordering::Relaxed);
                        strays.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let (pending, strays, readers) =
                        (pending.clone(), strays.clone(), readers.clone());
                    tokio::spawn(async move {
                        if !read_open(s, &pending, timeout).await {
                            strays.fetch_add(1, Ordering::Relaxed);
                        }
                        readers.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            })
        };
        Ok(OpenTarget {
            addr,
            pending,
            next_id: AtomicU64::new(0),
            strays,
            acceptor,
        })
    }

    fn strays(&self) -> u64 {
        self.strays.load(Ordering::Relaxed)
    }
}

/// Read the id of one connection at the open target and answer its open;
/// false for a stray (fewer than 8 bytes within `timeout`, or an id no open
/// is waiting for). The connection is closed on return.
async fn read_open(mut s: TcpStream, pending: &Pending, timeout: Duration) -> bool {
    let _ = s.set_nodelay(true);
    let mut id = [0u8; 8];
    match tokio::time::timeout(timeout, s.read_exact(&mut id)).await {
        Ok(Ok(_)) => {
            let t1 = Instant::now();
            let waiting = lock(pending).remove(&u64::from_be_bytes(id));
            match waiting {
                Some((t0, answer)) => {
                    // The open may have given up just now: then this is
                    // not a sample, and not a stray either.
                    let _ = answer.send(t1 - t0);
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poisoned table is still whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open `n` connections to `addr` at `rate` per second (open loop), each
/// sending a fresh id for the open target to read; returns (errors, their
/// first few distinct messages, latency).
async fn open_latency(
    target: &OpenTarget,
    addr: SocketAddr,
    n: u64,
    rate: f64,
    timeout: Duration,
) -> (u64, Vec<String>, Histogram<u64>) {
    let tasks = spawn_paced(n, rate, |_| {
        let id = target.next_id.fetch_add(1, Ordering::Relaxed);
        let (pending, at) = (target.pending.clone(), target.addr);
        tokio::spawn(async move {
            let (answer, answered) = oneshot::channel();
            let t0 = Instant::now();
            lock(&pending).insert(id, (t0, answer));
            let res = tokio::time::timeout(timeout, open_one(addr, id, answered, at)).await;
            lock(&pending).remove(&id);
            match res {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "{addr}: no id reached the open target {at} within {timeout:?}"
                )),
            }
        })
    })
    .await;
    let mut h = histogram();
    let mut errors = 0;
    let mut samples: Vec<String> = Vec::new();
    for t in tasks {
        match t
            .await
            .map_err(|e| format!("open task: {e}"))
            .and_then(|r| r)
        {
            Ok(d) => {
                let _ = h.record(us(d));
            }
            Err(e) => {
                errors += 1;
                if samples.len() < 5 && !samples.contains(&e) {
                    samples.push(e);
                }
            }
        }
    }
    (errors, samples, h)
}

/// One open: connect, send the id, wait for the open target's answer. A
/// connection the far side closes or answers on first is an error at once,
/// not at the timeout: its connector's target is not perf's.
async fn open_one(
    addr: SocketAddr,
    id: u64,
    mut answered: oneshot::Receiver<Duration>,
    target: SocketAddr,
) -> Result<Duration, String> {
    let refused = |e: std::io::Error| {
        format!(
            "{addr}: {e} before the id reached the open target {target} \
             (does the connector's target point there?)"
        )
    };
    let mut s = TcpStream::connect(addr).await.map_err(|e| {
        // The listener took the connection and reset it before the
        // connect returned here: the flow behind it failed that fast.
        if e.kind() == std::io::ErrorKind::ConnectionReset {
            refused(e)
        } else {
            format!("connect {addr}: {e}")
        }
    })?;
    let _ = s.set_nodelay(true);
    s.write_all(&id.to_be_bytes()).await.map_err(refused)?;
    let mut buf = [0u8; 64];
    tokio::select! {
        biased;
        d = &mut answered => d.map_err(|_| "the open target stopped".to_string()),
        r = s.read(&mut buf) => {
            // The open target answers before it closes: an end seen here
            // after a successful read of the id has its answer waiting.
            if let Ok(d) = answered.try_recv() {
                return Ok(d);
            }
            Err(match r {
                Ok(0) => format!(
                    "{addr}: closed before the id reached the open target {target} \
                     (does the connector's target point there?)"
                ),
                Ok(_) => format!(
                    "{addr}: bytes came back: the connector's target is not the open target {target}"
                ),
                Err(e) => refused(e),
            })
        }
    }
}

/// One side's measurements against the echo service at `addr`, then, with
/// an open target, its opens to `open_addr`.
async fn run_tcp(
    addr: SocketAddr,
    a: &TcpArgs,
    open: Option<(&OpenTarget, SocketAddr)>,
) -> Result<TcpRun, String> {
    let one = throughput(addr, a.bytes, 1).await?;
    let many = throughput(addr, a.bytes, a.flows.max(1)).await?;
    let echo = echo_latency(addr, a.echoes, a.echo_size).await?;
    let (rate, conn_errors, ch) = if a.conn_rate > 0.0 {
        conn_rate(addr, a.conn_rate, a.conn_duration).await
    } else {
        (0.0, 0, histogram())
    };
    let opened = match (open, &a.open) {
        (Some((target, to)), Some(o)) => Some((
            to,
            open_latency(target, to, o.opens, o.rate, o.timeout).await,
        )),
        _ => None,
    };
    Ok(TcpRun {
        addr: addr.to_string(),
        one_flow_mib_s: one,
        n_flows_mib_s: many,
        echo: Latency::of(&echo),
        conn_rate_achieved: rate,
        conn_errors,
        conn_latency: Latency::of(&ch),
        open_addr: opened.as_ref().map(|(to, _)| to.to_string()),
        open: opened.as_ref().map(|(_, (_, _, h))| Latency::of(h)),
        open_errors: opened.as_ref().map(|(_, (errors, _, _))| *errors),
        open_error_samples: opened
            .map(|(_, (_, samples, _))| samples)
            .unwrap_or_default(),
        curve: curve(&echo),
    })
}

/// `nowconnect perf tcp`: the direct target first, then the listener, in one
/// run.
pub async fn perf_tcp(a: &TcpArgs) -> Result<TcpReport, String> {
    // Bound before any measurement: a port already taken fails the run at
    // once, not after the echo measurements.
    let target = match &a.open {
        Some(o) => Some(OpenTarget::bind(o.target, o.timeout).await?),
        None => None,
    };
    let direct = match a.direct {
        Some(d) => Some(run_tcp(d, a, target.as_ref().map(|t| (t, t.addr))).await?),
        None => None,
    };
    let through_open = target.as_ref().zip(a.open.as_ref().map(|o| o.through));
    let through = run_tcp(a.through, a, through_open).await?;
    // No figure from a side whose every open failed.
    let added_open_p99_us = match (&through.open, direct.as_ref().and_then(|d| d.open.as_ref())) {
        (Some(t), Some(d)) if t.count > 0 && d.count > 0 => Some(t.p99_us as i64 - d.p99_us as i64),
        _ => None,
    };
    let ratio = |f: fn(&TcpRun) -> f64| direct.as_ref().map(|d| f(&through) / f(d).max(1e-9));
    let added = |f: fn(&Latency) -> u64| {
        direct
            .as_ref()
            .map(|d| f(&through.echo) as i64 - f(&d.echo) as i64)
    };
    let report = TcpReport {
        kind: "tcp",
        bytes_per_run: a.bytes,
        flows: a.flows,
        echo_size: a.echo_size,
        conn_rate_target: a.conn_rate,
        one_flow_ratio: ratio(|r| r.one_flow_mib_s),
        n_flows_ratio: ratio(|r| r.n_flows_mib_s),
        added_echo_p50_us: added(|l| l.p50_us),
        added_echo_p99_us: added(|l| l.p99_us),
        open_target: a.open.as_ref().map(|o| o.target.to_string()),
        opens: a.open.as_ref().map(|o| o.opens),
        open_rate: a.open.as_ref().map(|o| o.rate),
        open_strays: target.as_ref().map(OpenTarget::strays),
        added_open_p99_us,
        through,
        direct,
    };
    write_outputs(
        &report,
        a.json.as_ref(),
        a.markdown.as_ref(),
        a.svg.as_ref(),
        tcp_markdown,
        |r| {
            let mut series = vec![("through (echo)".to_string(), r.through.curve.clone())];
            if let Some(d) = &r.direct {
                series.push(("direct (echo)".to_string(), d.curve.clone()));
            }
            series
        },
    )?;
    Ok(report)
}

fn tcp_markdown(r: &TcpReport, svg: Option<&str>) -> String {
    let mut s = format!(
        "## TCP ({} MiB per throughput run, {} flows, {}-byte echoes, {} connections/s)\n\n\
         | target | 1 flow MiB/s | {} flows MiB/s | echo p50 | echo p99 | echo max | conn/s achieved | conn errors | conn p99 |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        r.bytes_per_run / (1024 * 1024),
        r.flows,
        r.echo_size,
        r.conn_rate_target,
        r.flows
    );
    let row = |name: &str, x: &TcpRun| {
        format!(
            "| {name} `{}` | {:.0} | {:.0} | {} | {} | {} | {:.0} | {} | {} |\n",
            x.addr,
            x.one_flow_mib_s,
            x.n_flows_mib_s,
            fmt_us(x.echo.p50_us),
            fmt_us(x.echo.p99_us),
            fmt_us(x.echo.max_us),
            x.conn_rate_achieved,
            x.conn_errors,
            fmt_us(x.conn_latency.p99_us)
        )
    };
    s += &row("through", &r.through);
    if let Some(d) = &r.direct {
        s += &row("direct", d);
    }
    if let (Some(one), Some(many)) = (r.one_flow_ratio, r.n_flows_ratio) {
        s += &format!(
            "\nThrough / direct: one flow **{one:.3}×**, {} flows **{many:.3}×**; added echo p50 {} µs, p99 {} µs.\n",
            r.flows,
            r.added_echo_p50_us.unwrap_or(0),
            r.added_echo_p99_us.unwrap_or(0)
        );
    }
    if let (Some(target), Some(opens), Some(rate)) = (&r.open_target, r.opens, r.open_rate) {
        s += &format!(
            "\nOpen latency ({opens} opens at {rate}/s; connect to the first 8 bytes read at the open target `{target}`):\n\n\
             | target | opens | errors | p50 | p99 | max |\n|---|---|---|---|---|---|\n"
        );
        let row = |name: &str, x: &TcpRun| match (&x.open_addr, &x.open, x.open_errors) {
            (Some(addr), Some(l), Some(errors)) => format!(
                "| {name} `{addr}` | {} | {errors} | {} | {} | {} |\n",
                l.count,
                fmt_us(l.p50_us),
                fmt_us(l.p99_us),
                fmt_us(l.max_us)
            ),
            _ => String::new(),
        };
        s += &row("through", &r.through);
        if let Some(d) = &r.direct {
            s += &row("direct", d);
        }
        s += "\n";
        if let Some(p) = r.added_open_p99_us {
            s += &format!("Added open p99: **{p} µs**. ");
        }
        s += &format!(
            "Stray connections to the open target: {}.\n",
            r.open_strays.unwrap_or(0)
        );
        for e in r
            .direct
            .iter()
            .chain([&r.through])
            .flat_map(|x| &x.open_error_samples)
        {
            s += &format!("\nopen error: `{e}`\n");
        }
    }
    if let Some(svg) = svg {
        s += &format!("\n![echo latency distribution]({svg})\n");
    }
    s
}
