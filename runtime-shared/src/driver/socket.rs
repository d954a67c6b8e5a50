//! Flow sockets: [`run_flow_socket`] and [`run_client_socket`] (with the
//! client's timeouts) pipe a socket's two halves to a flow with
//! credit-gated reads; the reader and writer traits adapters implement.

use std::sync::Arc;
use std::time::Instant;

use async_channel::Receiver;
use futures_util::io::{AsyncWrite, AsyncWriteExt};
use nowconnect_core::{Cid, ErrorCode, Payload};
use prometheus_client::metrics::counter::Counter;

use crate::metrics::{Metrics, labels};

use super::{Delivery, FlowEnd, FlowTx, PeerMsg, Permits, READ_CHUNK};

/// The byte counters of one flow socket, taken once per flow (no label
/// lookup per chunk): what it reads from its socket, what it writes there.
#[derive(Clone, Debug, Default)]
pub struct FlowBytes {
    pub read: Counter,
    pub written: Counter,
}

/// Pipe one socket (its read and write halves) and one flow until both
/// directions end or either side resets, counting its bytes in `bytes`. The
/// halves run concurrently in this one future; a reset drops the reader at
/// once and the socket is closed with a TCP reset ([`FlowWriter::abort`]),
/// so the peer learns that its stream was cut and cannot take a cut-off
/// transfer for a whole one.
pub async fn run_flow_socket<R, W>(rd: R, mut wr: W, end: FlowEnd, bytes: FlowBytes)
where
    R: ChunkReader,
    W: FlowWriter,
{
    use futures_util::future::{Either, select};
    let FlowEnd {
        cid,
        connector: _,
        rx,
        permits,
        cmd,
    } = end;
    let reset = {
        let reader = std::pin::pin!(read_half(rd, cid, permits, cmd.clone(), bytes.read));
        let writer = std::pin::pin!(write_half(&mut wr, cid, rx, cmd, bytes.written));
        match select(reader, writer).await {
            // Reader done (EOF sent as FIN, or error): the other direction goes on.
            Either::Left(((), writer)) => writer.await,
            // Writer done: a reset drops the reader now; a clean end still
            // lets the reader finish its direction.
            Either::Right((reset, reader)) => {
                if !reset {
                    reader.await;
                }
                reset
            }
        }
    };
    if reset {
        wr.abort();
    }
}

pub use nowconnect_core::client_timeouts::ClientTimeouts;
use nowconnect_core::client_timeouts::{Expired, Verdict};

/// [`run_flow_socket`] for a hub client, with its [`ClientTimeouts`]: a flow
/// that runs into one is reset with `idle_timeout` and its socket closed.
/// `sleep` is the runtime's timer.
pub async fn run_client_socket<R, W, S, F>(
    rd: R,
    wr: W,
    end: FlowEnd,
    metrics: Arc<Metrics>,
    timeouts: ClientTimeouts,
    sleep: S,
) where
    R: ChunkReader,
    W: FlowWriter,
    S: Fn(std::time::Duration) -> F,
    F: std::future::Future<Output = ()>,
{
    if !timeouts.any() {
        return run_flow_socket(rd, wr, end, metrics.client_bytes()).await;
    }
    // Boxed: only flows with a timeout pay for its larger state (a client
    // task lives as long as its flow, idle or not).
    Box::pin(timed_flow(rd, wr, end, metrics, timeouts, sleep)).await
}

async fn timed_flow<R, W, S, F>(
    rd: R,
    wr: W,
    end: FlowEnd,
    metrics: Arc<Metrics>,
    timeouts: ClientTimeouts,
    sleep: S,
) where
    R: ChunkReader,
    W: FlowWriter,
    S: Fn(std::time::Duration) -> F,
    F: std::future::Future<Output = ()>,
{
    let (cid, cmd) = (end.cid, end.cmd.clone());
    let activity = Activity::default();
    let flow = run_flow_socket(
        ActiveReader(rd, activity.clone()),
        ActiveWriter(wr, activity.clone()),
        end,
        metrics.client_bytes(),
    );
    let watch = async {
        loop {
            match timeouts.check(activity.age(), activity.idle(), activity.client_spoke()) {
                Verdict::Expired(e) => return e,
                Verdict::CheckIn(w) => sleep(w).await,
                Verdict::Done => std::future::pending::<()>().await,
            }
        }
    };
    let expired = futures_lite::future::or(
        async {
            flow.await;
            None
        },
        async { Some(watch.await) },
    )
    .await;
    let Some(expired) = expired else {
        return;
    };
    match expired {
        Expired::Idle(limit) => {
            tracing::info!(
                cid = cid.0,
                idle_sec = limit.as_secs(),
                "client flow idle; closed"
            );
        }
        Expired::FirstByte(limit) => tracing::info!(
            cid = cid.0,
            first_byte_timeout_sec = limit.as_secs(),
            "client sent nothing after connecting; closed"
        ),
    }
    metrics
        .client_timeouts
        .get_or_create(&labels(&[("kind", expired.kind())]))
        .inc();
    let _ = cmd.send(
        cid,
        PeerMsg::Reset {
            code: expired.code(),
            reason: expired.reason(),
        },
    );
}

async fn read_half<R: ChunkReader>(
    mut rd: R,
    cid: Cid,
    permits: Permits,
    cmd: FlowTx,
    bytes_read: Counter,
) {
    loop {
        if !permits.acquire().await {
            return; // flow over
        }
        match rd.read_chunk().await {
            Ok(None) => {
                let _ = cmd.send(cid, PeerMsg::Fin);
                return;
            }
            Ok(Some(payload)) => {
                bytes_read.inc_by(payload.len() as u64);
                if !cmd.send(cid, PeerMsg::Data(payload)) {
                    return;
                }
            }
            Err(e) => {
                let _ = cmd.send(
                    cid,
                    PeerMsg::Reset {
                        code: ErrorCode::ConnectionReset,
                        reason: format!("read error: {e}"),
                    },
                );
                return;
            }
        }
    }
}

/// The read side of a flow socket: the next chunk read, `None` at EOF.
/// Adapters implement it so that an idle flow holds no read buffer: memory
/// is taken only for bytes that arrive. They read into a buffer with
/// [`HEADROOM`](nowconnect_core::payload::HEADROOM) bytes free in front ([`Payload::with_room`]), where the
/// frame's header is written when it is sent, so the payload is not copied.
pub trait ChunkReader {
    fn read_chunk(&mut self)
    -> impl std::future::Future<Output = std::io::Result<Option<Payload>>>;
}

/// The write side of a flow socket.
pub trait FlowWriter: AsyncWrite + Unpin {
    /// End this side so that the socket closes with a TCP reset
    /// (`SO_LINGER` 0, and no FIN first) once its read side is gone too:
    /// called when the flow was reset, so the peer sees `ECONNRESET` instead
    /// of an end of stream and cannot take a cut-off transfer for a whole
    /// one. Unsent bytes are dropped, as a reset does.
    fn abort(self);
}

/// How much a flow socket reads at a time: starts at [`ReadSize::MIN`],
/// doubles (up to [`READ_CHUNK`]) while reads fill the buffer, halves when
/// they use less than a quarter of it. A bulk flow moves [`READ_CHUNK`]
/// per message (fewer messages, syscalls and wake-ups per byte); a
/// request/response flow such as LDAP keeps small buffers.
#[derive(Clone, Copy, Debug)]
pub struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize(Self::MIN)
    }
}

impl ReadSize {
    pub const MIN: usize = 4 * 1024;

    pub fn get(self) -> usize {
        self.0
    }

    /// Adjust after a read of `n` bytes into a buffer of [`Self::get`].
    pub fn update(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 2).min(READ_CHUNK);
        } else if n < self.0 / 4 {
            self.0 = (self.0 / 2).max(Self::MIN);
        }
    }
}

/// Write what the flow delivers to the socket; `true` when the flow was
/// reset (or the socket failed), so the socket is to be reset as well.
async fn write_half<W: AsyncWrite + Unpin>(
    wr: &mut W,
    cid: Cid,
    rx: Receiver<Delivery>,
    cmd: FlowTx,
    bytes_written: Counter,
) -> bool {
    let mut fin = false;
    while let Ok(msg) = rx.recv().await {
        match msg {
            Delivery::Data(b) => {
                let n = b.len();
                if let Err(e) = wr.write_all(&b).await {
                    let _ = cmd.send(
                        cid,
                        PeerMsg::Reset {
                            code: ErrorCode::ConnectionReset,
                            reason: format!("write error: {e}"),
                        },
                    );
                    return true;
                }
                bytes_written.inc_by(n as u64);
                let _ = cmd.send(cid, PeerMsg::Consumed(n));
            }
            Delivery::Fin => {
                fin = true;
                let _ = wr.close().await;
            }
            Delivery::Reset { code, reason } => {
                tracing::debug!(cid = cid.0, %code, %reason, "flow reset");
                return true;
            }
        }
    }
    // The flow is gone: after its FIN that is its normal end; before, the
    // link went away under it (a task ended without a word), which is a
    // reset too.
    !fin
}

/// When a flow socket last moved a byte, for idle timeouts: shared by an
/// [`ActiveReader`] and an [`ActiveWriter`] over the two halves of one socket.
#[derive(Clone)]
pub struct Activity {
    origin: Instant,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the reader (the client) has delivered a byte or its end.
    spoke: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: Arc::default(),
            spoke: Arc::default(),
        }
    }
}

impl Activity {
    /// How long since creation.
    pub fn age(&self) -> std::time::Duration {
        self.origin.elapsed()
    }

    /// Whether the read side has delivered any byte, or its end.
    pub fn client_spoke(&self) -> bool {
        self.spoke.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the last byte (or since creation).
    pub fn idle(&self) -> std::time::Duration {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.origin
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }
}

/// A [`ChunkReader`] that records activity.
pub struct ActiveReader<R>(pub R, pub Activity);

impl<R: ChunkReader> ChunkReader for ActiveReader<R> {
    async fn read_chunk(&mut self) -> std::io::Result<Option<Payload>> {
        let r = self.0.read_chunk().await;
        self.1.touch();
        // Data, or a clean end (a client that half-closes has said all it
        // will): either way it is no longer a client that never spoke.
        if r.is_ok() {
            self.1
                .spoke
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

/// An `AsyncWrite` that records activity.
pub struct ActiveWriter<W>(pub W, pub Activity);

impl<W: AsyncWrite + Unpin> AsyncWrite for ActiveWriter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.0).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.1.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_close(cx)
    }
}

impl<W: FlowWriter> FlowWriter for ActiveWriter<W> {
    fn abort(self) {
        self.0.abort();
    }
}
