//! What a run did, counted.

use std::collections::BTreeMap;

/// Counts of what a run did, printed by the tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub hubs: u64,
    pub events: u64,
    pub flows_started: u64,
    pub flows_completed: u64,
    /// Flows that crossed the mesh (origin hub other than the owner).
    pub flows_via_mesh: u64,
    pub flows_reset: BTreeMap<&'static str, u64>,
    pub flows_refused: BTreeMap<&'static str, u64>,
    pub tunnel_resets: u64,
    pub mesh_resets: u64,
    pub partitions: u64,
    pub hub_crashes: u64,
    pub hub_drains: u64,
    /// Drains the hub's node ended with nothing left (before the grace).
    pub hub_drains_complete: u64,
    pub agent_restarts: u64,
    pub redis_outages: u64,
    pub redis_failovers: u64,
    pub redis_slow_replies: u64,
    pub malformed_frames: u64,
    /// Mesh opens the owner refused for a stale epoch (fencing at work).
    pub stale_epoch_refusals: u64,
    pub target_refusals: u64,
    pub client_resets: u64,
    pub half_closes: u64,
    pub slow_readers: u64,
    /// Times a flow's receive window doubled (`core/src/flow.rs`).
    pub windows_grown: u64,
    pub bytes_echoed: u64,
    /// HELLOs a hub refused because the token does not admit them.
    pub hellos_refused: u64,
    /// Flows of clients of the second tenant (`acme`), whose agents reuse
    /// the default tenant's agent ids and connector name.
    pub flows_other_tenant: u64,
    /// Renewed tokens (REAUTH) a hub took in place of the tunnel's current
    /// one, and ones it refused (another agent or tenant, a narrower scope),
    /// closing the tunnel.
    pub reauths_accepted: u64,
    pub reauths_refused: u64,
    /// Tunnels a hub closed because their token expired.
    pub token_expiries: u64,
    /// Of those, tunnels whose agent held a fresh token for itself, issued
    /// before the tunnel's token was due, that never reached the tunnel
    /// (the agent tracks the token it dials with: a tunnel it keeps, such as
    /// a draining one, is not sent a token a new dial picked up).
    pub expiries_with_fresh_token: u64,
    /// Tunnels a hub closed because their token was revoked there.
    pub revocations: u64,
    /// Hub dials refused at the upgrade: the token presented had expired or
    /// was revoked at that hub.
    pub upgrades_refused: u64,
    /// Owner-side bridges: mesh opens the agent's tunnel took, mesh opens
    /// refused because it did not (full, or gone), and tunnel flows reset
    /// because the mesh connection was lost before the join reached it.
    pub bridges_opened: u64,
    pub bridges_refused: u64,
    pub bridges_lost_before_join: u64,
    /// Agents holding two or three tunnels at once (`ha_connections`).
    pub agents_multi_homed: u64,
    /// Hub crashes that took a tunnel of a multi-homed agent whose other
    /// tunnel (on another hub) was established at that moment.
    pub crashes_survived_multi_homed: u64,
    pub trace_hash: u64,
}

impl Outcome {
    /// Add another run's counts to these (the trace hash is not summed).
    pub fn add(&mut self, o: &Outcome) {
        self.hubs += o.hubs;
        self.events += o.events;
        self.flows_started += o.flows_started;
        self.flows_completed += o.flows_completed;
        self.flows_via_mesh += o.flows_via_mesh;
        for (k, v) in &o.flows_reset {
            *self.flows_reset.entry(k).or_default() += v;
        }
        for (k, v) in &o.flows_refused {
            *self.flows_refused.entry(k).or_default() += v;
        }
        self.tunnel_resets += o.tunnel_resets;
        self.mesh_resets += o.mesh_resets;
        self.partitions += o.partitions;
        self.hub_crashes += o.hub_crashes;
        self.hub_drains += o.hub_drains;
        self.hub_drains_complete += o.hub_drains_complete;
        self.agent_restarts += o.agent_restarts;
        self.redis_outages += o.redis_outages;
        self.redis_failovers += o.redis_failovers;
        self.redis_slow_replies += o.redis_slow_replies;
        self.malformed_frames += o.malformed_frames;
        self.stale_epoch_refusals += o.stale_epoch_refusals;
        self.hellos_refused += o.hellos_refused;
        self.flows_other_tenant += o.flows_other_tenant;
        self.bridges_opened += o.bridges_opened;
        self.bridges_refused += o.bridges_refused;
        self.bridges_lost_before_join += o.bridges_lost_before_join;
        self.agents_multi_homed += o.agents_multi_homed;
        self.crashes_survived_multi_homed += o.crashes_survived_multi_homed;
        self.reauths_accepted += o.reauths_accepted;
        self.reauths_refused += o.reauths_refused;
        self.token_expiries += o.token_expiries;
        self.expiries_with_fresh_token += o.expiries_with_fresh_token;
        self.revocations += o.revocations;
        self.upgrades_refused += o.upgrades_refused;
        self.target_refusals += o.target_refusals;
        self.client_resets += o.client_resets;
        self.half_closes += o.half_closes;
        self.slow_readers += o.slow_readers;
        self.windows_grown += o.windows_grown;
        self.bytes_echoed += o.bytes_echoed;
    }
}
