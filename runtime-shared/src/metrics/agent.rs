//! The agent process's metrics: a registry of its own, served on the
//! agent's `http.bind` (`/metrics`), so an agent exports no hub series and a
//! hub none of the agent's.
//!
//! Every series is labelled by what the agent's configuration names (its
//! hub URLs, its connectors), never by what a hub sends: a hub that opens a
//! connector the agent does not serve creates no series. The series are
//! created at start, and the agent loop keeps their handles
//! ([`HubSeries`], [`ConnectorSeries`]), so counting never looks a label up
//! in the registry on the data path.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{Labels, Metrics, labels};
use crate::driver::FlowBytes;

/// What `nowconnect_agent_tunnels{hub,state}` counts, in this order.
pub const TUNNEL_STATES: [&str; 4] = ["connecting", "established", "draining", "backoff"];

/// A tunnel state of [`TUNNEL_STATES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelState {
    /// Its slot dials the hub (dial, handshake, waiting for WELCOME).
    Connecting = 0,
    /// Its slot's tunnel took WELCOME and carries new flows.
    Established = 1,
    /// Its hub said DRAIN: it carries its flows, no new ones.
    Draining = 2,
    /// Its slot waits to dial again after a failure.
    Backoff = 3,
}

/// Why a target dial failed (`reason` of
/// `nowconnect_agent_target_dial_errors_total`), a fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DialFailure {
    Refused = 0,
    Timeout = 1,
    Unreachable = 2,
    Other = 3,
}

impl DialFailure {
    pub const ALL: [DialFailure; 4] = [
        DialFailure::Refused,
        DialFailure::Timeout,
        DialFailure::Unreachable,
        DialFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DialFailure::Refused => "refused",
            DialFailure::Timeout => "timeout",
            DialFailure::Unreachable => "unreachable",
            DialFailure::Other => "other",
        }
    }

    /// The reason of a failed connect (name resolution failures are
    /// `other`).
    pub fn of(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => DialFailure::Refused,
            K::TimedOut => DialFailure::Timeout,
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                DialFailure::Unreachable
            }
            _ => DialFailure::Other,
        }
    }
}

/// The series of one configured hub URL.
pub struct HubSeries {
    pub reconnects: Counter,
    /// By [`TunnelState`].
    pub tunnels: [Gauge; 4],
}

/// The series of one configured connector.
pub struct ConnectorSeries {
    pub flows: Counter,
    pub flows_active: Gauge,
    /// Bytes from the hub to the target.
    pub bytes_up: Counter,
    /// Bytes from the target to the hub.
    pub bytes_down: Counter,
    /// By [`DialFailure`].
    pub dial_errors: [Counter; 4],
    pub dial_seconds: Histogram,
}

impl ConnectorSeries {
    /// The byte counters of a target socket: what it reads goes down to the
    /// hub, what it writes came up from it.
    pub fn target_bytes(&self) -> FlowBytes {
        FlowBytes {
            read: self.bytes_down.clone(),
            written: self.bytes_up.clone(),
        }
    }
}

/// Holds one open flow in `nowconnect_agent_flows_active` until dropped
/// (the flow's dial failed, or its socket task ended).
pub struct ActiveFlow(Gauge);

impl ActiveFlow {
    pub fn new(g: &Gauge) -> Self {
        g.inc();
        ActiveFlow(g.clone())
    }
}

impl Drop for ActiveFlow {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn dial_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ])
}

pub struct AgentMetrics {
    registry: Registry,
    tunnels: Family<Labels, Gauge>,
    /// Slots whose current tunnel is established (taking new flows).
    pub tunnels_established: Gauge,
    /// Tunnels the agent holds at once when all is well (`ha_connections`).
    pub tunnels_wanted: Gauge,
    /// Tunnels closed on their WELCOME because their hub already carried
    /// another of the agent's tunnels.
    pub duplicate_hub_tunnels: Counter,
    reconnects: Family<Labels, Counter>,
    flows: Family<Labels, Counter>,
    flows_active: Family<Labels, Gauge>,
    bytes: Family<Labels, Counter>,
    dial_errors: Family<Labels, Counter>,
    dial_seconds: HistogramFamily,
    /// What the shared link driver counts on the agent's tunnels (frames,
    /// flow gauges, RTT): the hub's kind of series, not exported by the
    /// agent, except its keepalive RTT
    /// (`nowconnect_agent_tunnel_rtt_seconds`).
    pub link: Arc<Metrics>,
}

impl AgentMetrics {
    /// The agent's registry, with the series of every hub URL and connector
    /// it is configured with created at zero.
    pub fn new(hubs: &[String], connectors: &[String]) -> Self {
        let link = Arc::new(Metrics::new());
        let mut m = AgentMetrics {
            registry: Registry::default(),
            tunnels: Family::default(),
            tunnels_established: Gauge::default(),
            tunnels_wanted: Gauge::default(),
            duplicate_hub_tunnels: Counter::default(),
            reconnects: Family::default(),
            flows: Family::default(),
            flows_active: Family::default(),
            bytes: Family::default(),
            dial_errors: Family::default(),
            dial_seconds: Family::new_with_constructor(dial_histogram),
            link,
        };
        let r = &mut m.registry;
        r.register(
            "nowconnect_agent_tunnels",
            "Agent tunnels by configured hub URL and state (connecting, established, draining, backoff): 1 per tunnel slot in that state, and 1 per tunnel whose hub said DRAIN",
            m.tunnels.clone(),
        );
        r.register(
            "nowconnect_agent_tunnels_established",
            "Tunnels established now, one per slot at most (a tunnel whose hub said DRAIN no longer counts)",
            m.tunnels_established.clone(),
        );
        r.register(
            "nowconnect_agent_tunnels_wanted",
            "Tunnels the agent holds at once when every slot is up (ha_connections)",
            m.tunnels_wanted.clone(),
        );
        r.register(
            "nowconnect_agent_duplicate_hub_tunnels",
            "Tunnels closed on their WELCOME because that hub already carried another of the agent's tunnels",
            m.duplicate_hub_tunnels.clone(),
        );
        r.register(
            "nowconnect_agent_reconnects",
            "Hub dials after a slot's first (after a failed dial, a lost tunnel or a DRAIN), by the hub URL dialed",
            m.reconnects.clone(),
        );
        r.register(
            "nowconnect_agent_flows",
            "Flows hubs opened for a configured connector (a flow whose target dial failed counts too)",
            m.flows.clone(),
        );
        r.register(
            "nowconnect_agent_flows_active",
            "Flows open now by connector: dialing their target or piped to it",
            m.flows_active.clone(),
        );
        r.register(
            "nowconnect_agent_bytes",
            "Flow payload bytes by connector and direction (up: from the hub to the target; down: from the target to the hub)",
            m.bytes.clone(),
        );
        r.register(
            "nowconnect_agent_target_dial_errors",
            "Target dials that failed, by connector and reason (refused, timeout, unreachable, other)",
            m.dial_errors.clone(),
        );
        r.register(
            "nowconnect_agent_target_dial_seconds",
            "Time to connect to a target, successful dials only, by connector",
            m.dial_seconds.clone(),
        );
        r.register(
            "nowconnect_agent_tunnel_rtt_seconds",
            "Tunnel keepalive round-trip time (ping to pong), all tunnels",
            m.link.tunnel_rtt.clone(),
        );
        for h in hubs {
            let _ = m.hub(h);
        }
        for c in connectors {
            let _ = m.connector(c);
        }
        m
    }

    /// The series of configured hub URL `hub` (created if new).
    pub fn hub(&self, hub: &str) -> HubSeries {
        HubSeries {
            reconnects: self
                .reconnects
                .get_or_create(&labels(&[("hub", hub)]))
                .clone(),
            tunnels: TUNNEL_STATES.map(|state| {
                self.tunnels
                    .get_or_create(&labels(&[("hub", hub), ("state", state)]))
                    .clone()
            }),
        }
    }

    /// The series of configured connector `c` (created if new).
    pub fn connector(&self, c: &str) -> ConnectorSeries {
        let one = |f: &Family<Labels, Counter>, extra: &[(&str, &str)]| {
            let mut l = vec![("connector", c)];
            l.extend_from_slice(extra);
            f.get_or_create(&labels(&l)).clone()
        };
        ConnectorSeries {
            flows: one(&self.flows, &[]),
            flows_active: self
                .flows_active
                .get_or_create(&labels(&[("connector", c)]))
                .clone(),
            bytes_up: one(&self.bytes, &[("dir", "up")]),
            bytes_down: one(&self.bytes, &[("dir", "down")]),
            dial_errors: DialFailure::ALL
                .map(|r| one(&self.dial_errors, &[("reason", r.as_str())])),
            dial_seconds: self
                .dial_seconds
                .get_or_create(&labels(&[("connector", c)]))
                .clone(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_series_exist_at_zero_and_no_hub_series_is_exported() {
        let m = AgentMetrics::new(&["ws://h:1/tunnel".into()], &["ldap".into()]);
        let text = m.render();
        for sample in [
            "nowconnect_agent_tunnels{hub=\"ws://h:1/tunnel\",state=\"connecting\"} 0",
            "nowconnect_agent_reconnects_total{hub=\"ws://h:1/tunnel\"} 0",
            "nowconnect_agent_flows_total{connector=\"ldap\"} 0",
            "nowconnect_agent_flows_active{connector=\"ldap\"} 0",
            "nowconnect_agent_bytes_total{connector=\"ldap\",dir=\"up\"} 0",
            "nowconnect_agent_target_dial_errors_total{connector=\"ldap\",reason=\"refused\"} 0",
            "nowconnect_agent_target_dial_errors_total{connector=\"ldap\",reason=\"other\"} 0",
            "nowconnect_agent_target_dial_seconds_count{connector=\"ldap\"} 0",
            "nowconnect_agent_tunnel_rtt_seconds_count 0",
            "nowconnect_agent_duplicate_hub_tunnels_total 0",
        ] {
            assert!(text.contains(sample), "{sample} missing in:\n{text}");
        }
        let foreign: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nowconnect_") && !l.starts_with("nowconnect_agent_"))
            .collect();
        assert!(foreign.is_empty(), "hub series on an agent: {foreign:?}");
    }

    #[test]
    fn an_active_flow_counts_until_dropped() {
        let m = AgentMetrics::new(&[], &["ldap".into()]);
        let s = m.connector("ldap");
        let a = ActiveFlow::new(&s.flows_active);
        let b = ActiveFlow::new(&s.flows_active);
        assert_eq!(s.flows_active.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(s.flows_active.get(), 0);
    }

    #[test]
    fn dial_failures_are_classified_into_the_fixed_set() {
        use std::io::{Error, ErrorKind};
        let of = |k| DialFailure::of(&Error::from(k)).as_str();
        assert_eq!(of(ErrorKind::ConnectionRefused), "refused");
        assert_eq!(of(ErrorKind::TimedOut), "timeout");
        assert_eq!(of(ErrorKind::HostUnreachable), "unreachable");
        assert_eq!(of(ErrorKind::NetworkUnreachable), "unreachable");
        assert_eq!(of(ErrorKind::NotFound), "other");
    }
}
