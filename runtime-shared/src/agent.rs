//! The agent process, written once over [`AgentRt`]: it carries out what
//! the core [`AgentNode`] decides (dial a hub, dial a target, reset a flow,
//! end a tunnel), drives each tunnel's core [`Tunnel`] through a
//! [`TunnelDriver`] on the agent task itself (no reader or writer task hop
//! per message), and pipes each flow to its target socket. Every decision is
//! the node's; what is here is sockets, tasks, tokens, logs and metrics. The
//! agent's HTTP endpoint ([`crate::agent_http`]) runs beside it, in tasks of
//! its own.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use futures_lite::StreamExt;
use futures_lite::future::{pending, race};
use nowconnect_core::agent::AttemptId;
use nowconnect_core::agent_node::{AgentCommand, AgentNode, LinkRole};
use nowconnect_core::tunnel::{Tunnel, TunnelEvent};
use nowconnect_core::{Cid, ErrorCode};

use crate::agent_http::Endpoint;
use crate::agent_status::{AgentStatus, TunnelView};
use crate::config::AgentConfig;
use crate::driver::{
    CMD_BATCH, FlowBytes, FlowEnd, InlineWriter, LinkCmd, LoopTimer, PeerMsg, TunnelCmd,
    TunnelDriver, WsIn,
};
use crate::metrics::add_delta;
use crate::metrics::agent::{ActiveFlow, AgentMetrics, ConnectorSeries, DialFailure};
use crate::token_renewal::AgentRenewal;
use nowconnect_core::renewal::Presented;

pub use crate::rt::AgentRt;

/// A flow of the agent: cids are per tunnel, so (tunnel attempt, cid).
type Flow = (AttemptId, Cid);

/// What the dial tasks report to the agent task.
enum Internal<R: AgentRt> {
    HubConnected {
        attempt: AttemptId,
        /// `exp` of the token it dialed with.
        token_exp: Duration,
        reader: R::Reader,
        sink: R::Sink,
    },
    HubFailed {
        attempt: AttemptId,
        reason: String,
    },
    TargetConnected {
        flow: Flow,
        stream: R::Target,
    },
    TargetFailed {
        flow: Flow,
        reason: String,
        kind: DialFailure,
    },
}

/// A flow waiting for its target dial.
struct Waiting {
    end: FlowEnd,
    /// Counts it in `flows_active` (a configured connector's flow only).
    active: Option<ActiveFlow>,
    /// When its dial started.
    dialed: Option<Instant>,
}

/// The connector name a flow of a connector the agent does not serve is
/// attached under: the node resets it at once, and a hub's names never
/// become labels, not even in the link's unexported series.
const NOT_SERVED: &str = "(not served)";

enum Wake<R: AgentRt> {
    Stop,
    Internal(Internal<R>),
    /// What the socket of this attempt delivered (`None`: it ended).
    Ws(AttemptId, Option<WsIn>),
    /// A flow command for the tunnel of this attempt.
    Cmd(AttemptId, LinkCmd<TunnelCmd>),
    /// A socket took what was queued.
    Written,
    Timer,
}

/// One tunnel of the agent: its socket is read and written by the agent
/// task itself.
struct Connection<R: AgentRt> {
    attempt: AttemptId,
    /// `exp` of the token the hub holds for this tunnel.
    token_exp: Duration,
    driver: TunnelDriver,
    cmd_rx: Receiver<LinkCmd<TunnelCmd>>,
    reader: R::Reader,
    writer: InlineWriter<R::Sink, R::Msg>,
}

impl<R: AgentRt> Connection<R> {
    /// The next frame from the hub, command from a flow, or the socket
    /// ready for what is queued.
    async fn input(&mut self) -> Wake<R> {
        let attempt = self.attempt;
        let (reader, cmd_rx, writer) = (&mut self.reader, &self.cmd_rx, &mut self.writer);
        race(
            async { Wake::Ws(attempt, reader.next().await) },
            race(
                async {
                    match cmd_rx.recv().await {
                        Ok(c) => Wake::Cmd(attempt, c),
                        // Never: the driver holds a sender.
                        Err(_) => pending().await,
                    }
                },
                async {
                    if writer.is_idle() {
                        pending::<()>().await;
                    }
                    writer.write().await;
                    Wake::Written
                },
            ),
        )
        .await
    }

    fn on_ws(&mut self, now: Instant, msg: Option<WsIn>) {
        let t = &mut self.driver.tunnel;
        match msg {
            Some(WsIn::Frame(m)) => t.handle_message(now, &m),
            Some(WsIn::Other) => {}
            Some(WsIn::Closed(why)) => t.on_disconnected(&format!("hub closed the tunnel: {why}")),
            Some(WsIn::Failed(e)) => t.on_disconnected(&format!("tunnel read error: {e}")),
            None => t.on_disconnected("tunnel closed by the hub"),
        }
    }

    fn on_cmds(&mut self, now: Instant, first: LinkCmd<TunnelCmd>) {
        self.driver.on_cmd(now, first);
        for _ in 0..CMD_BATCH {
            match self.cmd_rx.try_recv() {
                Ok(cmd) => self.driver.on_cmd(now, cmd),
                Err(_) => break,
            }
        }
    }
}

async fn input<R: AgentRt>(c: Option<&mut Connection<R>>) -> Wake<R> {
    match c {
        Some(c) => c.input().await,
        None => pending().await,
    }
}

/// Each tunnel with the `exp` of the token its hub holds.
fn presented<R: AgentRt>(
    conns: &mut BTreeMap<AttemptId, Connection<R>>,
) -> impl Iterator<Item = Presented<'_>> {
    conns.values_mut().map(|c| Presented {
        exp: &mut c.token_exp,
        tunnel: &mut c.driver.tunnel,
    })
}

/// The agent's I/O around its [`AgentNode`].
struct Io<R: AgentRt> {
    rt: Arc<R>,
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
    /// The series of each configured connector.
    connectors: BTreeMap<String, ConnectorSeries>,
    /// The tunnels as `/readyz` and `nowconnect_agent_tunnels` show them.
    view: TunnelView,
    itx: Sender<Internal<R>>,
    /// Its tunnels by attempt: the current one, and one whose hub said DRAIN.
    conns: BTreeMap<AttemptId, Connection<R>>,
    /// Hub dials in progress (one per slot at most), by attempt.
    hub_dials: BTreeMap<AttemptId, R::Task>,
    target_dials: BTreeMap<Flow, R::Task>,
    /// Flows waiting for their target.
    waiting: BTreeMap<Flow, Waiting>,
    /// Writers of ended tunnels, still to send their close frame.
    closing: Vec<InlineWriter<R::Sink, R::Msg>>,
    renewal: AgentRenewal,
    /// The agent is shutting down: what it abandons is no warning.
    stopping: bool,
    /// The node's figures as last exported.
    reported: Reported,
}

/// What [`Io::report`] last put into the metrics.
#[derive(Default)]
struct Reported {
    established: usize,
    duplicate_hubs: u64,
}

impl<R: AgentRt> Io<R> {
    /// Carry out every command the node has queued, and hand it what the
    /// tunnels report meanwhile, until it has nothing more to say.
    fn execute(&mut self, node: &mut AgentNode) {
        loop {
            while let Some(c) = node.poll_command() {
                self.command(node, c);
            }
            let now = Instant::now();
            let mut reported = false;
            for (attempt, c) in self.conns.iter_mut() {
                for ev in c.driver.drain() {
                    reported = true;
                    log_event(*attempt, &ev, c.driver.tunnel.flow_count());
                    match &ev {
                        TunnelEvent::Open { cid, connector } => {
                            let series = self.connectors.get(connector.as_str());
                            let name = series.map_or(NOT_SERVED, |_| connector.as_str());
                            let end = c.driver.attach_flow(*cid, name);
                            let active = series.map(|s| {
                                s.flows.inc();
                                ActiveFlow::new(&s.flows_active)
                            });
                            let w = Waiting {
                                end,
                                active,
                                dialed: None,
                            };
                            self.waiting.insert((*attempt, *cid), w);
                        }
                        TunnelEvent::Closed { code, reason }
                            if node.role(*attempt) == Some(LinkRole::Current) =>
                        {
                            let why = format!("tunnel closed: {code}: {reason}");
                            self.view.failed(node.slot_of(*attempt), &why);
                        }
                        TunnelEvent::Flow(_) => {}
                        _ => self.view.touch(),
                    }
                    node.tunnel_event(now, *attempt, &ev);
                }
            }
            if !reported {
                break;
            }
        }
        // A tunnel that just became established, or one left with an older
        // token than the agent now holds, gets the newest.
        self.renewal.catch_up(presented(&mut self.conns));
        for c in self.conns.values_mut() {
            c.driver.flush();
            c.driver.report_due(Instant::now());
        }
        self.report(node);
    }

    /// The node's tunnel figures into the metrics and the readiness when
    /// they changed: a few small values compared per wake-up, no label
    /// looked up. A multi-homed agent also logs how many of its tunnels are
    /// up.
    fn report(&mut self, node: &AgentNode) {
        self.view.update(node);
        let established = node.connected_slots();
        if established != self.reported.established {
            self.reported.established = established;
            self.metrics.tunnels_established.set(established as i64);
            if node.slots() > 1 {
                tracing::info!(established, wanted = node.slots(), "tunnels established");
            }
        }
        add_delta(
            &self.metrics.duplicate_hub_tunnels,
            node.counters().duplicate_hubs,
            &mut self.reported.duplicate_hubs,
        );
    }

    fn command(&mut self, node: &AgentNode, c: AgentCommand) {
        match c {
            AgentCommand::DialHub { attempt, url, slot } => {
                tracing::info!(attempt = attempt.0, slot, %url, "connecting to hub");
                self.view.dialing(slot, attempt, &url);
                let token = self.cfg.dial_token();
                self.renewal.observe(&token);
                let token_exp = crate::token_renewal::token_exp(&token);
                let (rt, itx) = (self.rt.clone(), self.itx.clone());
                let task = self.rt.spawn(async move {
                    let msg = match rt.connect_hub(url, token).await {
                        Ok((reader, sink)) => Internal::HubConnected {
                            attempt,
                            token_exp,
                            reader,
                            sink,
                        },
                        Err(reason) => Internal::HubFailed { attempt, reason },
                    };
                    let _ = itx.try_send(msg);
                });
                if let Some(t) = self.hub_dials.insert(attempt, task) {
                    self.rt.cancel(t);
                }
            }
            AgentCommand::CancelHubDial { attempt, reason } => {
                if let Some(t) = self.hub_dials.remove(&attempt) {
                    if self.stopping {
                        tracing::info!(attempt = attempt.0, %reason, "hub attempt abandoned");
                    } else {
                        tracing::warn!(attempt = attempt.0, %reason, "hub attempt abandoned");
                        self.view.failed(node.slot_of(attempt), &reason);
                    }
                    self.rt.cancel(t);
                }
            }
            AgentCommand::CloseTunnel {
                attempt,
                code,
                reason,
            } => {
                if let Some(c) = self.conns.get_mut(&attempt) {
                    if code == ErrorCode::Shutdown {
                        tracing::info!(attempt = attempt.0, %code, %reason, "closing the tunnel");
                    } else {
                        tracing::warn!(attempt = attempt.0, %code, %reason, "closing the tunnel");
                        // A slot's own tunnel (a duplicate hub, no WELCOME
                        // in time): why that slot goes on.
                        self.view.failed(node.slot_of(attempt), &reason);
                    }
                    c.driver.tunnel.close(code, &reason);
                }
            }
            AgentCommand::EndTunnel {
                attempt,
                code,
                reason,
            } => {
                if let Some(mut c) = self.conns.remove(&attempt) {
                    // Flow resets the close caused go to their sockets.
                    c.driver.drain();
                    c.driver.close_socket(code, &reason);
                    // Dropping the reader is enough; what is queued (the
                    // close frame) still goes out.
                    self.closing.push(c.writer);
                }
            }
            AgentCommand::DialTarget {
                attempt,
                cid,
                target,
            } => {
                let (rt, itx) = (self.rt.clone(), self.itx.clone());
                let flow = (attempt, cid);
                if let Some(w) = self.waiting.get_mut(&flow) {
                    w.dialed = Some(Instant::now());
                }
                let task = self.rt.spawn(async move {
                    let msg = match rt.connect_target(target.clone()).await {
                        Ok(stream) => Internal::TargetConnected { flow, stream },
                        Err(e) => Internal::TargetFailed {
                            flow,
                            reason: format!("{target}: {e}"),
                            kind: DialFailure::of(&e),
                        },
                    };
                    let _ = itx.try_send(msg);
                });
                self.target_dials.insert(flow, task);
            }
            AgentCommand::CancelTarget { attempt, cid } => {
                if let Some(t) = self.target_dials.remove(&(attempt, cid)) {
                    self.rt.cancel(t);
                }
                self.waiting.remove(&(attempt, cid));
            }
            AgentCommand::ResetFlow {
                attempt,
                cid,
                code,
                reason,
            } => {
                tracing::warn!(attempt = attempt.0, cid = cid.0, %code, %reason, "flow reset");
                if let Some(c) = self.conns.get_mut(&attempt) {
                    // The node's dial timer ran out (its dial was cancelled
                    // just before): a timeout of the flow's connector.
                    if code == ErrorCode::ConnectTimeout
                        && let Some(s) = c
                            .driver
                            .pipes
                            .connector(cid)
                            .and_then(|n| self.connectors.get(n))
                    {
                        s.dial_errors[DialFailure::Timeout as usize].inc();
                    }
                    let msg = PeerMsg::Reset { code, reason };
                    c.driver.on_cmd(Instant::now(), LinkCmd::Flow { cid, msg });
                }
            }
        }
    }

    fn on_internal(&mut self, node: &mut AgentNode, now: Instant, i: Internal<R>) {
        if matches!(
            i,
            Internal::HubConnected { .. } | Internal::HubFailed { .. }
        ) {
            self.view.touch();
        }
        match i {
            Internal::HubConnected {
                attempt,
                token_exp,
                reader,
                sink,
            } => {
                self.hub_dials.remove(&attempt);
                if node.hub_connected(now, attempt).is_err() {
                    return;
                }
                let (out_tx, out_rx) = async_channel::unbounded();
                let (cmd_tx, cmd_rx) = async_channel::unbounded();
                let connectors = node.connectors();
                let tunnel = Tunnel::agent_slot(
                    now,
                    self.cfg.tunnel_config(),
                    &self.cfg.raw.agent_id,
                    &connectors,
                    node.slot_of(attempt),
                    node.slots(),
                );
                let mut driver =
                    TunnelDriver::new(tunnel, out_tx, cmd_tx, self.metrics.link.clone());
                driver.flush();
                let writer = R::writer(sink, out_rx);
                self.conns.insert(
                    attempt,
                    Connection {
                        attempt,
                        token_exp,
                        driver,
                        cmd_rx,
                        reader,
                        writer,
                    },
                );
            }
            Internal::HubFailed { attempt, reason } => {
                self.hub_dials.remove(&attempt);
                tracing::warn!(attempt = attempt.0, %reason, "hub connection failed");
                if node.is_dialing(attempt) {
                    self.view.failed(node.slot_of(attempt), &reason);
                }
                node.hub_failed(now, attempt);
            }
            Internal::TargetConnected { flow, stream } => {
                self.target_dials.remove(&flow);
                if node.target_connected(now, flow.0, flow.1)
                    && let Some(w) = self.waiting.remove(&flow)
                {
                    let series = self.connectors.get(&w.end.connector);
                    let bytes = series.map_or_else(FlowBytes::default, |s| {
                        if let Some(t) = w.dialed {
                            s.dial_seconds.observe(t.elapsed().as_secs_f64());
                        }
                        s.target_bytes()
                    });
                    let pipe = self.rt.pipe_target(stream, w.end, bytes);
                    let active = w.active;
                    self.rt.spawn(async move {
                        pipe.await;
                        drop(active);
                    });
                }
            }
            Internal::TargetFailed { flow, reason, kind } => {
                self.target_dials.remove(&flow);
                if let Some(s) = self
                    .waiting
                    .get(&flow)
                    .and_then(|w| self.connectors.get(&w.end.connector))
                {
                    s.dial_errors[kind as usize].inc();
                }
                node.target_failed(now, flow.0, flow.1, &reason);
            }
        }
    }

    /// Let the ended tunnels' writers send their close frames (2 s at most)
    /// in tasks of their own.
    fn finish_closed(&mut self) {
        for mut writer in self.closing.drain(..) {
            let grace = self.rt.sleep(Duration::from_secs(2));
            self.rt.spawn(async move {
                race(writer.write(), grace).await;
            });
        }
    }

    /// At shutdown: wait (2 s at most) for the close frames to go out.
    async fn flush_closed(&mut self) {
        let writes = futures_util::future::join_all(self.closing.iter_mut().map(|w| w.write()));
        race(
            async {
                writes.await;
            },
            self.rt.sleep(Duration::from_secs(2)),
        )
        .await;
    }

    fn deadline(&self, node: &AgentNode) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| c.driver.deadline())
            .chain(node.poll_timeout())
            .chain(self.renewal.deadline(Instant::now()))
            .min()
    }

    fn on_timer(&mut self, node: &mut AgentNode, now: Instant) {
        self.view.touch();
        let cfg = &self.cfg;
        self.renewal
            .renew(now, || cfg.current_token(), presented(&mut self.conns));
        node.handle_timeout(now);
        for c in self.conns.values_mut() {
            c.driver.tunnel.handle_timeout(now);
        }
    }
}

fn log_event(attempt: AttemptId, ev: &TunnelEvent, open_flows: usize) {
    match ev {
        TunnelEvent::Established {
            epoch,
            codec,
            replica_id,
        } => tracing::info!(
            attempt = attempt.0,
            epoch = epoch.0,
            codec = codec.as_str(),
            hub = replica_id.as_str(),
            "tunnel established"
        ),
        TunnelEvent::Drain => tracing::info!(
            attempt = attempt.0,
            open_flows,
            "hub is draining: moving to the next hub, this tunnel keeps its flows"
        ),
        TunnelEvent::Closed { code, reason } => {
            tracing::warn!(attempt = attempt.0, %code, %reason, "tunnel closed")
        }
        _ => {}
    }
}

/// An agent process: its runtime, configuration, metrics and, once bound,
/// the listener of its HTTP endpoint.
pub struct AgentProcess<R: AgentRt> {
    rt: R,
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
    http: Option<R::Listener>,
}

impl<R: AgentRt> AgentProcess<R> {
    pub fn new(rt: R, cfg: AgentConfig) -> Self {
        let connectors: Vec<String> = cfg.raw.connectors.iter().map(|c| c.name.clone()).collect();
        let metrics = Arc::new(AgentMetrics::new(&cfg.raw.hubs, &connectors));
        AgentProcess {
            rt,
            cfg,
            metrics,
            http: None,
        }
    }

    pub fn cfg(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Bind `http.bind` when the file sets it; the address it took.
    pub async fn bind_http(&mut self) -> Result<Option<SocketAddr>, String> {
        Ok(match crate::agent_http::bind(&self.rt, &self.cfg).await? {
            Some((l, addr)) => {
                self.http = Some(l);
                Some(addr)
            }
            None => None,
        })
    }

    /// Run until `stop` completes.
    pub async fn run(self, stop: impl Future<Output = ()> + Send) {
        run_agent(self.rt, self.cfg, self.metrics, self.http, stop).await
    }
}

/// The line an agent prints on stdout once it runs (operators and tests
/// wait for it): `nowconnect agent started`, and `http=ADDR` with the
/// address its endpoint took.
pub fn start_line(http: Option<SocketAddr>) -> String {
    match http {
        Some(a) => format!("nowconnect agent started http={a}"),
        None => "nowconnect agent started".into(),
    }
}

/// Run the agent of `cfg` until `stop` completes, serving its HTTP endpoint
/// on `http` meanwhile.
async fn run_agent<R: AgentRt>(
    rt: R,
    cfg: AgentConfig,
    metrics: Arc<AgentMetrics>,
    http: Option<R::Listener>,
    stop: impl Future<Output = ()> + Send,
) {
    let mut node = AgentNode::new(Instant::now(), cfg.core_config(), rand::random());
    metrics.tunnels_wanted.set(i64::from(node.slots()));
    let (itx, irx) = async_channel::unbounded::<Internal<R>>();
    let renewal = AgentRenewal::new(&cfg.token);
    let rt = Arc::new(rt);
    let status = Arc::new(AgentStatus::default());
    let server = http.map(|l| {
        let ep = Arc::new(Endpoint {
            cfg: cfg.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
        });
        rt.spawn(crate::agent_http::serve(rt.clone(), l, ep))
    });
    let connectors = cfg
        .raw
        .connectors
        .iter()
        .map(|c| (c.name.clone(), metrics.connector(&c.name)))
        .collect();
    let view = TunnelView::new(&cfg, &metrics, status);
    let mut io = Io {
        rt: rt.clone(),
        cfg,
        metrics,
        connectors,
        view,
        itx,
        conns: BTreeMap::new(),
        hub_dials: BTreeMap::new(),
        target_dials: BTreeMap::new(),
        waiting: BTreeMap::new(),
        closing: Vec::new(),
        renewal,
        stopping: false,
        reported: Reported::default(),
    };
    let mut stop = pin!(stop);
    let mut timer = LoopTimer::default();
    loop {
        io.execute(&mut node);
        io.finish_closed();
        debug_assert!(
            io.conns.len() <= 2 * usize::from(node.slots()),
            "the node holds two tunnels per slot at most"
        );
        timer.set(io.deadline(&node), |d| rt.sleep(d));
        let wake = {
            // Two tunnels per slot at most (its current one and one whose
            // hub said DRAIN), four slots at most.
            let mut conns = io.conns.values_mut();
            let mut next = || input(conns.next());
            let (a, b, c, d) = (next(), next(), next(), next());
            let (e, f, g, h) = (next(), next(), next(), next());
            let internal = async {
                match irx.recv().await {
                    Ok(i) => Wake::Internal(i),
                    // Never: the loop holds a sender.
                    Err(_) => pending().await,
                }
            };
            let timer = async {
                timer.wait().await;
                Wake::Timer
            };
            let stop = async {
                stop.as_mut().await;
                Wake::Stop
            };
            let tunnels = race(race(race(a, b), race(c, d)), race(race(e, f), race(g, h)));
            race(race(stop, race(internal, timer)), tunnels).await
        };
        let now = Instant::now();
        match wake {
            Wake::Stop => {
                io.stopping = true;
                node.stop();
                io.view.touch();
                io.execute(&mut node);
                io.flush_closed().await;
                if let Some(t) = server {
                    rt.cancel(t);
                }
                break;
            }
            Wake::Internal(i) => io.on_internal(&mut node, now, i),
            Wake::Ws(attempt, m) => {
                if let Some(c) = io.conns.get_mut(&attempt) {
                    c.on_ws(now, m);
                }
            }
            Wake::Cmd(attempt, cmd) => {
                if let Some(c) = io.conns.get_mut(&attempt) {
                    c.on_cmds(now, cmd);
                }
            }
            Wake::Written => {}
            Wake::Timer => io.on_timer(&mut node, now),
        }
        io.execute(&mut node);
        // Out in this same wake-up, as far as the sockets take it.
        for c in io.conns.values_mut() {
            c.writer.write_now().await;
        }
    }
}

/// How a hub's refusal of the tunnel upgrade reads in the agent's log.
pub fn hub_refusal(url: &str, status: impl std::fmt::Display, body: Option<&[u8]>) -> String {
    let body = body
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default();
    format!("{url}: hub refused the tunnel: HTTP {status} {body}")
}
