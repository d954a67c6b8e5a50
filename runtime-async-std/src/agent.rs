//! The agent process on async-std: follows the core [`Agent`]'s outputs
//! (dial a hub, dial a target, reset a flow), drives its current [`Tunnel`]
//! (and, after a hub's DRAIN, the draining one beside it) through the shared
//! [`TunnelDriver`], and pipes each flow to its target
//! socket with the shared flow pipes. Same configuration, behaviour, metrics
//! and logs as the tokio agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_std::net::TcpStream;
use async_std::task::{self, JoinHandle};
use async_tungstenite::tungstenite::Message;
use futures_util::StreamExt;
use nowconnect_core::agent::{Agent, HubLinkState};
use nowconnect_core::tunnel::Tunnel;
use nowconnect_core::{Cid, ErrorCode};
use nowconnect_shared::config::AgentConfig;
use nowconnect_shared::driver::{
    AgentConn, AgentDials, AgentFlow, AgentTasks, InlineWriter, LinkCmd, LoopTimer, TunnelDriver,
    agent_outputs, agent_tunnels_step,
};
use nowconnect_shared::metrics::Metrics;

use crate::net::{Ws, connect_ws, pipe_tcp, to_core};

enum Internal {
    HubConnected { attempt: u64, ws: Box<Ws> },
    HubFailed { attempt: u64, reason: String },
    TargetConnected { flow: AgentFlow, stream: TcpStream },
    TargetFailed { flow: AgentFlow, reason: String },
    Stop,
}

enum Wake {
    Internal(Internal),
    /// A flow command for the tunnel of this attempt.
    Cmd(u64, LinkCmd),
    /// What the tunnel's socket delivered (`None`: it ended).
    Ws(u64, Option<Result<Message, String>>),
    /// The socket of this attempt took what was queued.
    Written,
    Timer,
}

type WsWriter = InlineWriter<async_tungstenite::WebSocketSender<Box<dyn crate::net::Io>>, Message>;

/// One tunnel of the agent: its socket is read and written by the agent
/// task itself (no reader or writer task hop per message).
struct Connection {
    attempt: u64,
    driver: TunnelDriver,
    cmd_rx: Receiver<LinkCmd>,
    ws_in: async_tungstenite::WebSocketReceiver<Box<dyn crate::net::Io>>,
    writer: WsWriter,
}

impl Connection {
    /// The next frame from the hub, command from a flow, or the socket
    /// ready for what is queued.
    async fn input(&mut self) -> Wake {
        use futures_lite::future::{pending, race};
        let attempt = self.attempt;
        let (ws_in, cmd_rx, writer) = (&mut self.ws_in, &self.cmd_rx, &mut self.writer);
        race(
            async {
                let m = ws_in.next().await.map(|r| r.map_err(|e| e.to_string()));
                Wake::Ws(attempt, m)
            },
            race(
                async {
                    match cmd_rx.recv().await {
                        Ok(c) => Wake::Cmd(attempt, c),
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
}

pub struct AgentRuntime {
    cfg: AgentConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    metrics: Arc<Metrics>,
}

/// Cancel a task without waiting for it.
pub fn cancel<T: Send + 'static>(t: JoinHandle<T>) {
    task::spawn(async move {
        t.cancel().await;
    });
}

/// Hub and target dials as async-std tasks reporting into the agent's channel.
struct Tasks {
    itx: Sender<Internal>,
    tls: Option<Arc<rustls::ClientConfig>>,
    max: usize,
}

impl AgentTasks for Tasks {
    type Task = JoinHandle<()>;

    fn dial_hub(&self, attempt: u64, url: String, token: String) -> JoinHandle<()> {
        let (itx, tls, max) = (self.itx.clone(), self.tls.clone(), self.max);
        task::spawn(async move {
            let msg = match connect_ws(&url, &token, tls, max).await {
                Ok(ws) => Internal::HubConnected {
                    attempt,
                    ws: Box::new(ws),
                },
                Err(reason) => Internal::HubFailed { attempt, reason },
            };
            let _ = itx.try_send(msg);
        })
    }

    fn dial_target(&self, attempt: u64, cid: Cid, target: String) -> JoinHandle<()> {
        let itx = self.itx.clone();
        let flow = (attempt, cid);
        task::spawn(async move {
            let msg = match TcpStream::connect(target.as_str()).await {
                Ok(stream) => Internal::TargetConnected { flow, stream },
                Err(e) => Internal::TargetFailed {
                    flow,
                    reason: format!("{target}: {e}"),
                },
            };
            let _ = itx.try_send(msg);
        })
    }

    fn cancel(&self, t: JoinHandle<()>) {
        cancel(t);
    }
}

impl AgentRuntime {
    pub fn new(cfg: AgentConfig) -> Result<Self, String> {
        let tls = match &cfg.raw.tls {
            Some(t) => Some(Arc::new(nowconnect_shared::tls::client_config(
                &t.ca_bundle,
            )?)),
            None => None,
        };
        Ok(AgentRuntime {
            cfg,
            tls,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// A sender that stops [`AgentRuntime::run`] when sent `()` or dropped.
    pub fn stopper() -> (Sender<()>, Receiver<()>) {
        async_channel::bounded(1)
    }

    /// Run until `stop` fires (a message, or its sender dropped).
    pub async fn run(self, stop: Receiver<()>) {
        let agent_id = self.cfg.raw.agent_id.clone();
        let core_cfg = self.cfg.core_config();
        let connectors: Vec<String> = core_cfg.connectors.keys().cloned().collect();
        let mut agent = Agent::new(Instant::now(), core_cfg, rand::random());
        let (itx, irx) = async_channel::unbounded::<Internal>();
        {
            let itx = itx.clone();
            task::spawn(async move {
                let _ = stop.recv().await;
                let _ = itx.try_send(Internal::Stop);
            });
        }
        // The current tunnel, and the one whose hub said DRAIN (kept for its
        // flows until that hub closes it).
        let mut conn: Option<Connection> = None;
        let mut old: Option<Connection> = None;
        let tasks = Tasks {
            itx: itx.clone(),
            tls: self.tls.clone(),
            max: self.cfg.max_message(),
        };
        let mut dials: AgentDials<JoinHandle<()>> = AgentDials::default();
        // Moves the tunnels to a fresh token before theirs expires.
        let renewal = std::cell::RefCell::new(nowconnect_shared::token_renewal::TokenRenewal::new(
            &self.cfg.token,
        ));
        let mut timer = LoopTimer::default();
        loop {
            let conns = [conn.as_mut(), old.as_mut()]
                .into_iter()
                .flatten()
                .map(|c| (c.attempt, &mut c.driver))
                .collect();
            agent_outputs(&tasks, &mut agent, &mut dials, conns, || {
                let token = self.cfg.dial_token();
                renewal.borrow_mut().observe(&token);
                token
            });
            let deadline = [&conn, &old]
                .into_iter()
                .flatten()
                .filter_map(|c| c.driver.deadline())
                .chain(agent.poll_timeout())
                .chain(
                    renewal
                        .borrow()
                        .deadline(Instant::now(), nowconnect_shared::jwt::unix_now()),
                )
                .min();
            timer.set(deadline, task::sleep);
            let wake = next_wake(&irx, conn.as_mut(), old.as_mut(), &mut timer).await;
            let now = Instant::now();
            match wake {
                Wake::Internal(Internal::Stop) => {
                    for c in [conn.as_mut(), old.as_mut()].into_iter().flatten() {
                        c.driver
                            .tunnel
                            .close(ErrorCode::Shutdown, "agent shutting down");
                        c.driver.drain();
                        c.driver
                            .close_socket(ErrorCode::Shutdown, "agent shutting down");
                    }
                    agent.stop();
                    break;
                }
                Wake::Internal(Internal::HubConnected { attempt, ws }) => {
                    if agent.state() != &(HubLinkState::Dialing { attempt }) {
                        continue;
                    }
                    let (sink, ws_in) = (*ws).split();
                    let (out_tx, out_rx) = async_channel::unbounded();
                    let (ctx, crx) = async_channel::unbounded();
                    let tunnel =
                        Tunnel::agent(now, self.cfg.tunnel_config(), &agent_id, &connectors);
                    let mut driver = TunnelDriver::new(tunnel, out_tx, ctx, self.metrics.clone());
                    driver.flush();
                    conn = Some(Connection {
                        attempt,
                        driver,
                        cmd_rx: crx,
                        ws_in,
                        writer: nowconnect_shared::tung::inline_writer(sink, out_rx),
                    });
                }
                Wake::Internal(Internal::HubFailed { attempt, reason }) => {
                    tracing::warn!(attempt, %reason, "hub connection failed");
                    agent.hub_lost(now, attempt);
                }
                Wake::Written => {}
                Wake::Ws(attempt, msg) => {
                    let Some(c) = [conn.as_mut(), old.as_mut()]
                        .into_iter()
                        .flatten()
                        .find(|c| c.attempt == attempt)
                    else {
                        continue;
                    };
                    let t = &mut c.driver.tunnel;
                    match msg {
                        Some(Ok(Message::Close(f))) => {
                            let why = f.map(|f| f.reason.to_string()).unwrap_or_default();
                            t.on_disconnected(&format!("hub closed the tunnel: {why}"));
                        }
                        Some(Ok(m)) => {
                            if let Some(m) = to_core(m) {
                                t.handle_message(now, &m);
                            }
                        }
                        Some(Err(e)) => t.on_disconnected(&format!("tunnel read error: {e}")),
                        None => t.on_disconnected("tunnel closed by the hub"),
                    }
                }
                Wake::Internal(Internal::TargetConnected { flow, stream }) => {
                    dials.targets.remove(&flow);
                    if agent.target_connected(now, flow.0, flow.1)
                        && let Some(end) = dials.waiting.remove(&flow)
                    {
                        task::spawn(pipe_tcp(stream, end, self.metrics.clone(), "down", "up"));
                    }
                }
                Wake::Internal(Internal::TargetFailed { flow, reason }) => {
                    dials.targets.remove(&flow);
                    agent.target_failed(now, flow.0, flow.1, &reason);
                }
                Wake::Cmd(attempt, cmd) => {
                    if let Some(c) = [conn.as_mut(), old.as_mut()]
                        .into_iter()
                        .flatten()
                        .find(|c| c.attempt == attempt)
                    {
                        c.driver.on_cmd(now, cmd);
                        for _ in 0..nowconnect_shared::driver::CMD_BATCH {
                            match c.cmd_rx.try_recv() {
                                Ok(cmd) => c.driver.on_cmd(now, cmd),
                                Err(_) => break,
                            }
                        }
                    }
                }
                Wake::Timer => {
                    renewal.borrow_mut().renew(
                        now,
                        || self.cfg.current_token(),
                        [conn.as_mut(), old.as_mut()]
                            .into_iter()
                            .flatten()
                            .map(|c| &mut c.driver.tunnel),
                    );
                    agent.handle_timeout(now);
                    for c in [conn.as_mut(), old.as_mut()].into_iter().flatten() {
                        c.driver.tunnel.handle_timeout(now);
                    }
                }
            }
            agent_tunnels_step(&tasks, &mut conn, &mut old, &mut agent, &mut dials);
            // Out in this same wake-up, as far as the sockets take it.
            for c in [conn.as_mut(), old.as_mut()].into_iter().flatten() {
                c.writer.write_now().await;
            }
        }
        // Let the close frames go out (2 s at most) before returning.
        for mut c in [conn.take(), old.take()].into_iter().flatten() {
            let _ = async_std::future::timeout(Duration::from_secs(2), c.writer.write()).await;
        }
    }
}

impl AgentConn for Connection {
    fn attempt(&self) -> u64 {
        self.attempt
    }

    fn driver(&mut self) -> &mut TunnelDriver {
        &mut self.driver
    }

    /// Dropping the reader is enough; what is queued for the socket (the
    /// close frame) still goes out, for 2 s at most.
    fn finish(self) {
        let mut writer = self.writer;
        task::spawn(async move {
            let _ = async_std::future::timeout(Duration::from_secs(2), writer.write()).await;
        });
    }
}

/// Wait for the next thing to do: an internal event, input on either
/// tunnel, or the earliest core deadline (`timer`).
async fn next_wake<F: std::future::Future<Output = ()>>(
    irx: &Receiver<Internal>,
    conn: Option<&mut Connection>,
    old: Option<&mut Connection>,
    timer: &mut LoopTimer<F>,
) -> Wake {
    use futures_lite::future::race;
    let internal = async {
        match irx.recv().await {
            Ok(i) => Wake::Internal(i),
            Err(_) => Wake::Internal(Internal::Stop),
        }
    };
    let timer = async {
        timer.wait().await;
        Wake::Timer
    };
    race(race(internal, timer), race(input(conn), input(old))).await
}

async fn input(c: Option<&mut Connection>) -> Wake {
    match c {
        Some(c) => c.input().await,
        None => futures_lite::future::pending().await,
    }
}
