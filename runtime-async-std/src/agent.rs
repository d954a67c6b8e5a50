//! The agent process on async-std: the shared agent loop
//! ([`nowconnect_shared::agent::run_agent`], around the core
//! [`AgentNode`](nowconnect_core::agent_node::AgentNode)) with async-std
//! tasks, async-tungstenite over futures-rustls for the hub's WebSocket and
//! async-std TCP for targets and the HTTP endpoint. Same configuration,
//! behaviour, endpoint, metrics and logs as the tokio agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_channel::{Receiver, Sender};
use async_std::net::{TcpListener, TcpStream};
use async_std::task::{self, JoinHandle};
use async_tungstenite::tungstenite::Message;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use nowconnect_shared::agent::{AgentProcess, AgentRt};
use nowconnect_shared::config::AgentConfig;
use nowconnect_shared::driver::WsIn;
use nowconnect_shared::driver::{FlowBytes, FlowEnd, InlineWriter, Outgoing};

use crate::net::{connect_ws, pipe_tcp};

type WsSink = async_tungstenite::WebSocketSender<Box<dyn crate::net::Io>>;

pub struct AgentRuntime(AgentProcess<AsyncStdAgent>);

/// Cancel a task without waiting for it.
pub fn cancel<T: Send + 'static>(t: JoinHandle<T>) {
    task::spawn(async move {
        t.cancel().await;
    });
}

/// Tasks, timers and sockets of the agent on async-std.
struct AsyncStdAgent {
    tls: Option<Arc<rustls::ClientConfig>>,
    max_message: usize,
}

impl AgentRt for AsyncStdAgent {
    type Task = JoinHandle<()>;
    type Reader = BoxStream<'static, WsIn>;
    type Sink = WsSink;
    type Msg = Message;
    type Target = TcpStream;
    type Listener = TcpListener;
    type Stream = TcpStream;

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) -> JoinHandle<()> {
        task::spawn(f)
    }

    fn cancel(&self, t: JoinHandle<()>) {
        cancel(t);
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        task::sleep(d)
    }

    fn connect_hub(
        &self,
        url: String,
        token: String,
    ) -> impl Future<Output = Result<(Self::Reader, WsSink), String>> + Send + 'static {
        let (tls, max) = (self.tls.clone(), self.max_message);
        async move {
            let (sink, stream) = connect_ws(&url, &token, tls, max).await?.split();
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

    async fn accept(l: &TcpListener) -> std::io::Result<(TcpStream, SocketAddr)> {
        l.accept().await
    }

    fn writer(sink: WsSink, rx: Receiver<Outgoing>) -> InlineWriter<WsSink, Message> {
        nowconnect_shared::tung::inline_writer(sink, rx)
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
        let rt = AsyncStdAgent {
            tls,
            max_message: cfg.max_message(),
        };
        Ok(AgentRuntime(AgentProcess::new(rt, cfg)))
    }

    /// Bind the HTTP endpoint (`http.bind`), if the file sets one: the
    /// address it took.
    pub async fn bind_http(&mut self) -> Result<Option<SocketAddr>, String> {
        self.0.bind_http().await
    }

    /// A sender that stops [`AgentRuntime::run`] when sent `()` or dropped.
    pub fn stopper() -> (Sender<()>, Receiver<()>) {
        async_channel::bounded(1)
    }

    /// Run until `stop` fires (a message, or its sender dropped).
    pub async fn run(self, stop: Receiver<()>) {
        let stop = async move {
            let _ = stop.recv().await;
        };
        self.0.run(stop).await;
    }
}
