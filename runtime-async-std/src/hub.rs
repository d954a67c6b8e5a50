//! The hub on async-std: the shared hub ([`nowconnect_shared::hub`]) over
//! async-std tasks, timers and sockets, futures-rustls and async-tungstenite
//! for the mesh, the Redis registry on redis' smol runtime (async-std and
//! smol share the async-io reactor), and the shared HTTP endpoints
//! ([`nowconnect_shared::http`]) instead of a hyper stack.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_std::net::{TcpListener, TcpStream};
use async_std::task::{self, JoinHandle};
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use futures_util::StreamExt;
use nowconnect_core::registry::{RegistryError, RegistryOp, RegistryReply};
use nowconnect_shared::config::HubConfig;
use nowconnect_shared::driver::ClientTimeouts;
use nowconnect_shared::driver::{FlowEnd, Outgoing};
use nowconnect_shared::hub::HubRt;
use nowconnect_shared::hub::{HttpRole, HubHttp};
use nowconnect_shared::mesh::{MeshConnected, MeshInbound};
use nowconnect_shared::metrics::Metrics;
use nowconnect_shared::registry::RedisRegistry;

use crate::net::Io;

/// The async-std side of a hub.
pub struct AsyncStdRt {
    redis: Option<Arc<RedisRegistry>>,
}

pub type Shared = nowconnect_shared::hub::Shared<AsyncStdRt>;
pub type HubHandle = nowconnect_shared::hub::HubHandle<AsyncStdRt>;

/// Start a hub on async-std (see [`nowconnect_shared::hub::start`]).
pub async fn start(cfg: HubConfig) -> Result<HubHandle, String> {
    let redis = RedisRegistry::for_config(&cfg)?.map(Arc::new);
    let with_redis = redis.is_some();
    nowconnect_shared::hub::start(cfg, AsyncStdRt { redis }, with_redis).await
}

/// Run `f` within `d`, or say what did not finish in time.
async fn within<T>(d: Duration, what: &str, f: impl Future<Output = T>) -> Result<T, String> {
    async_std::future::timeout(d, f)
        .await
        .map_err(|_| format!("{what} not completed within {d:?}"))
}

impl HubRt for AsyncStdRt {
    type Task = JoinHandle<()>;
    type Listener = TcpListener;
    type Stream = TcpStream;
    type MeshWs = WebSocketStream<Box<dyn Io>>;

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) -> Self::Task {
        task::spawn(f)
    }

    fn abort(&self, t: Self::Task) {
        crate::agent::cancel(t);
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        task::sleep(d)
    }

    async fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        Ok(TcpListener::from(nowconnect_shared::rt::listen(addr)?))
    }

    fn local_addr(l: &TcpListener) -> std::io::Result<SocketAddr> {
        l.local_addr()
    }

    async fn accept(l: &TcpListener) -> std::io::Result<(TcpStream, SocketAddr)> {
        l.accept().await
    }

    fn read_proxy_header(
        &self,
        stream: TcpStream,
        within: Duration,
    ) -> impl Future<Output = (TcpStream, Result<Option<SocketAddr>, String>)> + Send + 'static
    {
        read_proxy_header_impl(stream, within)
    }

    fn pipe_client(
        &self,
        stream: TcpStream,
        end: FlowEnd,
        metrics: Arc<Metrics>,
        timeouts: ClientTimeouts,
    ) -> impl Future<Output = ()> + Send + 'static {
        crate::net::pipe_client(stream, end, metrics, timeouts)
    }

    fn registry_apply(
        &self,
        op: RegistryOp,
    ) -> impl Future<Output = Result<RegistryReply, RegistryError>> + Send + 'static {
        RedisRegistry::call(self.redis.clone(), op)
    }

    fn mesh_connect(
        &self,
        url: String,
        tls: Option<Arc<rustls::ClientConfig>>,
        cfg: WebSocketConfig,
    ) -> impl Future<Output = Result<MeshConnected<Self::MeshWs>, String>> + Send + 'static {
        mesh_connect_impl(url, tls, cfg)
    }

    fn mesh_accept(
        &self,
        tcp: TcpStream,
        inbound: MeshInbound,
        within_: Duration,
        cfg: WebSocketConfig,
    ) -> impl Future<Output = Result<MeshConnected<Self::MeshWs>, String>> + Send + 'static {
        mesh_accept_impl(tcp, inbound, within_, cfg)
    }
}

impl HubHttp for AsyncStdRt {
    async fn serve_http(
        shared: Arc<Shared>,
        l: TcpListener,
        role: HttpRole,
        stop: async_channel::Receiver<()>,
    ) {
        {
            loop {
                let accepted = futures_lite::future::or(async { Some(l.accept().await) }, async {
                    let _ = stop.recv().await;
                    None
                })
                .await;
                let (tcp, peer) = match accepted {
                    None => return,
                    Some(Ok(x)) => x,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "http accept failed");
                        task::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Tunnel frames are small and latency-bound: no Nagle delay.
                let _ = tcp.set_nodelay(true);
                // The certificate current now: a reload swaps it for later
                // accepts.
                let Some(tls) = shared.http_server_tls(role) else {
                    task::spawn(nowconnect_shared::http::serve_connection(
                        shared.clone(),
                        tcp,
                        peer,
                        role,
                        move |shared, tcp, rest, identity| {
                            run_tunnel(shared, tcp, rest, identity, peer)
                        },
                    ));
                    continue;
                };
                let shared = shared.clone();
                task::spawn(async move {
                    let limit = Duration::from_secs(shared.cfg().raw.http.header_timeout_sec);
                    let accept = futures_rustls::TlsAcceptor::from(tls).accept(tcp);
                    let stream = match async_std::future::timeout(limit, accept).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return shared.http_tls_failed(peer, &e.to_string(), false),
                        Err(_) => {
                            let reason = format!("not completed within {limit:?}");
                            return shared.http_tls_failed(peer, &reason, true);
                        }
                    };
                    nowconnect_shared::http::serve_connection(
                        shared,
                        stream,
                        peer,
                        role,
                        move |shared, tls, rest, identity| {
                            run_tunnel(shared, tls, rest, identity, peer)
                        },
                    )
                    .await
                });
            }
        }
    }
}

/// An upgraded `/tunnel` connection: the WebSocket over the socket (with any
/// bytes the agent sent after its request head), its writer task, and the
/// shared tunnel loop.
async fn run_tunnel<S>(
    shared: Arc<Shared>,
    tcp: S,
    rest: Vec<u8>,
    identity: nowconnect_shared::jwt::AgentIdentity,
    peer: SocketAddr,
) where
    S: futures_util::io::AsyncRead + futures_util::io::AsyncWrite + Unpin + Send,
{
    let cfg = nowconnect_shared::tung::hub_tunnel_ws_config(shared.max_ws_message());
    let ws = WebSocketStream::from_partially_read(tcp, rest, Role::Server, Some(cfg)).await;
    let (sink, stream) = ws.split();
    let (out_tx, out_rx) = async_channel::unbounded::<Outgoing>();
    let writer = nowconnect_shared::tung::inline_writer(sink, out_rx);
    let stream = stream.map(nowconnect_shared::tung::ws_in);
    shared
        .run_tunnel(stream, out_tx, writer, identity, peer)
        .await;
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback error
async fn mesh_connect_impl(
    url: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    cfg: WebSocketConfig,
) -> Result<MeshConnected<WebSocketStream<Box<dyn Io>>>, String> {
    let dial = nowconnect_shared::mesh::mesh_dial(&url)?;
    let tcp = TcpStream::connect((dial.host.as_str(), dial.port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = if dial.secure {
        Some(tls.ok_or_else(|| format!("{url}: wss:// needs ha.mesh.tls"))?)
    } else {
        None
    };
    let (io, peer_cert) = crate::net::tls_or_plain_with_peer(&url, &dial.host, tcp, tls).await?;
    let (ws, resp) = async_tungstenite::client_async_with_config(dial.request, io, Some(cfg))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let codec = nowconnect_shared::mesh::chosen_codec(&url, &resp)?;
    Ok(MeshConnected {
        ws,
        codec,
        peer_cert,
    })
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback error
async fn mesh_accept_impl(
    tcp: TcpStream,
    inbound: MeshInbound,
    within_: Duration,
    cfg: WebSocketConfig,
) -> Result<MeshConnected<WebSocketStream<Box<dyn Io>>>, String> {
    let _ = tcp.set_nodelay(true);
    let mut peer_cert = None;
    let io: Box<dyn Io> = match inbound.tls.clone() {
        Some(t) => {
            let tls = within(
                within_,
                "TLS handshake",
                futures_rustls::TlsAcceptor::from(t).accept(tcp),
            )
            .await?
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
            peer_cert = crate::net::leaf(tls.get_ref().1.peer_certificates());
            Box::new(tls)
        }
        None => Box::new(tcp),
    };
    let mut hs = inbound.handshake();
    let callback = |req: &_, resp| hs.on_request(req, resp);
    let accepted = within(
        within_,
        "mesh WebSocket handshake",
        async_tungstenite::accept_hdr_async_with_config(io, callback, Some(cfg)),
    )
    .await?;
    let ws = accepted.map_err(|e| hs.failed(e))?;
    Ok(hs.connected(ws, peer_cert))
}

/// [`HubRt::read_proxy_header`] on an async-std socket.
async fn read_proxy_header_impl(
    mut stream: TcpStream,
    within: Duration,
) -> (TcpStream, Result<Option<SocketAddr>, String>) {
    let header = async_std::future::timeout(
        within,
        nowconnect_shared::proxy_protocol::read_header(&mut stream),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no PROXY header within {within:?}")));
    (stream, header)
}
