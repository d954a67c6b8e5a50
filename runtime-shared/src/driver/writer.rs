//! What a link task drives itself: [`InlineWriter`], the batched WebSocket
//! writer (no writer task), and [`LoopTimer`], a link loop's timer.

use std::time::Instant;

use async_channel::Receiver;
use nowconnect_core::WsMessage;

use super::Outgoing;

/// The WebSocket writer of every link (hub and agent tunnels, mesh links),
/// driven by the link task itself instead of a task of its own: what the
/// link queues on its `Outgoing` channel is written in batches, flushed
/// once, in the same wake-up, which saves a cross-task hop (and, on a busy
/// machine, a thread wake-up) per message; a `Close` sends the close frame
/// and ends the socket. Cancel-safe: a message
/// leaves the queue only when the sink has taken it, so the write can be one
/// branch of a `race` that another branch wins.
pub struct InlineWriter<S, M> {
    sink: S,
    rx: Receiver<Outgoing>,
    frame: fn(WsMessage) -> M,
    close: fn(u16, String) -> M,
    /// Taken from the queue, not yet taken by the sink.
    pending: Option<M>,
    unflushed: bool,
    closing: bool,
    done: bool,
}

impl<S, M> InlineWriter<S, M>
where
    S: futures_util::Sink<M> + Unpin,
{
    pub fn new(
        sink: S,
        rx: Receiver<Outgoing>,
        frame: fn(WsMessage) -> M,
        close: fn(u16, String) -> M,
    ) -> Self {
        InlineWriter {
            sink,
            rx,
            frame,
            close,
            pending: None,
            unflushed: false,
            closing: false,
            done: false,
        }
    }

    /// Nothing to write or flush (or the socket is finished).
    pub fn is_idle(&self) -> bool {
        self.done || (self.pending.is_none() && !self.unflushed && self.rx.is_empty())
    }

    /// Whether the socket is finished: a close frame went out, or a write
    /// failed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Write everything queued and flush. `Pending` while the socket cannot
    /// take more (the task is woken when it can).
    pub fn poll_write(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use futures_util::SinkExt;
        use std::task::Poll;
        if self.done {
            return Poll::Ready(());
        }
        loop {
            if self.pending.is_none() && !self.closing {
                match self.rx.try_recv() {
                    Ok(Outgoing::Frame(f)) => self.pending = Some((self.frame)(f)),
                    Ok(Outgoing::Close { code, reason }) => {
                        self.pending = Some((self.close)(
                            code.ws_close_code(),
                            nowconnect_core::frame::ws_close_reason(&reason).to_string(),
                        ));
                        self.closing = true;
                    }
                    Err(_) => break,
                }
            }
            let Some(_) = &self.pending else { break };
            match self.sink.poll_ready_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    self.done = true;
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) => {}
            }
            let m = self.pending.take().expect("checked above");
            if self.sink.start_send_unpin(m).is_err() {
                self.done = true;
                return Poll::Ready(());
            }
            self.unflushed = true;
        }
        if self.unflushed {
            match self.sink.poll_flush_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    self.done = true;
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(())) => self.unflushed = false,
            }
        }
        if self.closing {
            // The close frame is out; end the socket.
            match self.sink.poll_close_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => self.done = true,
            }
        }
        Poll::Ready(())
    }

    /// [`Self::poll_write`] as a future.
    pub async fn write(&mut self) {
        futures_util::future::poll_fn(|cx| self.poll_write(cx)).await
    }

    /// Write what is queued now, without waiting: whatever the socket cannot
    /// take yet stays queued, and the task is woken when it can.
    pub async fn write_now(&mut self) {
        let _ = futures_lite::future::poll_once(self.write()).await;
    }
}

/// A link loop's timer, kept across wake-ups and replaced only when the
/// deadline moves. A fresh timer per wake-up is cheap on tokio but not on
/// async-io, which wakes its reactor thread (an eventfd write) for every
/// timer it registers: a busy link wakes hundreds of times a second while
/// its deadline (the next ping, the next metrics export) stays put.
/// Cancel-safe: waiting is one branch of a `race`, and the timer stays.
pub struct LoopTimer<F> {
    at: Option<Instant>,
    sleep: Option<std::pin::Pin<Box<F>>>,
}

impl<F: std::future::Future<Output = ()>> Default for LoopTimer<F> {
    fn default() -> Self {
        LoopTimer {
            at: None,
            sleep: None,
        }
    }
}

impl<F: std::future::Future<Output = ()>> LoopTimer<F> {
    /// Aim at `at` (`None`: no deadline); `sleep` makes a timer for a
    /// duration, only when the deadline differs from the one armed.
    pub fn set(&mut self, at: Option<Instant>, sleep: impl FnOnce(std::time::Duration) -> F) {
        if at == self.at && (at.is_none() || self.sleep.is_some()) {
            return;
        }
        self.at = at;
        self.sleep = at.map(|at| Box::pin(sleep(at.saturating_duration_since(Instant::now()))));
    }

    /// Wait for the deadline (forever without one); once it fires the
    /// timer is spent until the next [`Self::set`].
    pub async fn wait(&mut self) {
        futures_util::future::poll_fn(|cx| match self.sleep.as_mut() {
            Some(s) => std::future::Future::poll(s.as_mut(), cx).map(|()| {
                self.sleep = None;
            }),
            None => std::task::Poll::Pending,
        })
        .await
    }
}
