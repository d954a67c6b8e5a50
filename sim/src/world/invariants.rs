//! The invariants checked after every step, and violations.

use super::*;

/// A broken invariant, with what was seen.
#[derive(Debug)]
pub struct Violation(pub String);

impl World {
    pub(super) fn fail(&mut self, why: String) {
        if self.violation.is_none() {
            self.violation = Some(why);
        }
    }

    /// The invariants, after every step.
    pub(super) fn check(&self) -> Result<(), Violation> {
        if let Some(v) = &self.violation {
            return Err(Violation(v.clone()));
        }
        // Every peer speaks the protocol correctly (malformed frames are
        // rejected whole), so no flow may end for a credit or sequence
        // violation: that would be a bug in an endpoint.
        let mut codes = vec!["credit_overrun", "sequence_gap"];
        if self.outcome.malformed_frames == 0 {
            codes.push("protocol_error");
        }
        for code in codes {
            if let Some(n) = self.outcome.flows_reset.get(code) {
                return Err(Violation(format!(
                    "{n} flow(s) reset for `{code}` though every peer is correct"
                )));
            }
        }
        for (id, c) in &self.clients {
            if !c.data.starts_with(&c.received) {
                return Err(Violation(format!(
                    "client {id}: received bytes are not a prefix of what it sent ({} of {} bytes)",
                    c.received.len(),
                    c.data.len()
                )));
            }
            if c.fin_received && c.ended.is_none() && c.received.len() != c.sent {
                return Err(Violation(format!(
                    "client {id}: FIN after {} bytes echoed, {} sent: a silent gap",
                    c.received.len(),
                    c.sent
                )));
            }
        }
        for e in self.eps.values() {
            let (flows, dedup, mux, wake, bound, window, max_window) = match &e.link {
                Link::Tunnel(t) => (
                    t.flow_count(),
                    t.mux().dedup().len(),
                    t.mux(),
                    t.poll_timeout().map(|(at, w)| (at, format!("{w:?}"))),
                    self.tunnel_cfg.max_flows,
                    self.tunnel_cfg.window,
                    self.tunnel_cfg.max_window,
                ),
                Link::Mesh(m) => {
                    if m.queue_len() > 2 * self.mesh_cfg.send_queue_depth + 2
                        || m.inflight_bytes() > self.mesh_cfg.max_inflight_bytes
                    {
                        return Err(Violation(format!(
                            "a mesh link exceeds its bounds: queue {}, inflight {} bytes",
                            m.queue_len(),
                            m.inflight_bytes()
                        )));
                    }
                    (
                        m.flow_count(),
                        m.mux().dedup().len(),
                        m.mux(),
                        m.poll_timeout().map(|(at, w)| (at, format!("{w:?}"))),
                        self.mesh_cfg.max_flows,
                        self.mesh_cfg.window,
                        self.mesh_cfg.max_window,
                    )
                }
            };
            if flows > bound || dedup > bound {
                return Err(Violation(format!(
                    "a link exceeds its bounds: {flows} flows, {dedup} remembered closed flows"
                )));
            }
            // Windows grow (see `core/src/flow.rs`) within their maximum
            // and the link's growth budget; what a peer may still send never
            // exceeds the window as it stands.
            let mut growth = 0;
            for cid in mux.cids() {
                let f = mux.flow(cid).expect("listed");
                if f.recv_window() > u64::from(f.local_window()) {
                    return Err(Violation(format!(
                        "flow {cid}: receive window above the flow's window"
                    )));
                }
                if f.local_window() < window || f.local_window() > max_window {
                    return Err(Violation(format!(
                        "flow {cid}: window {} outside {window}..={max_window}",
                        f.local_window()
                    )));
                }
                growth += u64::from(f.local_window() - window);
            }
            if growth != mux.window_growth()
                || growth > GROWTH_BUDGET_WINDOWS * u64::from(max_window)
            {
                return Err(Violation(format!(
                    "window growth {growth} (link counts {}) beyond the budget",
                    mux.window_growth()
                )));
            }
            if let Some((at, why)) = wake
                && at < self.now
            {
                return Err(Violation(format!(
                    "a link asks to be woken in the past ({why})"
                )));
            }
        }
        for (i, h) in self.hubs.iter().enumerate().filter(|(_, h)| h.alive) {
            if let Some(at) = h.node.poll_timeout()
                && at < self.now
            {
                return Err(Violation(format!("hub {i} asks to be woken in the past")));
            }
        }
        for (i, a) in self.agents.iter().enumerate() {
            if let Some(at) = a.node.poll_timeout()
                && at < self.now
            {
                return Err(Violation(format!("agent {i} asks to be woken in the past")));
            }
        }
        Ok(())
    }
}
