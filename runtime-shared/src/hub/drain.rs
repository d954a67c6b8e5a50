//! Graceful drain: stop accepting, tell the agents, let flows finish.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
        self.draining.store(true, Ordering::Relaxed);
        self.with_control(|c, now| c.node.hub_mut().drain(now));
        let raw = &self.cfg.raw;
        let start = Instant::now();
        let deadline = start + Duration::from_secs(raw.shutdown_grace_sec);
        let (clients, flows, moves) = self.drain_state();
        tracing::info!(
            open_client_flows = clients,
            open_tunnel_flows = flows,
            agents_to_move = moves,
            delay_sec = raw.shutdown_delay_sec,
            grace_sec = raw.shutdown_grace_sec,
            "draining"
        );
        self.rt
            .sleep(Duration::from_secs(raw.shutdown_delay_sec))
            .await;
        for l in listeners {
            self.rt.abort(l);
        }
        tracing::info!("listeners closed");
        loop {
            let (clients, flows, moves) = self.drain_state();
            if clients == 0 && flows == 0 && moves == 0 {
                tracing::info!(
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    "drained: no flow left and every agent moved"
                );
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    open_client_flows = clients,
                    open_tunnel_flows = flows,
                    agents_not_moved = moves,
                    "grace period over; closing what is left"
                );
                return;
            }
            self.rt.sleep(Duration::from_millis(50)).await;
        }
    }

    /// (client flows, flows on this hub's tunnels, agents told to move that
    /// are not owned elsewhere yet).
    fn drain_state(&self) -> (usize, usize, usize) {
        let c = self.control.lock().expect("control lock");
        (
            self.active_clients.load(Ordering::Relaxed),
            c.node.hub().open_tunnel_flows(),
            c.node.hub().moves_pending(),
        )
    }
}
