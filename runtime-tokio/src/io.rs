//! The tokio side of the shared driver: tokio sockets as `futures-io`
//! halves, and the WebSocket message types of axum and tokio-tungstenite.

use std::sync::Arc;

use nowconnect_core::WsMessage;
use nowconnect_shared::driver::{FlowEnd, Outgoing, run_flow_socket, write_ws_with};
use nowconnect_shared::metrics::Metrics;
use tokio::net::TcpStream;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// Pipe a TCP socket to a flow (see [`run_flow_socket`]).
pub async fn pipe_tcp(
    stream: TcpStream,
    end: FlowEnd,
    metrics: Arc<Metrics>,
    up: &'static str,
    down: &'static str,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    run_flow_socket(rd.compat(), wr.compat_write(), end, metrics, up, down).await
}

type Tung = tokio_tungstenite::tungstenite::Message;

/// The writer loop for a tokio-tungstenite WebSocket.
pub async fn write_tungstenite<S>(sink: S, rx: async_channel::Receiver<Outgoing>)
where
    S: futures_util::Sink<Tung> + Unpin,
{
    write_ws_with(
        sink,
        rx,
        |m| match m {
            WsMessage::Text(s) => Tung::Text(s.into()),
            WsMessage::Binary(b) => Tung::Binary(b),
        },
        |code, reason| {
            Tung::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: code.into(),
                reason: reason.into(),
            }))
        },
    )
    .await
}

type Axum = axum::extract::ws::Message;

/// The writer loop for the hub's axum WebSocket (`/tunnel`).
pub async fn write_axum<S>(sink: S, rx: async_channel::Receiver<Outgoing>)
where
    S: futures_util::Sink<Axum> + Unpin,
{
    write_ws_with(
        sink,
        rx,
        |m| match m {
            WsMessage::Text(s) => Axum::Text(s.into()),
            WsMessage::Binary(b) => Axum::Binary(b),
        },
        |code, reason| {
            Axum::Close(Some(axum::extract::ws::CloseFrame {
                code,
                reason: reason.into(),
            }))
        },
    )
    .await
}
