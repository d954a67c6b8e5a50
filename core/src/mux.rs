//! The flows multiplexed on one link (a tunnel or a mesh link): flow table,
//! credit, duplicate suppression, and what a peer's flow frames do to them.
//!
//! [`crate::tunnel::Tunnel`] and [`crate::mesh_link::MeshLink`] both own a
//! `FlowMux` and translate between their wire frames and [`FlowFrame`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::dedup::DedupLru;
use crate::flow::{Flow, FlowError, RecvVerdict, SendError};
use crate::frame::{Cid, ErrorCode, Limits, Seq};
use crate::payload::Payload;

/// A flow-level frame, independent of tunnel or mesh framing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowFrame {
    Data {
        cid: Cid,
        seq: Seq,
        payload: Payload,
    },
    Fin {
        cid: Cid,
        seq: Option<Seq>,
    },
    Rst {
        cid: Cid,
        code: ErrorCode,
        reason: String,
    },
    Credit {
        cid: Cid,
        bytes: u32,
    },
}

impl FlowFrame {
    pub fn cid(&self) -> Cid {
        match self {
            FlowFrame::Data { cid, .. }
            | FlowFrame::Fin { cid, .. }
            | FlowFrame::Rst { cid, .. }
            | FlowFrame::Credit { cid, .. } => *cid,
        }
    }
}

/// The flow operations a link (tunnel or mesh link) offers its runtime, so
/// that one piece of runtime code can pipe sockets to flows on either.
pub trait FlowLink {
    /// Bytes that may be sent on `cid` now.
    fn send_credit(&self, cid: Cid) -> u64;
    fn send_data(&mut self, cid: Cid, payload: Payload) -> Result<(), crate::flow::SendError>;
    fn send_fin(&mut self, cid: Cid) -> Result<(), crate::flow::SendError>;
    fn reset_flow(&mut self, cid: Cid, code: ErrorCode, reason: &str);
    /// The consumer of `cid` drained `n` delivered bytes.
    fn consumed(&mut self, cid: Cid, n: usize);
    /// The runtime has data for `cid` but `send_credit` is 0: ask for a
    /// `Writable` event when it may send again. Flow credit always produces
    /// one when a grant arrives; links with caps of their own (the mesh)
    /// must remember the flow.
    fn note_blocked(&mut self, _cid: Cid) {}
}

/// What the local consumer of a flow (a client socket, a target socket, a
/// bridged flow on another link) must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    /// Write these bytes, then report them with `consumed`.
    Data { cid: Cid, payload: Bytes },
    /// The peer finished sending: shut down the write half.
    Fin { cid: Cid },
    /// The flow is over with an error: close the socket now.
    Reset {
        cid: Cid,
        code: ErrorCode,
        reason: String,
    },
    /// The send window grew; `credit` bytes may be sent now.
    Writable { cid: Cid, credit: u64 },
    /// Both directions finished in order; the flow is forgotten.
    Closed { cid: Cid },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MuxStats {
    pub flows_opened: u64,
    pub flows_closed: u64,
    pub flows_reset_local: u64,
    pub flows_reset_remote: u64,
    pub protocol_violations: u64,
    pub duplicates_dropped: u64,
    pub late_frames_ignored: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub open_refused_limit: u64,
    /// Times a flow's receive window doubled (see [`crate::flow`]).
    pub windows_grown: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("flow {0} already exists")]
    Exists(Cid),
    #[error("flow limit of {0} reached")]
    TooMany(usize),
}

#[derive(Clone, Debug)]
pub struct MuxConfig {
    pub limits: Limits,
    pub local_window: u32,
    /// The most one flow's receive window may grow to (`local_window`: no
    /// growth). All flows of the link together may grow by at most
    /// [`GROWTH_BUDGET_WINDOWS`] times this above `local_window`.
    pub max_window: u32,
    pub max_flows: usize,
    pub dedup_capacity: usize,
    /// Test-only: a deliberate bug the simulation must catch (only with the
    /// `planted-bugs` feature, which no runtime enables).
    #[cfg(feature = "planted-bugs")]
    #[doc(hidden)]
    pub planted_bug: PlantedBug,
}

/// How many flows of one link may have grown to the maximum window at once:
/// the growth all flows of a link may have taken together is this many
/// maximum windows, which bounds the extra bytes a link's receiver may have
/// to hold for readers that stop draining.
pub const GROWTH_BUDGET_WINDOWS: u64 = 8;

/// Deliberate bugs for proving that the simulation catches them. Only with
/// the `planted-bugs` feature (`nowconnect-sim` enables it; no runtime may).
#[cfg(feature = "planted-bugs")]
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlantedBug {
    #[default]
    None,
    /// Count every CREDIT grant twice: the sender overruns the window.
    DoubleCreditGrant,
    /// The owner hub accepts a mesh open for an agent it holds whatever the
    /// open's epoch: a stale origin's flow reaches the agent's tunnel.
    AcceptStaleEpoch,
    /// The hub node never closes a tunnel whose token expired: it keeps
    /// opening flows on it and carrying their bytes.
    IgnoreTokenExpiry,
    /// The hub node refuses a renewed token (another agent, tenant or a
    /// narrower scope) and closes the tunnel, but takes its credential
    /// first: the refused token becomes the tunnel's identity.
    RefusedReauthTakesIdentity,
    /// The hub node takes a renewed token but keeps the old deadline: a
    /// tunnel whose token was renewed in time expires anyway.
    ReauthKeepsDeadline,
}

#[derive(Clone, Debug)]
pub struct FlowMux {
    cfg: MuxConfig,
    peer_window: u32,
    flows: BTreeMap<Cid, Flow>,
    closed: DedupLru,
    frames: VecDeque<FlowFrame>,
    events: VecDeque<FlowEvent>,
    /// Bytes by which the flows' windows have grown above `local_window`.
    grown: u64,
    /// The link's shortest measured round trip, if any.
    path_rtt: Option<Duration>,
    /// The tag of each flow opened with [`FlowMux::open_tagged`], and how
    /// many open flows carry each tag.
    tags: BTreeMap<Cid, u32>,
    tagged: BTreeMap<u32, usize>,
    pub stats: MuxStats,
}

impl FlowMux {
    pub fn new(cfg: MuxConfig) -> Self {
        let closed = DedupLru::new(cfg.dedup_capacity);
        FlowMux {
            cfg,
            peer_window: 0,
            flows: BTreeMap::new(),
            closed,
            frames: VecDeque::new(),
            events: VecDeque::new(),
            grown: 0,
            path_rtt: None,
            tags: BTreeMap::new(),
            tagged: BTreeMap::new(),
            stats: MuxStats::default(),
        }
    }

    /// The peer's advertised per-flow window, learned at the handshake.
    pub fn set_peer_window(&mut self, window: u32) {
        self.peer_window = window;
    }

    pub fn local_window(&self) -> u32 {
        self.cfg.local_window
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn contains(&self, cid: Cid) -> bool {
        self.flows.contains_key(&cid)
    }

    pub fn flow(&self, cid: Cid) -> Option<&Flow> {
        self.flows.get(&cid)
    }

    pub fn cids(&self) -> impl Iterator<Item = Cid> + '_ {
        self.flows.keys().copied()
    }

    pub fn dedup(&self) -> &DedupLru {
        &self.closed
    }

    /// The link's shortest round trip measured so far (its pings). Flow
    /// windows grow only once it is known and at least
    /// [`crate::flow::GROWTH_STALL`]: on a short path, a wait for credit that
    /// long is the machine pausing the process, and growth would only cost
    /// memory and cache.
    pub fn set_path_rtt(&mut self, rtt: Duration) {
        self.path_rtt = Some(self.path_rtt.map_or(rtt, |r| r.min(rtt)));
    }

    /// Bytes by which this link's flows' windows have grown in all.
    pub fn window_growth(&self) -> u64 {
        self.grown
    }

    /// Remove a flow from the table, returning its growth to the budget.
    fn remove_flow(&mut self, cid: Cid) -> Option<Flow> {
        let flow = self.flows.remove(&cid)?;
        self.untag(cid);
        self.grown -= u64::from(flow.local_window().saturating_sub(self.cfg.local_window));
        Some(flow)
    }

    pub fn open(&mut self, cid: Cid) -> Result<(), OpenError> {
        if self.flows.contains_key(&cid) {
            return Err(OpenError::Exists(cid));
        }
        if self.flows.len() >= self.cfg.max_flows {
            self.stats.open_refused_limit += 1;
            return Err(OpenError::TooMany(self.cfg.max_flows));
        }
        let flow = Flow::new(cid, self.cfg.local_window, self.peer_window)
            .with_max_window(self.cfg.max_window);
        self.flows.insert(cid, flow);
        self.stats.flows_opened += 1;
        debug_assert!(self.flows.len() <= self.cfg.max_flows);
        Ok(())
    }

    /// [`FlowMux::open`], counting the flow under `tag` (see
    /// [`FlowMux::tagged`]) until it is gone.
    pub fn open_tagged(&mut self, cid: Cid, tag: u32) -> Result<(), OpenError> {
        self.open(cid)?;
        self.tags.insert(cid, tag);
        *self.tagged.entry(tag).or_default() += 1;
        debug_assert!(self.tags.len() <= self.flows.len());
        debug_assert!(self.tagged[&tag] <= self.tags.len());
        Ok(())
    }

    /// Open flows opened under `tag`.
    pub fn tagged(&self, tag: u32) -> usize {
        self.tagged.get(&tag).copied().unwrap_or(0)
    }

    fn untag(&mut self, cid: Cid) {
        if let Some(tag) = self.tags.remove(&cid)
            && let Some(n) = self.tagged.get_mut(&tag)
        {
            *n -= 1;
            if *n == 0 {
                self.tagged.remove(&tag);
            }
        }
    }

    /// Bytes the local side may send on `cid` now.
    pub fn send_credit(&self, cid: Cid) -> u64 {
        self.flows.get(&cid).map_or(0, Flow::send_credit)
    }

    /// Queue `payload` as one or more DATA frames. All or nothing: if the
    /// window cannot take the whole payload, nothing is sent.
    pub fn send_data(&mut self, cid: Cid, payload: impl Into<Payload>) -> Result<(), SendError> {
        let mut payload = payload.into();
        let flow = self
            .flows
            .get_mut(&cid)
            .ok_or(SendError::UnknownFlow(cid))?;
        if flow.fin_sent() {
            return Err(SendError::AfterFin(cid));
        }
        if payload.len() as u64 > flow.send_credit() {
            return Err(SendError::NoCredit {
                cid,
                len: payload.len(),
                window: flow.send_credit(),
            });
        }
        let max = self.cfg.limits.max_payload().max(1);
        while !payload.is_empty() {
            let chunk = payload.split_to(payload.len().min(max));
            let seq = flow.on_send_data(chunk.len())?;
            self.stats.bytes_out += chunk.len() as u64;
            self.frames.push_back(FlowFrame::Data {
                cid,
                seq,
                payload: chunk,
            });
        }
        Ok(())
    }

    pub fn send_fin(&mut self, cid: Cid) -> Result<(), SendError> {
        let flow = self
            .flows
            .get_mut(&cid)
            .ok_or(SendError::UnknownFlow(cid))?;
        let seq = flow.on_send_fin()?;
        self.frames.push_back(FlowFrame::Fin {
            cid,
            seq: Some(seq),
        });
        self.finish_if_done(cid);
        Ok(())
    }

    /// The local side aborts the flow: RST to the peer, forget the flow.
    /// Returns whether the flow existed.
    pub fn reset(&mut self, cid: Cid, code: ErrorCode, reason: &str) -> bool {
        let Some(flow) = self.remove_flow(cid) else {
            return false;
        };
        self.closed.record(cid, flow.received_frames());
        self.stats.flows_reset_local += 1;
        self.frames.push_back(FlowFrame::Rst {
            cid,
            code,
            reason: crate::frame::truncate_reason(reason, &self.cfg.limits),
        });
        true
    }

    /// Drop a flow without telling the peer (it was refused in another way).
    pub fn forget(&mut self, cid: Cid) {
        if let Some(flow) = self.remove_flow(cid) {
            self.closed.record(cid, flow.received_frames());
        }
    }

    /// The consumer drained `n` bytes of `cid`; grant credit back when due.
    pub fn consumed(&mut self, cid: Cid, n: usize) {
        if let Some(flow) = self.flows.get_mut(&cid)
            && let Some(bytes) = flow.on_consumed(n)
        {
            self.frames.push_back(FlowFrame::Credit { cid, bytes });
        }
    }

    /// The link is gone: every flow ends with `code`; nothing is sent.
    pub fn fail_all(&mut self, code: ErrorCode, reason: &str) {
        // Already a walk over every flow: check the running totals once.
        debug_assert_eq!(
            self.grown,
            self.flows
                .values()
                .map(|f| u64::from(f.local_window().saturating_sub(self.cfg.local_window)))
                .sum::<u64>(),
            "window growth accounting"
        );
        debug_assert_eq!(
            self.tagged.values().sum::<usize>(),
            self.tags.len(),
            "tagged flow counts"
        );
        debug_assert!(self.tags.keys().all(|cid| self.flows.contains_key(cid)));
        let flows = std::mem::take(&mut self.flows);
        self.grown = 0;
        self.tags.clear();
        self.tagged.clear();
        for (cid, flow) in flows {
            self.closed.record(cid, flow.received_frames());
            self.stats.flows_reset_local += 1;
            self.events.push_back(FlowEvent::Reset {
                cid,
                code,
                reason: reason.to_string(),
            });
        }
        self.frames.clear();
    }

    /// A flow frame from the peer, received at `now`.
    pub fn on_frame(&mut self, frame: FlowFrame, now: Instant) {
        let cid = frame.cid();
        let path_rtt = self.path_rtt;
        let room =
            (GROWTH_BUDGET_WINDOWS * u64::from(self.cfg.max_window)).saturating_sub(self.grown);
        let Some(flow) = self.flows.get_mut(&cid) else {
            self.on_frame_unknown_flow(frame);
            return;
        };
        let result = match frame {
            FlowFrame::Data { seq, payload, .. } => {
                match flow.on_recv_data_at(seq, payload.len(), now, path_rtt, room) {
                    Ok((RecvVerdict::Deliver, grown)) => {
                        if grown > 0 {
                            self.grown += u64::from(grown);
                            self.stats.windows_grown += 1;
                            debug_assert!(
                                self.grown
                                    <= GROWTH_BUDGET_WINDOWS * u64::from(self.cfg.max_window),
                                "window growth {} beyond the link's budget",
                                self.grown
                            );
                        }
                        self.stats.bytes_in += payload.len() as u64;
                        if !payload.is_empty() {
                            let payload = payload.into_bytes();
                            self.events.push_back(FlowEvent::Data { cid, payload });
                        }
                        Ok(())
                    }
                    Ok((RecvVerdict::Duplicate, _)) => {
                        self.stats.duplicates_dropped += 1;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            FlowFrame::Fin { seq, .. } => match flow.on_recv_fin(seq) {
                Ok(RecvVerdict::Deliver) => {
                    self.events.push_back(FlowEvent::Fin { cid });
                    self.finish_if_done(cid);
                    Ok(())
                }
                Ok(RecvVerdict::Duplicate) => {
                    self.stats.duplicates_dropped += 1;
                    Ok(())
                }
                Err(e) => Err(e),
            },
            FlowFrame::Credit { bytes, .. } => {
                let granted = flow.on_recv_credit(bytes);
                #[cfg(feature = "planted-bugs")]
                let granted = granted.and_then(|()| {
                    if self.cfg.planted_bug == PlantedBug::DoubleCreditGrant {
                        flow.on_recv_credit(bytes)
                    } else {
                        Ok(())
                    }
                });
                match granted {
                    Ok(()) => {
                        let credit = flow.send_credit();
                        if credit > 0 {
                            self.events.push_back(FlowEvent::Writable { cid, credit });
                        }
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            FlowFrame::Rst { code, reason, .. } => {
                let flow = self.remove_flow(cid).expect("flow present");
                self.closed.record(cid, flow.received_frames());
                self.stats.flows_reset_remote += 1;
                self.events
                    .push_back(FlowEvent::Reset { cid, code, reason });
                Ok(())
            }
        };
        if let Err(e) = result {
            self.violation(cid, e);
        }
    }

    fn on_frame_unknown_flow(&mut self, frame: FlowFrame) {
        let cid = frame.cid();
        match frame {
            FlowFrame::Data { seq, .. } if self.closed.is_duplicate(cid, seq) => {
                self.stats.duplicates_dropped += 1;
            }
            // A frame that crossed our RST or FIN on the wire: normal, ignore.
            _ if self.closed.contains(cid) => self.stats.late_frames_ignored += 1,
            // Never answer an RST with an RST.
            FlowFrame::Rst { .. } => self.stats.late_frames_ignored += 1,
            _ => {
                self.stats.protocol_violations += 1;
                self.closed.record(cid, 0);
                self.frames.push_back(FlowFrame::Rst {
                    cid,
                    code: ErrorCode::ProtocolError,
                    reason: format!("unknown flow {cid}"),
                });
            }
        }
    }

    /// The peer broke the protocol on one flow: reset that flow only.
    fn violation(&mut self, cid: Cid, e: FlowError) {
        self.stats.protocol_violations += 1;
        let reason = e.to_string();
        if self.reset(cid, e.code(), &reason) {
            self.events.push_back(FlowEvent::Reset {
                cid,
                code: e.code(),
                reason,
            });
        }
    }

    fn finish_if_done(&mut self, cid: Cid) {
        if self.flows.get(&cid).is_some_and(Flow::is_done) {
            let flow = self.remove_flow(cid).expect("flow present");
            self.closed.record(cid, flow.received_frames());
            self.stats.flows_closed += 1;
            self.events.push_back(FlowEvent::Closed { cid });
        }
    }

    pub fn poll_frame(&mut self) -> Option<FlowFrame> {
        self.frames.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<FlowEvent> {
        self.events.pop_front()
    }
}
