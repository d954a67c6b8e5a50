//! `MeshLinks`' per-peer series: one set per identified peer, its best link
//! state, removed when no link is left and at once on departure, and never
//! brought back by a late report of a departed peer's link.

use nowconnect_core::mesh_link::LinkState;
use nowconnect_shared::driver::{LinkCmd, MeshCmd};
use nowconnect_shared::mesh::{LinkId, LinkReport, MeshLinks};
use nowconnect_shared::metrics::Metrics;

fn report(peer: Option<&str>, outbound: bool, state: LinkState, queue: usize) -> LinkReport {
    LinkReport {
        peer: peer.map(str::to_string),
        outbound,
        state,
        queue_frames: queue,
        inflight_bytes: 0,
    }
}

fn tx() -> async_channel::Sender<LinkCmd<MeshCmd>> {
    async_channel::unbounded().0
}

/// The `nowconnect_mesh_*` samples that carry a `peer` label.
fn peer_samples(m: &Metrics) -> Vec<String> {
    m.render()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("peer=\""))
        .map(str::to_string)
        .collect()
}

fn state_of(m: &Metrics, peer: &str) -> Vec<String> {
    m.render()
        .lines()
        .filter(|l| l.starts_with(&format!("nowconnect_mesh_links{{peer=\"{peer}\"")))
        .filter(|l| l.ends_with(" 1"))
        .map(str::to_string)
        .collect()
}

#[test]
fn one_series_set_per_peer_with_its_best_state_and_none_before_it_is_identified() {
    let m = Metrics::new();
    let mut links = MeshLinks::default();
    let (out, inb, anon) = (LinkId(1), LinkId(2), LinkId(3));
    // An inbound link before its M_HELLO: nothing.
    links.report(
        &m,
        anon,
        report(None, false, LinkState::Connecting, 0),
        tx(),
        |_, _| {},
    );
    assert!(peer_samples(&m).is_empty(), "{:?}", peer_samples(&m));
    // The outbound link to hub-b backs off: hub-b is down.
    links.report(
        &m,
        out,
        report(Some("hub-b"), true, LinkState::Backoff, 2),
        tx(),
        |_, _| {},
    );
    assert_eq!(
        state_of(&m, "hub-b"),
        ["nowconnect_mesh_links{peer=\"hub-b\",state=\"backoff\"} 1"]
    );
    // hub-b's inbound link is established: hub-b is established, once.
    let mut counted = Vec::new();
    links.report(
        &m,
        inb,
        report(Some("hub-b"), false, LinkState::Established, 3),
        tx(),
        |_, p| counted.push(p.to_string()),
    );
    assert_eq!(counted, ["hub-b"]);
    assert_eq!(
        state_of(&m, "hub-b"),
        ["nowconnect_mesh_links{peer=\"hub-b\",state=\"established\"} 1"]
    );
    assert!(
        m.render()
            .contains("nowconnect_mesh_link_queue_frames{peer=\"hub-b\"} 5")
    );
    // The inbound link closes: the outbound link's state again.
    links.report(
        &m,
        inb,
        report(Some("hub-b"), false, LinkState::Closed, 0),
        tx(),
        |_, _| {},
    );
    links.gone(&m, inb);
    assert_eq!(
        state_of(&m, "hub-b"),
        ["nowconnect_mesh_links{peer=\"hub-b\",state=\"backoff\"} 1"]
    );
    // No link left: no series.
    links.gone(&m, out);
    assert!(peer_samples(&m).is_empty(), "{:?}", peer_samples(&m));
    assert_eq!(links.exported().count(), 0);
}

#[test]
fn a_departed_peer_loses_its_series_at_once_and_a_late_report_brings_none_back() {
    let m = Metrics::new();
    let mut links = MeshLinks::default();
    let (configured, other) = (LinkId(7), LinkId(8));
    links.report(
        &m,
        configured,
        report(Some("hub-c"), true, LinkState::Established, 0),
        tx(),
        |_, _| {},
    );
    links.report(
        &m,
        other,
        report(Some("hub-b"), true, LinkState::Established, 0),
        tx(),
        |_, _| {},
    );
    let closing = links.departed(&m, "hub-c");
    assert_eq!(closing.len(), 1, "the link task to hub-c is told to close");
    assert!(
        peer_samples(&m).iter().all(|l| !l.contains("hub-c")),
        "{:?}",
        peer_samples(&m)
    );
    // Its configured link redials with backoff: no series, no counters.
    let mut counted = false;
    links.report(
        &m,
        configured,
        report(Some("hub-c"), true, LinkState::Backoff, 0),
        tx(),
        |_, _| counted = true,
    );
    assert!(!counted);
    assert!(peer_samples(&m).iter().all(|l| !l.contains("hub-c")));
    // Registered again: back, in its current state.
    links.registered(&m, "hub-c");
    assert_eq!(
        state_of(&m, "hub-c"),
        ["nowconnect_mesh_links{peer=\"hub-c\",state=\"backoff\"} 1"]
    );
    // hub-b was never touched.
    assert_eq!(
        state_of(&m, "hub-b"),
        ["nowconnect_mesh_links{peer=\"hub-b\",state=\"established\"} 1"]
    );
}
