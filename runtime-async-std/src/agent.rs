//! The agent process on async-std: follows the core [`Agent`]'s outputs
//! (dial a hub, dial a target, reset a flow), drives one [`Tunnel`] at a time
//! through the shared [`TunnelDriver`], and pipes each flow to its target
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
    AgentDials, AgentTasks, LinkCmd, TunnelDriver, agent_outputs, agent_tunnel_step,
};
use nowconnect_shared::metrics::Metrics;

use crate::net::{Ws, connect_ws, pipe_tcp, to_core};
use nowconnect_shared::tung::write_ws;

enum Internal {
    HubConnected {
        attempt: u64,
        ws: Box<Ws>,
    },
    HubFailed {
        attempt: u64,
        reason: String,
    },
    /// What the tunnel's socket delivered (`None`: it ended).
    Ws {
        attempt: u64,
        msg: Option<Result<Message, String>>,
    },
    TargetConnected {
        cid: Cid,
        stream: TcpStream,
    },
    TargetFailed {
        cid: Cid,
        reason: String,
    },
    Stop,
}

enum Wake {
    Internal(Internal),
    Cmd(LinkCmd),
    Timer,
}

struct Connection {
    attempt: u64,
    driver: TunnelDriver,
    cmd_rx: Receiver<LinkCmd>,
    writer: JoinHandle<()>,
    reader: JoinHandle<()>,
}

pub struct AgentRuntime {
    cfg: AgentConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    metrics: Arc<Metrics>,
}

/// Cancel a task without waiting for it.
fn cancel<T: Send + 'static>(t: JoinHandle<T>) {
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

    fn dial_target(&self, cid: Cid, target: String) -> JoinHandle<()> {
        let itx = self.itx.clone();
        task::spawn(async move {
            let msg = match TcpStream::connect(target.as_str()).await {
                Ok(stream) => Internal::TargetConnected { cid, stream },
                Err(e) => Internal::TargetFailed {
                    cid,
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
        let mut conn: Option<Connection> = None;
        let tasks = Tasks {
            itx: itx.clone(),
            tls: self.tls.clone(),
            max: self.cfg.max_message(),
        };
        let mut dials: AgentDials<JoinHandle<()>> = AgentDials::default();
        loop {
            agent_outputs(
                &tasks,
                &mut agent,
                &mut dials,
                conn.as_mut().map(|c| (c.attempt, &mut c.driver)),
                || self.cfg.dial_token(),
            );
            let deadline = [
                agent.poll_timeout(),
                conn.as_ref()
                    .and_then(|c| c.driver.tunnel.poll_timeout().map(|(at, _)| at)),
            ]
            .into_iter()
            .flatten()
            .min();
            let wake = next_wake(&irx, conn.as_ref().map(|c| &c.cmd_rx), deadline).await;
            let now = Instant::now();
            match wake {
                Wake::Internal(Internal::Stop) => {
                    if let Some(c) = conn.as_mut() {
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
                    let (sink, mut stream) = (*ws).split();
                    let (out_tx, out_rx) = async_channel::unbounded();
                    let (ctx, crx) = async_channel::unbounded();
                    let tunnel =
                        Tunnel::agent(now, self.cfg.tunnel_config(), &agent_id, &connectors);
                    let mut driver = TunnelDriver::new(tunnel, out_tx, ctx, self.metrics.clone());
                    driver.flush();
                    let itx = itx.clone();
                    let reader = task::spawn(async move {
                        loop {
                            let msg = stream.next().await.map(|r| r.map_err(|e| e.to_string()));
                            let end = msg.is_none();
                            if itx.send(Internal::Ws { attempt, msg }).await.is_err() || end {
                                return;
                            }
                        }
                    });
                    conn = Some(Connection {
                        attempt,
                        driver,
                        cmd_rx: crx,
                        writer: task::spawn(write_ws(sink, out_rx)),
                        reader,
                    });
                }
                Wake::Internal(Internal::HubFailed { attempt, reason }) => {
                    tracing::warn!(attempt, %reason, "hub connection failed");
                    agent.hub_lost(now, attempt);
                }
                Wake::Internal(Internal::Ws { attempt, msg }) => {
                    let Some(c) = conn.as_mut().filter(|c| c.attempt == attempt) else {
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
                Wake::Internal(Internal::TargetConnected { cid, stream }) => {
                    dials.targets.remove(&cid);
                    if agent.target_connected(now, cid)
                        && let Some(end) = dials.waiting.remove(&cid)
                    {
                        task::spawn(pipe_tcp(stream, end, self.metrics.clone(), "down", "up"));
                    }
                }
                Wake::Internal(Internal::TargetFailed { cid, reason }) => {
                    dials.targets.remove(&cid);
                    agent.target_failed(now, cid, &reason);
                }
                Wake::Cmd(cmd) => {
                    if let Some(c) = conn.as_mut() {
                        c.driver.on_cmd(now, cmd);
                        for _ in 0..256 {
                            match c.cmd_rx.try_recv() {
                                Ok(cmd) => c.driver.on_cmd(now, cmd),
                                Err(_) => break,
                            }
                        }
                    }
                }
                Wake::Timer => {
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
                cancel(c.reader);
                dials.waiting.clear();
                for (_, t) in std::mem::take(&mut dials.targets) {
                    cancel(t);
                }
                let _ = async_std::future::timeout(Duration::from_millis(500), c.writer).await;
                agent.hub_lost(Instant::now(), attempt);
            }
        }
        if let Some(c) = conn.take() {
            drop(c.driver);
            cancel(c.reader);
            let _ = async_std::future::timeout(Duration::from_secs(2), c.writer).await;
        }
    }
}

/// Wait for the next thing to do: an internal event, a flow command, or the
/// earliest core deadline.
async fn next_wake(
    irx: &Receiver<Internal>,
    cmd_rx: Option<&Receiver<LinkCmd>>,
    deadline: Option<Instant>,
) -> Wake {
    use futures_lite::future::{or, pending};
    let internal = async {
        match irx.recv().await {
            Ok(i) => Wake::Internal(i),
            Err(_) => Wake::Internal(Internal::Stop),
        }
    };
    let cmd = async {
        match cmd_rx {
            Some(r) => match r.recv().await {
                Ok(c) => Wake::Cmd(c),
                Err(_) => pending().await,
            },
            None => pending().await,
        }
    };
    let timer = async {
        match deadline {
            Some(d) => {
                task::sleep(d.saturating_duration_since(Instant::now())).await;
                Wake::Timer
            }
            None => pending().await,
        }
    };
    or(internal, or(cmd, timer)).await
}
