//! Property tests over a hub tunnel and an agent tunnel joined by the sim's
//! in-memory wires: for random interleavings of DATA, FIN, RST, credit
//! (consumption) and wire duplicates, every flow delivers exactly the bytes
//! sent, in order, or ends reset with a reason; never a silent gap.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nowconnect_core::dedup::DedupLru;
use nowconnect_core::mesh_link::{MeshEvent, MeshLink, MeshLinkConfig};
use nowconnect_core::mux::FlowEvent;
use nowconnect_core::rng::Rng;
use nowconnect_core::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
use nowconnect_core::{Cid, Codec, Epoch, ErrorCode, Frame, Limits, MeshHeader, WsMessage};
use nowconnect_sim::{Dir, Pair, VirtualClock};
use proptest::prelude::*;

#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    // Arbitrary origin of the virtual clock; only offsets from it are used.
    Instant::now()
}

#[derive(Clone, Debug)]
enum Op {
    /// Send `len` bytes on flow `flow` from the hub (true) or the agent side.
    Send {
        flow: usize,
        from_hub: bool,
        len: usize,
    },
    /// The receiving consumer drains up to `n` bytes.
    Consume {
        flow: usize,
        at_hub: bool,
        n: usize,
    },
    Fin {
        flow: usize,
        from_hub: bool,
    },
    Reset {
        flow: usize,
        from_hub: bool,
    },
    Deliver {
        to_agent: bool,
        count: usize,
    },
    /// Duplicate the DATA message at the head of a wire.
    DuplicateHead {
        to_agent: bool,
    },
}

fn op(flows: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..flows, any::<bool>(), 1usize..40_000).prop_map(|(flow, from_hub, len)| Op::Send { flow, from_hub, len }),
        4 => (0..flows, any::<bool>(), 1usize..80_000).prop_map(|(flow, at_hub, n)| Op::Consume { flow, at_hub, n }),
        1 => (0..flows, any::<bool>()).prop_map(|(flow, from_hub)| Op::Fin { flow, from_hub }),
        1 => (0..flows, any::<bool>()).prop_map(|(flow, from_hub)| Op::Reset { flow, from_hub }),
        6 => (any::<bool>(), 1usize..8).prop_map(|(to_agent, count)| Op::Deliver { to_agent, count }),
        1 => any::<bool>().prop_map(|to_agent| Op::DuplicateHead { to_agent }),
    ]
}

/// One direction of one flow, as the model sees it.
#[derive(Default, Debug)]
struct Half {
    sent: Vec<u8>,
    delivered: Vec<u8>,
    unconsumed: usize,
    fin_sent: bool,
    fin_seen: bool,
}

#[derive(Default, Debug)]
struct Model {
    /// [flow] → (hub→agent half, agent→hub half)
    halves: Vec<(Half, Half)>,
    hub_cids: Vec<Cid>,
    sent_counter: u8,
    duplicates_injected: u64,
    /// cid → true once the agent side saw OPEN
    agent_open: BTreeMap<Cid, bool>,
    /// A flow reset locally or remotely (either side) ends both halves.
    reset: Vec<Option<ErrorCode>>,
}

fn drain_events(p: &mut Pair<Tunnel, Tunnel>, m: &mut Model) {
    // a = hub, b = agent
    while let Some(e) = p.a.poll_event() {
        on_event(m, true, e);
    }
    while let Some(e) = p.b.poll_event() {
        on_event(m, false, e);
    }
}

fn flow_of(m: &Model, cid: Cid) -> usize {
    m.hub_cids
        .iter()
        .position(|c| *c == cid)
        .expect("known cid")
}

fn on_event(m: &mut Model, at_hub: bool, e: TunnelEvent) {
    match e {
        TunnelEvent::Open { cid, .. } => {
            m.agent_open.insert(cid, true);
        }
        TunnelEvent::Flow(fe) => match fe {
            FlowEvent::Data { cid, payload } => {
                let f = flow_of(m, cid);
                let half = if at_hub {
                    &mut m.halves[f].1
                } else {
                    &mut m.halves[f].0
                };
                assert!(!half.fin_seen, "data after FIN delivered on flow {f}");
                half.delivered.extend_from_slice(&payload);
                half.unconsumed += payload.len();
                assert!(
                    half.sent.starts_with(&half.delivered),
                    "flow {f}: delivered bytes are not a prefix of the sent bytes"
                );
            }
            FlowEvent::Fin { cid } => {
                let f = flow_of(m, cid);
                let half = if at_hub {
                    &mut m.halves[f].1
                } else {
                    &mut m.halves[f].0
                };
                assert_eq!(
                    half.delivered, half.sent,
                    "flow {f}: FIN delivered with a gap"
                );
                half.fin_seen = true;
            }
            FlowEvent::Reset { cid, code, reason } => {
                let f = flow_of(m, cid);
                assert!(
                    !reason.is_empty() || code == ErrorCode::Normal,
                    "reset without a reason"
                );
                m.reset[f].get_or_insert(code);
            }
            FlowEvent::Writable { .. } | FlowEvent::Closed { .. } => {}
        },
        TunnelEvent::Closed { code, reason } => panic!("tunnel closed: {code} {reason}"),
        TunnelEvent::Hello { .. }
        | TunnelEvent::Established { .. }
        | TunnelEvent::Rtt(_)
        | TunnelEvent::Drain
        | TunnelEvent::Reauth { .. } => {}
    }
}

fn established_pair(flows: usize, window: u32) -> (Pair<Tunnel, Tunnel>, Model) {
    let clock = VirtualClock::new(origin());
    let cfg = TunnelConfig {
        window,
        ..TunnelConfig::default()
    };
    let hub = Tunnel::hub(clock.now(), cfg.clone());
    let agent = Tunnel::agent(clock.now(), cfg, "agent-1", &["ldap".to_string()]);
    // a = hub, b = agent
    let mut p = Pair::new(hub, agent, clock);
    assert!(p.run_until_idle(100));
    assert!(matches!(p.a.poll_event(), Some(TunnelEvent::Hello { .. })));
    let now = p.now();
    p.a.accept(now, Epoch(1));
    p.collect();
    assert!(p.run_until_idle(100));
    assert!(p.b.is_established() && p.a.is_established());
    assert_eq!(p.b.codec(), Codec::V2);
    let mut m = Model::default();
    for _ in 0..flows {
        let cid = p.a.open_flow("ldap").unwrap();
        m.hub_cids.push(cid);
        m.halves.push((Half::default(), Half::default()));
        m.reset.push(None);
    }
    p.collect();
    drain_events(&mut p, &mut m);
    (p, m)
}

fn apply(p: &mut Pair<Tunnel, Tunnel>, m: &mut Model, op: &Op) {
    match *op {
        Op::Send {
            flow,
            from_hub,
            len,
        } => {
            let cid = m.hub_cids[flow];
            if !from_hub && !m.agent_open.contains_key(&cid) {
                return;
            }
            let t = if from_hub { &mut p.a } else { &mut p.b };
            let credit = t.send_credit(cid) as usize;
            let len = len.min(credit);
            if len == 0 {
                return;
            }
            m.sent_counter = m.sent_counter.wrapping_add(1);
            let base = m.sent_counter;
            let bytes: Vec<u8> = (0..len)
                .map(|i| base.wrapping_add((i % 251) as u8))
                .collect();
            t.send_data(cid, Bytes::from(bytes.clone()))
                .expect("within credit");
            let half = if from_hub {
                &mut m.halves[flow].0
            } else {
                &mut m.halves[flow].1
            };
            half.sent.extend_from_slice(&bytes);
        }
        Op::Consume { flow, at_hub, n } => {
            let cid = m.hub_cids[flow];
            let half = if at_hub {
                &mut m.halves[flow].1
            } else {
                &mut m.halves[flow].0
            };
            let n = n.min(half.unconsumed);
            if n == 0 {
                return;
            }
            half.unconsumed -= n;
            let t = if at_hub { &mut p.a } else { &mut p.b };
            t.consumed(cid, n);
        }
        Op::Fin { flow, from_hub } => {
            let cid = m.hub_cids[flow];
            if !from_hub && !m.agent_open.contains_key(&cid) {
                return;
            }
            let t = if from_hub { &mut p.a } else { &mut p.b };
            if t.mux().contains(cid) && t.send_fin(cid).is_ok() {
                let half = if from_hub {
                    &mut m.halves[flow].0
                } else {
                    &mut m.halves[flow].1
                };
                half.fin_sent = true;
            }
        }
        Op::Reset { flow, from_hub } => {
            let cid = m.hub_cids[flow];
            let t = if from_hub { &mut p.a } else { &mut p.b };
            if t.mux().contains(cid) {
                t.reset_flow(cid, ErrorCode::ConnectionReset, "test reset");
                m.reset[flow].get_or_insert(ErrorCode::ConnectionReset);
            }
        }
        Op::Deliver { to_agent, count } => {
            let dir = if to_agent { Dir::AToB } else { Dir::BToA };
            for _ in 0..count {
                if !p.deliver_one(dir) {
                    break;
                }
                drain_events(p, m);
            }
        }
        Op::DuplicateHead { to_agent } => {
            let dir = if to_agent { Dir::AToB } else { Dir::BToA };
            let wire = p.wire(dir);
            if let Some(WsMessage::Binary(b)) = wire.front()
                && b.first() == Some(&0x04)
            {
                let dup = wire.front().cloned().expect("head");
                wire.push_front(dup);
                m.duplicates_injected += 1;
            }
        }
    }
    p.collect();
    drain_events(p, m);
}

/// Drain everything: consume all, FIN every open half, deliver until quiet.
fn finish(p: &mut Pair<Tunnel, Tunnel>, m: &mut Model) {
    for _ in 0..10_000 {
        let mut progressed = false;
        for flow in 0..m.hub_cids.len() {
            for at_hub in [true, false] {
                let half = if at_hub {
                    &m.halves[flow].1
                } else {
                    &m.halves[flow].0
                };
                if half.unconsumed > 0 {
                    apply(
                        p,
                        m,
                        &Op::Consume {
                            flow,
                            at_hub,
                            n: usize::MAX,
                        },
                    );
                    progressed = true;
                }
            }
            for from_hub in [true, false] {
                let half = if from_hub {
                    &m.halves[flow].0
                } else {
                    &m.halves[flow].1
                };
                if !half.fin_sent && m.reset[flow].is_none() {
                    let before = half.fin_sent;
                    apply(p, m, &Op::Fin { flow, from_hub });
                    let half = if from_hub {
                        &m.halves[flow].0
                    } else {
                        &m.halves[flow].1
                    };
                    progressed |= half.fin_sent != before;
                }
            }
        }
        while p.deliver_one(Dir::AToB) || p.deliver_one(Dir::BToA) {
            drain_events(p, m);
            progressed = true;
        }
        if !progressed {
            return;
        }
    }
    panic!("did not converge");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn flows_deliver_exactly_or_reset(ops in prop::collection::vec(op(4), 1..200), window in 1024u32..200_000) {
        let (mut p, mut m) = established_pair(4, window);
        for o in &ops {
            apply(&mut p, &mut m, o);
        }
        finish(&mut p, &mut m);
        for f in 0..m.hub_cids.len() {
            if m.reset[f].is_some() {
                continue;
            }
            for (name, half) in [("hub→agent", &m.halves[f].0), ("agent→hub", &m.halves[f].1)] {
                prop_assert!(half.fin_seen, "flow {} {}: neither complete nor reset", f, name);
                prop_assert_eq!(&half.delivered, &half.sent, "flow {} {}", f, name);
            }
        }
        // Injected duplicates were dropped and counted, never delivered.
        let dropped = p.a.mux().stats.duplicates_dropped + p.b.mux().stats.duplicates_dropped;
        prop_assert!(dropped <= m.duplicates_injected);
        // Credit is never negative and never above the window.
        for t in [&p.a, &p.b] {
            for cid in t.mux().cids() {
                prop_assert!(t.mux().flow(cid).unwrap().recv_window() <= u64::from(window));
            }
        }
    }

    #[test]
    fn dedup_lru_never_exceeds_its_bound(cap in 1usize..64, ops in prop::collection::vec(((0u64..200).prop_map(Cid), 0u64..50), 0..500)) {
        let mut lru = DedupLru::new(cap);
        for (cid, received) in ops {
            lru.record(cid, received);
            prop_assert!(lru.len() <= cap);
            prop_assert!(lru.contains(cid), "most recent entry evicted");
            prop_assert!(lru.is_duplicate(cid, received.saturating_sub(1)) == (received > 0));
            prop_assert!(!lru.is_duplicate(cid, received));
        }
    }

    #[test]
    fn stale_epoch_frames_never_reach_a_socket(
        frames in prop::collection::vec((0u64..4, 0usize..3, prop::collection::vec(any::<u8>(), 1..64)), 1..60)
    ) {
        let (mut p, cid, epoch) = established_mesh();
        let mut next_seq = 0u64;
        for (epoch_pick, kind, data) in frames {
            // Epoch 2 is the flow's; others are stale.
            let e = Epoch(epoch_pick + 1);
            let h = MeshHeader { cid, connector: "ldap".into(), agent_id: "agent-1".into(), seq: next_seq, epoch: e };
            let frame = match kind {
                0 => Frame::MData { h, payload: Bytes::from(data) },
                1 => Frame::MCredit { h, bytes: 10 },
                _ => Frame::MData { h, payload: Bytes::from(data) },
            };
            let msg = Codec::V2.encode(&frame, &Limits::default()).unwrap();
            let now = p.now();
            // b is the owner side here.
            p.b.handle_message(now, &msg);
            let mut data_events = 0;
            let mut stale_events = 0;
            while let Some(ev) = p.b.poll_event() {
                match ev {
                    MeshEvent::Flow(FlowEvent::Data { .. }) => data_events += 1,
                    MeshEvent::StaleEpoch { .. } => stale_events += 1,
                    _ => {}
                }
            }
            let flow_alive = p.b.mux().contains(cid);
            if e != epoch {
                prop_assert_eq!(data_events, 0, "a stale-epoch frame produced a socket write");
                if stale_events > 0 {
                    prop_assert!(!flow_alive, "flow survived a stale frame");
                }
            } else if kind != 1 && data_events == 1 {
                next_seq += 1;
            }
            if !flow_alive {
                break;
            }
        }
    }
}

fn established_mesh() -> (Pair<MeshLink, MeshLink>, Cid, Epoch) {
    let clock = VirtualClock::new(origin());
    let cfg = MeshLinkConfig::default();
    let now = clock.now();
    let mut origin_side = MeshLink::outbound(now, cfg.clone(), "hub-b", Rng::new(1));
    assert_eq!(origin_side.poll_event(), Some(MeshEvent::Connect));
    origin_side.on_connected(now, Codec::V2);
    let owner = MeshLink::inbound(now, cfg, "hub-a", Codec::V2, Rng::new(2));
    let mut p = Pair::new(origin_side, owner, clock);
    assert!(p.run_until_idle(100));
    while p.a.poll_event().is_some() {}
    while p.b.poll_event().is_some() {}
    let epoch = Epoch(2);
    let cid = p.a.open_flow("ldap", "agent-1", epoch).unwrap();
    p.collect();
    assert!(p.run_until_idle(100));
    match p.b.poll_event() {
        Some(MeshEvent::Open {
            cid: c, epoch: e, ..
        }) => {
            assert_eq!((c, e), (cid, epoch));
            p.b.accept_open(c);
        }
        other => panic!("{other:?}"),
    }
    p.collect();
    assert!(p.run_until_idle(100));
    assert_eq!(p.a.poll_event(), Some(MeshEvent::OpenAccepted { cid }));
    (p, cid, epoch)
}

#[test]
fn keepalive_measures_rtt_and_idle_peer_is_closed() {
    let (mut p, _m) = established_pair(1, 65536);
    p.advance(Duration::from_secs(16));
    let mut rtts = 0;
    while let Some(e) = p.a.poll_event() {
        if matches!(e, TunnelEvent::Rtt(_)) {
            rtts += 1;
        }
    }
    assert!(rtts >= 1, "no RTT sample after a ping interval");
    // Stop delivering: the agent's idle timer fires and the tunnel closes.
    let now = p.now() + Duration::from_secs(46);
    p.b.handle_timeout(now);
    let mut closed = None;
    while let Some(e) = p.b.poll_event() {
        if let TunnelEvent::Closed { code, .. } = e {
            closed = Some(code);
        }
    }
    assert_eq!(closed, Some(ErrorCode::IdleTimeout));
}
