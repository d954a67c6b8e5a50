//! `nowconnect perf agents`: one process holding N real agent tunnels, for
//! measuring what a hub (or a cluster) spends per agent and how a crowd of
//! agents re-homes when a hub dies.
//!
//! Each agent is the product's own [`AgentProcess`] on the tokio runtime,
//! built from an in-memory `premise.yaml` ([`AgentConfig::parse`]) with its
//! own id (`--id-prefix` + index) and its own token, minted here with the
//! hub's HS256 secret ([`crate::jwt::mint`]). The agents start at `--ramp`
//! a second, are held for `--duration`, then stop.
//!
//! The only thing added around an agent is a [`Probed`] runtime: it passes
//! every call through to [`TokioAgent`] and timestamps what the agent does
//! with its hubs — every dial (`connect_hub`), its failure, the WELCOME
//! that establishes a tunnel (the first frame the hub sends, decoded with
//! the core's codec) and the tunnel's end. From these the report gives the
//! connected count over time, the time until all N were connected, and per
//! agent the gap between each failure and its next dial against the floor
//! of the agent's backoff (`nowconnect_core::backoff`): the delay before
//! the k-th redial since the backoff last started over is at least half of
//! `min(backoff_max, base · 2^k)`, and it starts over only when a tunnel
//! stayed up for [`STABLE_AFTER`]. The probe's timestamps sit outside the
//! agent's (a failure is seen before the agent hears of it, a dial after
//! the agent decided it), so a measured gap is never shorter than the
//! agent's delay: a gap below the floor is a real violation.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures_util::Stream;
use nowconnect_core::backoff::STABLE_AFTER;
use nowconnect_core::{Frame, Limits};
use nowconnect_shared::agent::{AgentProcess, AgentRt};
use nowconnect_shared::driver::{FlowBytes, FlowEnd, InlineWriter, Outgoing, WsIn};
use serde::Serialize;
use tokio::sync::watch;

use crate::agent::TokioAgent;
use crate::config::AgentConfig;

/// What `perf agents` runs.
#[derive(Clone, Debug)]
pub struct AgentsArgs {
    /// The hub tunnel URLs every agent lists, in order.
    pub hubs: Vec<String>,
    pub count: usize,
    pub id_prefix: String,
    /// The connector each agent serves and its target.
    pub connector: String,
    pub target: String,
    /// The hub's HS256 secret (`tunnel.jwt.hs256_secret_file`).
    pub jwt_key: PathBuf,
    pub tenant: Option<String>,
    pub token_ttl: Duration,
    /// Agents started per second.
    pub ramp: f64,
    /// How long to hold the agents once all were started.
    pub duration: Duration,
    /// `ha_connections` of every agent (`None`: the product's default).
    pub ha_connections: Option<u8>,
    /// `reconnect_backoff_max_sec` of every agent (`None`: the default).
    pub backoff_max_sec: Option<u64>,
    /// Progress lines on stderr every this often (when something changed).
    pub progress: Duration,
}

/// One thing an agent did with its hubs, `t_ms` after the run started.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub t_ms: f64,
    #[serde(flatten)]
    pub what: What,
}

/// `attempt` numbers an agent's dials from 0 in the order the probe saw
/// them; the events of one dial and its tunnel carry its number.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// A dial of hub `hub` (index into the report's `hubs`) started.
    Dial { attempt: u32, hub: usize },
    /// The dial failed (or was abandoned) before a tunnel existed.
    DialFailed { attempt: u32, reason: String },
    /// The hub's WELCOME arrived: the tunnel is established.
    Up {
        attempt: u32,
        replica: String,
        epoch: u64,
    },
    /// The hub said DRAIN (it is shutting down): the agent dials the next
    /// hub at once, without a backoff, and this tunnel keeps its flows.
    Drain { attempt: u32 },
    /// An established tunnel, or one that never got its WELCOME, ended.
    Down {
        attempt: u32,
        established: bool,
        reason: String,
    },
}

/// The figures of the whole crowd, updated by every probe.
#[derive(Default)]
struct Crowd {
    /// Agents with at least one established tunnel.
    connected: AtomicUsize,
    dials: AtomicU64,
    dial_failures: AtomicU64,
    ups: AtomicU64,
    downs: AtomicU64,
}

/// One agent's record.
struct Probe {
    start: Instant,
    hubs: Arc<Vec<String>>,
    crowd: Arc<Crowd>,
    /// Its established tunnels now.
    up: AtomicU32,
    /// Dials so far.
    dials: AtomicU32,
    events: Mutex<Vec<Event>>,
}

impl Probe {
    fn record(&self, what: What) {
        let t_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.events
            .lock()
            .expect("probe lock")
            .push(Event { t_ms, what });
    }

    fn established(&self, attempt: u32, replica: String, epoch: u64) {
        self.crowd.ups.fetch_add(1, Ordering::Relaxed);
        if self.up.fetch_add(1, Ordering::Relaxed) == 0 {
            self.crowd.connected.fetch_add(1, Ordering::Relaxed);
        }
        self.record(What::Up {
            attempt,
            replica,
            epoch,
        });
    }

    fn ended(&self, attempt: u32, established: bool, reason: String) {
        self.crowd.downs.fetch_add(1, Ordering::Relaxed);
        if established && self.up.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.crowd.connected.fetch_sub(1, Ordering::Relaxed);
        }
        self.record(What::Down {
            attempt,
            established,
            reason,
        });
    }
}

/// A short reason for the report (a hub's refusal can carry a body).
fn short(reason: &str) -> String {
    reason.chars().take(160).collect()
}

/// The agent runtime `R` with every hub dial and tunnel timestamped.
pub(crate) struct Probed<R> {
    inner: R,
    probe: Arc<Probe>,
}

/// Records a dial that ends without an answer (the agent abandoned it at
/// its hub-connect timeout, or stopped) when its future is dropped.
struct DialGuard {
    probe: Arc<Probe>,
    attempt: u32,
    done: bool,
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        if !self.done {
            self.probe
                .crowd
                .dial_failures
                .fetch_add(1, Ordering::Relaxed);
            self.probe.record(What::DialFailed {
                attempt: self.attempt,
                reason: "abandoned".into(),
            });
        }
    }
}

/// A hub's side of a tunnel, passed through; its WELCOME, a DRAIN and its
/// end are recorded (every frame is decoded a second time, here: the
/// probe costs the agents' process, not the hub).
pub(crate) struct ProbedReader<S> {
    inner: S,
    probe: Arc<Probe>,
    attempt: u32,
    established: bool,
    ended: bool,
}

impl<S> ProbedReader<S> {
    fn end(&mut self, reason: String) {
        if !std::mem::replace(&mut self.ended, true) {
            self.probe.ended(self.attempt, self.established, reason);
        }
    }
}

impl<S: Stream<Item = WsIn> + Unpin> Stream for ProbedReader<S> {
    type Item = WsIn;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WsIn>> {
        let item = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(item) = &item {
            match item {
                Some(WsIn::Frame(m)) => {
                    match nowconnect_core::codec::decode(m, &Limits::default()) {
                        Ok(Frame::Welcome {
                            epoch, replica_id, ..
                        }) if !self.established => {
                            self.established = true;
                            self.probe.established(self.attempt, replica_id, epoch.0);
                        }
                        Ok(Frame::Drain) => self.probe.record(What::Drain {
                            attempt: self.attempt,
                        }),
                        _ => {}
                    }
                }
                Some(WsIn::Other) => {}
                Some(WsIn::Closed(why)) => self.end(short(&format!("closed: {why}"))),
                Some(WsIn::Failed(e)) => self.end(short(&format!("read error: {e}"))),
                None => self.end("closed by the hub".into()),
            }
        }
        item
    }
}

impl<S> Drop for ProbedReader<S> {
    fn drop(&mut self) {
        self.end("closed by the agent".into());
    }
}

impl<R: AgentRt> AgentRt for Probed<R> {
    type Task = R::Task;
    type Reader = ProbedReader<R::Reader>;
    type Sink = R::Sink;
    type Msg = R::Msg;
    type Target = R::Target;
    type Listener = R::Listener;
    type Stream = R::Stream;

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) -> R::Task {
        self.inner.spawn(f)
    }

    fn cancel(&self, t: R::Task) {
        self.inner.cancel(t)
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        self.inner.sleep(d)
    }

    fn connect_hub(
        &self,
        url: String,
        token: String,
    ) -> impl Future<Output = Result<(Self::Reader, Self::Sink), String>> + Send + 'static {
        let probe = self.probe.clone();
        probe.crowd.dials.fetch_add(1, Ordering::Relaxed);
        let hub = probe
            .hubs
            .iter()
            .position(|h| *h == url)
            .unwrap_or(usize::MAX);
        let attempt = probe.dials.fetch_add(1, Ordering::Relaxed);
        probe.record(What::Dial { attempt, hub });
        let dial = self.inner.connect_hub(url, token);
        async move {
            let mut guard = DialGuard {
                probe: probe.clone(),
                attempt,
                done: false,
            };
            let r = dial.await;
            guard.done = true;
            match r {
                Ok((reader, sink)) => Ok((
                    ProbedReader {
                        inner: reader,
                        probe,
                        attempt,
                        established: false,
                        ended: false,
                    },
                    sink,
                )),
                Err(e) => {
                    probe.crowd.dial_failures.fetch_add(1, Ordering::Relaxed);
                    probe.record(What::DialFailed {
                        attempt,
                        reason: short(&e),
                    });
                    Err(e)
                }
            }
        }
    }

    fn connect_target(
        &self,
        target: String,
    ) -> impl Future<Output = std::io::Result<R::Target>> + Send + 'static {
        self.inner.connect_target(target)
    }

    fn pipe_target(
        &self,
        stream: R::Target,
        end: FlowEnd,
        bytes: FlowBytes,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.inner.pipe_target(stream, end, bytes)
    }

    async fn bind(&self, addr: std::net::SocketAddr) -> std::io::Result<R::Listener> {
        self.inner.bind(addr).await
    }

    fn local_addr(l: &R::Listener) -> std::io::Result<std::net::SocketAddr> {
        R::local_addr(l)
    }

    fn accept(
        l: &R::Listener,
    ) -> impl Future<Output = std::io::Result<(R::Stream, std::net::SocketAddr)>> + Send + '_ {
        R::accept(l)
    }

    fn writer(
        sink: R::Sink,
        rx: async_channel::Receiver<Outgoing>,
    ) -> InlineWriter<R::Sink, R::Msg> {
        R::writer(sink, rx)
    }
}

/// One agent of the report.
#[derive(Debug, Serialize)]
pub struct AgentReport {
    pub id: String,
    pub events: Vec<Event>,
}

/// The connected count at one moment.
#[derive(Debug, Serialize)]
pub struct Sample {
    pub t_ms: f64,
    pub connected: usize,
    pub dials: u64,
    pub dial_failures: u64,
    pub tunnels_ended: u64,
}

/// Redials measured against the agents' backoff.
#[derive(Debug, Default, Serialize)]
pub struct BackoffCheck {
    /// Dials that followed a failed dial or an ended tunnel.
    pub redials: u64,
    /// The shortest gap between a failure and the next dial.
    pub min_gap_ms: Option<f64>,
    /// Redials sooner than the floor of the agent's backoff schedule.
    pub below_floor: u64,
    /// The first few of them: (agent, gap ms, floor ms).
    pub examples: Vec<(String, f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct AgentsReport {
    pub count: usize,
    /// Agents started (fewer than `count` when a signal stopped the ramp).
    pub started: usize,
    pub hubs: Vec<String>,
    pub id_prefix: String,
    pub ramp_per_sec: f64,
    pub ha_connections: u8,
    /// The run's start on the wall clock (ms since the Unix epoch): `t_ms`
    /// of every event and sample counts from here.
    pub start_unix_ms: f64,
    /// When the last agent was started.
    pub started_all_ms: f64,
    /// When all N agents had an established tunnel at once, if they did.
    pub all_connected_ms: Option<f64>,
    pub max_connected: usize,
    /// When the agents were told to stop.
    pub stop_ms: f64,
    pub connected_at_stop: usize,
    pub dials: u64,
    pub dial_failures: u64,
    pub tunnels_up: u64,
    pub tunnels_ended: u64,
    /// The backoff check (single-homed agents only: a multi-homed agent's
    /// slots each have their own backoff, which the probe cannot tell
    /// apart).
    pub backoff: Option<BackoffCheck>,
    pub nofile_limit: u64,
    pub samples: Vec<Sample>,
    pub agents: Vec<AgentReport>,
}

/// The agent's `premise.yaml`, in memory.
fn agent_yaml(a: &AgentsArgs, id: &str) -> String {
    let hubs: Vec<String> = a.hubs.iter().map(|h| format!("'{h}'")).collect();
    let mut y = format!(
        "agent_id: '{id}'\nhubs: [{}]\nconnectors:\n  - {{ name: '{}', target: '{}' }}\n",
        hubs.join(", "),
        a.connector,
        a.target
    );
    if let Some(n) = a.ha_connections {
        y += &format!("ha_connections: {n}\n");
    }
    if let Some(s) = a.backoff_max_sec {
        y += &format!("reconnect_backoff_max_sec: {s}\n");
    }
    y
}

/// Run the crowd; the report.
pub async fn perf_agents(a: &AgentsArgs) -> Result<AgentsReport, String> {
    if a.count == 0 || a.hubs.is_empty() || a.ramp <= 0.0 {
        return Err("--count ≥ 1, at least one --hub and --ramp > 0".into());
    }
    // Each agent holds a socket per tunnel (one more while it redials).
    let nofile = nowconnect_shared::nofile::raise_to_hard()?;
    let want = a.count as u64 * u64::from(a.ha_connections.unwrap_or(1)) + 64;
    if nofile < want {
        eprintln!(
            "perf-agents: warning: RLIMIT_NOFILE is {nofile}; {} agents want about {want} sockets",
            a.count
        );
    }
    let secret = crate::jwt::read_secret(&a.jwt_key)?;
    let start = Instant::now();
    let start_unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| format!("clock: {e}"))?
        .as_secs_f64()
        * 1000.0;
    let since = move |t: Instant| t.duration_since(start).as_secs_f64() * 1000.0;
    let hubs = Arc::new(a.hubs.clone());
    let crowd = Arc::new(Crowd::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let connectors = vec![a.connector.clone()];
    let mut probes: Vec<(String, Arc<Probe>)> = Vec::with_capacity(a.count);
    let mut tasks = Vec::with_capacity(a.count);
    // The settings every agent runs with (the first agent's, as parsed).
    let mut core = None;

    let sampler = {
        let crowd = crowd.clone();
        let stop = stop_rx.clone();
        let (count, every) = (a.count, a.progress);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut all_connected = None;
            let mut max_connected = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut last_print = (Instant::now(), usize::MAX, u64::MAX);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let s = Sample {
                    t_ms: since(now),
                    connected: crowd.connected.load(Ordering::Relaxed),
                    dials: crowd.dials.load(Ordering::Relaxed),
                    dial_failures: crowd.dial_failures.load(Ordering::Relaxed),
                    tunnels_ended: crowd.downs.load(Ordering::Relaxed),
                };
                max_connected = max_connected.max(s.connected);
                if s.connected == count && all_connected.is_none() {
                    all_connected = Some(s.t_ms);
                }
                let changed = (s.connected, s.dials) != (last_print.1, last_print.2);
                if (changed && now - last_print.0 >= every)
                    || now - last_print.0 >= Duration::from_secs(30)
                {
                    eprintln!(
                        "perf-agents: {:7.1}s connected {}/{count}, dials {}, failed dials {}, tunnels ended {}",
                        s.t_ms / 1000.0,
                        s.connected,
                        s.dials,
                        s.dial_failures,
                        s.tunnels_ended
                    );
                    last_print = (now, s.connected, s.dials);
                }
                // One sample a second in the report, every change in between.
                let keep = samples.last().is_none_or(|p: &Sample| {
                    s.t_ms - p.t_ms >= 1000.0 || p.connected != s.connected
                });
                if keep {
                    samples.push(s);
                }
                if *stop.borrow() {
                    return (samples, all_connected, max_connected);
                }
            }
        })
    };
    // SIGTERM or SIGINT ends the run early, report included.
    let (sig_tx, mut signalled) = watch::channel(false);
    tokio::spawn(async move {
        stop_signal().await;
        let _ = sig_tx.send(true);
    });
    for i in 0..a.count {
        let due = start + Duration::from_secs_f64(i as f64 / a.ramp);
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = signalled.wait_for(|v| *v) => break,
        }
        let id = format!("{}{i}", a.id_prefix);
        let token = crate::jwt::mint(&secret, &id, &connectors, a.tenant.as_deref(), a.token_ttl)?;
        let file = Path::new("perf-agents").join(&id);
        let cfg = AgentConfig::parse(&file, &agent_yaml(a, &id), Some(token))
            .map_err(|e| e.to_string())?;
        core.get_or_insert_with(|| cfg.core_config());
        let probe = Arc::new(Probe {
            start,
            hubs: hubs.clone(),
            crowd: crowd.clone(),
            up: AtomicU32::new(0),
            dials: AtomicU32::new(0),
            events: Mutex::new(Vec::new()),
        });
        let rt = Probed {
            inner: TokioAgent::for_config(&cfg)?,
            probe: probe.clone(),
        };
        let agent = AgentProcess::new(rt, cfg);
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(agent.run(async move {
            let _ = rx.wait_for(|v| *v).await;
        })));
        probes.push((id, probe));
    }
    let started_all_ms = since(Instant::now());
    let started = tasks.len();
    tokio::select! {
        _ = tokio::time::sleep(a.duration) => {}
        _ = signalled.wait_for(|v| *v) => eprintln!("perf-agents: signalled: stopping"),
    }
    let stop_ms = since(Instant::now());
    let connected_at_stop = crowd.connected.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let (samples, all_connected_ms, max_connected) =
        sampler.await.map_err(|e| format!("sampler: {e}"))?;
    let all = futures_util::future::join_all(tasks);
    if tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .is_err()
    {
        eprintln!("perf-agents: warning: some agents did not stop within 10 s");
    }
    let agents: Vec<AgentReport> = probes
        .into_iter()
        .map(|(id, p)| AgentReport {
            id,
            events: std::mem::take(&mut *p.events.lock().expect("probe lock")),
        })
        .collect();
    let core = core.ok_or("stopped before the first agent started")?;
    let ha = core.ha_connections;
    let backoff =
        (ha == 1).then(|| check_backoff(&agents, core.backoff_base, core.backoff_max, stop_ms));
    Ok(AgentsReport {
        count: a.count,
        started,
        hubs: a.hubs.clone(),
        id_prefix: a.id_prefix.clone(),
        ramp_per_sec: a.ramp,
        ha_connections: ha,
        start_unix_ms,
        started_all_ms,
        all_connected_ms,
        max_connected,
        stop_ms,
        connected_at_stop,
        dials: crowd.dials.load(Ordering::Relaxed),
        dial_failures: crowd.dial_failures.load(Ordering::Relaxed),
        tunnels_up: crowd.ups.load(Ordering::Relaxed),
        tunnels_ended: crowd.downs.load(Ordering::Relaxed),
        backoff,
        nofile_limit: nofile,
        samples,
        agents,
    })
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Probe timestamps are within this of the agent's own (the end of a dial
/// the agent abandoned is seen when its task is dropped, a little after).
const CLOCK_SLACK_MS: f64 = 2.0;

/// Every redial of every (single-homed) agent against its backoff floor,
/// following the agent's own rules: a failed dial or a lost tunnel draws
/// the next delay; a DRAIN dials at once and leaves the drained tunnel to
/// end on its own (no delay drawn); the delays start over when a tunnel
/// had stayed up for [`STABLE_AFTER`] (at a loss or a DRAIN). Events after
/// `stop_ms` (the agents' own shutdown) are left out.
fn check_backoff(
    agents: &[AgentReport],
    base: Duration,
    max: Duration,
    stop_ms: f64,
) -> BackoffCheck {
    let mut c = BackoffCheck::default();
    let stable_ms = STABLE_AFTER.as_secs_f64() * 1000.0;
    for a in agents {
        // Delays drawn since the backoff last started over; when the
        // current tunnel came up; the end awaiting its redial and that
        // redial's floor; the tunnels whose hub said DRAIN.
        let mut drawn: u32 = 0;
        let mut up_since: Option<f64> = None;
        let mut pending: Option<(f64, f64)> = None;
        let mut drained = std::collections::BTreeSet::new();
        for e in a.events.iter().take_while(|e| e.t_ms < stop_ms) {
            let stable = |u: f64| e.t_ms - u + CLOCK_SLACK_MS >= stable_ms;
            match &e.what {
                What::Dial { .. } => {
                    if let Some((end, floor)) = pending.take() {
                        let gap = e.t_ms - end;
                        c.redials += 1;
                        c.min_gap_ms = Some(c.min_gap_ms.map_or(gap, |m: f64| m.min(gap)));
                        if gap + CLOCK_SLACK_MS < floor {
                            c.below_floor += 1;
                            if c.examples.len() < 10 {
                                c.examples.push((a.id.clone(), gap, floor));
                            }
                        }
                    }
                }
                What::Up { .. } => up_since = Some(e.t_ms),
                What::Drain { attempt } => {
                    drained.insert(*attempt);
                    if up_since.take().is_some_and(stable) {
                        drawn = 0;
                    }
                    pending = None;
                }
                What::Down { attempt, .. } if drained.contains(attempt) => {}
                What::DialFailed { .. } | What::Down { .. } => {
                    // The lenient reading when the time up is close to
                    // the bound: the delays start over.
                    if up_since.take().is_some_and(stable) {
                        drawn = 0;
                    }
                    let d = base.saturating_mul(1u32 << drawn.min(30)).min(max);
                    drawn = drawn.saturating_add(1);
                    pending = Some((e.t_ms, d.as_secs_f64() * 1000.0 / 2.0));
                }
            }
        }
    }
    c
}

/// The one-line summary on stdout.
pub fn summary_line(r: &AgentsReport) -> String {
    let s = |ms: Option<f64>| ms.map_or("never".into(), |v| format!("{:.2}s", v / 1000.0));
    let backoff = match &r.backoff {
        Some(b) => format!(
            "redials={} min_redial_gap_ms={} below_backoff_floor={}",
            b.redials,
            b.min_gap_ms.map_or("-".into(), |g| format!("{g:.1}")),
            b.below_floor
        ),
        None => "backoff_check=n/a(multi-homed)".into(),
    };
    format!(
        "perf-agents: count={} connected={} max_connected={} all_connected_in={} started_all_in={:.2}s dials={} dial_failures={} tunnels_ended={} {backoff}",
        r.count,
        r.connected_at_stop,
        r.max_connected,
        s(r.all_connected_ms),
        r.started_all_ms / 1000.0,
        r.dials,
        r.dial_failures,
        r.tunnels_ended,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t_ms: f64, what: What) -> Event {
        Event { t_ms, what }
    }

    fn agent(events: Vec<Event>) -> AgentReport {
        AgentReport {
            id: "a".into(),
            events,
        }
    }

    const BASE: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn a_redial_sooner_than_the_floor_is_counted() {
        let a = agent(vec![
            ev(0.0, What::Dial { attempt: 0, hub: 0 }),
            ev(
                5.0,
                What::DialFailed {
                    attempt: 0,
                    reason: "x".into(),
                },
            ),
            // First delay: at least 100 ms.
            ev(60.0, What::Dial { attempt: 0, hub: 1 }),
            ev(
                70.0,
                What::DialFailed {
                    attempt: 0,
                    reason: "x".into(),
                },
            ),
            // Second: at least 200 ms.
            ev(290.0, What::Dial { attempt: 0, hub: 0 }),
        ]);
        let c = check_backoff(&[a], BASE, MAX, f64::MAX);
        assert_eq!(c.redials, 2);
        assert_eq!(c.below_floor, 1, "{c:?}");
        assert_eq!(c.examples[0].2, 100.0);
    }

    #[test]
    fn a_stable_tunnel_starts_the_delays_over_and_a_short_one_does_not() {
        let up = |t| {
            ev(
                t,
                What::Up {
                    attempt: 0,
                    replica: "h".into(),
                    epoch: 1,
                },
            )
        };
        let down = |t| {
            ev(
                t,
                What::Down {
                    attempt: 0,
                    established: true,
                    reason: "x".into(),
                },
            )
        };
        let a = agent(vec![
            ev(0.0, What::Dial { attempt: 0, hub: 0 }),
            ev(
                1.0,
                What::DialFailed {
                    attempt: 0,
                    reason: "x".into(),
                },
            ),
            ev(150.0, What::Dial { attempt: 0, hub: 0 }),
            up(160.0),
            // Up 20 s: the next delay is the first again (≥ 100 ms).
            down(20_160.0),
            ev(20_270.0, What::Dial { attempt: 0, hub: 1 }),
            up(20_280.0),
            // Up 1 s: the delays go on growing (≥ 200 ms).
            down(21_280.0),
            ev(21_400.0, What::Dial { attempt: 0, hub: 0 }),
        ]);
        let c = check_backoff(&[a], BASE, MAX, f64::MAX);
        assert_eq!(c.redials, 3);
        assert_eq!(c.below_floor, 1, "{c:?}");
        assert_eq!(c.examples[0].2, 200.0);
        assert!((c.min_gap_ms.unwrap() - 110.0).abs() < 1e-9);
    }

    #[test]
    fn a_drain_redials_at_once_and_its_tunnel_ending_draws_no_delay() {
        let a = agent(vec![
            ev(0.0, What::Dial { attempt: 0, hub: 0 }),
            ev(
                1.0,
                What::Up {
                    attempt: 0,
                    replica: "a".into(),
                    epoch: 1,
                },
            ),
            ev(500.0, What::Drain { attempt: 0 }),
            ev(
                510.0,
                What::Down {
                    attempt: 0,
                    established: true,
                    reason: "x".into(),
                },
            ),
            // Seen after the drained tunnel's end, decided before it.
            ev(520.0, What::Dial { attempt: 1, hub: 1 }),
            ev(
                521.0,
                What::DialFailed {
                    attempt: 1,
                    reason: "x".into(),
                },
            ),
            ev(700.0, What::Dial { attempt: 2, hub: 2 }),
        ]);
        let c = check_backoff(&[a], BASE, MAX, f64::MAX);
        assert_eq!(c.redials, 1, "{c:?}");
        assert_eq!(c.below_floor, 0, "{c:?}");
    }
}
