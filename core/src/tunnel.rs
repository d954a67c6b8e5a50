//! The agent tunnel: one WebSocket between an agent and a hub, either side.
//!
//! Handshake: the agent sends HELLO (always v1 JSON, so any hub understands
//! it) listing the codecs it speaks; the hub's owner logic decides, then
//! [`Tunnel::accept`] sends WELCOME (v1 JSON) naming the codec both sides send
//! with from then on. Incoming text messages are always decoded as v1 and
//! binary ones as v2, so a v1-only agent keeps working.
//!
//! Drive it the sans-IO way: feed [`Tunnel::handle_message`] and the local
//! calls, then drain [`Tunnel::poll_transmit`] (to the socket) and
//! [`Tunnel::poll_event`] (to the owner), and re-arm one timer from
//! [`Tunnel::poll_timeout`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{self, Codec, CodecError, WsMessage};
use crate::flow::SendError;
use crate::frame::{Cid, Epoch, ErrorCode, Frame, FrameType, Limits};
use crate::mux::{FlowEvent, FlowFrame, FlowMux, MuxConfig, OpenError};
use crate::payload::Payload;
use crate::timer::Timers;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Hub,
    Agent,
}

#[derive(Clone, Debug)]
pub struct TunnelConfig {
    pub limits: Limits,
    /// Our per-flow receive window in bytes, as advertised.
    pub window: u32,
    /// The most a flow's receive window may grow to (see [`crate::flow`];
    /// `window` or less: no growth).
    pub max_window: u32,
    /// Codecs we send with, best first.
    pub codecs: Vec<Codec>,
    pub ping_interval: Duration,
    /// No frame at all from the peer for this long closes the tunnel.
    pub idle_timeout: Duration,
    /// HELLO / WELCOME must arrive within this.
    pub handshake_timeout: Duration,
    pub max_flows: usize,
    pub dedup_capacity: usize,
    /// The most bytes of control frames (PONG, RST, CREDIT, FIN, …) that
    /// may wait to be sent. DATA is bounded by the peer's credit; control
    /// replies are caused by what the peer sends, so a peer that keeps
    /// sending and never reads would otherwise grow this queue without
    /// bound. Beyond it the tunnel closes (`limit_exceeded`).
    pub max_control_backlog: usize,
    /// Test-only (see `mux::PlantedBug`; only with the `planted-bugs`
    /// feature).
    #[cfg(feature = "planted-bugs")]
    #[doc(hidden)]
    pub planted_bug: crate::mux::PlantedBug,
}

/// When an established tunnel sends its first ping (later ones follow
/// `ping_interval`).
pub const FIRST_PING: Duration = Duration::from_secs(1);

/// While the agent pings it, a hub sends its own PING only with every this
/// many PINGs of the agent's: the agent's PINGs and the hub's PONGs already
/// carry the keepalive both ways, and the hub's PING is then only for its
/// round-trip figure (the flows' window growth keeps the shortest round
/// trip seen, so the first one counts most). A hub holding thousands of
/// idle agents handles a third fewer frames for it. The first PING always
/// goes, on its timer; after it the timer only comes due when the agent has
/// not pinged for [`HUB_PING_SLACK`] intervals.
pub const HUB_PING_EVERY_WHILE_PINGED: u32 = 4;

/// How many of its ping intervals a hub waits after the agent's last PING
/// before it pings on its own timer: more than one, so that an agent
/// pinging at the same interval (a little late, as timers are) keeps moving
/// the timer and it never fires.
pub const HUB_PING_SLACK: f64 = 1.5;

/// Default [`TunnelConfig::max_control_backlog`]: 1 MiB (some 50,000
/// PONGs).
pub const DEFAULT_MAX_CONTROL_BACKLOG: usize = 1024 * 1024;

/// Default per-flow receive window: 256 KiB.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;
/// Default most a flow's receive window grows to: 4 MiB.
pub const DEFAULT_MAX_WINDOW: u32 = 4 * 1024 * 1024;

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            limits: Limits::default(),
            window: DEFAULT_WINDOW,
            max_window: DEFAULT_MAX_WINDOW,
            codecs: vec![Codec::V2, Codec::V1],
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            handshake_timeout: Duration::from_secs(10),
            max_flows: 4096,
            dedup_capacity: 4096,
            max_control_backlog: DEFAULT_MAX_CONTROL_BACKLOG,
            #[cfg(feature = "planted-bugs")]
            planted_bug: crate::mux::PlantedBug::None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelState {
    /// Hub: waiting for HELLO.
    AwaitHello,
    /// Hub: HELLO received, waiting for the owner to accept or refuse.
    AwaitAccept,
    /// Agent: HELLO sent, waiting for WELCOME.
    AwaitWelcome,
    Established {
        epoch: Epoch,
    },
    Closed {
        code: ErrorCode,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelEvent {
    /// Hub side: the agent introduced itself. Call `accept` or `close`.
    Hello {
        agent_id: String,
        connectors: Vec<String>,
        /// Which of the agent's `slots` tunnels this is (0 of 1 for an
        /// agent that holds one tunnel).
        slot: u8,
        slots: u8,
    },
    /// Both sides: the tunnel is ready under `epoch`. On the agent side
    /// `replica_id` names the hub that answered (empty if it did not say).
    Established {
        epoch: Epoch,
        codec: Codec,
        replica_id: String,
    },
    /// Agent side: the hub opened a flow; dial the connector's target.
    Open {
        cid: Cid,
        connector: String,
    },
    Flow(FlowEvent),
    /// A keepalive round trip completed.
    Rtt(Duration),
    /// Agent side: the hub is shutting down (DRAIN). Open a tunnel to
    /// another hub now; this one keeps carrying its flows.
    Drain,
    /// Hub side: the agent sent a fresh token for this tunnel (REAUTH).
    Reauth {
        token: String,
    },
    /// The tunnel is over: send a WebSocket close with this reason, then drop
    /// the socket once `poll_transmit` is empty.
    Closed {
        code: ErrorCode,
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TunnelTimer {
    Handshake,
    Ping,
    Idle,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelStats {
    pub frames_in: BTreeMap<FrameType, u64>,
    pub frames_out: BTreeMap<FrameType, u64>,
    pub decode_errors: u64,
    pub unexpected_frames: u64,
    /// Closed because the control backlog passed its bound.
    pub control_backlog_closes: u64,
    /// Hub side: opens refused for a connector past its fair share.
    pub open_refused_share: u64,
}

#[derive(Debug)]
pub struct Tunnel {
    role: Role,
    cfg: TunnelConfig,
    state: TunnelState,
    codec: Codec,
    mux: FlowMux,
    next_cid: Cid,
    /// What waits to be sent, each marked DATA (`true`) or control.
    transmit: VecDeque<(WsMessage, bool)>,
    /// Bytes of control frames in `transmit`.
    control_backlog: usize,
    events: VecDeque<TunnelEvent>,
    timers: Timers<TunnelTimer>,
    ping_nonce: u64,
    ping_outstanding: Option<(u64, Instant)>,
    drain_seen: bool,
    peer_codecs: Vec<String>,
    /// Hub side: the connectors the agent announced, each a flow tag (its
    /// index) for the fair share (see [`Tunnel::open_flow`]).
    peer_connectors: Vec<String>,
    last_rtt: Option<Duration>,
    /// Hub: the agent's PINGs since its last own PING.
    pings_skipped: u32,
    pub stats: TunnelStats,
}

impl Tunnel {
    fn new(role: Role, now: Instant, cfg: TunnelConfig) -> Self {
        let mux = FlowMux::new(MuxConfig {
            limits: cfg.limits,
            local_window: cfg.window,
            max_window: cfg.max_window,
            max_flows: cfg.max_flows,
            dedup_capacity: cfg.dedup_capacity,
            #[cfg(feature = "planted-bugs")]
            planted_bug: cfg.planted_bug,
        });
        let mut timers = Timers::default();
        timers.set(TunnelTimer::Handshake, now + cfg.handshake_timeout);
        let state = match role {
            Role::Hub => TunnelState::AwaitHello,
            Role::Agent => TunnelState::AwaitWelcome,
        };
        Tunnel {
            role,
            cfg,
            state,
            codec: Codec::V1,
            mux,
            next_cid: Cid(1),
            transmit: VecDeque::new(),
            control_backlog: 0,
            events: VecDeque::new(),
            timers,
            ping_nonce: 0,
            ping_outstanding: None,
            drain_seen: false,
            peer_codecs: Vec::new(),
            peer_connectors: Vec::new(),
            last_rtt: None,
            pings_skipped: 0,
            stats: TunnelStats::default(),
        }
    }

    /// The hub side of a freshly upgraded WebSocket.
    pub fn hub(now: Instant, cfg: TunnelConfig) -> Self {
        Tunnel::new(Role::Hub, now, cfg)
    }

    /// The agent side of a freshly connected WebSocket: sends HELLO.
    pub fn agent(now: Instant, cfg: TunnelConfig, agent_id: &str, connectors: &[String]) -> Self {
        Tunnel::agent_slot(now, cfg, agent_id, connectors, 0, 1)
    }

    /// [`Tunnel::agent`] for tunnel `slot` of a multi-homed agent that
    /// holds `slots` tunnels at once.
    pub fn agent_slot(
        now: Instant,
        cfg: TunnelConfig,
        agent_id: &str,
        connectors: &[String],
        slot: u8,
        slots: u8,
    ) -> Self {
        let mut t = Tunnel::new(Role::Agent, now, cfg);
        let hello = Frame::Hello {
            agent_id: agent_id.to_string(),
            connectors: connectors.to_vec(),
            codecs: t
                .cfg
                .codecs
                .iter()
                .map(|c| c.as_str().to_string())
                .collect(),
            window: t.cfg.window,
            slot,
            slots,
        };
        t.send_with(Codec::V1, &hello);
        t
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn state(&self) -> &TunnelState {
        &self.state
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, TunnelState::Established { .. })
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, TunnelState::Closed { .. })
    }

    pub fn flow_count(&self) -> usize {
        self.mux.len()
    }

    pub fn mux(&self) -> &FlowMux {
        &self.mux
    }

    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    pub fn limits(&self) -> &Limits {
        &self.cfg.limits
    }

    /// One WebSocket message from the peer.
    pub fn handle_message(&mut self, now: Instant, msg: &WsMessage) {
        if self.is_closed() {
            return;
        }
        let frame = match codec::decode(msg, &self.cfg.limits) {
            Ok(f) => f,
            Err(e) => {
                self.stats.decode_errors += 1;
                let code = match e {
                    CodecError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    _ => ErrorCode::ProtocolError,
                };
                self.close(code, &format!("malformed frame: {e}"));
                return;
            }
        };
        *self.stats.frames_in.entry(frame.frame_type()).or_default() += 1;
        self.timers
            .set(TunnelTimer::Idle, now + self.cfg.idle_timeout);
        self.handle_frame(now, frame);
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame) {
        match (&self.state, frame) {
            (
                TunnelState::AwaitHello,
                Frame::Hello {
                    agent_id,
                    connectors,
                    codecs,
                    window,
                    slot,
                    slots,
                },
            ) if self.role == Role::Hub => {
                self.mux.set_peer_window(effective_window(window));
                self.peer_codecs = codecs;
                // Each connector once: a list repeating a name must not
                // shrink the others' guarantees.
                let mut unique = connectors.clone();
                unique.sort();
                unique.dedup();
                self.peer_connectors = unique;
                self.state = TunnelState::AwaitAccept;
                self.events.push_back(TunnelEvent::Hello {
                    agent_id,
                    connectors,
                    slot,
                    slots,
                });
            }
            (
                TunnelState::AwaitWelcome,
                Frame::Welcome {
                    epoch,
                    codec,
                    window,
                    replica_id,
                    ..
                },
            ) if self.role == Role::Agent => {
                let Some(c) = Codec::from_name(&codec).filter(|c| self.cfg.codecs.contains(c))
                else {
                    self.close(
                        ErrorCode::ProtocolError,
                        &format!("WELCOME names codec `{codec}` that this agent did not offer"),
                    );
                    return;
                };
                self.codec = c;
                self.mux.set_peer_window(effective_window(window));
                self.establish(now, epoch, replica_id);
            }
            (TunnelState::Established { .. }, frame) => self.handle_established(now, frame),
            (state, frame) => {
                self.stats.unexpected_frames += 1;
                let reason = format!(
                    "unexpected {} in state {}",
                    frame.frame_type().as_str(),
                    state_name(state)
                );
                self.close(ErrorCode::ProtocolError, &reason);
            }
        }
    }

    fn handle_established(&mut self, now: Instant, frame: Frame) {
        match frame {
            Frame::Open { cid, connector } if self.role == Role::Agent => {
                match self.mux.open(cid) {
                    Ok(()) => self.events.push_back(TunnelEvent::Open { cid, connector }),
                    Err(OpenError::TooMany(n)) => {
                        self.send_frame(&Frame::Rst {
                            cid,
                            code: ErrorCode::LimitExceeded,
                            reason: format!("agent flow limit of {n} reached"),
                        });
                    }
                    Err(OpenError::Exists(_)) => {
                        self.stats.unexpected_frames += 1;
                        self.mux.reset(
                            cid,
                            ErrorCode::ProtocolError,
                            "OPEN for a flow that is already open",
                        );
                        self.events.push_back(TunnelEvent::Flow(FlowEvent::Reset {
                            cid,
                            code: ErrorCode::ProtocolError,
                            reason: "hub reopened a live flow".into(),
                        }));
                    }
                }
            }
            Frame::Data { cid, seq, payload } => self.mux.on_frame(
                FlowFrame::Data {
                    cid,
                    seq,
                    payload: payload.into(),
                },
                now,
            ),
            Frame::Fin { cid, seq } => self.mux.on_frame(FlowFrame::Fin { cid, seq }, now),
            Frame::Rst { cid, code, reason } => {
                self.mux.on_frame(FlowFrame::Rst { cid, code, reason }, now)
            }
            Frame::Credit { cid, bytes } => {
                self.mux.on_frame(FlowFrame::Credit { cid, bytes }, now)
            }
            Frame::Ping { nonce } => {
                self.send_frame(&Frame::Pong { nonce });
                if self.role == Role::Hub && self.last_rtt.is_some() {
                    self.on_agent_ping(now);
                }
            }
            // A repeated DRAIN changes nothing.
            Frame::Drain if self.role == Role::Agent => {
                if !self.drain_seen {
                    self.drain_seen = true;
                    self.events.push_back(TunnelEvent::Drain);
                }
            }
            Frame::Reauth { token } if self.role == Role::Hub => {
                self.events.push_back(TunnelEvent::Reauth { token });
            }
            Frame::Pong { nonce } => {
                if let Some((n, sent)) = self.ping_outstanding
                    && n == nonce
                {
                    self.ping_outstanding = None;
                    let rtt = now.saturating_duration_since(sent);
                    self.last_rtt = Some(rtt);
                    self.mux.set_path_rtt(rtt);
                    self.events.push_back(TunnelEvent::Rtt(rtt));
                }
            }
            other => {
                self.stats.unexpected_frames += 1;
                let reason = format!(
                    "unexpected {} on an established tunnel",
                    other.frame_type().as_str()
                );
                self.close(ErrorCode::ProtocolError, &reason);
            }
        }
        self.pump();
    }

    fn establish(&mut self, now: Instant, epoch: Epoch, replica_id: String) {
        self.state = TunnelState::Established { epoch };
        self.timers.clear(TunnelTimer::Handshake);
        // The first ping goes after a second (or the interval, if shorter):
        // the round trip it measures lets flow windows grow on a long path.
        self.timers.set(
            TunnelTimer::Ping,
            now + self.cfg.ping_interval.min(FIRST_PING),
        );
        self.timers
            .set(TunnelTimer::Idle, now + self.cfg.idle_timeout);
        self.events.push_back(TunnelEvent::Established {
            epoch,
            codec: self.codec,
            replica_id,
        });
    }

    /// Hub side: accept the agent under `epoch` (after the ownership claim).
    pub fn accept(&mut self, now: Instant, epoch: Epoch) {
        self.accept_as(now, epoch, "")
    }

    /// [`Tunnel::accept`], naming this hub's replica in WELCOME.
    pub fn accept_as(&mut self, now: Instant, epoch: Epoch, replica_id: &str) {
        if self.state != TunnelState::AwaitAccept {
            return;
        }
        let codec = self
            .cfg
            .codecs
            .iter()
            .copied()
            .find(|c| self.peer_codecs.iter().any(|p| p == c.as_str()))
            .unwrap_or(Codec::V1);
        let welcome = Frame::Welcome {
            epoch,
            codec: codec.as_str().to_string(),
            window: self.cfg.window,
            max_frame: self.cfg.limits.max_frame as u32,
            replica_id: replica_id.to_string(),
        };
        self.send_with(Codec::V1, &welcome);
        self.codec = codec;
        self.establish(now, epoch, String::new());
    }

    /// Hub side: tell the agent this hub is shutting down (DRAIN), so it
    /// moves to another hub at once and keeps this tunnel only for its
    /// flows. v1 has no DRAIN frame: returns false and sends nothing (a v1
    /// agent moves when the tunnel closes).
    pub fn send_drain(&mut self) -> bool {
        if self.role != Role::Hub || !self.is_established() || self.codec != Codec::V2 {
            return false;
        }
        self.send_frame(&Frame::Drain);
        true
    }

    /// Agent side: hand the hub a fresh token for this tunnel (REAUTH), so
    /// it outlives the token it was opened with. v1 has no REAUTH frame:
    /// returns false and sends nothing (such a tunnel ends with its token).
    pub fn send_reauth(&mut self, token: &str) -> bool {
        if self.role != Role::Agent || !self.is_established() || self.codec != Codec::V2 {
            return false;
        }
        self.send_frame(&Frame::Reauth {
            token: token.to_string(),
        });
        true
    }

    /// Agent side: whether the hub sent DRAIN on this tunnel.
    pub fn drain_seen(&self) -> bool {
        self.drain_seen
    }

    /// Hub side: open a new flow to `connector` on this agent.
    ///
    /// The agent's flows are shared fairly between its connectors: each of
    /// the `k` connectors it announced is guaranteed `max_flows / (2k)` of
    /// them, and a connector past its guarantee may open more only while
    /// the free flows exceed what the other connectors' guarantees still
    /// need. One busy listener therefore never takes the flows another
    /// connector of the same agent is owed, and an agent with one
    /// connector (or idle others) can use every flow.
    pub fn open_flow(&mut self, connector: &str) -> Result<Cid, SendError> {
        if !self.is_established() || self.role != Role::Hub {
            return Err(SendError::NotEstablished);
        }
        let cid = self.next_cid;
        let tag = self.fair_share(connector)?;
        self.mux
            .open_tagged(cid, tag)
            .map_err(|_| SendError::QueueFull(self.cfg.max_flows))?;
        self.next_cid = self.next_cid.next();
        self.send_frame(&Frame::Open {
            cid,
            connector: connector.to_string(),
        });
        Ok(cid)
    }

    /// The flow tag of `connector` if it may open one more flow now (see
    /// [`Tunnel::open_flow`]). A connector the agent did not announce gets
    /// a tag of its own and no guarantee.
    fn fair_share(&mut self, connector: &str) -> Result<u32, SendError> {
        let k = self.peer_connectors.len();
        let tag = self
            .peer_connectors
            .iter()
            .position(|c| c == connector)
            .unwrap_or(k);
        let max = self.cfg.max_flows;
        // One connector, or a full agent (refused as such by the mux).
        if k <= 1 || self.mux.len() >= max {
            return Ok(tag as u32);
        }
        let guarantee = max / (2 * k);
        let open = self.mux.tagged(tag as u32);
        if open < guarantee {
            return Ok(tag as u32);
        }
        let reserved: usize = (0..k)
            .filter(|t| *t != tag)
            .map(|t| guarantee.saturating_sub(self.mux.tagged(t as u32)))
            .sum();
        let free = max.saturating_sub(self.mux.len());
        if free > reserved {
            return Ok(tag as u32);
        }
        self.stats.open_refused_share += 1;
        Err(SendError::ShareExceeded {
            connector: connector.to_string(),
            open,
            reserved,
        })
    }

    /// Bytes that may be sent on `cid` now.
    pub fn send_credit(&self, cid: Cid) -> u64 {
        if self.is_established() {
            self.mux.send_credit(cid)
        } else {
            0
        }
    }

    pub fn send_data(&mut self, cid: Cid, payload: impl Into<Payload>) -> Result<(), SendError> {
        if !self.is_established() {
            return Err(SendError::NotEstablished);
        }
        self.mux.send_data(cid, payload)?;
        self.pump();
        Ok(())
    }

    pub fn send_fin(&mut self, cid: Cid) -> Result<(), SendError> {
        if !self.is_established() {
            return Err(SendError::NotEstablished);
        }
        self.mux.send_fin(cid)?;
        self.pump();
        Ok(())
    }

    /// Abort a flow locally (socket error, target unreachable, ...).
    pub fn reset_flow(&mut self, cid: Cid, code: ErrorCode, reason: &str) {
        if self.mux.reset(cid, code, reason) {
            self.pump();
        }
    }

    /// The consumer of `cid` drained `n` bytes.
    pub fn consumed(&mut self, cid: Cid, n: usize) {
        self.mux.consumed(cid, n);
        self.pump();
    }

    /// Close the whole tunnel locally: every flow ends with `LinkLost`.
    pub fn close(&mut self, code: ErrorCode, reason: &str) {
        if self.is_closed() {
            return;
        }
        self.mux.fail_all(ErrorCode::LinkLost, reason);
        self.state = TunnelState::Closed {
            code,
            reason: reason.to_string(),
        };
        self.timers.clear_all();
        self.pump();
        self.events.push_back(TunnelEvent::Closed {
            code,
            reason: reason.to_string(),
        });
    }

    /// The socket is gone (read error, EOF, close frame from the peer).
    pub fn on_disconnected(&mut self, reason: &str) {
        self.close(ErrorCode::LinkLost, reason);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for t in self.timers.expired(now) {
            match t {
                TunnelTimer::Handshake => self.close(ErrorCode::IdleTimeout, "handshake timed out"),
                TunnelTimer::Idle => self.close(
                    ErrorCode::IdleTimeout,
                    &format!("no frame from the peer for {:?}", self.cfg.idle_timeout),
                ),
                // Due: an agent's, or a hub's before its first round trip
                // or once its agent has been quiet for `HUB_PING_SLACK`
                // intervals.
                TunnelTimer::Ping => {
                    self.timers
                        .set(TunnelTimer::Ping, now + self.cfg.ping_interval);
                    self.pings_skipped = 0;
                    self.send_ping(now);
                }
            }
        }
    }

    fn send_ping(&mut self, now: Instant) {
        self.ping_nonce += 1;
        self.ping_outstanding = Some((self.ping_nonce, now));
        self.send_frame(&Frame::Ping {
            nonce: self.ping_nonce,
        });
    }

    /// Hub, with a round trip measured: the agent's PING (answered) carries
    /// the keepalive both ways, so the hub's own PING timer moves past the
    /// agent's next one ([`HUB_PING_SLACK`]) and comes due only if the
    /// agent goes quiet; the hub pings for its round trip with every
    /// [`HUB_PING_EVERY_WHILE_PINGED`]-th of the agent's PINGs, in the
    /// same wake-up. An idle tunnel then wakes its hub once per agent PING.
    fn on_agent_ping(&mut self, now: Instant) {
        let quiet = self.cfg.ping_interval.mul_f64(HUB_PING_SLACK);
        self.timers.set(TunnelTimer::Ping, now + quiet);
        if self.pings_skipped + 1 < HUB_PING_EVERY_WHILE_PINGED {
            self.pings_skipped += 1;
        } else {
            self.pings_skipped = 0;
            self.send_ping(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<(Instant, TunnelTimer)> {
        self.timers.next()
    }

    pub fn poll_transmit(&mut self) -> Option<WsMessage> {
        let (m, data) = self.transmit.pop_front()?;
        if !data {
            self.control_backlog -= m.len();
        }
        debug_assert!(
            !self.transmit.is_empty() || self.control_backlog == 0,
            "control backlog of {} bytes with nothing queued",
            self.control_backlog
        );
        Some(m)
    }

    /// Whether anything waits to be sent.
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// Bytes of control frames waiting to be sent.
    pub fn control_backlog(&self) -> usize {
        self.control_backlog
    }

    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        if let Some(e) = self.mux.poll_event() {
            return Some(TunnelEvent::Flow(e));
        }
        self.events.pop_front()
    }

    /// Move the mux's frames onto the wire.
    fn pump(&mut self) {
        while let Some(ff) = self.mux.poll_frame() {
            let frame = match ff {
                FlowFrame::Data { cid, seq, payload } => {
                    let head = Frame::Data {
                        cid,
                        seq,
                        payload: Bytes::new(),
                    };
                    let msg = self.codec.encode_data(head, payload, &self.cfg.limits);
                    self.sent(FrameType::Data, msg);
                    continue;
                }
                FlowFrame::Fin { cid, seq } => Frame::Fin { cid, seq },
                FlowFrame::Rst { cid, code, reason } => Frame::Rst { cid, code, reason },
                FlowFrame::Credit { cid, bytes } => Frame::Credit { cid, bytes },
            };
            self.send_frame(&frame);
        }
    }

    fn send_frame(&mut self, frame: &Frame) {
        self.send_with(self.codec, frame);
    }

    fn send_with(&mut self, codec: Codec, frame: &Frame) {
        let msg = codec.encode(frame, &self.cfg.limits);
        self.sent(frame.frame_type(), msg);
    }

    fn sent(&mut self, t: FrameType, msg: Result<WsMessage, CodecError>) {
        match msg {
            Ok(msg) => {
                let data = t == FrameType::Data;
                if !data {
                    if self.control_backlog + msg.len() > self.cfg.max_control_backlog {
                        // The peer does not read what it causes: drop the
                        // frame and close (once; closing sends no more).
                        if !self.is_closed() {
                            self.stats.control_backlog_closes += 1;
                            let reason = format!(
                                "output_budget: more than {} bytes of control replies wait to be sent; the peer does not read",
                                self.cfg.max_control_backlog
                            );
                            self.close(ErrorCode::LimitExceeded, &reason);
                        }
                        return;
                    }
                    self.control_backlog += msg.len();
                    debug_assert!(self.control_backlog <= self.cfg.max_control_backlog);
                }
                *self.stats.frames_out.entry(t).or_default() += 1;
                self.transmit.push_back((msg, data));
            }
            // Only reachable if local code built an invalid frame; fail loudly
            // in tests, close the tunnel in production rather than send garbage.
            Err(e) => {
                debug_assert!(false, "encoding a local frame failed: {e}");
                self.close(ErrorCode::Internal, &format!("cannot encode frame: {e}"));
            }
        }
    }
}

/// A peer that advertises no window gets the protocol default.
pub fn effective_window(window: u32) -> u32 {
    if window == 0 { DEFAULT_WINDOW } else { window }
}

fn state_name(s: &TunnelState) -> &'static str {
    match s {
        TunnelState::AwaitHello => "await-hello",
        TunnelState::AwaitAccept => "await-accept",
        TunnelState::AwaitWelcome => "await-welcome",
        TunnelState::Established { .. } => "established",
        TunnelState::Closed { .. } => "closed",
    }
}

impl crate::mux::FlowLink for Tunnel {
    fn send_credit(&self, cid: Cid) -> u64 {
        Tunnel::send_credit(self, cid)
    }
    fn send_data(&mut self, cid: Cid, payload: Payload) -> Result<(), SendError> {
        Tunnel::send_data(self, cid, payload)
    }
    fn send_fin(&mut self, cid: Cid) -> Result<(), SendError> {
        Tunnel::send_fin(self, cid)
    }
    fn reset_flow(&mut self, cid: Cid, code: ErrorCode, reason: &str) {
        Tunnel::reset_flow(self, cid, code, reason)
    }
    fn consumed(&mut self, cid: Cid, n: usize) {
        Tunnel::consumed(self, cid, n)
    }
}
