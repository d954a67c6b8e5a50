//! The tokio side of the shared driver: tokio sockets as `futures-io`
//! halves, and the WebSocket message types of axum and tokio-tungstenite.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use nowconnect_core::WsMessage;
use nowconnect_shared::driver::{
    ChunkReader, FlowEnd, InlineWriter, Outgoing, ReadSize, run_client_socket, run_flow_socket,
};
use nowconnect_shared::metrics::Metrics;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::compat::TokioAsyncWriteCompatExt;

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
    run_flow_socket(
        TokioReader::new(rd),
        wr.compat_write(),
        end,
        metrics,
        up,
        down,
    )
    .await
}

/// Like [`pipe_tcp`], for a hub client (see [`run_client_socket`]).
pub async fn pipe_client(
    stream: TcpStream,
    end: FlowEnd,
    metrics: Arc<Metrics>,
    idle: Option<std::time::Duration>,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    run_client_socket(
        TokioReader::new(rd),
        wr.compat_write(),
        end,
        metrics,
        idle,
        tokio::time::sleep,
    )
    .await
}

/// Waits until the socket is readable, then reads with `try_read_buf` into
/// uninitialised capacity: an idle flow holds no buffer at all, a busy one
/// reads up to [`ReadSize`] at a time (at most `READ_CHUNK`) without
/// zeroing memory first.
struct TokioReader(OwnedReadHalf, ReadSize);

impl TokioReader {
    fn new(half: OwnedReadHalf) -> Self {
        TokioReader(half, ReadSize::default())
    }
}

impl ChunkReader for TokioReader {
    async fn read_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            self.0.readable().await?;
            let mut buf = BytesMut::with_capacity(self.1.get());
            match self.0.try_read_buf(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    self.1.update(n);
                    return Ok(Some(buf.freeze()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
type Axum = axum::extract::ws::Message;

fn axum_frame(m: WsMessage) -> Axum {
    match m {
        WsMessage::Text(s) => Axum::Text(s.into()),
        WsMessage::Binary(b) => Axum::Binary(b),
    }
}

fn axum_close(code: u16, reason: String) -> Axum {
    Axum::Close(Some(axum::extract::ws::CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// The hub's axum WebSocket (`/tunnel`), written by its tunnel task.
pub fn axum_writer<S>(sink: S, rx: async_channel::Receiver<Outgoing>) -> InlineWriter<S, Axum>
where
    S: futures_util::Sink<Axum> + Unpin,
{
    InlineWriter::new(sink, rx, axum_frame, axum_close)
}
