//! Driving a core link ([`Tunnel`] or mesh link) and piping its flows to TCP
//! sockets or to flows on another link.
//!
//! One task per link owns the core link and a [`FlowPipes`]. One task per
//! flow socket runs [`run_flow_socket`]: its reader half sends what it reads
//! as [`LinkCmd::Data`], at most [`CHUNKS_IN_FLIGHT`] chunks ahead of what
//! the core has accepted (the core's per-flow credit is the real bound; this
//! only keeps the adapter's own buffer small); its writer half writes
//! [`FlowMsg::Data`] and reports [`LinkCmd::Consumed`] once written, which is
//! what grants the peer more credit. No protocol decision is made here.
//!
//! Nothing here depends on an async runtime: channels are `async-channel`,
//! sockets are `futures-io` halves, and the two concurrent halves of a flow
//! socket are joined with `futures-util` rather than spawned, so the tokio
//! and async-std adapters drive flows with the very same code.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use async_channel::{Receiver, Sender};
use bytes::Bytes;
use futures_util::io::{AsyncWrite, AsyncWriteExt};
use nowconnect_core::flow::SendError;
use nowconnect_core::mux::{FlowEvent, FlowLink};
use nowconnect_core::tunnel::{Tunnel, TunnelEvent};
use nowconnect_core::{Cid, Epoch, ErrorCode, Payload, WsMessage};

use crate::metrics::{Cadence, Metrics, add_delta, add_frame_deltas, labels};

/// Largest read from a flow socket (and so the largest DATA payload a
/// runtime sends): 256 KiB moved 0.24x a direct loopback connection through
/// a hub against 0.18x with 64 KiB, in one `tunnel-bench` session
/// (`docs/performance.md`).
pub const READ_CHUNK: usize = 256 * 1024;
/// Chunks a flow's reader may have handed over and the core not yet taken.
pub const CHUNKS_IN_FLIGHT: usize = 2;

/// Where the answer to an open goes (a one-shot channel).
pub type Reply<T> = Sender<T>;

/// A one-shot channel for an open's answer.
pub fn reply_channel<T>() -> (Reply<T>, Receiver<T>) {
    async_channel::bounded(1)
}

/// Reader permits of one flow: a token per chunk the reader may hand over
/// ahead of the core. Closing the channel tells the reader the flow is over.
#[derive(Clone)]
pub struct Permits {
    give: Sender<()>,
    take: Receiver<()>,
}

impl Permits {
    pub fn new(n: usize) -> Self {
        let (give, take) = async_channel::bounded(n.max(1));
        for _ in 0..n {
            let _ = give.try_send(());
        }
        Permits { give, take }
    }

    /// Wait for a permit; `false` once the flow is over.
    pub async fn acquire(&self) -> bool {
        self.take.recv().await.is_ok()
    }

    pub fn release(&self) {
        let _ = self.give.try_send(());
    }

    pub fn close(&self) {
        self.give.close();
    }
}

/// Commands to a link task (tunnel or mesh link) from flow tasks and the control.
pub enum LinkCmd {
    /// Hub: ownership claimed; send WELCOME.
    Accept {
        epoch: Epoch,
    },
    Close {
        code: ErrorCode,
        reason: String,
    },
    /// Hub: this hub is draining; send DRAIN (v2 tunnels).
    Drain,
    /// Hub: open a flow to this connector.
    OpenFlow {
        connector: String,
        reply: Reply<Result<FlowEnd, String>>,
    },
    /// Owner hub: open a flow to this connector joined to a mesh flow; the
    /// answer is the new flow's cid.
    OpenJoined {
        connector: String,
        peer: Peer,
        reply: Reply<Result<Cid, String>>,
    },
    /// Owner hub: the held flow `cid` (see [`FlowPipes::hold`]) is joined to
    /// `peer` from now on.
    Join {
        cid: Cid,
        peer: Peer,
    },
    /// Mesh origin: open a flow to `agent_id`'s `connector` under `epoch`.
    OpenMeshFlow {
        connector: String,
        agent_id: String,
        epoch: Epoch,
        reply: Reply<Result<FlowEnd, String>>,
    },
    Data {
        cid: Cid,
        payload: Payload,
    },
    Fin {
        cid: Cid,
    },
    Reset {
        cid: Cid,
        code: ErrorCode,
        reason: String,
    },
    Consumed {
        cid: Cid,
        n: usize,
    },
}

/// Send an open to `link` and return where its answer arrives. With no link
/// (it went away between the routing decision and now) the answer's channel
/// is closed at once, as it is when the link has ended or ends before it
/// answers ([`end_commands`]): the caller hears `link went away` and never
/// waits on an answer nobody can give.
pub fn send_open<T>(
    link: Option<Sender<LinkCmd>>,
    open: impl FnOnce(Reply<T>) -> LinkCmd,
) -> Receiver<T> {
    let (tx, rx) = reply_channel();
    if let Some(link) = link {
        let _ = link.try_send(open(tx));
    }
    rx
}

/// The end of a link task: nothing sent to it may wait forever. Closes its
/// command channel (a later send fails at once) and empties it. An open's
/// reply is dropped, so whoever waits for it hears that the link went away
/// (a client is refused with `link_lost`; a bridge resets its mesh flow), and
/// a join resets the flow on the other link. Flow commands go with their
/// flows. Without this, a command queued in the instant the link closed
/// stayed in the channel as long as any sender lived, and its client waited
/// for an answer with neither data nor a close.
pub fn end_commands(rx: &Receiver<LinkCmd>, reason: &str) {
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        if let LinkCmd::Join { peer, .. } = cmd {
            peer.reset(ErrorCode::LinkLost, reason);
        }
    }
}

/// What the WebSocket writer task sends.
#[derive(Debug)]
pub enum Outgoing {
    Frame(WsMessage),
    /// A close frame carrying the reason, then the end of the socket.
    Close {
        code: ErrorCode,
        reason: String,
    },
}

impl Outgoing {
    /// The WebSocket close code for a tunnel-level error (RFC 6455 §7.4.1).
    pub fn close_code(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::Normal | ErrorCode::LinkLost | ErrorCode::IdleTimeout => 1000,
            ErrorCode::Shutdown => 1001,
            ErrorCode::ProtocolError | ErrorCode::SequenceGap | ErrorCode::CreditOverrun => 1002,
            ErrorCode::FrameTooLarge => 1009,
            ErrorCode::Internal => 1011,
            _ => 1008,
        }
    }

    /// Close reasons are limited to 123 bytes by the protocol.
    pub fn close_reason(reason: &str) -> String {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason[..end].to_string()
    }
}

/// Link commands (flow opens, data, resets, closes) a link task (hub or
/// agent tunnel, mesh link) takes from its command queue in one go when a
/// command wakes it, before it looks at its socket and timers again: bounds
/// how long a burst of commands can hold off reading the link.
pub const CMD_BATCH: usize = 256;

/// Messages that may wait in a bounded link's writer queue; more wait in
/// the core, where they are bounded.
pub const WRITER_HIGH_WATER: usize = 256;

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
                            Outgoing::close_code(code),
                            Outgoing::close_reason(&reason),
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

/// What a flow's socket task receives from the tunnel.
#[derive(Debug)]
pub enum FlowMsg {
    Data(Bytes),
    Fin,
    Reset { code: ErrorCode, reason: String },
}

/// The socket side's handle on one flow.
pub struct FlowEnd {
    pub cid: Cid,
    pub connector: String,
    pub rx: Receiver<FlowMsg>,
    pub permits: Permits,
    pub cmd: Sender<LinkCmd>,
}

/// A flow on another link task: the owner hub joins a mesh flow and a flow
/// on the agent's tunnel, and each link hands what arrives for its side
/// straight to the other link, with no task in between.
#[derive(Clone)]
pub struct Peer {
    pub cmd: Sender<LinkCmd>,
    pub cid: Cid,
}

impl Peer {
    /// Reset the flow on the other link (nothing to do if it is gone).
    fn reset(&self, code: ErrorCode, reason: impl Into<String>) {
        let _ = self.cmd.try_send(LinkCmd::Reset {
            cid: self.cid,
            code,
            reason: reason.into(),
        });
    }
}

/// Where what the core delivers for a flow goes.
enum Sink {
    /// A flow socket's task, and its reader permits.
    Socket {
        tx: Sender<FlowMsg>,
        permits: Permits,
    },
    /// A flow to be joined to a peer: what arrives waits here, and what the
    /// core took from the peer is credited to it once joined.
    Held { queue: Vec<FlowMsg>, taken: usize },
    /// A flow on another link: deliveries go there as commands, and what the
    /// core takes of its data is credited back to it at once (the credit of
    /// this flow's receive window bounds what waits on either side).
    Joined(Peer),
}

struct FlowSlot {
    sink: Sink,
    pending: VecDeque<Payload>,
    fin_pending: bool,
    connector: String,
    /// The tunnel side of a bridged mesh flow: its end is reported through
    /// [`FlowPipes::take_bridged_ends`].
    bridged: bool,
}

/// The flows of one link as the runtime sees them: a channel to each flow's
/// socket task (or the joined flow on another link), the chunks handed over
/// that the core has not taken yet, and the reader permits.
pub struct FlowPipes {
    flows: BTreeMap<Cid, FlowSlot>,
    cmd_tx: Sender<LinkCmd>,
    metrics: Arc<Metrics>,
    bridged_ends: usize,
}

impl Drop for FlowPipes {
    /// The link is gone: joined flows on other links are reset.
    fn drop(&mut self) {
        for slot in self.flows.values() {
            if let Sink::Joined(p) = &slot.sink {
                p.reset(
                    ErrorCode::LinkLost,
                    "the other side of the bridged flow went away",
                );
            }
        }
    }
}

impl FlowPipes {
    pub fn new(cmd_tx: Sender<LinkCmd>, metrics: Arc<Metrics>) -> Self {
        FlowPipes {
            flows: BTreeMap::new(),
            cmd_tx,
            metrics,
            bridged_ends: 0,
        }
    }

    /// Bridged tunnel-side flows that ended since the last call.
    pub fn take_bridged_ends(&mut self) -> usize {
        std::mem::take(&mut self.bridged_ends)
    }

    /// Bridged tunnel-side flows still open.
    pub fn bridged_open(&self) -> usize {
        self.flows.values().filter(|s| s.bridged).count()
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Register a flow the core already knows (opened here or by the peer).
    pub fn attach(&mut self, cid: Cid, connector: &str) -> FlowEnd {
        let (tx, rx) = async_channel::unbounded();
        let permits = Permits::new(CHUNKS_IN_FLIGHT);
        self.insert(
            cid,
            connector,
            Sink::Socket {
                tx,
                permits: permits.clone(),
            },
            false,
        );
        FlowEnd {
            cid,
            connector: connector.to_string(),
            rx,
            permits,
            cmd: self.cmd_tx.clone(),
        }
    }

    /// Register a flow that will be joined to a flow on another link
    /// ([`LinkCmd::Join`]); until then what arrives for it is held.
    pub fn hold(&mut self, cid: Cid, connector: &str) {
        let sink = Sink::Held {
            queue: Vec::new(),
            taken: 0,
        };
        self.insert(cid, connector, sink, false);
    }

    /// Register the tunnel side of a bridged flow, joined to `peer` at once.
    pub fn attach_joined(&mut self, cid: Cid, connector: &str, peer: Peer) {
        self.insert(cid, connector, Sink::Joined(peer), true);
    }

    fn insert(&mut self, cid: Cid, connector: &str, sink: Sink, bridged: bool) {
        self.flows.insert(
            cid,
            FlowSlot {
                sink,
                pending: VecDeque::new(),
                fin_pending: false,
                connector: connector.to_string(),
                bridged,
            },
        );
        self.metrics
            .flows_active
            .get_or_create(&labels(&[("connector", connector)]))
            .inc();
    }

    fn detach(&mut self, cid: Cid) -> Option<FlowSlot> {
        let slot = self.flows.remove(&cid)?;
        self.metrics
            .flows_active
            .get_or_create(&labels(&[("connector", &slot.connector)]))
            .dec();
        if slot.bridged {
            self.bridged_ends += 1;
        }
        if let Sink::Socket { permits, .. } = &slot.sink {
            // Wake a reader waiting for a permit so it notices the flow is over.
            permits.close();
        }
        Some(slot)
    }

    /// End a flow from this side: the core resets it, and a joined flow on
    /// another link is reset too.
    pub fn fail(&mut self, link: &mut impl FlowLink, cid: Cid, code: ErrorCode, reason: &str) {
        if let Some(slot) = self.detach(cid) {
            link.reset_flow(cid, code, reason);
            self.count_reset(code);
            if let Sink::Joined(p) = slot.sink {
                p.reset(code, reason);
            }
        }
    }

    fn count_reset(&self, code: ErrorCode) {
        self.metrics
            .flow_resets
            .get_or_create(&labels(&[("code", code.as_str())]))
            .inc();
    }

    /// Hand a delivery to the flow's consumer; `false` when a joined peer
    /// link is gone (the caller then fails the flow).
    fn deliver(slot: &mut FlowSlot, msg: FlowMsg) -> bool {
        match &mut slot.sink {
            Sink::Socket { tx, .. } => {
                let _ = tx.try_send(msg);
                true
            }
            Sink::Held { queue, .. } => {
                queue.push(msg);
                true
            }
            Sink::Joined(p) => p.cmd.try_send(Self::as_cmd(p.cid, msg)).is_ok(),
        }
    }

    fn as_cmd(cid: Cid, msg: FlowMsg) -> LinkCmd {
        match msg {
            FlowMsg::Data(payload) => LinkCmd::Data {
                cid,
                payload: payload.into(),
            },
            FlowMsg::Fin => LinkCmd::Fin { cid },
            FlowMsg::Reset { code, reason } => LinkCmd::Reset { cid, code, reason },
        }
    }

    /// Join a held flow to `peer`: what waited goes to it, then what the
    /// core took of the peer's data is credited. A flow that ended while
    /// held resets the peer's.
    fn join(&mut self, link: &mut impl FlowLink, cid: Cid, peer: Peer) {
        let Some(slot) = self.flows.get_mut(&cid) else {
            peer.reset(
                ErrorCode::ConnectionReset,
                "the mesh flow ended before it was bridged",
            );
            return;
        };
        let held = std::mem::replace(&mut slot.sink, Sink::Joined(peer.clone()));
        let Sink::Held { queue, taken } = held else {
            slot.sink = held;
            return;
        };
        let mut ok = true;
        for m in queue {
            ok &= peer.cmd.try_send(Self::as_cmd(peer.cid, m)).is_ok();
        }
        if taken > 0 {
            ok &= peer
                .cmd
                .try_send(LinkCmd::Consumed {
                    cid: peer.cid,
                    n: taken,
                })
                .is_ok();
        }
        if !ok {
            self.fail(link, cid, ErrorCode::LinkLost, "the agent tunnel went away");
        }
    }

    /// A flow-level command (`Data`, `Fin`, `Reset`, `Consumed`); returns the
    /// command back when it is not one.
    pub fn on_cmd(&mut self, link: &mut impl FlowLink, cmd: LinkCmd) -> Option<LinkCmd> {
        match cmd {
            LinkCmd::Data { cid, payload } => {
                if let Some(slot) = self.flows.get_mut(&cid) {
                    slot.pending.push_back(payload);
                    self.push_pending(link, cid);
                }
            }
            LinkCmd::Fin { cid } => {
                if let Some(slot) = self.flows.get_mut(&cid) {
                    slot.fin_pending = true;
                    self.push_pending(link, cid);
                }
            }
            LinkCmd::Reset { cid, code, reason } => {
                // From the flow's own consumer (socket task or joined peer):
                // nothing to tell it back.
                if self.detach(cid).is_some() {
                    link.reset_flow(cid, code, &reason);
                    self.count_reset(code);
                }
            }
            LinkCmd::Consumed { cid, n } => link.consumed(cid, n),
            LinkCmd::Join { cid, peer } => self.join(link, cid, peer),
            other => return Some(other),
        }
        None
    }

    /// Hand queued chunks to the core as far as its credit allows; release a
    /// reader permit per chunk fully taken; send FIN once all data is in.
    fn push_pending(&mut self, link: &mut impl FlowLink, cid: Cid) {
        let Some(slot) = self.flows.get_mut(&cid) else {
            return;
        };
        while let Some(front) = slot.pending.front_mut() {
            let credit = link.send_credit(cid) as usize;
            if credit == 0 {
                link.note_blocked(cid);
                return;
            }
            let take = credit.min(front.len());
            let chunk = front.split_to(take);
            if let Err(e) = link.send_data(cid, chunk) {
                tracing::warn!(cid, error = %e, "send on flow failed");
                return;
            }
            let done = front.is_empty();
            if done {
                slot.pending.pop_front();
            }
            match &mut slot.sink {
                Sink::Socket { permits, .. } => {
                    if done {
                        permits.release();
                    }
                }
                Sink::Held { taken, .. } => *taken += take,
                Sink::Joined(p) => {
                    let _ = p.cmd.try_send(LinkCmd::Consumed {
                        cid: p.cid,
                        n: take,
                    });
                }
            }
        }
        if slot.fin_pending {
            slot.fin_pending = false;
            let _ = link.send_fin(cid);
        }
    }

    pub fn on_event(&mut self, link: &mut impl FlowLink, fe: FlowEvent) {
        let (cid, msg) = match fe {
            FlowEvent::Data { cid, payload } => (cid, FlowMsg::Data(payload)),
            FlowEvent::Fin { cid } => (cid, FlowMsg::Fin),
            FlowEvent::Reset { cid, code, reason } => {
                if let Some(mut slot) = self.detach(cid) {
                    self.count_reset(code);
                    Self::deliver(&mut slot, FlowMsg::Reset { code, reason });
                }
                return;
            }
            FlowEvent::Writable { cid, .. } => return self.push_pending(link, cid),
            FlowEvent::Closed { cid } => {
                self.detach(cid);
                return;
            }
        };
        if let Some(slot) = self.flows.get_mut(&cid)
            && !Self::deliver(slot, msg)
        {
            self.fail(
                link,
                cid,
                ErrorCode::LinkLost,
                "the other side of the bridged flow went away",
            );
        }
    }
}

/// Why a tunnel could not open a flow, for the client's reset.
fn open_error(e: SendError) -> String {
    match e {
        SendError::QueueFull(n) => format!("agent flow limit of {n} reached"),
        e => e.to_string(),
    }
}

/// A tunnel's core state machine with its flow pipes and socket writer.
pub struct TunnelDriver {
    pub tunnel: Tunnel,
    pub pipes: FlowPipes,
    out: Sender<Outgoing>,
    metrics: Arc<Metrics>,
    reported: nowconnect_core::tunnel::TunnelStats,
    reported_dups: u64,
    reported_growths: u64,
    reported_violations: u64,
    cadence: Cadence,
}

impl TunnelDriver {
    pub fn new(
        tunnel: Tunnel,
        out: Sender<Outgoing>,
        cmd_tx: Sender<LinkCmd>,
        metrics: Arc<Metrics>,
    ) -> Self {
        TunnelDriver {
            tunnel,
            pipes: FlowPipes::new(cmd_tx, metrics.clone()),
            out,
            metrics,
            reported: Default::default(),
            reported_dups: 0,
            reported_growths: 0,
            reported_violations: 0,
            cadence: Cadence::default(),
        }
    }

    /// The core's next deadline, or the owed metrics export if earlier.
    pub fn deadline(&self) -> Option<Instant> {
        let core = self.tunnel.poll_timeout().map(|(at, _)| at);
        core.into_iter().chain(self.cadence.deadline()).min()
    }

    /// [`Self::report`] at most every [`Cadence::EVERY`].
    pub fn report_due(&mut self, now: Instant) {
        if self.cadence.due(now) {
            self.report();
        }
    }

    pub fn attach_flow(&mut self, cid: Cid, connector: &str) -> FlowEnd {
        self.pipes.attach(cid, connector)
    }

    /// Apply a command; `Accept`, `Close` and `OpenFlow` are handled here too.
    pub fn on_cmd(&mut self, now: Instant, cmd: LinkCmd) {
        let Some(cmd) = self.pipes.on_cmd(&mut self.tunnel, cmd) else {
            return;
        };
        match cmd {
            LinkCmd::Accept { epoch } => self.tunnel.accept(now, epoch),
            LinkCmd::Close { code, reason } => self.tunnel.close(code, &reason),
            LinkCmd::Drain => {
                if !self.tunnel.send_drain() {
                    tracing::info!(
                        "v1 agent: no DRAIN frame; it moves when the drain closes its tunnel"
                    );
                }
            }
            LinkCmd::OpenFlow { connector, reply } => {
                let res = match self.tunnel.open_flow(&connector) {
                    Ok(cid) => Ok(self.pipes.attach(cid, &connector)),
                    Err(e) => {
                        if matches!(e, SendError::ShareExceeded { .. }) {
                            self.metrics
                                .connector_share_refusals
                                .get_or_create(&labels(&[("connector", &connector)]))
                                .inc();
                        }
                        Err(open_error(e))
                    }
                };
                if let Err(async_channel::TrySendError::Closed(Ok(end))) = reply.try_send(res) {
                    // The client went away while we opened: abort the flow.
                    self.on_cmd(
                        now,
                        LinkCmd::Reset {
                            cid: end.cid,
                            code: ErrorCode::ConnectionReset,
                            reason: "client closed before the flow opened".into(),
                        },
                    );
                }
            }
            LinkCmd::OpenJoined {
                connector,
                peer,
                reply,
            } => match self.tunnel.open_flow(&connector) {
                Ok(cid) => {
                    self.pipes.attach_joined(cid, &connector, peer);
                    if reply.try_send(Ok(cid)).is_err() {
                        self.pipes.fail(
                            &mut self.tunnel,
                            cid,
                            ErrorCode::ConnectionReset,
                            "the mesh flow went away before the flow opened",
                        );
                    }
                }
                Err(e) => {
                    let _ = reply.try_send(Err(open_error(e)));
                }
            },
            LinkCmd::OpenMeshFlow { reply, .. } => {
                let _ = reply.try_send(Err("not a mesh link".into()));
            }
            LinkCmd::Data { .. }
            | LinkCmd::Fin { .. }
            | LinkCmd::Reset { .. }
            | LinkCmd::Consumed { .. }
            | LinkCmd::Join { .. } => {}
        }
    }

    /// Dispatch flow events to their sockets; return the tunnel-level events.
    pub fn drain(&mut self) -> Vec<TunnelEvent> {
        let mut rest = Vec::new();
        while let Some(ev) = self.tunnel.poll_event() {
            match ev {
                TunnelEvent::Flow(fe) => self.pipes.on_event(&mut self.tunnel, fe),
                TunnelEvent::Rtt(d) => {
                    self.metrics.tunnel_rtt.observe(d.as_secs_f64());
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Move everything the core wants sent to the socket writer.
    pub fn flush(&mut self) {
        while let Some(m) = self.tunnel.poll_transmit() {
            let _ = self.out.try_send(Outgoing::Frame(m));
        }
    }

    /// Move what the core wants sent to the socket writer while fewer than
    /// [`WRITER_HIGH_WATER`] messages wait there: the rest stays in the
    /// core, whose control backlog is bounded
    /// ([`nowconnect_core::tunnel::TunnelConfig::max_control_backlog`]), so
    /// a peer that never reads cannot grow this process.
    pub fn flush_bounded(&mut self) {
        while self.out.len() < WRITER_HIGH_WATER {
            match self.tunnel.poll_transmit() {
                Some(m) => {
                    let _ = self.out.try_send(Outgoing::Frame(m));
                }
                None => break,
            }
        }
    }

    /// Whether the core holds frames [`Self::flush_bounded`] left behind.
    pub fn backlogged(&self) -> bool {
        self.tunnel.has_transmit()
    }

    /// Flush, then ask the writer to send a close frame with `reason`.
    pub fn close_socket(&mut self, code: ErrorCode, reason: &str) {
        self.flush();
        let _ = self.out.try_send(Outgoing::Close {
            code,
            reason: reason.to_string(),
        });
    }

    /// Add the core's counters since the last call to the metrics.
    pub fn report(&mut self) {
        let (s, m) = (&self.tunnel.stats, &self.metrics);
        add_frame_deltas(
            &m.tunnel_frames,
            "in",
            &s.frames_in,
            &mut self.reported.frames_in,
        );
        add_frame_deltas(
            &m.tunnel_frames,
            "out",
            &s.frames_out,
            &mut self.reported.frames_out,
        );
        let mux = &self.tunnel.mux().stats;
        add_delta(
            &m.cid_dedup_dropped,
            mux.duplicates_dropped,
            &mut self.reported_dups,
        );
        add_delta(
            &m.flow_window_growths,
            mux.windows_grown,
            &mut self.reported_growths,
        );
        let violations = mux.protocol_violations + s.decode_errors + s.unexpected_frames;
        add_delta(
            &m.protocol_errors,
            violations,
            &mut self.reported_violations,
        );
    }
}

/// Owner side of the mesh: open a flow on the agent's tunnel joined to the
/// held mesh flow `mesh`, then join the mesh flow to it. From then on the
/// two link tasks hand each other what arrives, with no task in between.
/// Returns whether the tunnel flow opened: the tunnel task then reports its
/// end ([`FlowPipes::take_bridged_ends`]); otherwise the caller does.
pub async fn bridge(mesh: Peer, tunnel_cmd: Sender<LinkCmd>, connector: String) -> bool {
    let rx = send_open(Some(tunnel_cmd.clone()), |reply| LinkCmd::OpenJoined {
        connector,
        peer: mesh.clone(),
        reply,
    });
    match rx.recv().await {
        Ok(Ok(cid)) => {
            let tunnel = Peer {
                cmd: tunnel_cmd,
                cid,
            };
            let joined = mesh.cmd.try_send(LinkCmd::Join {
                cid: mesh.cid,
                peer: tunnel.clone(),
            });
            if joined.is_err() {
                tunnel.reset(ErrorCode::LinkLost, "the mesh link went away");
            }
            true
        }
        Ok(Err(reason)) => {
            mesh.reset(ErrorCode::LimitExceeded, reason);
            false
        }
        Err(_) => {
            mesh.reset(ErrorCode::LinkLost, "the agent tunnel went away");
            false
        }
    }
}

/// What an agent runtime must do for the core agent: start a hub dial or a
/// target dial as a task that reports back into the runtime's own event
/// channel, and cancel such a task. Everything else of the agent's loop is
/// [`agent_outputs`] and [`agent_tunnel_step`], shared.
pub trait AgentTasks {
    type Task;
    /// Dial `url` with `token`; report the WebSocket (or the failure) for `attempt`.
    fn dial_hub(&self, attempt: u64, url: String, token: String) -> Self::Task;
    /// Connect to `target`; report the stream (or the failure) for flow
    /// `cid` of tunnel `attempt`.
    fn dial_target(&self, attempt: u64, cid: Cid, target: String) -> Self::Task;
    fn cancel(&self, task: Self::Task);
}

/// A flow of the agent: cids are per tunnel, so (tunnel attempt, cid).
pub type AgentFlow = (u64, Cid);

/// The dials an agent has running and the flow ends waiting for them.
pub struct AgentDials<T> {
    pub hub: Option<(u64, T)>,
    pub targets: BTreeMap<AgentFlow, T>,
    pub waiting: BTreeMap<AgentFlow, FlowEnd>,
}

impl<T> Default for AgentDials<T> {
    fn default() -> Self {
        AgentDials {
            hub: None,
            targets: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }
}

impl<T> AgentDials<T> {
    /// Tunnel `attempt` is gone: drop its waiting flows and return its
    /// running target dials (to cancel).
    pub fn forget_tunnel(&mut self, attempt: u64) -> Vec<T> {
        let range = (attempt, 0)..=(attempt, Cid::MAX);
        let cids: Vec<AgentFlow> = self.waiting.range(range.clone()).map(|(k, _)| *k).collect();
        for k in cids {
            self.waiting.remove(&k);
        }
        let cids: Vec<AgentFlow> = self.targets.range(range).map(|(k, _)| *k).collect();
        cids.into_iter()
            .filter_map(|k| self.targets.remove(&k))
            .collect()
    }
}

/// Carry out what the core agent asked for; `conns` are the agent's open
/// tunnels (the current one and a draining one), each with the dial attempt
/// it belongs to. `token` gives the token for a new hub connection.
pub fn agent_outputs<R: AgentTasks>(
    rt: &R,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
    mut conns: Vec<(u64, &mut TunnelDriver)>,
    token: impl Fn() -> String,
) {
    use nowconnect_core::agent::AgentOutput;
    while let Some(out) = agent.poll_output() {
        match out {
            AgentOutput::DialHub { attempt, url } => {
                tracing::info!(attempt, %url, "connecting to hub");
                if let Some((_, t)) = dials.hub.take() {
                    rt.cancel(t);
                }
                dials.hub = Some((attempt, rt.dial_hub(attempt, url, token())));
            }
            AgentOutput::AbortHub { attempt, reason } => {
                tracing::warn!(attempt, %reason, "hub attempt abandoned");
                if let Some((a, t)) = dials.hub.take() {
                    if a == attempt {
                        rt.cancel(t);
                    } else {
                        dials.hub = Some((a, t));
                    }
                }
                if let Some((_, d)) = conns.iter_mut().find(|(a, _)| *a == attempt) {
                    d.tunnel.close(ErrorCode::IdleTimeout, &reason);
                }
            }
            AgentOutput::DialTarget {
                attempt,
                cid,
                target,
            } => {
                dials
                    .targets
                    .insert((attempt, cid), rt.dial_target(attempt, cid, target));
            }
            AgentOutput::ResetFlow {
                attempt,
                cid,
                code,
                reason,
            } => {
                tracing::warn!(attempt, cid, %code, %reason, "flow reset");
                if let Some(t) = dials.targets.remove(&(attempt, cid)) {
                    rt.cancel(t);
                }
                dials.waiting.remove(&(attempt, cid));
                if let Some((_, d)) = conns.iter_mut().find(|(a, _)| *a == attempt) {
                    d.on_cmd(Instant::now(), LinkCmd::Reset { cid, code, reason });
                }
            }
        }
    }
    // Send what those outputs queued (RSTs) before waiting again.
    for (_, d) in conns {
        d.drain();
        d.flush();
    }
}

/// What became of a tunnel in one [`agent_tunnel_step`].
#[derive(Debug, PartialEq, Eq)]
pub enum TunnelStep {
    Running,
    /// The hub said DRAIN: this tunnel is now a draining one (the core agent
    /// is already dialing the next hub).
    Draining,
    /// The tunnel ended with this close.
    Lost(ErrorCode, String),
}

/// The agent's step after every wake-up, the same on every runtime: hand
/// the tunnel's events to the core [`Agent`](nowconnect_core::agent::Agent)
/// (established, DRAIN, flows opened: their ends wait in `waiting` for the
/// target dial), send what the core queued, export its counters.
pub fn agent_tunnel_step(
    driver: &mut TunnelDriver,
    agent: &mut nowconnect_core::agent::Agent,
    attempt: u64,
    waiting: &mut BTreeMap<AgentFlow, FlowEnd>,
    now: Instant,
) -> TunnelStep {
    let mut step = TunnelStep::Running;
    for ev in driver.drain() {
        match ev {
            TunnelEvent::Established { epoch, codec } => {
                tracing::info!(
                    attempt,
                    epoch = epoch.0,
                    codec = codec.as_str(),
                    "tunnel established"
                );
                agent.hub_established(now, attempt);
            }
            TunnelEvent::Drain => {
                tracing::info!(
                    attempt,
                    open_flows = driver.tunnel.flow_count(),
                    "hub is draining: moving to the next hub, this tunnel keeps its flows"
                );
                agent.hub_draining(now, attempt);
                if step == TunnelStep::Running {
                    step = TunnelStep::Draining;
                }
            }
            TunnelEvent::Open { cid, connector } => {
                let end = driver.attach_flow(cid, &connector);
                waiting.insert((attempt, cid), end);
                agent.flow_opened(now, attempt, cid, &connector);
            }
            TunnelEvent::Closed { code, reason } => {
                tracing::warn!(attempt, %code, %reason, "tunnel closed");
                step = TunnelStep::Lost(code, reason);
            }
            TunnelEvent::Hello { .. }
            | TunnelEvent::Reauth { .. }
            | TunnelEvent::Flow(_)
            | TunnelEvent::Rtt(_) => {}
        }
    }
    driver.drain();
    driver.flush();
    driver.report_due(now);
    step
}

/// One tunnel of an agent runtime (its socket halves are the runtime's).
pub trait AgentConn {
    fn attempt(&self) -> u64;
    fn driver(&mut self) -> &mut TunnelDriver;
    /// The tunnel is over: stop what the runtime runs for it (its reader).
    fn finish(self);
}

/// The agent's step over its tunnels after every wake-up, the same on every
/// runtime: [`agent_tunnel_step`] for the draining tunnel and the current
/// one; a lost tunnel is ended (socket closed, its dials cancelled, the core
/// told); a current tunnel whose hub said DRAIN becomes the draining one
/// (one at a time: a second drain in a row ends the older one).
pub fn agent_tunnels_step<R: AgentTasks, C: AgentConn>(
    rt: &R,
    conn: &mut Option<C>,
    old: &mut Option<C>,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
) {
    if let Some(c) = old.as_mut() {
        let attempt = c.attempt();
        if let TunnelStep::Lost(code, reason) = agent_tunnel_step(
            c.driver(),
            agent,
            attempt,
            &mut dials.waiting,
            Instant::now(),
        ) {
            let c = old.take().expect("draining tunnel");
            end_agent_conn(rt, c, code, &reason, agent, dials);
        }
    }
    let Some(c) = conn.as_mut() else {
        return;
    };
    let attempt = c.attempt();
    match agent_tunnel_step(
        c.driver(),
        agent,
        attempt,
        &mut dials.waiting,
        Instant::now(),
    ) {
        TunnelStep::Running => {}
        TunnelStep::Lost(code, reason) => {
            let c = conn.take().expect("current tunnel");
            end_agent_conn(rt, c, code, &reason, agent, dials);
        }
        TunnelStep::Draining => {
            if let Some(mut prev) = old.take() {
                let why = "a newer hub is draining too";
                prev.driver().tunnel.close(ErrorCode::Shutdown, why);
                prev.driver().drain();
                end_agent_conn(rt, prev, ErrorCode::Shutdown, why, agent, dials);
            }
            *old = conn.take();
        }
    }
}

/// A tunnel ended: close its socket (the writer task sends the close and
/// ends), cancel its target dials, tell the core.
fn end_agent_conn<R: AgentTasks, C: AgentConn>(
    rt: &R,
    mut c: C,
    code: ErrorCode,
    reason: &str,
    agent: &mut nowconnect_core::agent::Agent,
    dials: &mut AgentDials<R::Task>,
) {
    let attempt = c.attempt();
    c.driver().close_socket(code, reason);
    for t in dials.forget_tunnel(attempt) {
        rt.cancel(t);
    }
    c.finish();
    agent.hub_lost(Instant::now(), attempt);
}

/// How a hub's refusal of the tunnel upgrade reads in the agent's log.
pub fn hub_refusal(url: &str, status: impl std::fmt::Display, body: Option<&[u8]>) -> String {
    let body = body
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default();
    format!("{url}: hub refused the tunnel: HTTP {status} {body}")
}

/// Pipe one socket (its read and write halves) and one flow until both
/// directions end or either side resets. `up` names the byte direction of
/// what is read from this socket. The halves run concurrently in this one
/// future; a reset drops the reader at once and the socket is closed with a
/// TCP reset ([`FlowWriter::abort`]), so the peer learns that its stream
/// was cut and cannot take a cut-off transfer for a whole one.
pub async fn run_flow_socket<R, W>(
    rd: R,
    mut wr: W,
    end: FlowEnd,
    metrics: Arc<Metrics>,
    up: &'static str,
    down: &'static str,
) where
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
        let reader = std::pin::pin!(read_half(
            rd,
            cid,
            permits,
            cmd.clone(),
            metrics.clone(),
            up
        ));
        let writer = std::pin::pin!(write_half(&mut wr, cid, rx, cmd, metrics, down));
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

/// The timeouts of a hub client's flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// No byte in either direction for this long: reset (`idle_timeout`).
    pub idle: Option<std::time::Duration>,
    /// The client sent no byte this long after connecting: reset
    /// (`idle_timeout`, reason `first_byte_timeout`).
    pub first_byte: Option<std::time::Duration>,
}

/// Why a client flow was timed out.
enum Expired {
    Idle(std::time::Duration),
    FirstByte(std::time::Duration),
}

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
    if timeouts == ClientTimeouts::default() {
        return run_flow_socket(rd, wr, end, metrics, "up", "down").await;
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
        metrics.clone(),
        "up",
        "down",
    );
    let watch = async {
        loop {
            let mut wait: Option<std::time::Duration> = None;
            if let Some(limit) = timeouts.first_byte.filter(|_| !activity.client_spoke()) {
                let age = activity.age();
                if age >= limit {
                    return Expired::FirstByte(limit);
                }
                wait = Some(limit - age);
            }
            if let Some(limit) = timeouts.idle {
                let idle = activity.idle();
                if idle >= limit {
                    return Expired::Idle(limit);
                }
                wait = Some(wait.map_or(limit - idle, |w| w.min(limit - idle)));
            }
            match wait {
                Some(w) => sleep(w).await,
                // The client spoke and no idle limit is set: nothing to watch.
                None => std::future::pending::<()>().await,
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
    let (kind, reason) = match expired {
        None => return,
        Some(Expired::Idle(limit)) => {
            tracing::info!(cid, idle_sec = limit.as_secs(), "client flow idle; closed");
            (
                "idle",
                format!(
                    "no bytes either way for {}s (limits.client_idle_timeout_sec)",
                    limit.as_secs()
                ),
            )
        }
        Some(Expired::FirstByte(limit)) => {
            tracing::info!(
                cid,
                first_byte_timeout_sec = limit.as_secs(),
                "client sent nothing after connecting; closed"
            );
            (
                "first_byte",
                format!(
                    "the client sent no byte within {}s of connecting (listeners[].first_byte_timeout_sec)",
                    limit.as_secs()
                ),
            )
        }
    };
    metrics
        .client_timeouts
        .get_or_create(&labels(&[("kind", kind)]))
        .inc();
    let _ = cmd.try_send(LinkCmd::Reset {
        cid,
        code: ErrorCode::IdleTimeout,
        reason,
    });
}

async fn read_half<R: ChunkReader>(
    mut rd: R,
    cid: Cid,
    permits: Permits,
    cmd: Sender<LinkCmd>,
    metrics: Arc<Metrics>,
    up: &'static str,
) {
    let bytes_up = metrics.bytes.get_or_create(&labels(&[("dir", up)])).clone();
    loop {
        if !permits.acquire().await {
            return; // flow over
        }
        match rd.read_chunk().await {
            Ok(None) => {
                let _ = cmd.try_send(LinkCmd::Fin { cid });
                return;
            }
            Ok(Some(payload)) => {
                bytes_up.inc_by(payload.len() as u64);
                if cmd.try_send(LinkCmd::Data { cid, payload }).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = cmd.try_send(LinkCmd::Reset {
                    cid,
                    code: ErrorCode::ConnectionReset,
                    reason: format!("read error: {e}"),
                });
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
    rx: Receiver<FlowMsg>,
    cmd: Sender<LinkCmd>,
    metrics: Arc<Metrics>,
    down: &'static str,
) -> bool {
    let bytes_down = metrics
        .bytes
        .get_or_create(&labels(&[("dir", down)]))
        .clone();
    let mut fin = false;
    while let Ok(msg) = rx.recv().await {
        match msg {
            FlowMsg::Data(b) => {
                let n = b.len();
                if let Err(e) = wr.write_all(&b).await {
                    let _ = cmd.try_send(LinkCmd::Reset {
                        cid,
                        code: ErrorCode::ConnectionReset,
                        reason: format!("write error: {e}"),
                    });
                    return true;
                }
                bytes_down.inc_by(n as u64);
                let _ = cmd.try_send(LinkCmd::Consumed { cid, n });
            }
            FlowMsg::Fin => {
                fin = true;
                let _ = wr.close().await;
            }
            FlowMsg::Reset { code, reason } => {
                tracing::debug!(cid, %code, %reason, "flow reset");
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
