//! Graceful drain: stop accepting, tell the agents, let flows finish. The
//! core's `HubNode` decides when the listeners close and when the drain is
//! over; this performs its steps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nowconnect_core::hub_node::NodeOutput;

use crate::rt::HubRt;

use super::Shared;

impl<R: HubRt> Shared<R> {
    /// Graceful drain: `/readyz` says `draining` and new tunnels are refused
    /// at once; every agent is told to move (DRAIN) and claims itself on
    /// another hub, while its flows here go on. Listeners keep taking
    /// clients for `shutdown_delay_sec`, then close. Returns when no client
    /// flow, no tunnel flow and no pending agent move is left, or when the
    /// grace period ends.
    pub(super) async fn drain(self: &Arc<Self>, listeners: Vec<R::Task>) {
        let raw = &self.cfg.raw;
        let start = Instant::now();
        let (delay, grace) = (
            Duration::from_secs(raw.shutdown_delay_sec),
            Duration::from_secs(raw.shutdown_grace_sec),
        );
        // What is open when the drain starts; its steps (the listeners'
        // close at once when there is no delay) are taken below, in order.
        let left = self.with_control(|c, now| {
            c.node.drain(now, delay, grace);
            c.node.drain_left()
        });
        tracing::info!(
            open_client_flows = left.client_flows,
            open_tunnel_flows = left.tunnel_flows,
            agents_to_move = left.agents_to_move,
            delay_sec = raw.shutdown_delay_sec,
            grace_sec = raw.shutdown_grace_sec,
            "draining"
        );
        let mut listeners = Some(listeners);
        while let Ok(step) = self.drain_steps.1.recv().await {
            match step {
                NodeOutput::CloseListeners => {
                    for l in listeners.take().into_iter().flatten() {
                        self.rt.abort(l);
                    }
                    tracing::info!("listeners closed");
                }
                NodeOutput::Drained {
                    complete: true,
                    left: _,
                } => {
                    tracing::info!(
                        elapsed_ms = start.elapsed().as_millis() as u64,
                        "drained: no flow left and every agent moved"
                    );
                    return;
                }
                NodeOutput::Drained {
                    complete: false,
                    left,
                } => {
                    tracing::warn!(
                        open_client_flows = left.client_flows,
                        open_tunnel_flows = left.tunnel_flows,
                        agents_not_moved = left.agents_to_move,
                        "grace period over; closing what is left"
                    );
                    return;
                }
                _ => {}
            }
        }
    }
}
