//! The tokio side of the shared driver: tokio sockets as `futures-io`
//! halves, and the WebSocket message types of axum and tokio-tungstenite.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use nowconnect_core::payload::HEADROOM;
use nowconnect_core::{Payload, WsMessage};
use nowconnect_shared::driver::{
    ChunkReader, FlowBytes, FlowEnd, FlowWriter, InlineWriter, Outgoing, ReadSize,
    run_client_socket, run_flow_socket,
};
use nowconnect_shared::metrics::Metrics;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

/// Pipe a TCP socket to a flow (see [`run_flow_socket`]).
pub async fn pipe_tcp(stream: TcpStream, end: FlowEnd, bytes: FlowBytes) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    run_flow_socket(
        TokioReader::new(rd),
        TokioWriter(wr.compat_write()),
        end,
        bytes,
    )
    .await
}

/// Like [`pipe_tcp`], for a hub client (see [`run_client_socket`]).
pub async fn pipe_client(
    stream: TcpStream,
    end: FlowEnd,
    metrics: Arc<Metrics>,
    timeouts: nowconnect_shared::driver::ClientTimeouts,
) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    run_client_socket(
        TokioReader::new(rd),
        TokioWriter(wr.compat_write()),
        end,
        metrics,
        timeouts,
        tokio::time::sleep,
    )
    .await
}

/// The write half of a tokio socket as a [`FlowWriter`].
struct TokioWriter(Compat<OwnedWriteHalf>);

impl FlowWriter for TokioWriter {
    fn abort(self) {
        let half = self.0.into_inner();
        let _ = half.as_ref().set_zero_linger();
        // No shutdown (a FIN) on the way out: the socket closes, with the
        // reset, when the read half is gone too.
        half.forget();
    }
}

impl futures_util::io::AsyncWrite for TokioWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// Waits until the socket is readable, then reads into uninitialised
/// capacity: an idle flow holds no buffer at all, a busy one reads up to
/// [`ReadSize`] at a time (at most `READ_CHUNK`) without zeroing memory
/// first, behind [`HEADROOM`] bytes left free for the frame's header. The
/// read goes through `AsyncRead` (`read_buf`), which clears the socket's
/// readiness after a short read: `try_read_buf` left it set, so every chunk
/// cost a second read that failed with `EAGAIN` and a buffer allocated for
/// it.
struct TokioReader(OwnedReadHalf, ReadSize);

impl TokioReader {
    fn new(half: OwnedReadHalf) -> Self {
        TokioReader(half, ReadSize::default())
    }
}

impl ChunkReader for TokioReader {
    async fn read_chunk(&mut self) -> std::io::Result<Option<Payload>> {
        self.0.readable().await?;
        let mut buf = BytesMut::with_capacity(HEADROOM + self.1.get());
        buf.put_bytes(0, HEADROOM);
        match tokio::io::AsyncReadExt::read_buf(&mut self.0, &mut buf).await? {
            0 => Ok(None),
            n => {
                self.1.update(n);
                Ok(Some(Payload::with_room(buf, HEADROOM)))
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

/// A stream with one byte already read from it put back in front: the
/// HTTP server reads the first byte of a request through TLS itself (to
/// bound the wait for it) and hands hyper the whole request.
pub struct Prefixed<S> {
    first: Option<u8>,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(first: u8, inner: S) -> Self {
        Prefixed {
            first: Some(first),
            inner,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if buf.remaining() > 0
            && let Some(b) = self.first.take()
        {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Prefixed;

    #[tokio::test]
    async fn the_byte_put_back_is_read_first_and_writes_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(b'G', a);
        b.write_all(b"ET / HTTP/1.1").await.unwrap();
        let mut got = [0u8; 14];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1");
        p.write_all(b"ok").await.unwrap();
        let mut back = [0u8; 2];
        b.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok");
    }
}
