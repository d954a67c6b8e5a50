//! What the hub needs from an async runtime ([`HubRt`]), and the one type
//! an adapter hands back to it from an agent tunnel ([`WsIn`], a driver type). The hub
//! ([`crate::hub`]) is written once over this trait.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nowconnect_core::registry::{RegistryError, RegistryOp, RegistryReply};
use tungstenite::protocol::WebSocketConfig;

use crate::driver::FlowEnd;
use crate::mesh::MeshWs;
use crate::metrics::Metrics;

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
