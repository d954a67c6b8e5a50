//! Prometheus metrics (prometheus-client). Every metric name of DESIGN.md is
//! registered here, plus the flow, byte, tunnel and registry figures an
//! operator needs; `docs/operations.md` lists them. The agent process has a
//! registry of its own ([`agent::AgentMetrics`]).
//!
//! prometheus-client appends `_total` to counter names on export.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub mod agent;

pub type Labels = Vec<(String, String)>;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Add to `counter` what a growing core count gained since it was last
/// reported; `reported` remembers the count.
pub fn add_delta(counter: &Counter, now: u64, reported: &mut u64) {
    if now > *reported {
        counter.inc_by(now - *reported);
        *reported = now;
    }
}

/// [`add_delta`] for a core count per frame type, into `family{dir, type}`.
pub fn add_frame_deltas(
    family: &Family<Labels, Counter>,
    dir: &str,
    now: &std::collections::BTreeMap<nowconnect_core::FrameType, u64>,
    reported: &mut std::collections::BTreeMap<nowconnect_core::FrameType, u64>,
) {
    for (t, n) in now {
        let seen = reported.entry(*t).or_default();
        if *n > *seen {
            let c = family.get_or_create(&labels(&[("dir", dir), ("type", t.as_str())]));
            add_delta(&c, *n, seen);
        }
    }
}

/// When a busy link exports its core counters: the counters cost nothing
/// to keep, but each export looks labels up in the registry, which took
/// 5-8 % of a hub's CPU when it ran on every wake-up of a bulk flow
/// (`docs/performance.md`). The first activity after a quiet spell is
/// exported at once; more within [`Cadence::EVERY`] waits for the deadline,
/// which the link's timer includes.
#[derive(Debug, Default)]
pub struct Cadence {
    next: Option<std::time::Instant>,
    pending: bool,
}

impl Cadence {
    pub const EVERY: std::time::Duration = std::time::Duration::from_millis(250);

    /// After a wake-up: whether to export now.
    pub fn due(&mut self, now: std::time::Instant) -> bool {
        if self.next.is_none_or(|at| now >= at) {
            self.next = Some(now + Self::EVERY);
            self.pending = false;
            true
        } else {
            self.pending = true;
            false
        }
    }

    /// When an export is owed for activity held back.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.next.filter(|_| self.pending)
    }
}

pub struct Metrics {
    registry: Registry,
    // mesh (DESIGN.md names)
    pub mesh_links: Family<Labels, Gauge>,
    pub mesh_frames: Family<Labels, Counter>,
    pub mesh_rtt: Histogram,
    pub owner_epoch_mismatch: Counter,
    pub cid_dedup_dropped: Counter,
    pub flow_window_growths: Counter,
    pub mesh_backpressure_drops: Family<Labels, Counter>,
    pub mesh_link_reconnects: Counter,
    pub mesh_peers_departed: Counter,
    pub mesh_link_errors: Counter,
    pub mesh_link_queue_frames: Family<Labels, Gauge>,
    pub mesh_link_inflight_bytes: Family<Labels, Gauge>,
    /// Mesh wire bytes by peer and direction (the encoded frames).
    pub mesh_bytes: Family<Labels, Counter>,
    // tunnels and agents
    pub agents_connected: Gauge,
    pub tunnels: Family<Labels, Counter>,
    pub tunnel_frames: Family<Labels, Counter>,
    pub tunnel_rtt: Histogram,
    pub auth_failures: Family<Labels, Counter>,
    pub protocol_errors: Counter,
    // flows
    pub flows_active: Family<Labels, Gauge>,
    pub flows: Family<Labels, Counter>,
    pub flow_resets: Family<Labels, Counter>,
    pub bytes: Family<Labels, Counter>,
    pub client_connections_refused: Family<Labels, Counter>,
    /// Client flows closed by a timeout, by kind (`first_byte`, `idle`).
    pub client_timeouts: Family<Labels, Counter>,
    /// Flows refused on an agent's tunnel because the connector held its
    /// fair share of the agent's flows, by connector.
    pub connector_share_refusals: Family<Labels, Counter>,
    // registry and routing
    pub registry_healthy: Gauge,
    pub registry_errors: Counter,
    pub shadow_would_route: Family<Labels, Counter>,
    // operations
    pub config_reloads: Family<Labels, Counter>,
    /// Failed TLS handshakes on the HTTP port (`http.tls`), by reason
    /// (`error`, `timeout`).
    pub http_tls_handshake_failures: Family<Labels, Counter>,
    /// Refusals of a party holding a valid credential that tried to go
    /// beyond it, by kind ([`SECURITY_EVENT_KINDS`]).
    pub security_events: Family<Labels, Counter>,
}

/// Every kind of `nowconnect_security_events_total`, created at zero.
pub const SECURITY_EVENT_KINDS: &[&str] = &[
    "mesh_peer_certificate_mismatch",
    "mesh_peer_unexpected_replica",
    "mesh_peer_not_registered",
    "mesh_open_connector_not_served",
    "mesh_url_refused",
    "mesh_proxy_untrusted_source",
    "mesh_client_cert_header_refused",
    "tunnel_token_expired",
    "tunnel_revoked",
    "connector_outside_scope",
    "unscoped_token",
    "tunnel_duplicate_hello",
];

/// Reasons a client is refused before it is routed besides the protocol's
/// error codes and the core's edge refusals ([`EdgeRefusal`], [`Refusal`]),
/// created at zero.
///
/// [`EdgeRefusal`]: nowconnect_core::admission::EdgeRefusal
/// [`Refusal`]: nowconnect_core::admission::Refusal
pub const EDGE_REFUSALS: &[&str] = &[
    // Refused on the agent's tunnel: the connector held its fair share.
    "connector_share",
];

impl Metrics {
    /// Create the series whose label values are known in advance, at zero,
    /// so dashboards and alerts see values rather than gaps: refusals and
    /// resets by code, authentication failures by reason, tunnel results,
    /// and flows per configured connector and route.
    pub fn init_known_series(&self, connectors: &[String]) {
        for code in nowconnect_core::ErrorCode::ALL {
            let c = code.as_str();
            let _ = self
                .client_connections_refused
                .get_or_create(&labels(&[("reason", c)]));
            let _ = self.flow_resets.get_or_create(&labels(&[("code", c)]));
        }
        let edge = nowconnect_core::admission::EdgeRefusal::ALL.map(|r| r.as_str());
        let listener = nowconnect_core::admission::Refusal::ALL.map(|r| r.as_str());
        let node = nowconnect_core::hub_node::ClientRefusal::ALL.map(|r| r.as_str());
        for reason in EDGE_REFUSALS
            .iter()
            .chain(&edge)
            .chain(&listener)
            .chain(&node)
        {
            let _ = self
                .client_connections_refused
                .get_or_create(&labels(&[("reason", reason)]));
        }
        for kind in ["first_byte", "idle"] {
            let _ = self
                .client_timeouts
                .get_or_create(&labels(&[("kind", kind)]));
        }
        for reason in crate::jwt::AUTH_FAILURE_LABELS {
            let _ = self
                .auth_failures
                .get_or_create(&labels(&[("reason", reason)]));
        }
        for result in ["accepted", "refused", "closed"] {
            let _ = self.tunnels.get_or_create(&labels(&[("result", result)]));
        }
        for kind in SECURITY_EVENT_KINDS {
            let _ = self
                .security_events
                .get_or_create(&labels(&[("kind", kind)]));
        }
        for result in ["ok", "error"] {
            let _ = self
                .config_reloads
                .get_or_create(&labels(&[("result", result)]));
        }
        for c in connectors {
            let _ = self
                .flows_active
                .get_or_create(&labels(&[("connector", c)]));
            for route in ["local", "mesh"] {
                let _ = self
                    .flows
                    .get_or_create(&labels(&[("connector", c), ("route", route)]));
            }
        }
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            mesh_links: Family::default(),
            mesh_frames: Family::default(),
            // Fine below 1 ms (loopback and LAN meshes), coarse above; 20 ms
            // (the original SLO, used by the alert) is a bucket bound.
            mesh_rtt: Histogram::new([
                0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.0025, 0.005,
                0.01, 0.02, 0.05, 0.1, 0.5,
            ]),
            owner_epoch_mismatch: Counter::default(),
            cid_dedup_dropped: Counter::default(),
            flow_window_growths: Counter::default(),
            mesh_backpressure_drops: Family::default(),
            mesh_link_reconnects: Counter::default(),
            mesh_peers_departed: Counter::default(),
            mesh_link_errors: Counter::default(),
            mesh_link_queue_frames: Family::default(),
            mesh_link_inflight_bytes: Family::default(),
            mesh_bytes: Family::default(),
            agents_connected: Gauge::default(),
            tunnels: Family::default(),
            tunnel_frames: Family::default(),
            tunnel_rtt: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
            auth_failures: Family::default(),
            config_reloads: Family::default(),
            http_tls_handshake_failures: Family::default(),
            security_events: Family::default(),
            protocol_errors: Counter::default(),
            flows_active: Family::default(),
            flows: Family::default(),
            flow_resets: Family::default(),
            bytes: Family::default(),
            client_connections_refused: Family::default(),
            client_timeouts: Family::default(),
            connector_share_refusals: Family::default(),
            registry_healthy: Gauge::default(),
            registry_errors: Counter::default(),
            shadow_would_route: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "nowconnect_mesh_links",
            "Mesh peers by replica id and state (1 = the best state of the links to that peer: established if any is, else the outbound link's)",
            m.mesh_links.clone(),
        );
        r.register(
            "nowconnect_mesh_frames",
            "Mesh frames by direction and type",
            m.mesh_frames.clone(),
        );
        r.register(
            "nowconnect_mesh_rtt_seconds",
            "Mesh link round-trip time from ping/pong",
            m.mesh_rtt.clone(),
        );
        r.register(
            "nowconnect_owner_epoch_mismatch",
            "Opens, frames or renewals refused for a stale ownership epoch",
            m.owner_epoch_mismatch.clone(),
        );
        r.register(
            "nowconnect_cid_dedup_dropped",
            "Duplicate DATA frames dropped",
            m.cid_dedup_dropped.clone(),
        );
        r.register(
            "nowconnect_flow_window_growths",
            "Times a flow's receive window doubled because its sender kept waiting on credit (tunnel.max_window_bytes)",
            m.flow_window_growths.clone(),
        );
        r.register(
            "nowconnect_mesh_backpressure_drops",
            "Mesh sends refused for backpressure, by peer and reason (the flow waits; nothing is lost)",
            m.mesh_backpressure_drops.clone(),
        );
        r.register(
            "nowconnect_mesh_link_reconnects",
            "Mesh link reconnect attempts",
            m.mesh_link_reconnects.clone(),
        );
        r.register(
            "nowconnect_mesh_peers_departed",
            "Replicas that left the registry (absent from its listings for a whole lease); their mesh links were closed",
            m.mesh_peers_departed.clone(),
        );
        r.register(
            "nowconnect_mesh_link_errors",
            "Mesh link failures",
            m.mesh_link_errors.clone(),
        );
        r.register(
            "nowconnect_security_events",
            "Refusals of a credential holder going beyond its credential, by kind (mesh peer identity, connector scope, token expiry, revocation)",
            m.security_events.clone(),
        );
        r.register(
            "nowconnect_mesh_link_queue_frames",
            "Frames the mesh links to a peer hold for the socket (at most ha.mesh.send_queue_depth per link and queue, control and data; the socket writer holds a few hundred more)",
            m.mesh_link_queue_frames.clone(),
        );
        r.register(
            "nowconnect_mesh_link_inflight_bytes",
            "Bytes sent on the mesh links to a peer and not yet credited back",
            m.mesh_link_inflight_bytes.clone(),
        );
        r.register(
            "nowconnect_mesh_bytes",
            "Mesh bytes by peer and direction: the encoded mesh frames (WebSocket message payloads of every frame type, without WebSocket and TLS framing)",
            m.mesh_bytes.clone(),
        );
        r.register(
            "nowconnect_agents_connected",
            "Agent tunnels owned by this hub",
            m.agents_connected.clone(),
        );
        r.register(
            "nowconnect_tunnels",
            "Agent tunnels by result (accepted, refused, closed)",
            m.tunnels.clone(),
        );
        r.register(
            "nowconnect_tunnel_frames",
            "Tunnel frames by direction and type",
            m.tunnel_frames.clone(),
        );
        r.register(
            "nowconnect_tunnel_rtt_seconds",
            "Tunnel keepalive round-trip time",
            m.tunnel_rtt.clone(),
        );
        r.register(
            "nowconnect_tunnel_auth_failures",
            "Refused /tunnel requests by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "nowconnect_config_reloads",
            "Configuration reloads (SIGHUP or a watched file changed) by result",
            m.config_reloads.clone(),
        );
        r.register(
            "nowconnect_http_tls_handshake_failures",
            "TLS handshakes on the HTTP port (http.tls) that failed or did not complete within http.header_timeout_sec, by reason",
            m.http_tls_handshake_failures.clone(),
        );
        r.register(
            "nowconnect_protocol_errors",
            "Protocol violations by peers (flow or link closed)",
            m.protocol_errors.clone(),
        );
        r.register(
            "nowconnect_flows_active",
            "Open flows by connector",
            m.flows_active.clone(),
        );
        r.register(
            "nowconnect_flows",
            "Flows started by connector and route",
            m.flows.clone(),
        );
        r.register(
            "nowconnect_flow_resets",
            "Flows ended by reset, by code",
            m.flow_resets.clone(),
        );
        r.register(
            "nowconnect_bytes",
            "Flow payload bytes by direction (up: client to target)",
            m.bytes.clone(),
        );
        r.register(
            "nowconnect_client_connections_refused",
            "Client connections refused by reason",
            m.client_connections_refused.clone(),
        );
        r.register(
            "nowconnect_client_timeouts",
            "Client flows closed by a timeout, by kind (first_byte, idle)",
            m.client_timeouts.clone(),
        );
        r.register(
            "nowconnect_connector_share_refusals",
            "Flows refused because the connector held its fair share of the agent's flows (also in client_connections_refused, reason connector_share)",
            m.connector_share_refusals.clone(),
        );
        r.register(
            "nowconnect_registry_healthy",
            "1 when the registry answers",
            m.registry_healthy.clone(),
        );
        r.register(
            "nowconnect_registry_errors",
            "Registry calls that failed or timed out",
            m.registry_errors.clone(),
        );
        r.register(
            "nowconnect_shadow_would_route",
            "Shadow mode: the route active mode would have taken",
            m.shadow_would_route.clone(),
        );
        // Series that exist without any peer or traffic, so dashboards and
        // alerts see zeros instead of gaps. Per-peer series appear with peers.
        for dir in ["in", "out"] {
            for t in nowconnect_core::FrameType::ALL
                .iter()
                .filter(|t| t.is_mesh())
            {
                let _ = m
                    .mesh_frames
                    .get_or_create(&labels(&[("dir", dir), ("type", t.as_str())]));
            }
        }
        for dir in ["up", "down"] {
            let _ = m.bytes.get_or_create(&labels(&[("dir", dir)]));
        }
        for reason in ["error", "timeout"] {
            let _ = m
                .http_tls_handshake_failures
                .get_or_create(&labels(&[("reason", reason)]));
        }
        Metrics { registry, ..m }
    }

    /// Remove every series labelled with mesh peer `peer` (it left, or no
    /// link to it is left): link state, queue, inflight, backpressure and
    /// bytes.
    pub fn remove_mesh_peer(&self, peer: &str) {
        for st in nowconnect_core::mesh_link::LinkState::ALL {
            self.mesh_links
                .remove(&labels(&[("peer", peer), ("state", st.as_str())]));
        }
        self.mesh_link_queue_frames
            .remove(&labels(&[("peer", peer)]));
        self.mesh_link_inflight_bytes
            .remove(&labels(&[("peer", peer)]));
        for reason in nowconnect_core::mesh_link::BACKPRESSURE_REASONS {
            self.mesh_backpressure_drops
                .remove(&labels(&[("peer", peer), ("reason", reason)]));
        }
        for dir in ["in", "out"] {
            self.mesh_bytes
                .remove(&labels(&[("peer", peer), ("dir", dir)]));
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }

    /// The byte counters of a hub client's socket: what it reads goes up
    /// to the target, what it writes came down from it.
    pub fn client_bytes(&self) -> crate::driver::FlowBytes {
        crate::driver::FlowBytes {
            read: self.bytes.get_or_create(&labels(&[("dir", "up")])).clone(),
            written: self
                .bytes
                .get_or_create(&labels(&[("dir", "down")]))
                .clone(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
