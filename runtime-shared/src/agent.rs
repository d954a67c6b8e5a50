//! The agent process, written once over [`AgentRt`]: it carries out what
//! the core [`AgentNode`] decides (dial a hub, dial a target, reset a flow,
//! end a tunnel), drives each tunnel's core [`Tunnel`] through a
//! [`TunnelDriver`] on the agent task itself (no reader or writer task hop
//! per message), and pipes each flow to its target socket. Every decision is
//! the node's; what is here is sockets, tasks, tokens, logs and metrics.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use futures_lite::StreamExt;
use futures_lite::future::{pending, race};
use nowconnect_core::agent::AttemptId;
use nowconnect_core::agent_node::{AgentCommand, AgentNode};
use nowconnect_core::tunnel::{Tunnel, TunnelEvent};
use nowconnect_core::{Cid, ErrorCode};

use crate::config::AgentConfig;
use crate::driver::{
    CMD_BATCH, FlowEnd, InlineWriter, LinkCmd, LoopTimer, Outgoing, PeerMsg, TunnelCmd,
    TunnelDriver, WsIn,
};
use crate::metrics::{Metrics, add_delta};
use crate::token_renewal::AgentRenewal;
use nowconnect_core::renewal::Presented;

/// What the agent needs from its async runtime: tasks, a timer, the hub's
/// WebSocket and the target's TCP socket. Everything else is shared.
pub trait AgentRt: Send + Sync + Sized + 'static {
    /// A spawned task; dropping it does not stop it.
    type Task: Send + 'static;
    /// What the hub sends, as the loop needs it.
    type Reader: futures_lite::Stream<Item = WsIn> + Unpin + Send + 'static;
    /// The WebSocket's sending half and its message type.
    type Sink: futures_util::Sink<Self::Msg> + Unpin + Send + 'static;
    type Msg: Send + 'static;
    /// A connected target socket.
    type Target: Send + 'static;

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) -> Self::Task;
    /// Stop a task at its next await point.
    fn cancel(&self, t: Self::Task);
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static;
    /// Dial the hub at `url` with `token` (TLS for `wss://`).
    fn connect_hub(
        &self,
        url: String,
        token: String,
    ) -> impl Future<Output = Result<(Self::Reader, Self::Sink), String>> + Send + 'static;
    fn connect_target(
        &self,
        target: String,
    ) -> impl Future<Output = Result<Self::Target, String>> + Send + 'static;
    /// Pipe a target socket to its flow.
    fn pipe_target(
        &self,
        stream: Self::Target,
        end: FlowEnd,
        metrics: Arc<Metrics>,
    ) -> impl Future<Output = ()> + Send + 'static;
    /// The batched writer of a hub WebSocket.
    fn writer(sink: Self::Sink, rx: Receiver<Outgoing>) -> InlineWriter<Self::Sink, Self::Msg>;
}

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
    },
}

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
    metrics: Arc<Metrics>,
    itx: Sender<Internal<R>>,
    /// Its tunnels by attempt: the current one, and one whose hub said DRAIN.
    conns: BTreeMap<AttemptId, Connection<R>>,
    /// Hub dials in progress (one per slot at most), by attempt.
    hub_dials: BTreeMap<AttemptId, R::Task>,
    target_dials: BTreeMap<Flow, R::Task>,
    /// Flow ends waiting for their target.
    waiting: BTreeMap<Flow, FlowEnd>,
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
                self.command(c);
            }
            let now = Instant::now();
            let mut reported = false;
            for (attempt, c) in self.conns.iter_mut() {
                for ev in c.driver.drain() {
                    reported = true;
                    log_event(*attempt, &ev, c.driver.tunnel.flow_count());
                    if let TunnelEvent::Open { cid, connector } = &ev {
                        let end = c.driver.attach_flow(*cid, connector);
                        self.waiting.insert((*attempt, *cid), end);
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

    /// The node's tunnel figures into the metrics when they changed: two
    /// integers compared per wake-up, no label looked up. A multi-homed
    /// agent also logs how many of its tunnels are up.
    fn report(&mut self, node: &AgentNode) {
        let established = node.connected_slots();
        if established != self.reported.established {
            self.reported.established = established;
            self.metrics
                .agent_tunnels_established
                .set(established as i64);
            if node.slots() > 1 {
                tracing::info!(established, wanted = node.slots(), "tunnels established");
            }
        }
        add_delta(
            &self.metrics.agent_duplicate_hub_tunnels,
            node.counters().duplicate_hubs,
            &mut self.reported.duplicate_hubs,
        );
    }

    fn command(&mut self, c: AgentCommand) {
        match c {
            AgentCommand::DialHub { attempt, url, slot } => {
                tracing::info!(attempt = attempt.0, slot, %url, "connecting to hub");
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
                let task = self.rt.spawn(async move {
                    let msg = match rt.connect_target(target).await {
                        Ok(stream) => Internal::TargetConnected { flow, stream },
                        Err(reason) => Internal::TargetFailed { flow, reason },
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
                    let msg = PeerMsg::Reset { code, reason };
                    c.driver.on_cmd(Instant::now(), LinkCmd::Flow { cid, msg });
                }
            }
        }
    }

    fn on_internal(&mut self, node: &mut AgentNode, now: Instant, i: Internal<R>) {
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
                let mut driver = TunnelDriver::new(tunnel, out_tx, cmd_tx, self.metrics.clone());
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
                node.hub_failed(now, attempt);
            }
            Internal::TargetConnected { flow, stream } => {
                self.target_dials.remove(&flow);
                if node.target_connected(now, flow.0, flow.1)
                    && let Some(end) = self.waiting.remove(&flow)
                {
                    let pipe = self.rt.pipe_target(stream, end, self.metrics.clone());
                    self.rt.spawn(pipe);
                }
            }
            Internal::TargetFailed { flow, reason } => {
                self.target_dials.remove(&flow);
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

/// Run the agent of `cfg` until `stop` completes.
pub async fn run_agent<R: AgentRt>(
    rt: R,
    cfg: AgentConfig,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send,
) {
    let mut node = AgentNode::new(Instant::now(), cfg.core_config(), rand::random());
    metrics.agent_tunnels_wanted.set(i64::from(node.slots()));
    let (itx, irx) = async_channel::unbounded::<Internal<R>>();
    let renewal = AgentRenewal::new(&cfg.token);
    let rt = Arc::new(rt);
    let mut io = Io {
        rt: rt.clone(),
        cfg,
        metrics,
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
                io.execute(&mut node);
                io.flush_closed().await;
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
