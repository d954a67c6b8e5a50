//! The hub on tokio: the shared hub ([`nowconnect_shared::hub`]) over tokio
//! tasks, timers and sockets, tokio-rustls and tokio-tungstenite for the
//! mesh, the Redis registry on redis' tokio runtime, and axum (hyper) for
//! `/tunnel`, `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use nowconnect_core::WsMessage;
use nowconnect_core::registry::{RegistryError, RegistryOp, RegistryReply};
use nowconnect_shared::driver::{FlowEnd, Outgoing};
use nowconnect_shared::hub::{HttpRole, HubHttp};
use nowconnect_shared::hub::{HubRt, WsIn};
use nowconnect_shared::mesh::{MeshConnected, MeshInbound};
use nowconnect_shared::metrics::Metrics;
use nowconnect_shared::registry::RedisRegistry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::config::HubConfig;

/// The transport under a mesh WebSocket: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// The tokio side of a hub.
pub struct TokioRt {
    redis: Option<Arc<RedisRegistry>>,
}

pub type Shared = nowconnect_shared::hub::Shared<TokioRt>;
pub type HubHandle = nowconnect_shared::hub::HubHandle<TokioRt>;

/// Start a hub on the current tokio runtime (see
/// [`nowconnect_shared::hub::start`]).
pub async fn start(cfg: HubConfig) -> Result<HubHandle, String> {
    let redis = RedisRegistry::for_config(&cfg)?.map(Arc::new);
    let with_redis = redis.is_some();
    nowconnect_shared::hub::start(cfg, TokioRt { redis }, with_redis).await
}

impl HubRt for TokioRt {
    type Task = tokio::task::JoinHandle<()>;
    type Listener = TcpListener;
    type Stream = TcpStream;
    type MeshWs = WebSocketStream<BoxIo>;

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) -> Self::Task {
        tokio::spawn(f)
    }

    fn abort(&self, t: Self::Task) {
        t.abort();
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep(d)
    }

    async fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        TcpListener::from_std(nowconnect_shared::rt::listen(addr)?)
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
        timeouts: nowconnect_shared::driver::ClientTimeouts,
    ) -> impl Future<Output = ()> + Send + 'static {
        crate::io::pipe_client(stream, end, metrics, timeouts)
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
        within: Duration,
        cfg: WebSocketConfig,
    ) -> impl Future<Output = Result<MeshConnected<Self::MeshWs>, String>> + Send + 'static {
        mesh_accept_impl(tcp, inbound, within, cfg)
    }
}

impl HubHttp for TokioRt {
    fn serve_http(
        shared: Arc<Shared>,
        l: TcpListener,
        role: HttpRole,
        stop: async_channel::Receiver<()>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut app = Router::new();
        if role.serves("/tunnel") {
            app = app.route("/tunnel", get(tunnel_handler));
        }
        if role.serves("/metrics") {
            app = app
                .route("/healthz", get(|| async { "ok" }))
                .route("/readyz", get(readyz))
                .route("/metrics", get(metrics_handler));
        }
        serve_http(l, app.with_state(shared.clone()), shared, role, stop)
    }
}

/// The HTTP server of one port (`role`'s endpoints): hyper with a timer, so
/// a client must send its request head within `http.header_timeout_sec`
/// (no slowloris), a connection that sends nothing is closed after the same
/// time, and each connection serves one request. With `http.tls` a
/// connection first completes its TLS handshake (the certificate current at
/// accept) within that time too. Stops accepting when `stop` fires (or is
/// dropped) and lets requests in progress end.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    shared: Arc<Shared>,
    role: HttpRole,
    stop: async_channel::Receiver<()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let header_timeout = Duration::from_secs(shared.cfg().raw.http.header_timeout_sec);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.recv() => return,
        };
        // Tunnel frames are small and latency-bound: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let svc = TowerToHyperService::new(
            app.clone()
                .layer(axum::middleware::map_response(close_unless_upgrade))
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let builder = builder.clone();
        let stop = stop.clone();
        // The certificate current now: a reload swaps it for later accepts.
        let tls = shared.http_server_tls(role);
        let shared = shared.clone();
        tokio::spawn(async move {
            // hyper's header timer starts with the first byte: a connection
            // that sends nothing gets the same deadline here.
            let Some(tls) = tls else {
                let mut first = [0u8; 1];
                if tokio::time::timeout(header_timeout, tcp.peek(&mut first))
                    .await
                    .is_err()
                {
                    tracing::debug!(%peer, "http connection sent nothing; closed");
                    return;
                }
                return serve_one(&builder, tcp, svc, peer, stop).await;
            };
            let accept = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
            let mut tls = match tokio::time::timeout(header_timeout, accept).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return shared.http_tls_failed(peer, &e.to_string(), false),
                Err(_) => {
                    let reason = format!("not completed within {header_timeout:?}");
                    return shared.http_tls_failed(peer, &reason, true);
                }
            };
            // The first byte of the request, read through TLS (rustls may
            // hold it already, so the socket cannot be peeked), and given
            // back to hyper in front of the stream.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, tls.read(&mut first)).await {
                Ok(Ok(1)) => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::debug!(%peer, "https connection sent nothing; closed");
                    return;
                }
            }
            let io = crate::io::Prefixed::new(first[0], tls);
            serve_one(&builder, io, svc, peer, stop).await
        });
    }
}

/// Serve one accepted connection with hyper (upgrades allowed) until it
/// ends, or until `stop` fires and the request in progress ends.
async fn serve_one<I>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    io: I,
    svc: hyper_util::service::TowerToHyperService<Router>,
    peer: SocketAddr,
    stop: async_channel::Receiver<()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        }
        _ = stop.recv() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// One request per connection (health checks, scrapes, one WebSocket
/// upgrade): every response but a `101` closes its connection, so no idle
/// keep-alive connection is held open.
async fn close_unless_upgrade(mut r: Response) -> Response {
    if r.status() != StatusCode::SWITCHING_PROTOCOLS {
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let (code, body) = shared.readyz();
    (
        status(code),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics().render(),
    )
        .into_response()
}

async fn tunnel_handler(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let identity = match shared.authorize_tunnel(auth, peer) {
        Ok(id) => id,
        Err((code, body)) => return (status(code), body).into_response(),
    };
    let max = shared.max_ws_message();
    // The hub tunnel's read size (`tung::HUB_TUNNEL_READ_BUFFER`):
    // tungstenite zeroes that much before each read and keeps it resident
    // per tunnel, and axum's default (128 KiB) made every small CREDIT read
    // from the agent zero 128 KiB.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(nowconnect_shared::tung::HUB_TUNNEL_READ_BUFFER)
        .on_upgrade(move |socket: WebSocket| async move {
            let (sink, stream) = socket.split();
            let (out_tx, out_rx) = async_channel::unbounded::<Outgoing>();
            let writer = crate::io::axum_writer(sink, out_rx);
            let stream = stream.map(|m| match m {
                Ok(Message::Binary(b)) => WsIn::Frame(WsMessage::Binary(b)),
                Ok(Message::Text(t)) => WsIn::Frame(WsMessage::Text(t.as_str().to_owned())),
                Ok(Message::Close(f)) => {
                    WsIn::Closed(f.map(|f| f.reason.to_string()).unwrap_or_default())
                }
                Ok(_) => WsIn::Other,
                Err(e) => WsIn::Failed(e.to_string()),
            });
            shared
                .run_tunnel(stream, out_tx, writer, identity, peer)
                .await;
        })
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback error
async fn mesh_connect_impl(
    url: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    cfg: WebSocketConfig,
) -> Result<MeshConnected<WebSocketStream<BoxIo>>, String> {
    let dial = nowconnect_shared::mesh::mesh_dial(&url)?;
    let tcp = TcpStream::connect((dial.host.as_str(), dial.port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (io, peer_cert): (BoxIo, _) = if dial.secure {
        let cfg = tls.ok_or_else(|| format!("{url}: wss:// needs ha.mesh.tls"))?;
        let name = rustls_pki_types::ServerName::try_from(dial.host.clone())
            .map_err(|e| format!("{url}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        let cert = leaf(stream.get_ref().1.peer_certificates());
        (Box::new(stream), cert)
    } else {
        (Box::new(tcp), None)
    };
    let (ws, resp) = tokio_tungstenite::client_async_with_config(dial.request, io, Some(cfg))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let codec = nowconnect_shared::mesh::chosen_codec(&url, &resp)?;
    Ok(MeshConnected {
        ws,
        codec,
        peer_cert,
    })
}

/// The peer's end-entity certificate, owned.
fn leaf(
    chain: Option<&[rustls_pki_types::CertificateDer<'_>]>,
) -> Option<rustls_pki_types::CertificateDer<'static>> {
    chain?.first().map(|c| c.clone().into_owned())
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback error
async fn mesh_accept_impl(
    tcp: TcpStream,
    inbound: MeshInbound,
    within: Duration,
    cfg: WebSocketConfig,
) -> Result<MeshConnected<WebSocketStream<BoxIo>>, String> {
    let _ = tcp.set_nodelay(true);
    let mut peer_cert = None;
    let io: BoxIo = match inbound.tls.clone() {
        Some(t) => {
            match tokio::time::timeout(within, tokio_rustls::TlsAcceptor::from(t).accept(tcp)).await
            {
                Ok(Ok(tls)) => {
                    peer_cert = leaf(tls.get_ref().1.peer_certificates());
                    Box::new(tls)
                }
                Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
                Err(_) => {
                    return Err(format!("TLS handshake not completed within {within:?}"));
                }
            }
        }
        None => Box::new(tcp),
    };
    let mut hs = inbound.handshake();
    let callback = |req: &_, resp| hs.on_request(req, resp);
    let accepted = tokio::time::timeout(
        within,
        tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(cfg)),
    )
    .await
    .map_err(|_| format!("mesh WebSocket handshake not completed within {within:?}"))?;
    let ws = accepted.map_err(|e| hs.failed(e))?;
    Ok(hs.connected(ws, peer_cert))
}

/// [`HubRt::read_proxy_header`] on a tokio socket.
async fn read_proxy_header_impl(
    stream: TcpStream,
    within: Duration,
) -> (TcpStream, Result<Option<SocketAddr>, String>) {
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let mut io = stream.compat();
    let header = tokio::time::timeout(
        within,
        nowconnect_shared::proxy_protocol::read_header(&mut io),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no PROXY header within {within:?}")));
    (io.into_inner(), header)
}
