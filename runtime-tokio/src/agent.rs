//! The agent process on tokio: the shared agent loop
//! ([`nowconnect_shared::agent::run_agent`], around the core
//! [`AgentNode`](nowconnect_core::agent_node::AgentNode)) with tokio tasks,
//! tokio-tungstenite for the hub's WebSocket, tokio TCP for targets and, for
//! the HTTP endpoint, tokio TCP through tokio-util's `futures-io` adapter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SplitSink};
use nowconnect_shared::agent::{AgentProcess, AgentRt, hub_refusal};
use nowconnect_shared::driver::WsIn;
use nowconnect_shared::driver::{FlowBytes, FlowEnd, InlineWriter, Outgoing};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use crate::config::AgentConfig;
use crate::io::pipe_tcp;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct AgentRuntime(AgentProcess<TokioAgent>);

/// Tasks, timers and sockets of the agent on tokio.
pub(crate) struct TokioAgent {
    connector: Option<Connector>,
    max_message: usize,
}

impl AgentRt for TokioAgent {
    type Task = JoinHandle<()>;
    type Reader = BoxStream<'static, WsIn>;
    type Sink = SplitSink<Ws, Message>;
    type Msg = Message;
    type Target = TcpStream;
    type Listener = TcpListener;
    type Stream = Compat<TcpStream>;

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) -> JoinHandle<()> {
        tokio::spawn(f)
    }

    fn cancel(&self, t: JoinHandle<()>) {
        t.abort();
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep(d)
    }

    fn connect_hub(
        &self,
        url: String,
        token: String,
    ) -> impl Future<Output = Result<(Self::Reader, Self::Sink), String>> + Send + 'static {
        let (connector, max) = (self.connector.clone(), self.max_message);
        async move {
            let (sink, stream) = connect_hub(&url, &token, connector, max).await?.split();
            Ok((stream.map(nowconnect_shared::tung::ws_in).boxed(), sink))
        }
    }

    fn connect_target(
        &self,
        target: String,
    ) -> impl Future<Output = std::io::Result<TcpStream>> + Send + 'static {
        TcpStream::connect(target)
    }

    fn pipe_target(
        &self,
        stream: TcpStream,
        end: FlowEnd,
        bytes: FlowBytes,
    ) -> impl Future<Output = ()> + Send + 'static {
        pipe_tcp(stream, end, bytes)
    }

    async fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        TcpListener::bind(addr).await
    }

    fn local_addr(l: &TcpListener) -> std::io::Result<SocketAddr> {
        l.local_addr()
    }

    async fn accept(l: &TcpListener) -> std::io::Result<(Compat<TcpStream>, SocketAddr)> {
        let (s, peer) = l.accept().await?;
        Ok((s.compat(), peer))
    }

    fn writer(
        sink: Self::Sink,
        rx: async_channel::Receiver<Outgoing>,
    ) -> InlineWriter<Self::Sink, Message> {
        nowconnect_shared::tung::inline_writer(sink, rx)
    }
}

impl TokioAgent {
    /// The runtime side of the agent of `cfg`: its TLS trust for `wss://`
    /// hubs and its largest message.
    pub(crate) fn for_config(cfg: &AgentConfig) -> Result<Self, String> {
        let connector = match &cfg.raw.tls {
            Some(tls) => Some(Connector::Rustls(Arc::new(crate::tls::client_config(
                &tls.ca_bundle,
            )?))),
            None => None,
        };
        Ok(TokioAgent {
            connector,
            max_message: cfg.max_message(),
        })
    }
}

impl AgentRuntime {
    pub fn new(cfg: AgentConfig) -> Result<Self, String> {
        let rt = TokioAgent::for_config(&cfg)?;
        Ok(AgentRuntime(AgentProcess::new(rt, cfg)))
    }

    /// Bind the HTTP endpoint (`http.bind`), if the file sets one: the
    /// address it took.
    pub async fn bind_http(&mut self) -> Result<Option<SocketAddr>, String> {
        self.0.bind_http().await
    }

    /// Run until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let stop = async move {
            let _ = stop.wait_for(|v| *v).await;
        };
        self.0.run(stop).await;
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
                    hub_refusal(url, resp.status(), resp.body().as_deref())
                }
                e => format!("{url}: {e}"),
            })?;
    Ok(ws)
}
