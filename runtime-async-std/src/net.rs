//! async-std sockets for the shared driver: WebSocket dialing (plain or
//! rustls through futures-rustls), the WebSocket writer, TCP flow sockets.

use std::sync::Arc;

use async_std::net::TcpStream;
use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Error as WsError;
use futures_util::io::{AsyncRead, AsyncWrite};
use nowconnect_core::Payload;
use nowconnect_core::payload::HEADROOM;
use nowconnect_shared::driver::{
    ChunkReader, FlowBytes, FlowEnd, FlowWriter, ReadSize, run_client_socket, run_flow_socket,
};
use nowconnect_shared::metrics::Metrics;
use rustls_pki_types::{CertificateDer, ServerName};

/// A byte stream a WebSocket runs over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Dial a `ws://` or `wss://` URL with `Authorization: Bearer <token>`.
/// TLS uses `tls` (its own roots) for `wss://`.
pub async fn connect_ws(
    url: &str,
    token: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_message: usize,
) -> Result<Ws, String> {
    let req = nowconnect_shared::tung::hub_request(url, token)?;
    let uri = req.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| format!("bad hub URL `{url}`: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let secure = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // `wss://` without `tls.ca_bundle`: the public web PKI.
    let tls = secure.then(|| tls.unwrap_or_else(|| Arc::new(public_roots())));
    let io = tls_or_plain(url, &host, tcp, tls).await?;
    let config = nowconnect_shared::tung::ws_config(max_message);
    let (ws, _) = async_tungstenite::client_async_with_config(req, io, Some(config))
        .await
        .map_err(|e| match e {
            WsError::Http(resp) => {
                nowconnect_shared::agent::hub_refusal(url, resp.status(), resp.body().as_deref())
            }
            e => format!("{url}: {e}"),
        })?;
    Ok(ws)
}

/// `tcp` as it is, or wrapped in TLS with `tls` for server name `host`.
pub async fn tls_or_plain(
    url: &str,
    host: &str,
    tcp: TcpStream,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Io>, String> {
    Ok(tls_or_plain_with_peer(url, host, tcp, tls).await?.0)
}

/// [`tls_or_plain`], also giving the server's end-entity certificate (for
/// the mesh, which checks that it names the replica the peer claims).
pub async fn tls_or_plain_with_peer(
    url: &str,
    host: &str,
    tcp: TcpStream,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(Box<dyn Io>, Option<CertificateDer<'static>>), String> {
    let Some(cfg) = tls else {
        return Ok((Box::new(tcp), None));
    };
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{url}: bad TLS server name `{host}`: {e}"))?;
    let stream = futures_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{url}: TLS: {e}"))?;
    let cert = leaf(stream.get_ref().1.peer_certificates());
    Ok((Box::new(stream), cert))
}

/// The peer's end-entity certificate, owned.
pub fn leaf(chain: Option<&[CertificateDer<'_>]>) -> Option<CertificateDer<'static>> {
    chain?.first().map(|c| c.clone().into_owned())
}

/// A client config trusting the public web PKI (Mozilla's roots), for
/// `wss://` hubs when no `tls.ca_bundle` is configured.
fn public_roots() -> rustls::ClientConfig {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Pipe a TCP socket to a flow (see [`run_flow_socket`]).
pub async fn pipe_tcp(stream: TcpStream, end: FlowEnd, bytes: FlowBytes) {
    let _ = stream.set_nodelay(true);
    run_flow_socket(
        PeekReader::new(stream.clone()),
        WriteHalf(stream),
        end,
        bytes,
    )
    .await
}

/// Pipe a hub client's socket to its flow (see [`run_client_socket`]).
pub async fn pipe_client(
    stream: TcpStream,
    end: FlowEnd,
    metrics: Arc<Metrics>,
    timeouts: nowconnect_shared::driver::ClientTimeouts,
) {
    let _ = stream.set_nodelay(true);
    run_client_socket(
        PeekReader::new(stream.clone()),
        WriteHalf(stream),
        end,
        metrics,
        timeouts,
        async_std::task::sleep,
    )
    .await
}

/// The read side of a flow socket: waits for data with a one-byte `peek`,
/// so an idle flow holds no read buffer, then reads what is there into a
/// buffer of [`ReadSize`] (up to 256 KiB for a bulk flow).
struct PeekReader(TcpStream, ReadSize);

impl PeekReader {
    fn new(stream: TcpStream) -> Self {
        PeekReader(stream, ReadSize::default())
    }
}

impl ChunkReader for PeekReader {
    async fn read_chunk(&mut self) -> std::io::Result<Option<Payload>> {
        use futures_util::io::AsyncReadExt;
        let mut probe = [0u8; 1];
        if self.0.peek(&mut probe).await? == 0 {
            return Ok(None);
        }
        // Room in front for the frame's header (see `ChunkReader`).
        let mut buf = bytes::BytesMut::zeroed(HEADROOM + self.1.get());
        let n = self.0.read(&mut buf[HEADROOM..]).await?;
        if n == 0 {
            return Ok(None);
        }
        self.1.update(n);
        buf.truncate(HEADROOM + n);
        Ok(Some(Payload::with_room(buf, HEADROOM)))
    }
}

/// The write side of a TCP socket whose `close` shuts down only the write
/// direction (a FIN to the peer), so a half-closed flow keeps reading.
struct WriteHalf(TcpStream);

impl FlowWriter for WriteHalf {
    fn abort(self) {
        // The socket closes, with the reset, when the reader's handle is
        // gone too (dropping this one sends nothing).
        let _ = socket2::SockRef::from(&self.0).set_linger(Some(std::time::Duration::ZERO));
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(self.0.shutdown(std::net::Shutdown::Write))
    }
}
