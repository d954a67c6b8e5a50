//! [`TunnelDriver`]: one core [`Tunnel`] driven by its link task.

use std::sync::Arc;
use std::time::Instant;

use async_channel::Sender;
use nowconnect_core::flow::SendError;
use nowconnect_core::mux::FlowEvent;
use nowconnect_core::tunnel::{Tunnel, TunnelEvent};
use nowconnect_core::{Cid, ErrorCode};

use crate::metrics::{Cadence, Metrics, add_delta, add_frame_deltas, labels};

use super::{
    FlowEnd, FlowPipes, LinkCmd, OpenRefused, Outgoing, PeerMsg, TunnelCmd, TunnelTx,
    WRITER_HIGH_WATER,
};

/// A tunnel's core state machine with its flow pipes and socket writer.
pub struct TunnelDriver {
    pub tunnel: Tunnel,
    pub pipes: FlowPipes<TunnelCmd>,
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
        cmd_tx: TunnelTx,
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

    /// Why the tunnel took no flow for `connector` (a client's open or a
    /// bridged mesh flow's), counting a fair-share refusal by connector.
    fn open_refused(&self, e: SendError, connector: &str) -> OpenRefused {
        if matches!(e, SendError::ShareExceeded { .. }) {
            self.metrics
                .connector_share_refusals
                .get_or_create(&labels(&[("connector", connector)]))
                .inc();
        }
        e.refusal("agent flow")
    }

    pub fn attach_flow(&mut self, cid: Cid, connector: &str) -> FlowEnd {
        self.pipes.attach(&mut self.tunnel, cid, connector)
    }

    /// Apply a command: a flow's to its flow, the tunnel's own here.
    pub fn on_cmd(&mut self, now: Instant, cmd: LinkCmd<TunnelCmd>) {
        match cmd {
            LinkCmd::Flow { cid, msg } => self.pipes.on_flow(&mut self.tunnel, cid, msg),
            LinkCmd::Close { code, reason } => self.tunnel.close(code, &reason),
            LinkCmd::Link(cmd) => self.on_tunnel_cmd(now, cmd),
        }
    }

    fn on_tunnel_cmd(&mut self, now: Instant, cmd: TunnelCmd) {
        match cmd {
            TunnelCmd::Accept { epoch, replica_id } => {
                self.tunnel.accept_as(now, epoch, &replica_id)
            }
            TunnelCmd::Drain => {
                if !self.tunnel.send_drain() {
                    tracing::info!(
                        "v1 agent: no DRAIN frame; it moves when the drain closes its tunnel"
                    );
                }
            }
            TunnelCmd::OpenFlow { connector, reply } => {
                let res = match self.tunnel.open_flow(&connector) {
                    Ok(cid) => Ok(self.pipes.attach(&mut self.tunnel, cid, &connector)),
                    Err(e) => Err(self.open_refused(e, &connector)),
                };
                if let Err(async_channel::TrySendError::Closed(Ok(end))) = reply.try_send(res) {
                    // The client went away while we opened: abort the flow.
                    let reset = PeerMsg::Reset {
                        code: ErrorCode::ConnectionReset,
                        reason: "client closed before the flow opened".into(),
                    };
                    self.pipes.on_flow(&mut self.tunnel, end.cid, reset);
                }
            }
            TunnelCmd::OpenJoined {
                connector,
                peer,
                reply,
            } => match self.tunnel.open_flow(&connector) {
                Ok(cid) => {
                    self.pipes
                        .attach_joined(&mut self.tunnel, cid, &connector, peer);
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
                    let _ = reply.try_send(Err(self.open_refused(e, &connector)));
                }
            },
        }
    }

    /// Dispatch flow events to their sockets; return the tunnel-level
    /// events, and a copy of each flow's end (`Reset`, `Closed`: a node may
    /// be waiting on that flow).
    pub fn drain(&mut self) -> Vec<TunnelEvent> {
        let mut rest = Vec::new();
        while let Some(ev) = self.tunnel.poll_event() {
            match ev {
                TunnelEvent::Flow(fe) => {
                    if matches!(fe, FlowEvent::Reset { .. } | FlowEvent::Closed { .. }) {
                        rest.push(TunnelEvent::Flow(fe.clone()));
                    }
                    self.pipes.on_event(&mut self.tunnel, fe)
                }
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
