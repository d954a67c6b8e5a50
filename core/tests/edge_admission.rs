//! A listener's edge, decided in core: the hub's client connection limit,
//! taken at accept by the node (before a PROXY header is read or the
//! client routed), and the PROXY-protocol edge (trusted sources only, a cap
//! on connections still sending their header). The adversary's view: a
//! party that can only reach a listener must not get past
//! `max_client_connections`, nor keep a slot once its connection is gone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nowconnect_core::admission::{EdgeDecision, EdgeRefusal, ProxyEdge, Refusal};
use nowconnect_core::hub::{Hub, HubConfig, HubOutput};
use nowconnect_core::hub_node::{ClientRefusal, DrainLeft, HubNode, NodeOutput};

mod common;
use common::origin;

const LIMIT: usize = 4;

fn node() -> HubNode {
    HubNode::new(Hub::new(origin(), HubConfig::default(), 7), LIMIT)
}

fn outputs(node: &mut HubNode) -> Vec<NodeOutput> {
    std::iter::from_fn(|| node.poll_output()).collect()
}

fn routes(outs: &[NodeOutput]) -> usize {
    outs.iter()
        .filter(|o| matches!(o, NodeOutput::Hub(HubOutput::Route { .. })))
        .count()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_burst_of_accepts_past_the_limit_is_refused_before_any_is_routed() {
    let mut n = node();
    let now = origin();
    let results: Vec<_> = (1..=LIMIT as u64 + 3)
        .map(|c| n.client_accepted(now, c))
        .collect();
    let taken = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(taken, LIMIT);
    assert!(
        results[LIMIT..]
            .iter()
            .all(|r| *r == Err(ClientRefusal::LimitExceeded)),
        "{results:?}"
    );
    assert_eq!(ClientRefusal::LimitExceeded.as_str(), "limit_exceeded");
    assert_eq!(n.client_flows(), LIMIT);
    // Nothing was routed: the limit held with every client still unrouted.
    assert_eq!(routes(&outputs(&mut n)), 0);
    // Routing the accepted ones takes no further slot.
    for c in 1..=LIMIT as u64 {
        n.client_connected(now, c, "acme/echo", None);
    }
    assert_eq!(routes(&outputs(&mut n)), LIMIT);
    assert_eq!(n.client_flows(), LIMIT);
    assert_eq!(
        n.client_accepted(now, 99),
        Err(ClientRefusal::LimitExceeded)
    );
}

#[test]
fn a_client_refused_later_frees_its_slot_exactly_once() {
    let mut n = node();
    let now = origin();
    for c in 1..=LIMIT as u64 {
        n.client_accepted(now, c).unwrap();
    }
    // Client 2 is refused at the listener (a bad PROXY header, the
    // listener's admission) before it is routed: its guard closes it.
    n.client_closed(now, 2);
    assert_eq!(n.client_flows(), LIMIT - 1);
    // Closing it again, or an unknown client, frees no one else's slot.
    n.client_closed(now, 2);
    n.client_closed(now, 1234);
    assert_eq!(n.client_flows(), LIMIT - 1);
    n.client_accepted(now, 10).unwrap();
    assert_eq!(
        n.client_accepted(now, 11),
        Err(ClientRefusal::LimitExceeded)
    );
    // An id taken again is not counted twice (nor refused).
    assert_eq!(n.client_accepted(now, 10), Ok(()));
    assert_eq!(n.client_flows(), LIMIT);
}

#[test]
fn a_drain_waits_for_accepted_clients_not_yet_routed() {
    let mut n = node();
    let now = origin();
    n.client_accepted(now, 1).unwrap();
    n.drain(now, Duration::ZERO, Duration::from_secs(30));
    let outs = outputs(&mut n);
    assert!(outs.contains(&NodeOutput::CloseListeners), "{outs:?}");
    assert!(
        !outs.iter().any(|o| matches!(o, NodeOutput::Drained { .. })),
        "over while a client was still reading its PROXY header: {outs:?}"
    );
    assert_eq!(
        n.drain_left(),
        DrainLeft {
            client_flows: 1,
            ..DrainLeft::default()
        }
    );
    let gone = now + Duration::from_secs(1);
    n.client_closed(gone, 1);
    assert_eq!(
        outputs(&mut n),
        vec![NodeOutput::Drained {
            complete: true,
            left: DrainLeft::default()
        }]
    );
}

#[test]
fn a_direct_listener_serves_every_source() {
    let mut e = ProxyEdge::direct();
    assert_eq!(e.arrive(false), EdgeDecision::Serve);
    assert_eq!(e.arrive(true), EdgeDecision::Serve);
    assert_eq!(e.pending(), 0);
}

#[test]
fn a_proxy_listener_refuses_untrusted_sources_without_counting_them() {
    let mut e = ProxyEdge::proxied(2);
    for _ in 0..100 {
        assert_eq!(
            e.arrive(false),
            EdgeDecision::Refuse(EdgeRefusal::UntrustedProxy)
        );
    }
    assert_eq!(e.pending(), 0);
    assert_eq!(e.arrive(true), EdgeDecision::ReadProxyHeader);
    assert_eq!(e.pending(), 1);
}

#[test]
fn headers_still_being_sent_are_capped_and_each_end_frees_one() {
    let mut e = ProxyEdge::proxied(3);
    for _ in 0..3 {
        assert_eq!(e.arrive(true), EdgeDecision::ReadProxyHeader);
    }
    assert_eq!(
        e.arrive(true),
        EdgeDecision::Refuse(EdgeRefusal::ProxyPending)
    );
    assert_eq!(e.pending(), 3, "a refusal takes nothing");
    e.header_ended();
    assert_eq!(e.arrive(true), EdgeDecision::ReadProxyHeader);
    assert_eq!(
        e.arrive(true),
        EdgeDecision::Refuse(EdgeRefusal::ProxyPending)
    );
    for _ in 0..3 {
        e.header_ended();
    }
    assert_eq!(e.pending(), 0);
}

#[test]
fn a_header_names_the_client_or_refuses_the_connection() {
    let proxy = addr("10.0.0.1:40000");
    assert_eq!(
        ProxyEdge::client_of::<()>(proxy, Ok(Some(addr("198.51.100.7:5000")))),
        Ok(addr("198.51.100.7:5000"))
    );
    // A health check of the balancer's own: served as the balancer.
    assert_eq!(ProxyEdge::client_of::<()>(proxy, Ok(None)), Ok(proxy));
    assert_eq!(
        ProxyEdge::client_of(proxy, Err("timed out")),
        Err((EdgeRefusal::ProxyHeader, "timed out"))
    );
}

#[test]
fn refusal_labels_are_distinct_and_stable() {
    let mut labels: Vec<&str> = EdgeRefusal::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels, ["untrusted_proxy", "proxy_pending", "proxy_header"]);
    labels.extend(Refusal::ALL.iter().map(|r| r.as_str()));
    labels.extend(ClientRefusal::ALL.iter().map(|r| r.as_str()));
    let n = labels.len();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), n, "{labels:?}");
}

/// A party that can only reach a proxy listener: floods it from an
/// untrusted address, then (as if through the balancer) opens connections
/// that never finish their header. The node's limit and the pending cap
/// both hold at every step; every slot comes back once the connections
/// are gone (the runtime's header timeout ends them).
#[test]
fn a_listener_flood_never_gets_past_the_limits_nor_keeps_its_slots() {
    let mut n = node();
    let mut e = ProxyEdge::proxied(2);
    let now: Instant = origin();
    let mut held = Vec::new();
    for c in 1..=1000u64 {
        let trusted = c % 2 == 0;
        if n.client_accepted(now, c).is_err() {
            continue;
        }
        match e.arrive(trusted) {
            EdgeDecision::ReadProxyHeader => held.push(c),
            EdgeDecision::Refuse(_) => n.client_closed(now, c),
            EdgeDecision::Serve => unreachable!("a proxy listener"),
        }
        assert!(n.client_flows() <= LIMIT);
        assert!(e.pending() <= 2);
    }
    assert_eq!(held.len(), 2);
    let later = now + Duration::from_secs(10);
    for c in held {
        e.header_ended();
        n.client_closed(later, c);
    }
    assert_eq!((n.client_flows(), e.pending()), (0, 0));
    assert!(n.client_accepted(later, 5000).is_ok());
}
