//! What the hub and the agent need from an async runtime ([`HubRt`],
//! [`AgentRt`]), and the one type an adapter hands back to the hub from an
//! agent tunnel ([`WsIn`], a driver type). The hub ([`crate::hub`]) and the
//! agent ([`crate::agent`], its HTTP endpoint [`crate::agent_http`]) are
//! written once over these traits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nowconnect_core::registry::{RegistryError, RegistryOp, RegistryReply};
use tungstenite::protocol::WebSocketConfig;

use async_channel::Receiver;

use crate::driver::{FlowBytes, FlowEnd, InlineWriter, Outgoing};
use crate::mesh::MeshWs;
use crate::metrics::Metrics;

/// The accept backlog of a hub's listeners (`/tunnel`, the client
/// listeners, the mesh). The runtimes' default is 128: when a hub dies, the
/// agents it held redial the survivors within a few hundred milliseconds,
/// and connections past the backlog are dropped and retried by TCP only
/// after a second. The kernel caps it at `net.core.somaxconn` (4096 on
/// current kernels).
pub const LISTEN_BACKLOG: i32 = 4096;

/// A hub's listening socket on `addr`: `SO_REUSEADDR` (as the runtimes' own
/// `bind`), a backlog of [`LISTEN_BACKLOG`], non-blocking, for the runtime
/// to wrap in its listener type. Both runtimes' [`HubRt::bind`] use it.
pub fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What a hub needs from its async runtime. Everything else is shared.
pub trait HubRt: Send + Sync + Sized + 'static {
    /// A spawned task; dropping it does not stop it.
    type Task: Send + 'static;
    type Listener: Send + Sync + 'static;
    /// An accepted TCP connection.
    type Stream: Send + 'static;
    /// A mesh WebSocket (dialed or accepted).
    type MeshWs: MeshWs;

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) -> Self::Task;
    /// Stop a task at its next await point.
    fn abort(&self, t: Self::Task);
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static;

    /// A listening socket with a backlog of [`LISTEN_BACKLOG`].
    fn bind(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = std::io::Result<Self::Listener>> + Send;
    fn local_addr(l: &Self::Listener) -> std::io::Result<SocketAddr>;
    fn accept(
        l: &Self::Listener,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, SocketAddr)>> + Send + '_;

    /// Read a PROXY protocol header from a client socket (see
    /// [`crate::proxy_protocol::read_header`]) within `within`, and give the
    /// socket back.
    fn read_proxy_header(
        &self,
        stream: Self::Stream,
        within: Duration,
    ) -> impl Future<Output = (Self::Stream, Result<Option<SocketAddr>, String>)> + Send + 'static;

    /// Pipe a client socket to its flow, reset when it runs into one of
    /// its `timeouts`.
    fn pipe_client(
        &self,
        stream: Self::Stream,
        end: FlowEnd,
        metrics: Arc<Metrics>,
        timeouts: crate::driver::ClientTimeouts,
    ) -> impl Future<Output = ()> + Send + 'static;

    /// Perform one registry call on Redis.
    fn registry_apply(
        &self,
        op: RegistryOp,
    ) -> impl Future<Output = Result<RegistryReply, RegistryError>> + Send + 'static;

    /// Dial a peer's `/mesh` (TLS with `tls` for `wss://`), offering both
    /// mesh subprotocols; the codec is the one the peer chose.
    fn mesh_connect(
        &self,
        url: String,
        tls: Option<Arc<rustls::ClientConfig>>,
        cfg: WebSocketConfig,
    ) -> impl Future<Output = Result<crate::mesh::MeshConnected<Self::MeshWs>, String>> + Send + 'static;

    /// Accept one mesh connection: TLS with `inbound.tls` when set, then
    /// the WebSocket handshake of `/mesh` through
    /// [`crate::mesh::MeshHandshake::on_request`] (which, behind a
    /// TLS-terminating proxy, takes the peer's certificate from its
    /// header), all within `within`.
    fn mesh_accept(
        &self,
        tcp: Self::Stream,
        inbound: crate::mesh::MeshInbound,
        within: Duration,
        cfg: WebSocketConfig,
    ) -> impl Future<Output = Result<crate::mesh::MeshConnected<Self::MeshWs>, String>> + Send + 'static;
}

pub use crate::driver::WsIn;

/// What the agent needs from its async runtime: tasks, a timer, the hub's
/// WebSocket, the target's TCP socket and the listener of its HTTP
/// endpoint. Everything else is shared.
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
    /// The HTTP endpoint's listener (`http.bind`) and the connections it
    /// accepts.
    type Listener: Send + Sync + 'static;
    type Stream: futures_util::io::AsyncRead + futures_util::io::AsyncWrite + Unpin + Send + 'static;

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
    ) -> impl Future<Output = std::io::Result<Self::Target>> + Send + 'static;
    /// Pipe a target socket to its flow, counting its bytes in `bytes`.
    fn pipe_target(
        &self,
        stream: Self::Target,
        end: FlowEnd,
        bytes: FlowBytes,
    ) -> impl Future<Output = ()> + Send + 'static;
    fn bind(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = std::io::Result<Self::Listener>> + Send;
    fn local_addr(l: &Self::Listener) -> std::io::Result<SocketAddr>;
    fn accept(
        l: &Self::Listener,
    ) -> impl Future<Output = std::io::Result<(Self::Stream, SocketAddr)>> + Send + '_;
    /// The batched writer of a hub WebSocket.
    fn writer(sink: Self::Sink, rx: Receiver<Outgoing>) -> InlineWriter<Self::Sink, Self::Msg>;
}
