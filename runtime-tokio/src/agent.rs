//! The agent process: follows the core [`Agent`]'s outputs (dial a hub, dial
//! a target, reset a flow), drives its current [`Tunnel`] (and, after a
//! hub's DRAIN, the draining one beside it), and pipes each flow to its
//! target socket.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::{SplitSink, SplitStream};
use nowconnect_core::agent::{Agent, HubLinkState};
use nowconnect_core::tunnel::Tunnel;
use nowconnect_core::{Cid, ErrorCode, WsMessage};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::config::AgentConfig;
use crate::driver::{
    AgentConn, AgentDials, AgentFlow, AgentTasks, InlineWriter, LinkCmd, TunnelDriver,
    agent_outputs, agent_tunnels_step,
};
use crate::io::pipe_tcp;
use crate::metrics::Metrics;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

enum Internal {
    HubConnected { attempt: u64, ws: Box<Ws> },
    HubFailed { attempt: u64, reason: String },
    TargetConnected { flow: AgentFlow, stream: TcpStream },
    TargetFailed { flow: AgentFlow, reason: String },
}

type WsWriter = InlineWriter<SplitSink<Ws, Message>, Message>;

/// One tunnel of the agent: the current one, or one whose hub said DRAIN.
/// Its socket is read and written by the agent task itself.
struct Connection {
    attempt: u64,
    driver: TunnelDriver,
    ws_in: SplitStream<Ws>,
    writer: WsWriter,
    cmd_rx: async_channel::Receiver<LinkCmd>,
}

type WsRead = Option<Result<Message, tokio_tungstenite::tungstenite::Error>>;

enum Input {
    Ws(WsRead),
    Cmd(Result<LinkCmd, async_channel::RecvError>),
    /// The socket took what was queued.
    Written,
}

impl Connection {
    /// The next frame from the hub or command from a flow, or the socket
    /// ready for what is queued.
    async fn input(&mut self) -> Input {
        tokio::select! {
            m = self.ws_in.next() => Input::Ws(m),
            c = self.cmd_rx.recv() => Input::Cmd(c),
            () = self.writer.write(), if !self.writer.is_idle() => Input::Written,
        }
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Ws(m) => self.on_ws(m),
            Input::Cmd(c) => self.on_cmds(c),
            Input::Written => {}
        }
    }

    fn on_ws(&mut self, msg: WsRead) {
        let now = Instant::now();
        let t = &mut self.driver.tunnel;
        match msg {
            Some(Ok(Message::Binary(b))) => t.handle_message(now, &WsMessage::Binary(b)),
            Some(Ok(Message::Text(x))) => {
                t.handle_message(now, &WsMessage::Text(x.as_str().to_owned()))
            }
            Some(Ok(Message::Close(f))) => {
                let why = f.map(|f| f.reason.to_string()).unwrap_or_default();
                t.on_disconnected(&format!("hub closed the tunnel: {why}"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => t.on_disconnected(&format!("tunnel read error: {e}")),
            None => t.on_disconnected("tunnel closed by the hub"),
        }
    }

    fn on_cmds(&mut self, first: Result<LinkCmd, async_channel::RecvError>) {
        let now = Instant::now();
        if let Ok(cmd) = first {
            self.driver.on_cmd(now, cmd);
            for _ in 0..crate::driver::CMD_BATCH {
                match self.cmd_rx.try_recv() {
                    Ok(cmd) => self.driver.on_cmd(now, cmd),
                    Err(_) => break,
                }
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.driver.deadline()
    }
}

pub struct AgentRuntime {
    cfg: AgentConfig,
    connector: Option<Connector>,
    metrics: Arc<Metrics>,
}

/// Hub and target dials as tokio tasks reporting into the agent's channel.
struct Tasks {
    itx: mpsc::UnboundedSender<Internal>,
    connector: Option<Connector>,
    max: usize,
}

impl AgentTasks for Tasks {
    type Task = JoinHandle<()>;

    fn dial_hub(&self, attempt: u64, url: String, token: String) -> JoinHandle<()> {
        let (itx, connector, max) = (self.itx.clone(), self.connector.clone(), self.max);
        tokio::spawn(async move {
            let msg = match connect_hub(&url, &token, connector, max).await {
                Ok(ws) => Internal::HubConnected {
                    attempt,
                    ws: Box::new(ws),
                },
                Err(reason) => Internal::HubFailed { attempt, reason },
            };
            let _ = itx.send(msg);
        })
    }

    fn dial_target(&self, attempt: u64, cid: Cid, target: String) -> JoinHandle<()> {
        let itx = self.itx.clone();
        let flow = (attempt, cid);
        tokio::spawn(async move {
            let msg = match TcpStream::connect(&target).await {
                Ok(stream) => Internal::TargetConnected { flow, stream },
                Err(e) => Internal::TargetFailed {
                    flow,
                    reason: format!("{target}: {e}"),
                },
            };
            let _ = itx.send(msg);
        })
    }

    fn cancel(&self, task: JoinHandle<()>) {
        task.abort();
    }
}

impl AgentRuntime {
    pub fn new(cfg: AgentConfig) -> Result<Self, String> {
        let connector = match &cfg.raw.tls {
            Some(tls) => Some(Connector::Rustls(Arc::new(crate::tls::client_config(
                &tls.ca_bundle,
            )?))),
            None => None,
        };
        Ok(AgentRuntime {
            cfg,
            connector,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// Run until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let r = &self.cfg.raw;
        let core_cfg = self.cfg.core_config();
        let connectors: Vec<String> = core_cfg.connectors.keys().cloned().collect();
        let mut agent = Agent::new(Instant::now(), core_cfg, rand::random());
        let (itx, mut irx) = mpsc::unbounded_channel::<Internal>();
        // The current tunnel, and the one whose hub said DRAIN (kept for its
        // flows until that hub closes it).
        let mut conn: Option<Connection> = None;
        let mut old: Option<Connection> = None;
        let tasks = Tasks {
            itx: itx.clone(),
            connector: self.connector.clone(),
            max: self.cfg.max_message(),
        };
        let mut dials: AgentDials<JoinHandle<()>> = AgentDials::default();
        // Moves the tunnels to a fresh token before theirs expires.
        let renewal = std::cell::RefCell::new(nowconnect_shared::token_renewal::TokenRenewal::new(
            &self.cfg.token,
        ));
        let mut timer = nowconnect_shared::driver::LoopTimer::default();
        loop {
            // Perform what the agent core asked for.
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
            let deadline = [
                renewal
                    .borrow()
                    .deadline(Instant::now(), nowconnect_shared::jwt::unix_now()),
                agent.poll_timeout(),
                conn.as_ref().and_then(Connection::deadline),
                old.as_ref().and_then(Connection::deadline),
            ]
            .into_iter()
            .flatten()
            .min();
            timer.set(deadline, tokio::time::sleep);
            let timer = timer.wait();
            tokio::select! {
                _ = stop.wait_for(|v| *v) => {
                    for c in [conn.as_mut(), old.as_mut()].into_iter().flatten() {
                        c.driver.tunnel.close(ErrorCode::Shutdown, "agent shutting down");
                        c.driver.drain();
                        c.driver.close_socket(ErrorCode::Shutdown, "agent shutting down");
                    }
                    agent.stop();
                    break;
                }
                Some(m) = irx.recv() => {
                    let now = Instant::now();
                    match m {
                        Internal::HubConnected { attempt, ws } => {
                            if agent.state() != &(HubLinkState::Dialing { attempt }) {
                                continue;
                            }
                            let (sink, ws_in) = (*ws).split();
                            let (out_tx, out_rx) = async_channel::unbounded();
                            let (ctx, cmd_rx) = async_channel::unbounded();
                            let tunnel = Tunnel::agent(now, self.cfg.tunnel_config(), &r.agent_id, &connectors);
                            let mut driver = TunnelDriver::new(tunnel, out_tx, ctx, self.metrics.clone());
                            driver.flush();
                            let writer = nowconnect_shared::tung::inline_writer(sink, out_rx);
                            conn = Some(Connection { attempt, driver, ws_in, writer, cmd_rx });
                        }
                        Internal::HubFailed { attempt, reason } => {
                            tracing::warn!(attempt, %reason, "hub connection failed");
                            agent.hub_lost(now, attempt);
                        }
                        Internal::TargetConnected { flow, stream } => {
                            dials.targets.remove(&flow);
                            if agent.target_connected(now, flow.0, flow.1) && let Some(end) = dials.waiting.remove(&flow) {
                                tokio::spawn(pipe_tcp(stream, end, self.metrics.clone(), "down", "up"));
                            }
                        }
                        Internal::TargetFailed { flow, reason } => {
                            dials.targets.remove(&flow);
                            agent.target_failed(now, flow.0, flow.1, &reason);
                        }
                    }
                }
                input = async { conn.as_mut().expect("guarded").input().await }, if conn.is_some() => {
                    conn.as_mut().expect("guarded").on_input(input);
                }
                input = async { old.as_mut().expect("guarded").input().await }, if old.is_some() => {
                    old.as_mut().expect("guarded").on_input(input);
                }
                _ = timer => {
                    let now = Instant::now();
                    renewal.borrow_mut().renew(
                        now,
                        || self.cfg.current_token(),
                        [conn.as_mut(), old.as_mut()].into_iter().flatten().map(|c| &mut c.driver.tunnel),
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
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), c.writer.write()).await;
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
        tokio::spawn(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), writer.write()).await;
        });
    }
}

async fn connect_hub(
    url: &str,
    token: &str,
    connector: Option<Connector>,
    max: usize,
) -> Result<Ws, String> {
    let req = nowconnect_shared::tung::hub_request(url, token)?;
    let config = nowconnect_shared::tung::ws_config(max);
    let (ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(req, Some(config), true, connector)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    crate::driver::hub_refusal(url, resp.status(), resp.body().as_deref())
                }
                e => format!("{url}: {e}"),
            })?;
    Ok(ws)
}
