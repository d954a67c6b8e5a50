//! The agent process: follows the core [`Agent`]'s outputs (dial a hub, dial
//! a target, reset a flow), drives one [`Tunnel`] at a time, and pipes each
//! flow to its target socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
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
    AgentDials, AgentTasks, LinkCmd, TunnelDriver, agent_outputs, agent_tunnel_step,
};
use crate::io::pipe_tcp;
use crate::metrics::Metrics;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

enum Internal {
    HubConnected { attempt: u64, ws: Box<Ws> },
    HubFailed { attempt: u64, reason: String },
    TargetConnected { cid: Cid, stream: TcpStream },
    TargetFailed { cid: Cid, reason: String },
}

struct Connection {
    attempt: u64,
    driver: TunnelDriver,
    writer: JoinHandle<()>,
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

    fn dial_target(&self, cid: Cid, target: String) -> JoinHandle<()> {
        let itx = self.itx.clone();
        tokio::spawn(async move {
            let msg = match TcpStream::connect(&target).await {
                Ok(stream) => Internal::TargetConnected { cid, stream },
                Err(e) => Internal::TargetFailed {
                    cid,
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
        let mut conn: Option<Connection> = None;
        let mut ws_in: Option<SplitStream<Ws>> = None;
        let mut cmd_rx: Option<async_channel::Receiver<LinkCmd>> = None;
        let tasks = Tasks {
            itx: itx.clone(),
            connector: self.connector.clone(),
            max: self.cfg.max_message(),
        };
        let mut dials: AgentDials<JoinHandle<()>> = AgentDials::default();
        loop {
            // Perform what the agent core asked for.
            agent_outputs(
                &tasks,
                &mut agent,
                &mut dials,
                conn.as_mut().map(|c| (c.attempt, &mut c.driver)),
                || self.cfg.dial_token(),
            );
            let agent_deadline = agent.poll_timeout();
            let tunnel_deadline = conn
                .as_ref()
                .and_then(|c| c.driver.tunnel.poll_timeout().map(|(at, _)| at));
            let deadline = match (agent_deadline, tunnel_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.wait_for(|v| *v) => {
                    if let Some(c) = conn.as_mut() {
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
                            let (sink, stream) = (*ws).split();
                            let (out_tx, out_rx) = async_channel::unbounded();
                            let (ctx, crx) = async_channel::unbounded();
                            let tunnel = Tunnel::agent(now, self.cfg.tunnel_config(), &r.agent_id, &connectors);
                            let mut driver = TunnelDriver::new(tunnel, out_tx, ctx, self.metrics.clone());
                            driver.flush();
                            conn = Some(Connection { attempt, driver, writer: tokio::spawn(nowconnect_shared::tung::write_ws(sink, out_rx)) });
                            ws_in = Some(stream);
                            cmd_rx = Some(crx);
                        }
                        Internal::HubFailed { attempt, reason } => {
                            tracing::warn!(attempt, %reason, "hub connection failed");
                            agent.hub_lost(now, attempt);
                        }
                        Internal::TargetConnected { cid, stream } => {
                            dials.targets.remove(&cid);
                            if agent.target_connected(now, cid) && let Some(end) = dials.waiting.remove(&cid) {
                                tokio::spawn(pipe_tcp(stream, end, self.metrics.clone(), "down", "up"));
                            }
                        }
                        Internal::TargetFailed { cid, reason } => {
                            dials.targets.remove(&cid);
                            agent.target_failed(now, cid, &reason);
                        }
                    }
                }
                msg = async { ws_in.as_mut().expect("guarded").next().await }, if ws_in.is_some() => {
                    let c = conn.as_mut().expect("connection with its stream");
                    let now = Instant::now();
                    match msg {
                        Some(Ok(Message::Binary(b))) => c.driver.tunnel.handle_message(now, &WsMessage::Binary(b)),
                        Some(Ok(Message::Text(t))) => c.driver.tunnel.handle_message(now, &WsMessage::Text(t.as_str().to_owned())),
                        Some(Ok(Message::Close(f))) => {
                            let why = f.map(|f| f.reason.to_string()).unwrap_or_default();
                            c.driver.tunnel.on_disconnected(&format!("hub closed the tunnel: {why}"));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => c.driver.tunnel.on_disconnected(&format!("tunnel read error: {e}")),
                        None => c.driver.tunnel.on_disconnected("tunnel closed by the hub"),
                    }
                }
                cmd = async { cmd_rx.as_mut().expect("guarded").recv().await }, if cmd_rx.is_some() => {
                    let c = conn.as_mut().expect("connection with its commands");
                    let now = Instant::now();
                    if let Ok(cmd) = cmd {
                        c.driver.on_cmd(now, cmd);
                        for _ in 0..256 {
                            match cmd_rx.as_mut().expect("guarded").try_recv() {
                                Ok(cmd) => c.driver.on_cmd(now, cmd),
                                Err(_) => break,
                            }
                        }
                    }
                }
                _ = timer => {
                    let now = Instant::now();
                    agent.handle_timeout(now);
                    if let Some(c) = conn.as_mut() {
                        c.driver.tunnel.handle_timeout(now);
                    }
                }
            }
            let lost = conn.as_mut().and_then(|c| {
                agent_tunnel_step(
                    &mut c.driver,
                    &mut agent,
                    c.attempt,
                    &mut dials.waiting,
                    Instant::now(),
                )
                .map(|(code, reason)| (c.attempt, code, reason))
            });
            if let Some((attempt, code, reason)) = lost {
                let mut c = conn.take().expect("connection");
                c.driver.close_socket(code, &reason);
                drop(c.driver);
                ws_in = None;
                cmd_rx = None;
                dials.waiting.clear();
                for (_, t) in std::mem::take(&mut dials.targets) {
                    t.abort();
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), c.writer).await;
                agent.hub_lost(Instant::now(), attempt);
            }
        }
        if let Some(c) = conn.take() {
            drop(c.driver);
            let _ = tokio::time::timeout(Duration::from_secs(2), c.writer).await;
        }
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
