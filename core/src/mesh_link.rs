//! One mesh link between two hubs: connection state, capped backoff with
//! jitter, bounded send queues with control frames ahead of data, an
//! inflight-bytes cap, per-flow credit, epoch checks on every flow frame, and
//! RTT from ping/pong.
//!
//! States: `Connecting` (dialing, or waiting for the peer's M_HELLO) →
//! `Established` → on loss `Backoff` (outbound links; inbound ones go to
//! `Closed`) → `Connecting` again when the backoff timer fires. `close` ends in
//! `Closed` for good.
//!
//! Flows are opened only by the side that is their origin: the dialer of a
//! link uses odd cids and the acceptor even ones, so both may open flows on one
//! link without collisions.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backoff::Backoff;
use crate::codec::{self, Codec, WsMessage};
use crate::flow::SendError;
use crate::frame::{Cid, Epoch, ErrorCode, Frame, FrameType, Limits, MeshHeader};
use crate::mux::{FlowEvent, FlowFrame, FlowMux, MuxConfig};
use crate::payload::Payload;
use crate::rng::Rng;
use crate::timer::Timers;
use crate::tunnel::effective_window;

/// Why a mesh link refused or held back a send (`MeshStats::backpressure`).
pub const BACKPRESSURE_REASONS: [&str; 4] = [
    "queue_full",
    "control_queue_full",
    "flow_limit",
    "inflight_cap",
];

#[derive(Clone, Debug)]
pub struct MeshLinkConfig {
    pub limits: Limits,
    pub window: u32,
    /// The most a flow's receive window may grow to (see [`crate::flow`]).
    pub max_window: u32,
    /// Frames waiting for the socket, per queue (control and data each).
    pub send_queue_depth: usize,
    /// Data bytes sent and not yet credited back, over all flows of the link.
    pub max_inflight_bytes: u64,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_flows: usize,
    pub dedup_capacity: usize,
    pub codec: Codec,
    /// Test-only (see `mux::PlantedBug`; only with the `planted-bugs`
    /// feature).
    #[cfg(feature = "planted-bugs")]
    #[doc(hidden)]
    pub planted_bug: crate::mux::PlantedBug,
}

impl Default for MeshLinkConfig {
    fn default() -> Self {
        MeshLinkConfig {
            limits: Limits::default(),
            window: crate::tunnel::DEFAULT_WINDOW,
            max_window: crate::tunnel::DEFAULT_MAX_WINDOW,
            send_queue_depth: 1000,
            max_inflight_bytes: 8 * 1024 * 1024,
            ping_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_flows: 8192,
            dedup_capacity: 8192,
            codec: Codec::V2,
            #[cfg(feature = "planted-bugs")]
            planted_bug: crate::mux::PlantedBug::None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkState {
    Connecting,
    Established,
    Backoff,
    Closed,
}

impl LinkState {
    pub const ALL: [LinkState; 4] = [
        LinkState::Connecting,
        LinkState::Established,
        LinkState::Backoff,
        LinkState::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Established => "established",
            LinkState::Backoff => "backoff",
            LinkState::Closed => "closed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshEvent {
    /// Outbound link: dial the peer now; report with `on_connected` or
    /// `on_disconnected` (the link times the attempt out itself).
    Connect,
    Established {
        peer_replica: String,
    },
    /// Owner side: the origin asks for a flow to `agent_id` under `epoch`.
    /// Answer with `accept_open` or `refuse_open`.
    Open {
        cid: Cid,
        connector: String,
        agent_id: String,
        epoch: Epoch,
    },
    /// Origin side: the owner accepted the flow.
    OpenAccepted {
        cid: Cid,
    },
    Flow(FlowEvent),
    /// A flow frame carried an epoch other than the flow's; it was dropped and
    /// the flow reset.
    StaleEpoch {
        cid: Cid,
        got: Epoch,
        expected: Epoch,
    },
    Rtt(Duration),
    /// The link is down (its flows were reset first); drop the socket.
    Down {
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MeshTimer {
    Handshake,
    Reconnect,
    Ping,
    Idle,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshStats {
    pub frames_in: BTreeMap<FrameType, u64>,
    pub frames_out: BTreeMap<FrameType, u64>,
    /// Sends refused for backpressure, by reason (`queue_full`, `inflight_cap`).
    pub backpressure: BTreeMap<&'static str, u64>,
    pub stale_epoch: u64,
    pub reconnects: u64,
    pub errors: u64,
    /// Bytes of the encoded mesh frames taken from the peer (WebSocket
    /// message payloads, every frame type; the WebSocket and TLS framing
    /// not included).
    pub bytes_in: u64,
    /// Bytes of the encoded mesh frames handed to the socket, likewise.
    pub bytes_out: u64,
}

#[derive(Clone, Debug)]
struct FlowMeta {
    connector: String,
    agent_id: String,
    epoch: Epoch,
    /// Data bytes sent on this flow and not yet credited back.
    outstanding: u64,
}

#[derive(Debug)]
pub struct MeshLink {
    cfg: MeshLinkConfig,
    outbound: bool,
    state: LinkState,
    codec: Codec,
    local_replica: String,
    peer_replica: Option<String>,
    hello_sent: bool,
    backoff: Backoff,
    rng: Rng,
    mux: FlowMux,
    meta: BTreeMap<Cid, FlowMeta>,
    next_cid: Cid,
    /// The highest cid the peer opened on this connection.
    last_peer_cid: Option<Cid>,
    ctrl_q: VecDeque<Frame>,
    /// DATA and FIN in order; a DATA's payload travels beside its
    /// header-only frame, to be encoded without a copy.
    data_q: VecDeque<(Frame, Option<Payload>)>,
    inflight: u64,
    blocked: BTreeSet<Cid>,
    events: VecDeque<MeshEvent>,
    timers: Timers<MeshTimer>,
    ping_nonce: u64,
    ping_outstanding: Option<(u64, Instant)>,
    last_rtt: Option<Duration>,
    pub stats: MeshStats,
}

impl MeshLink {
    fn new(cfg: MeshLinkConfig, outbound: bool, local_replica: &str, rng: Rng) -> Self {
        let mux = FlowMux::new(MuxConfig {
            limits: cfg.limits,
            local_window: cfg.window,
            max_window: cfg.max_window,
            max_flows: cfg.max_flows,
            dedup_capacity: cfg.dedup_capacity,
            #[cfg(feature = "planted-bugs")]
            planted_bug: cfg.planted_bug,
        });
        MeshLink {
            backoff: Backoff::new(cfg.backoff_base, cfg.backoff_max),
            codec: cfg.codec,
            cfg,
            outbound,
            state: LinkState::Connecting,
            local_replica: local_replica.to_string(),
            peer_replica: None,
            hello_sent: false,
            rng,
            mux,
            meta: BTreeMap::new(),
            next_cid: Cid::first_on_mesh(outbound),
            last_peer_cid: None,
            ctrl_q: VecDeque::new(),
            data_q: VecDeque::new(),
            inflight: 0,
            blocked: BTreeSet::new(),
            events: VecDeque::new(),
            timers: Timers::default(),
            ping_nonce: 0,
            ping_outstanding: None,
            last_rtt: None,
            stats: MeshStats::default(),
        }
    }

    /// A link this hub dials; asks to connect at once.
    pub fn outbound(now: Instant, cfg: MeshLinkConfig, local_replica: &str, rng: Rng) -> Self {
        let mut l = MeshLink::new(cfg, true, local_replica, rng);
        l.start_connect(now);
        l
    }

    /// A link a peer dialed and this hub accepted, speaking `codec`.
    pub fn inbound(
        now: Instant,
        cfg: MeshLinkConfig,
        local_replica: &str,
        codec: Codec,
        rng: Rng,
    ) -> Self {
        let mut l = MeshLink::new(cfg, false, local_replica, rng);
        l.codec = codec;
        l.timers
            .set(MeshTimer::Handshake, now + l.cfg.handshake_timeout);
        l.send_hello();
        l
    }

    pub fn state(&self) -> LinkState {
        self.state
    }

    pub fn is_outbound(&self) -> bool {
        self.outbound
    }

    pub fn peer_replica(&self) -> Option<&str> {
        self.peer_replica.as_deref()
    }

    /// Frames waiting for the socket, both queues: what
    /// [`Self::poll_transmit`] has not handed out yet.
    pub fn queue_len(&self) -> usize {
        self.ctrl_q.len() + self.data_q.len()
    }

    /// Whether [`Self::poll_transmit`] has a frame to give.
    pub fn has_transmit(&self) -> bool {
        !self.ctrl_q.is_empty() || !self.data_q.is_empty()
    }

    pub fn inflight_bytes(&self) -> u64 {
        self.inflight
    }

    pub fn flow_count(&self) -> usize {
        self.mux.len()
    }

    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    pub fn mux(&self) -> &FlowMux {
        &self.mux
    }

    pub fn backoff_attempt(&self) -> u32 {
        self.backoff.attempt()
    }

    fn start_connect(&mut self, now: Instant) {
        self.state = LinkState::Connecting;
        self.hello_sent = false;
        self.timers
            .set(MeshTimer::Handshake, now + self.cfg.handshake_timeout);
        self.events.push_back(MeshEvent::Connect);
    }

    /// Outbound: the WebSocket (and TLS) is up, speaking `codec`.
    pub fn on_connected(&mut self, _now: Instant, codec: Codec) {
        if self.state != LinkState::Connecting || self.hello_sent {
            return;
        }
        self.codec = codec;
        self.send_hello();
    }

    fn send_hello(&mut self) {
        self.hello_sent = true;
        let hello = Frame::MHello {
            replica_id: self.local_replica.clone(),
            window: self.cfg.window,
        };
        self.ctrl_q.push_back(hello);
    }

    /// The socket failed or closed (or the dial failed).
    pub fn on_disconnected(&mut self, now: Instant, reason: &str) {
        if matches!(self.state, LinkState::Closed | LinkState::Backoff) {
            return;
        }
        self.stats.errors += 1;
        self.go_down(reason);
        if self.outbound {
            self.state = LinkState::Backoff;
            let delay = self.backoff.next_delay(&mut self.rng);
            self.timers.set(MeshTimer::Reconnect, now + delay);
        } else {
            self.state = LinkState::Closed;
        }
    }

    /// Close for good (shutdown, peer removed).
    pub fn close(&mut self, reason: &str) {
        if self.state == LinkState::Closed {
            return;
        }
        if self.state != LinkState::Backoff {
            self.go_down(reason);
        }
        self.state = LinkState::Closed;
        self.timers.clear_all();
    }

    fn go_down(&mut self, reason: &str) {
        self.mux.fail_all(ErrorCode::LinkLost, reason);
        self.meta.clear();
        self.blocked.clear();
        self.inflight = 0;
        self.ctrl_q.clear();
        self.data_q.clear();
        self.ping_outstanding = None;
        self.peer_replica = None;
        self.last_peer_cid = None;
        self.timers.clear_all();
        self.events.push_back(MeshEvent::Down {
            reason: reason.to_string(),
        });
    }

    pub fn handle_message(&mut self, now: Instant, msg: &WsMessage) {
        if !matches!(self.state, LinkState::Connecting | LinkState::Established) {
            return;
        }
        let frame = match codec::decode(msg, &self.cfg.limits) {
            Ok(f) => f,
            Err(e) => {
                self.on_disconnected(now, &format!("malformed mesh frame: {e}"));
                return;
            }
        };
        *self.stats.frames_in.entry(frame.frame_type()).or_default() += 1;
        self.stats.bytes_in += msg.len() as u64;
        self.timers
            .set(MeshTimer::Idle, now + self.cfg.idle_timeout);
        match (self.state, frame) {
            (LinkState::Connecting, Frame::MHello { replica_id, window }) if self.hello_sent => {
                self.mux.set_peer_window(effective_window(window));
                self.peer_replica = Some(replica_id.clone());
                self.state = LinkState::Established;
                self.backoff.reset();
                self.timers.clear(MeshTimer::Handshake);
                let next = now + self.next_ping_delay();
                self.timers.set(MeshTimer::Ping, next);
                self.events.push_back(MeshEvent::Established {
                    peer_replica: replica_id,
                });
            }
            (LinkState::Established, frame) => self.handle_established(now, frame),
            (_, frame) => {
                let reason = format!("unexpected {} before M_HELLO", frame.frame_type().as_str());
                self.on_disconnected(now, &reason);
            }
        }
    }

    fn handle_established(&mut self, now: Instant, frame: Frame) {
        match frame {
            Frame::MOpen { h } => self.on_open(h),
            Frame::MOpenAck {
                h,
                ok,
                code,
                reason,
            } => {
                if !self.epoch_ok(&h) {
                    return;
                }
                if ok {
                    self.events
                        .push_back(MeshEvent::OpenAccepted { cid: h.cid });
                } else {
                    self.mux.on_frame(
                        FlowFrame::Rst {
                            cid: h.cid,
                            code,
                            reason,
                        },
                        now,
                    );
                    self.forget_finished();
                }
            }
            Frame::MData { h, payload } => {
                if self.epoch_ok(&h) {
                    self.mux.on_frame(
                        FlowFrame::Data {
                            cid: h.cid,
                            seq: h.seq,
                            payload: payload.into(),
                        },
                        now,
                    );
                }
            }
            Frame::MFin { h } => {
                if self.epoch_ok(&h) {
                    self.mux.on_frame(
                        FlowFrame::Fin {
                            cid: h.cid,
                            seq: Some(h.seq),
                        },
                        now,
                    );
                }
            }
            Frame::MRst { h, code, reason } => {
                if self.epoch_ok(&h) {
                    self.mux.on_frame(
                        FlowFrame::Rst {
                            cid: h.cid,
                            code,
                            reason,
                        },
                        now,
                    );
                }
            }
            Frame::MCredit { h, bytes } => {
                if self.epoch_ok(&h) {
                    if let Some(m) = self.meta.get_mut(&h.cid) {
                        let released = m.outstanding.min(u64::from(bytes));
                        m.outstanding -= released;
                        self.inflight -= released;
                    }
                    self.mux
                        .on_frame(FlowFrame::Credit { cid: h.cid, bytes }, now);
                }
            }
            Frame::MPing { nonce } => self.push_ctrl(Frame::MPong { nonce }),
            Frame::MPong { nonce } => {
                if let Some((n, sent)) = self.ping_outstanding
                    && n == nonce
                {
                    self.ping_outstanding = None;
                    let rtt = now.saturating_duration_since(sent);
                    self.last_rtt = Some(rtt);
                    self.mux.set_path_rtt(rtt);
                    self.events.push_back(MeshEvent::Rtt(rtt));
                }
            }
            other => {
                let reason = format!(
                    "unexpected {} on an established mesh link",
                    other.frame_type().as_str()
                );
                self.on_disconnected(now, &reason);
                return;
            }
        }
        self.pump();
        self.forget_finished();
    }

    fn on_open(&mut self, h: MeshHeader) {
        // The peer opens flows of its side only (it dialed if we did not).
        let peers_side = h.cid.opened_by_mesh_dialer() != self.outbound;
        // And with ever higher cids on one connection: a cid used before
        // (open now or ended) would let what is still in flight for the old
        // flow (a bridge's join on the owner hub) meet the new one.
        let reused = self.last_peer_cid.is_some_and(|last| h.cid <= last);
        if !peers_side || self.mux.contains(h.cid) || reused {
            self.push_ctrl(Frame::MOpenAck {
                reason: format!("cid {} is not valid for a new flow from this peer", h.cid),
                h,
                ok: false,
                code: ErrorCode::ProtocolError,
            });
            self.stats.errors += 1;
            return;
        }
        self.last_peer_cid = Some(h.cid);
        if self.mux.open(h.cid).is_err() {
            self.bump_backpressure("flow_limit");
            self.push_ctrl(Frame::MOpenAck {
                reason: format!("mesh link flow limit of {} reached", self.cfg.max_flows),
                h,
                ok: false,
                code: ErrorCode::LimitExceeded,
            });
            return;
        }
        self.meta.insert(
            h.cid,
            FlowMeta {
                connector: h.connector.clone(),
                agent_id: h.agent_id.clone(),
                epoch: h.epoch,
                outstanding: 0,
            },
        );
        self.events.push_back(MeshEvent::Open {
            cid: h.cid,
            connector: h.connector,
            agent_id: h.agent_id,
            epoch: h.epoch,
        });
    }

    /// Whether a flow frame's epoch matches its flow. A stale one is dropped,
    /// counted, and resets the flow; unknown flows go to the mux as usual.
    fn epoch_ok(&mut self, h: &MeshHeader) -> bool {
        let Some(m) = self.meta.get(&h.cid) else {
            return true;
        };
        if m.epoch == h.epoch {
            return true;
        }
        let expected = m.epoch;
        self.stats.stale_epoch += 1;
        self.events.push_back(MeshEvent::StaleEpoch {
            cid: h.cid,
            got: h.epoch,
            expected,
        });
        let reason = format!(
            "stale epoch {} (flow is under epoch {})",
            h.epoch.0, expected.0
        );
        self.reset_flow(h.cid, ErrorCode::StaleEpoch, &reason);
        self.events.push_back(MeshEvent::Flow(FlowEvent::Reset {
            cid: h.cid,
            code: ErrorCode::StaleEpoch,
            reason,
        }));
        false
    }

    /// Owner side: the open is valid (epoch current, agent here).
    pub fn accept_open(&mut self, cid: Cid) {
        if let Some(h) = self.header(cid, 0) {
            self.push_ctrl(Frame::MOpenAck {
                h,
                ok: true,
                code: ErrorCode::Normal,
                reason: String::new(),
            });
        }
    }

    /// Owner side: refuse the open with a reason (stale epoch, no agent, ...).
    pub fn refuse_open(&mut self, cid: Cid, code: ErrorCode, reason: &str) {
        if let Some(h) = self.header(cid, 0) {
            self.push_ctrl(Frame::MOpenAck {
                h,
                ok: false,
                code,
                reason: crate::frame::truncate_reason(reason, &self.cfg.limits),
            });
        }
        self.mux.forget(cid);
        self.drop_meta(cid);
    }

    /// Origin side: open a flow to `agent_id`'s `connector` under `epoch`.
    pub fn open_flow(
        &mut self,
        connector: &str,
        agent_id: &str,
        epoch: Epoch,
    ) -> Result<Cid, SendError> {
        if self.state != LinkState::Established {
            return Err(SendError::NotEstablished);
        }
        if self.ctrl_q.len() >= self.cfg.send_queue_depth {
            self.bump_backpressure("queue_full");
            return Err(SendError::QueueFull(self.cfg.send_queue_depth));
        }
        let cid = self.next_cid;
        if self.mux.open(cid).is_err() {
            self.bump_backpressure("flow_limit");
            return Err(SendError::QueueFull(self.cfg.max_flows));
        }
        self.next_cid = self.next_cid.next_on_mesh();
        self.meta.insert(
            cid,
            FlowMeta {
                connector: connector.to_string(),
                agent_id: agent_id.to_string(),
                epoch,
                outstanding: 0,
            },
        );
        let h = self.header(cid, 0).expect("meta just inserted");
        self.push_ctrl(Frame::MOpen { h });
        Ok(cid)
    }

    /// Bytes that may be sent on `cid` now: its credit, capped by the link's
    /// inflight room; 0 while the data queue is full.
    pub fn send_credit(&self, cid: Cid) -> u64 {
        if self.state != LinkState::Established || self.data_q.len() >= self.cfg.send_queue_depth {
            return 0;
        }
        let room = self.cfg.max_inflight_bytes.saturating_sub(self.inflight);
        self.mux.send_credit(cid).min(room)
    }

    /// Queue data. Refused (nothing queued, counted as backpressure) when the
    /// data queue or the inflight cap is full; the flow gets a `Writable`
    /// event when there is room again.
    pub fn send_data(&mut self, cid: Cid, payload: impl Into<Payload>) -> Result<(), SendError> {
        let payload = payload.into();
        if self.state != LinkState::Established {
            return Err(SendError::NotEstablished);
        }
        if self.data_q.len() >= self.cfg.send_queue_depth {
            self.bump_backpressure("queue_full");
            self.blocked.insert(cid);
            return Err(SendError::QueueFull(self.cfg.send_queue_depth));
        }
        let len = payload.len() as u64;
        if self.inflight + len > self.cfg.max_inflight_bytes {
            self.bump_backpressure("inflight_cap");
            self.blocked.insert(cid);
            return Err(SendError::NoCredit {
                cid,
                len: payload.len(),
                window: self.cfg.max_inflight_bytes.saturating_sub(self.inflight),
            });
        }
        self.mux.send_data(cid, payload)?;
        if let Some(m) = self.meta.get_mut(&cid) {
            m.outstanding += len;
        }
        self.inflight += len;
        debug_assert!(self.inflight <= self.cfg.max_inflight_bytes);
        self.pump();
        Ok(())
    }

    pub fn send_fin(&mut self, cid: Cid) -> Result<(), SendError> {
        if self.state != LinkState::Established {
            return Err(SendError::NotEstablished);
        }
        self.mux.send_fin(cid)?;
        self.pump();
        self.forget_finished();
        Ok(())
    }

    pub fn reset_flow(&mut self, cid: Cid, code: ErrorCode, reason: &str) {
        if self.mux.reset(cid, code, reason) {
            self.pump();
        }
        self.drop_meta(cid);
    }

    pub fn consumed(&mut self, cid: Cid, n: usize) {
        self.mux.consumed(cid, n);
        self.pump();
    }

    fn drop_meta(&mut self, cid: Cid) {
        if let Some(m) = self.meta.remove(&cid) {
            self.inflight -= m.outstanding;
        }
        self.blocked.remove(&cid);
    }

    /// Forget the metadata of flows the mux has finished with.
    fn forget_finished(&mut self) {
        let gone: Vec<Cid> = self
            .meta
            .keys()
            .copied()
            .filter(|c| !self.mux.contains(*c))
            .collect();
        for cid in gone {
            self.drop_meta(cid);
        }
        // Already a walk over every flow: the inflight total is the sum of
        // what each flow has outstanding.
        debug_assert_eq!(
            self.inflight,
            self.meta.values().map(|m| m.outstanding).sum::<u64>(),
            "inflight accounting"
        );
        self.wake_blocked();
    }

    fn wake_blocked(&mut self) {
        if self.blocked.is_empty()
            || self.data_q.len() >= self.cfg.send_queue_depth
            || self.inflight >= self.cfg.max_inflight_bytes
        {
            return;
        }
        for cid in std::mem::take(&mut self.blocked) {
            let credit = self.send_credit(cid);
            if credit > 0 {
                self.events
                    .push_back(MeshEvent::Flow(FlowEvent::Writable { cid, credit }));
            } else if self.mux.contains(cid) {
                self.blocked.insert(cid);
            }
        }
    }

    fn bump_backpressure(&mut self, reason: &'static str) {
        debug_assert!(BACKPRESSURE_REASONS.contains(&reason), "{reason}");
        *self.stats.backpressure.entry(reason).or_default() += 1;
    }

    fn header(&self, cid: Cid, seq: u64) -> Option<MeshHeader> {
        self.meta.get(&cid).map(|m| MeshHeader {
            cid,
            connector: m.connector.clone(),
            agent_id: m.agent_id.clone(),
            seq,
            epoch: m.epoch,
        })
    }

    fn push_ctrl(&mut self, frame: Frame) {
        if self.ctrl_q.len() >= self.cfg.send_queue_depth {
            // The peer does not read even control frames: it is stuck.
            self.bump_backpressure("control_queue_full");
            self.stats.errors += 1;
            let reason = format!(
                "control queue full ({} frames): peer is not reading",
                self.cfg.send_queue_depth
            );
            self.go_down(&reason);
            self.state = if self.outbound {
                LinkState::Backoff
            } else {
                LinkState::Closed
            };
            return;
        }
        self.ctrl_q.push_back(frame);
        debug_assert!(self.ctrl_q.len() <= self.cfg.send_queue_depth);
    }

    fn pump(&mut self) {
        while let Some(ff) = self.mux.poll_frame() {
            let cid = ff.cid();
            let (seq, is_data) = match &ff {
                FlowFrame::Data { seq, .. } => (*seq, true),
                FlowFrame::Fin { seq, .. } => (seq.unwrap_or(0), true),
                _ => (0, false),
            };
            let h = self.header(cid, seq).unwrap_or_else(|| MeshHeader {
                cid,
                connector: "-".into(),
                agent_id: "-".into(),
                seq,
                epoch: Epoch(0),
            });
            let frame = match ff {
                FlowFrame::Data { payload, .. } => {
                    let head = Frame::MData {
                        h,
                        payload: Bytes::new(),
                    };
                    self.data_q.push_back((head, Some(payload)));
                    continue;
                }
                FlowFrame::Fin { .. } => Frame::MFin { h },
                FlowFrame::Rst { code, reason, .. } => Frame::MRst { h, code, reason },
                FlowFrame::Credit { bytes, .. } => Frame::MCredit { h, bytes },
            };
            // DATA and FIN keep their order in the data queue; RST and CREDIT
            // may overtake data.
            if is_data {
                self.data_q.push_back((frame, None));
            } else {
                self.push_ctrl(frame);
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for t in self.timers.expired(now) {
            match t {
                MeshTimer::Handshake => self.on_disconnected(now, "mesh handshake timed out"),
                MeshTimer::Idle => {
                    let reason = format!("no frame from the peer for {:?}", self.cfg.idle_timeout);
                    self.on_disconnected(now, &reason)
                }
                MeshTimer::Reconnect => {
                    if self.state == LinkState::Backoff {
                        self.stats.reconnects += 1;
                        self.start_connect(now);
                    }
                }
                MeshTimer::Ping => {
                    if self.state == LinkState::Established {
                        self.ping_nonce += 1;
                        self.ping_outstanding = Some((self.ping_nonce, now));
                        self.push_ctrl(Frame::MPing {
                            nonce: self.ping_nonce,
                        });
                        let next = now + self.next_ping_delay();
                        self.timers.set(MeshTimer::Ping, next);
                    }
                }
            }
        }
    }

    /// The wait before the next ping: between 80 % and 100 % of
    /// `ping_interval`, drawn per ping, never later than configured (the
    /// peer's idle timeout counts on it). Links that come up together (a
    /// hub's links at start, the two ends of a link) would otherwise ping in
    /// the same instant for ever, all the pings of a hub pair contending for
    /// the same CPUs at once.
    fn next_ping_delay(&mut self) -> Duration {
        let spread = self.cfg.ping_interval / 5;
        let spread_ns = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
        if spread_ns == 0 {
            return self.cfg.ping_interval;
        }
        self.cfg.ping_interval - spread + Duration::from_nanos(self.rng.below(spread_ns + 1))
    }

    pub fn poll_timeout(&self) -> Option<(Instant, MeshTimer)> {
        self.timers.next()
    }

    /// The next message for the socket: control frames first.
    pub fn poll_transmit(&mut self) -> Option<WsMessage> {
        let (frame, payload) = match self.ctrl_q.pop_front() {
            Some(f) => (f, None),
            None => self.data_q.pop_front()?,
        };
        let t = frame.frame_type();
        let msg = match payload {
            Some(p) => self.codec.encode_data(frame, p, &self.cfg.limits),
            None => self.codec.encode(&frame, &self.cfg.limits),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                debug_assert!(false, "encoding a local mesh frame failed: {e}");
                self.stats.errors += 1;
                return None;
            }
        };
        *self.stats.frames_out.entry(t).or_default() += 1;
        self.stats.bytes_out += msg.len() as u64;
        self.wake_blocked();
        Some(msg)
    }

    pub fn poll_event(&mut self) -> Option<MeshEvent> {
        if let Some(e) = self.mux.poll_event() {
            return Some(MeshEvent::Flow(e));
        }
        self.events.pop_front()
    }
}

impl crate::mux::FlowLink for MeshLink {
    fn send_credit(&self, cid: Cid) -> u64 {
        MeshLink::send_credit(self, cid)
    }
    fn send_data(&mut self, cid: Cid, payload: Payload) -> Result<(), SendError> {
        MeshLink::send_data(self, cid, payload)
    }
    fn send_fin(&mut self, cid: Cid) -> Result<(), SendError> {
        MeshLink::send_fin(self, cid)
    }
    fn reset_flow(&mut self, cid: Cid, code: ErrorCode, reason: &str) {
        MeshLink::reset_flow(self, cid, code, reason)
    }
    fn consumed(&mut self, cid: Cid, n: usize) {
        MeshLink::consumed(self, cid, n)
    }
    fn note_blocked(&mut self, cid: Cid) {
        // Only a link cap needs remembering: a flow without credit is woken
        // by the peer's M_CREDIT anyway.
        if self.mux.send_credit(cid) > 0
            && self.blocked.insert(cid)
            && self.state == LinkState::Established
        {
            // The flow has data and credit but the link holds it back: the
            // same backpressure as a refused send, counted once each time
            // the flow starts waiting.
            let reason = if self.data_q.len() >= self.cfg.send_queue_depth {
                "queue_full"
            } else {
                "inflight_cap"
            };
            self.bump_backpressure(reason);
        }
    }
}
