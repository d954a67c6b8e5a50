//! One flow's protocol state: sequence numbers and half-close per direction,
//! reset with a reason, and the per-flow credit window.
//!
//! Credit: each side advertises a receive window (bytes). A sender may have at
//! most that many bytes sent and not yet granted back; the receiver grants more
//! (CREDIT frames) as its consumer drains what it delivered. A sender that
//! exceeds the window has broken the protocol and the flow is reset.
//!
//! Window growth: one flow can move at most a window per round trip, so a
//! window that is ample on a LAN caps a flow across a WAN (256 KiB over a
//! 20 ms round trip: 12.5 MiB/s). Such a flow's bytes arrive in bursts, one
//! window each, with a pause of about a round trip between them while the
//! sender waits for credit. The receiver watches for that: a pause of at
//! least [`GROWTH_STALL`] after a burst in which the sender used all the
//! credit it had been granted by the start of that burst (less a quarter
//! window), and in which the flow moved at least half a window per round
//! trip, counts as a wait for the round trip. Two in a row double the window
//! (up to the flow's maximum); the extra is granted with the next CREDIT. A
//! reader that drains slowly holds the sender back by its own pace, well
//! under a window per round trip, so its flow does not grow (nor does one
//! that does not drain at all); a sender that pauses with credit left (an
//! application's own pace) does not count; and pauses shorter than
//! [`GROWTH_STALL`] leave the window as configured.
//! A busy machine pauses a process for milliseconds now and then, which on a
//! LAN would look like waits: windows grow only on links whose shortest
//! measured ping round trip is at least [`GROWTH_STALL`] too
//! ([`crate::mux::FlowMux::set_path_rtt`]). Growth needs no protocol
//! support: a grant may lift the sender's credit to 2³²−1.

use std::time::{Duration, Instant};

use crate::frame::{Cid, ErrorCode, Seq};

/// The shortest pause between bursts that counts as a wait for credit.
/// Below it the configured window already allows a quarter of a GiB per
/// second per 256 KiB, more than one flow moves through a hub.
pub const GROWTH_STALL: Duration = Duration::from_millis(1);
/// Waits for credit in a row that double the window.
const WAITS_TO_GROW: u8 = 2;

/// Errors that end one flow (never the link).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("sequence gap on flow {cid}: expected seq {expected}, got {got}")]
    SequenceGap { cid: Cid, expected: Seq, got: Seq },
    #[error("credit overrun on flow {cid}: {len} bytes sent with {window} bytes of window left")]
    CreditOverrun { cid: Cid, len: usize, window: u64 },
    #[error("DATA after FIN on flow {cid}")]
    DataAfterFin { cid: Cid },
    #[error("FIN on flow {cid} announces {announced} DATA frames, {received} were received")]
    FinMismatch {
        cid: Cid,
        announced: Seq,
        received: Seq,
    },
    #[error("credit grant on flow {cid} overflows the window ({window} + {grant})")]
    CreditOverflow { cid: Cid, window: u64, grant: u32 },
}

impl FlowError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FlowError::SequenceGap { .. } | FlowError::FinMismatch { .. } => ErrorCode::SequenceGap,
            FlowError::CreditOverrun { .. } | FlowError::CreditOverflow { .. } => {
                ErrorCode::CreditOverrun
            }
            FlowError::DataAfterFin { .. } => ErrorCode::ProtocolError,
        }
    }
}

/// Misuse of a flow by the local caller (the runtime), as opposed to a peer error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("flow {0} is not open")]
    UnknownFlow(Cid),
    #[error("flow {cid}: {len} bytes exceed the send window of {window} bytes")]
    NoCredit { cid: Cid, len: usize, window: u64 },
    #[error("flow {0} already sent FIN")]
    AfterFin(Cid),
    #[error("the link is not established")]
    NotEstablished,
    #[error("the send queue is full ({0} frames)")]
    QueueFull(usize),
    /// Hub side: the connector holds its share of the agent's flows and
    /// the rest is kept for the agent's other connectors.
    #[error(
        "connector `{connector}` holds {open} of the agent's flows; the other {reserved} free flows are kept for its other connectors"
    )]
    ShareExceeded {
        connector: String,
        open: usize,
        reserved: usize,
    },
}

impl SendError {
    /// A link's refusal to open a flow, by its cause: the agent's (or mesh
    /// link's) flow limit, the connector's fair share, or a link that is
    /// not (or no longer) established. `flows` names the limit a full
    /// queue hit (`agent flow`, `mesh link flow`).
    pub fn refusal(self, flows: &str) -> OpenRefused {
        let (code, label) = match &self {
            SendError::ShareExceeded { .. } => (ErrorCode::LimitExceeded, "connector_share"),
            SendError::NotEstablished => (ErrorCode::LinkLost, ErrorCode::LinkLost.as_str()),
            _ => (ErrorCode::LimitExceeded, ErrorCode::LimitExceeded.as_str()),
        };
        let reason = match self {
            SendError::QueueFull(n) => format!("{flows} limit of {n} reached"),
            e => e.to_string(),
        };
        OpenRefused {
            code,
            label,
            reason,
        }
    }
}

/// Why a link could not open a flow ([`SendError::refusal`]): the code a
/// bridged mesh flow is reset with, the label the client's refusal is
/// counted under (`nowconnect_client_connections_refused_total{reason}`),
/// and the reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRefused {
    pub code: ErrorCode,
    pub label: &'static str,
    pub reason: String,
}

impl std::fmt::Display for OpenRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What to do with a received DATA frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvVerdict {
    /// Deliver the payload to the consumer.
    Deliver,
    /// Already seen: drop and count.
    Duplicate,
}

/// Largest window a grant may build up to: one u32 of outstanding bytes.
pub const MAX_WINDOW: u64 = u32::MAX as u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub cid: Cid,
    /// Next seq this side sends.
    send_seq: Seq,
    /// Bytes this side may still send before it needs more credit.
    send_credit: u64,
    fin_sent: bool,
    /// Next seq expected from the peer.
    recv_seq: Seq,
    /// Bytes the peer may still send before it needs more credit.
    recv_window: u64,
    /// Bytes delivered to the consumer and drained, not yet granted back.
    recv_ungranted: u64,
    /// Our current window (advertised, then grown): grants are batched to a
    /// quarter of it.
    local_window: u32,
    /// The most `local_window` may grow to.
    max_window: u32,
    /// Credit granted (the window included), in all; the bytes received in
    /// all are this less `recv_window`.
    granted: u64,
    /// When the last DATA arrived.
    last_arrival: Option<Instant>,
    /// When the current burst began, `granted` then, and bytes received
    /// since.
    burst_start: Option<Instant>,
    granted_at_burst: u64,
    burst_bytes: u64,
    /// Waits for credit in a row.
    waits: u8,
    fin_received: bool,
    /// Set once the flow is reset; no more frames either way.
    reset: Option<ErrorCode>,
}

impl Flow {
    /// `local_window`: what we let the peer send; `peer_window`: what the peer
    /// lets us send.
    pub fn new(cid: Cid, local_window: u32, peer_window: u32) -> Self {
        Flow {
            cid,
            send_seq: 0,
            send_credit: u64::from(peer_window),
            fin_sent: false,
            recv_seq: 0,
            recv_window: u64::from(local_window),
            recv_ungranted: 0,
            local_window,
            max_window: local_window,
            granted: u64::from(local_window),
            last_arrival: None,
            burst_start: None,
            granted_at_burst: u64::from(local_window),
            burst_bytes: 0,
            waits: 0,
            fin_received: false,
            reset: None,
        }
    }

    /// Let the receive window grow up to `max` (no growth when `max` is not
    /// above the window the flow was made with).
    pub fn with_max_window(mut self, max: u32) -> Self {
        self.max_window = max.max(self.local_window);
        self
    }

    /// Our current receive window: the advertised one, or what it grew to.
    pub fn local_window(&self) -> u32 {
        self.local_window
    }

    pub fn send_credit(&self) -> u64 {
        if self.fin_sent || self.reset.is_some() {
            0
        } else {
            self.send_credit
        }
    }

    pub fn recv_window(&self) -> u64 {
        self.recv_window
    }

    pub fn fin_sent(&self) -> bool {
        self.fin_sent
    }

    pub fn fin_received(&self) -> bool {
        self.fin_received
    }

    pub fn is_reset(&self) -> Option<ErrorCode> {
        self.reset
    }

    /// Both directions finished in order: the flow can be forgotten.
    pub fn is_done(&self) -> bool {
        self.reset.is_some() || (self.fin_sent && self.fin_received)
    }

    pub fn sent_frames(&self) -> Seq {
        self.send_seq
    }

    pub fn received_frames(&self) -> Seq {
        self.recv_seq
    }

    /// Account for sending `len` bytes; returns the seq of the DATA frame.
    pub fn on_send_data(&mut self, len: usize) -> Result<Seq, SendError> {
        if self.fin_sent {
            return Err(SendError::AfterFin(self.cid));
        }
        if self.reset.is_some() {
            return Err(SendError::UnknownFlow(self.cid));
        }
        if len as u64 > self.send_credit {
            return Err(SendError::NoCredit {
                cid: self.cid,
                len,
                window: self.send_credit,
            });
        }
        self.send_credit -= len as u64;
        let seq = self.send_seq;
        self.send_seq += 1;
        Ok(seq)
    }

    /// Account for sending FIN; returns the number of DATA frames sent.
    pub fn on_send_fin(&mut self) -> Result<Seq, SendError> {
        if self.fin_sent {
            return Err(SendError::AfterFin(self.cid));
        }
        if self.reset.is_some() {
            return Err(SendError::UnknownFlow(self.cid));
        }
        self.fin_sent = true;
        Ok(self.send_seq)
    }

    /// A DATA frame arrived from the peer at `now`. Returns how many bytes
    /// the window grew by (0 mostly). `path_rtt`: the link's shortest
    /// measured round trip; no growth without one, or below [`GROWTH_STALL`]
    /// (see [`crate::mux::FlowMux::set_path_rtt`]). `room`: how much more
    /// growth the link's budget allows.
    pub fn on_recv_data_at(
        &mut self,
        seq: Seq,
        len: usize,
        now: Instant,
        path_rtt: Option<Duration>,
        room: u64,
    ) -> Result<(RecvVerdict, u32), FlowError> {
        let verdict = self.on_recv_data(seq, len)?;
        if verdict == RecvVerdict::Duplicate || self.max_window <= self.local_window {
            return Ok((verdict, 0));
        }
        let mut grown = 0;
        if let Some(last) = self.last_arrival
            && now.saturating_duration_since(last) >= GROWTH_STALL
        {
            // A pause ended a burst. Was the sender out of credit, and did
            // the flow move at least half a window per round trip (from the
            // start of the burst to now), as a flow held by its window does?
            let slack = u64::from(self.local_window / 4);
            let received_before = self.granted - self.recv_window - len as u64;
            let out_of_credit = received_before + slack >= self.granted_at_burst;
            let period = self
                .burst_start
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
            let rtt = path_rtt.filter(|r| *r >= GROWTH_STALL);
            let window_bound = rtt.is_some_and(|r| {
                u128::from(self.burst_bytes) * r.as_nanos() * 2
                    >= u128::from(self.local_window) * period.as_nanos()
            });
            if out_of_credit && window_bound {
                self.waits = self.waits.saturating_add(1);
            } else {
                self.waits = 0;
            }
            if self.waits >= WAITS_TO_GROW {
                self.waits = 0;
                let room = u32::try_from(room).unwrap_or(u32::MAX);
                let next = self
                    .local_window
                    .saturating_mul(2)
                    .min(self.max_window)
                    .min(self.local_window.saturating_add(room));
                grown = next - self.local_window;
                debug_assert!(grown <= room, "growth beyond the link's budget");
                self.local_window = next;
                debug_assert!(self.local_window <= self.max_window);
                // Granted with the next CREDIT, as if drained.
                self.recv_ungranted += u64::from(grown);
            }
            self.granted_at_burst = self.granted;
            self.burst_bytes = 0;
            self.burst_start = Some(now);
        }
        self.burst_start.get_or_insert(now);
        self.last_arrival = Some(now);
        self.burst_bytes += len as u64;
        if self.burst_bytes > 2 * u64::from(self.local_window) {
            // Windows pass without a pause: not bound by the round trip.
            self.waits = 0;
        }
        Ok((verdict, grown))
    }

    /// A DATA frame arrived from the peer.
    pub fn on_recv_data(&mut self, seq: Seq, len: usize) -> Result<RecvVerdict, FlowError> {
        if seq < self.recv_seq {
            return Ok(RecvVerdict::Duplicate);
        }
        if self.fin_received {
            return Err(FlowError::DataAfterFin { cid: self.cid });
        }
        if seq > self.recv_seq {
            return Err(FlowError::SequenceGap {
                cid: self.cid,
                expected: self.recv_seq,
                got: seq,
            });
        }
        if len as u64 > self.recv_window {
            return Err(FlowError::CreditOverrun {
                cid: self.cid,
                len,
                window: self.recv_window,
            });
        }
        self.recv_window -= len as u64;
        self.recv_seq += 1;
        Ok(RecvVerdict::Deliver)
    }

    /// FIN arrived; `seq` (when the peer sent it) must equal the DATA count.
    pub fn on_recv_fin(&mut self, seq: Option<Seq>) -> Result<RecvVerdict, FlowError> {
        if self.fin_received {
            return Ok(RecvVerdict::Duplicate);
        }
        if let Some(announced) = seq
            && announced != self.recv_seq
        {
            return Err(FlowError::FinMismatch {
                cid: self.cid,
                announced,
                received: self.recv_seq,
            });
        }
        self.fin_received = true;
        Ok(RecvVerdict::Deliver)
    }

    /// The peer granted more send window.
    pub fn on_recv_credit(&mut self, grant: u32) -> Result<(), FlowError> {
        let next = self.send_credit + u64::from(grant);
        if next > MAX_WINDOW {
            return Err(FlowError::CreditOverflow {
                cid: self.cid,
                window: self.send_credit,
                grant,
            });
        }
        self.send_credit = next;
        debug_assert!(self.send_credit <= MAX_WINDOW);
        Ok(())
    }

    /// The local consumer drained `n` delivered bytes. Returns a grant to send
    /// to the peer once enough has built up (a quarter of the window), so a
    /// busy flow sends one CREDIT per several DATA frames, not one each.
    pub fn on_consumed(&mut self, n: usize) -> Option<u32> {
        if self.reset.is_some() || self.fin_received {
            return None;
        }
        self.recv_ungranted += n as u64;
        let threshold = (u64::from(self.local_window) / 4).max(1);
        if self.recv_ungranted >= threshold {
            let grant = self
                .recv_ungranted
                .min(MAX_WINDOW - self.recv_window.min(MAX_WINDOW));
            self.recv_ungranted -= grant;
            self.recv_window += grant;
            self.granted += grant;
            // What the peer may still send never exceeds the window as it
            // stands (more would mean the consumer reported bytes it was
            // never given).
            debug_assert!(
                self.recv_window <= u64::from(self.local_window),
                "flow {}: receive window {} above the flow's window {}",
                self.cid,
                self.recv_window,
                self.local_window
            );
            if grant > 0 {
                return Some(grant as u32);
            }
        }
        None
    }

    pub fn on_reset(&mut self, code: ErrorCode) {
        if self.reset.is_none() {
            self.reset = Some(code);
        }
    }
}
