//! The simulated Redis: registry calls arriving after their latency, with
//! outages, slow replies and failovers that lose data.

use super::*;

impl World {
    /// A registry call from hub `hub` reaches Redis (or does not).
    pub(super) fn registry_arrive(
        &mut self,
        hub: usize,
        incarnation: u64,
        op: u64,
        call: RegistryOp,
    ) {
        let now = self.now;
        let result = if self.redis_down_until.is_some_and(|t| t > now) {
            Err(RegistryError::Unavailable("connection refused".into()))
        } else {
            let r = self.registry.apply(now, &call);
            if let (RegistryOp::Claim { agent_id, .. }, Ok(RegistryReply::Claimed(e))) = (&call, &r)
            {
                let prev = self.max_epoch.get(agent_id).copied().unwrap_or(Epoch(0));
                if *e <= prev {
                    self.fail(format!(
                        "registry handed out epoch {} for `{agent_id}` after epoch {}: epochs must only grow",
                        e.0, prev.0
                    ));
                }
                self.max_epoch.insert(agent_id.clone(), (*e).max(prev));
            }
            r
        };
        if self.held_until(Node::Redis, Node::Hub(hub)).is_some() {
            return; // the reply is lost; the hub times the call out
        }
        let mut d = self.latency();
        if self.chance(self.faults.redis_slow) {
            self.outcome.redis_slow_replies += 1;
            let t = self.hubs[hub].cfg.registry_timeout.as_micros() as u64;
            d += Duration::from_micros(self.rng.below(2 * t));
        }
        self.schedule(
            d,
            Event::RegistryReply {
                hub,
                incarnation,
                op,
                result,
            },
        );
    }
}
