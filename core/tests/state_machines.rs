//! Edge cases of the tunnel, mesh link, hub and agent state machines.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use nowconnect_core::agent::{Agent, AgentConfig, AgentOutput, AttemptId, HubLinkState};
use nowconnect_core::hub::{Hub, HubConfig, HubOutput, TunnelId};
use nowconnect_core::mesh_link::{LinkState, MeshEvent, MeshLink, MeshLinkConfig};
use nowconnect_core::mux::FlowEvent;
use nowconnect_core::registry::{MemoryRegistry, RegistryError, RegistryOp, RegistryReply};
use nowconnect_core::rng::Rng;
use nowconnect_core::routing::{Mode, Route};
use nowconnect_core::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
use nowconnect_core::{Cid, Codec, Epoch, ErrorCode, Frame, Limits, WsMessage};

mod common;
use common::origin;

fn v1(f: &Frame) -> WsMessage {
    Codec::V1.encode(f, &Limits::default()).unwrap()
}

fn v2(f: &Frame) -> WsMessage {
    Codec::V2.encode(f, &Limits::default()).unwrap()
}

fn events(t: &mut Tunnel) -> Vec<TunnelEvent> {
    std::iter::from_fn(|| t.poll_event()).collect()
}

fn transmits(t: &mut Tunnel) -> Vec<Frame> {
    std::iter::from_fn(|| t.poll_transmit())
        .map(|m| nowconnect_core::codec::decode(&m, &Limits::default()).unwrap())
        .collect()
}

fn hello(codecs: &[&str]) -> Frame {
    Frame::Hello {
        slot: 0,
        slots: 1,
        agent_id: "a1".into(),
        connectors: vec!["ldap".into()],
        codecs: codecs.iter().map(|s| s.to_string()).collect(),
        window: 0,
    }
}

/// A hub tunnel after HELLO and accept, with `flows` flows opened.
fn hub_tunnel(codecs: &[&str], flows: usize) -> (Tunnel, Vec<Cid>) {
    let now = origin();
    let mut t = Tunnel::hub(now, TunnelConfig::default());
    t.handle_message(now, &v1(&hello(codecs)));
    assert!(matches!(events(&mut t)[..], [TunnelEvent::Hello { .. }]));
    t.accept(now, Epoch(3));
    let cids = (0..flows).map(|_| t.open_flow("ldap").unwrap()).collect();
    transmits(&mut t);
    events(&mut t);
    (t, cids)
}

/// An agent tunnel of `cfg` after its hub's WELCOME (v2, epoch 1), with
/// nothing left to send or report.
fn welcomed_agent(cfg: TunnelConfig) -> Tunnel {
    let now = origin();
    let mut t = Tunnel::agent(now, cfg, "a1", &["ldap".into()]);
    transmits(&mut t);
    t.handle_message(
        now,
        &v1(&Frame::Welcome {
            replica_id: String::new(),
            epoch: Epoch(1),
            codec: "v2".into(),
            window: 0,
            max_frame: 0,
        }),
    );
    events(&mut t);
    transmits(&mut t);
    t
}

#[test]
fn v1_only_agent_gets_v1() {
    let (mut t, cids) = hub_tunnel(&[], 1);
    assert_eq!(t.codec(), Codec::V1);
    t.send_data(cids[0], Bytes::from_static(b"x")).unwrap();
    assert!(matches!(t.poll_transmit(), Some(WsMessage::Text(_))));
    let (t2, _) = hub_tunnel(&["v2", "v1"], 0);
    assert_eq!(t2.codec(), Codec::V2);
}

#[test]
fn frames_before_hello_and_second_hello_close_the_tunnel() {
    let now = origin();
    let mut t = Tunnel::hub(now, TunnelConfig::default());
    t.handle_message(
        now,
        &v1(&Frame::Data {
            cid: Cid(1),
            seq: 0,
            payload: Bytes::from_static(b"x"),
        }),
    );
    match events(&mut t).last() {
        Some(TunnelEvent::Closed { code, reason }) => {
            assert_eq!(*code, ErrorCode::ProtocolError);
            assert!(
                reason.contains("unexpected DATA in state await-hello"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    let (mut t, _) = hub_tunnel(&["v2"], 0);
    t.handle_message(now, &v1(&hello(&[])));
    assert!(
        matches!(events(&mut t).last(), Some(TunnelEvent::Closed { code: ErrorCode::ProtocolError, reason }) if reason.contains("HELLO"))
    );
}

#[test]
fn malformed_frame_closes_with_a_precise_reason() {
    let (mut t, _) = hub_tunnel(&["v2"], 1);
    t.handle_message(
        origin(),
        &WsMessage::Text(r#"{"type":"DATA","cid":1,"seq":0,"b64":"!!"}"#.into()),
    );
    match events(&mut t).as_slice() {
        [
            TunnelEvent::Flow(FlowEvent::Reset {
                code: ErrorCode::LinkLost,
                ..
            }),
            TunnelEvent::Closed { reason, .. },
        ] => {
            assert!(
                reason.contains("malformed frame") && reason.contains("base64"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    let (mut t, _) = hub_tunnel(&["v2"], 0);
    t.handle_message(
        origin(),
        &WsMessage::Binary(Bytes::from(vec![4u8; 2 * 1024 * 1024])),
    );
    assert!(matches!(
        events(&mut t).last(),
        Some(TunnelEvent::Closed {
            code: ErrorCode::FrameTooLarge,
            ..
        })
    ));
}

#[test]
fn protocol_errors_reset_only_the_offending_flow() {
    let (mut t, cids) = hub_tunnel(&["v2"], 3);
    let now = origin();
    // DATA for a cid that never existed: RST back, tunnel stays up.
    t.handle_message(
        now,
        &v2(&Frame::Data {
            cid: Cid(99),
            seq: 0,
            payload: Bytes::from_static(b"x"),
        }),
    );
    assert!(matches!(
        &transmits(&mut t)[..],
        [Frame::Rst {
            cid: Cid(99),
            code: ErrorCode::ProtocolError,
            ..
        }]
    ));
    // Sequence gap on flow 0.
    t.handle_message(
        now,
        &v2(&Frame::Data {
            cid: cids[0],
            seq: 5,
            payload: Bytes::from_static(b"x"),
        }),
    );
    // Credit overrun on flow 1: more than the 256 KiB window in one frame.
    t.handle_message(
        now,
        &v2(&Frame::Data {
            cid: cids[1],
            seq: 0,
            payload: Bytes::from(vec![0u8; 300 * 1024]),
        }),
    );
    let ev = events(&mut t);
    assert!(ev.contains(&TunnelEvent::Flow(FlowEvent::Reset {
        cid: cids[0],
        code: ErrorCode::SequenceGap,
        reason: format!("sequence gap on flow {}: expected seq 0, got 5", cids[0]),
    })));
    assert!(ev.iter().any(|e| matches!(e, TunnelEvent::Flow(FlowEvent::Reset { cid, code: ErrorCode::CreditOverrun, .. }) if *cid == cids[1])));
    let sent = transmits(&mut t);
    assert_eq!(
        sent.iter()
            .filter(|f| matches!(f, Frame::Rst { .. }))
            .count(),
        2
    );
    // Flow 2 is untouched and the tunnel is up.
    assert!(t.is_established());
    t.handle_message(
        now,
        &v2(&Frame::Data {
            cid: cids[2],
            seq: 0,
            payload: Bytes::from_static(b"ok"),
        }),
    );
    assert_eq!(
        events(&mut t),
        vec![TunnelEvent::Flow(FlowEvent::Data {
            cid: cids[2],
            payload: Bytes::from_static(b"ok")
        })]
    );
    assert_eq!(t.mux().stats.protocol_violations, 3);
}

#[test]
fn duplicate_seq_is_dropped_and_counted() {
    let (mut t, cids) = hub_tunnel(&["v2"], 1);
    let d = v2(&Frame::Data {
        cid: cids[0],
        seq: 0,
        payload: Bytes::from_static(b"a"),
    });
    t.handle_message(origin(), &d);
    t.handle_message(origin(), &d);
    assert_eq!(events(&mut t).len(), 1);
    assert_eq!(t.mux().stats.duplicates_dropped, 1);
}

#[test]
fn sender_cannot_exceed_the_peer_window() {
    let (mut t, cids) = hub_tunnel(&["v2"], 1);
    let w = t.send_credit(cids[0]);
    assert_eq!(w, 256 * 1024);
    assert!(
        t.send_data(cids[0], Bytes::from(vec![0u8; w as usize + 1]))
            .is_err()
    );
    t.send_data(cids[0], Bytes::from(vec![0u8; w as usize]))
        .unwrap();
    assert_eq!(t.send_credit(cids[0]), 0);
    t.handle_message(
        origin(),
        &v2(&Frame::Credit {
            cid: cids[0],
            bytes: 1000,
        }),
    );
    assert_eq!(
        events(&mut t),
        vec![TunnelEvent::Flow(FlowEvent::Writable {
            cid: cids[0],
            credit: 1000
        })]
    );
}

/// An agent's flows are shared fairly between its connectors: with two
/// connectors and 16 flows, each is guaranteed 4; a busy connector may take
/// the rest but never what the other one is still owed, and an ended flow
/// gives its room back.
#[test]
fn a_busy_connector_never_takes_the_flows_another_connector_is_owed() {
    let now = origin();
    let mut t = Tunnel::hub(
        now,
        TunnelConfig {
            max_flows: 16,
            ..TunnelConfig::default()
        },
    );
    t.handle_message(
        now,
        &v1(&Frame::Hello {
            slot: 0,
            slots: 1,
            agent_id: "a1".into(),
            // A name announced twice counts once.
            connectors: vec!["busy".into(), "ldap".into(), "busy".into()],
            codecs: vec!["v2".into()],
            window: 0,
        }),
    );
    events(&mut t);
    t.accept(now, Epoch(1));
    // `busy` gets everything but `ldap`'s guarantee of 16 / (2 * 2) = 4.
    let busy: Vec<Cid> = (0..12).map(|_| t.open_flow("busy").unwrap()).collect();
    let refused = t.open_flow("busy").unwrap_err();
    assert_eq!(
        refused.to_string(),
        "connector `busy` holds 12 of the agent's flows; the other 4 free flows are kept for its other connectors"
    );
    assert_eq!(t.stats.open_refused_share, 1);
    // `ldap` still gets its four, then the agent is full.
    for _ in 0..4 {
        t.open_flow("ldap").unwrap();
    }
    assert!(matches!(
        t.open_flow("ldap"),
        Err(nowconnect_core::flow::SendError::QueueFull(16))
    ));
    // A busy flow ends: its room is free again, for either connector.
    t.reset_flow(busy[0], ErrorCode::ConnectionReset, "client closed");
    t.open_flow("ldap").unwrap();
    assert_eq!(t.flow_count(), 16);
}

/// With one connector (or when the others hold their guarantee already) a
/// connector may use every flow of the agent.
#[test]
fn a_single_connector_may_use_every_flow() {
    let now = origin();
    let mut t = Tunnel::hub(
        now,
        TunnelConfig {
            max_flows: 8,
            ..TunnelConfig::default()
        },
    );
    t.handle_message(now, &v1(&hello(&["v2"])));
    events(&mut t);
    t.accept(now, Epoch(1));
    for _ in 0..8 {
        t.open_flow("ldap").unwrap();
    }
    assert!(matches!(
        t.open_flow("ldap"),
        Err(nowconnect_core::flow::SendError::QueueFull(8))
    ));
    assert_eq!(t.stats.open_refused_share, 0);
}

#[test]
fn agent_flow_limit_refuses_opens_with_a_reason() {
    let now = origin();
    let cfg = TunnelConfig {
        max_flows: 2,
        ..TunnelConfig::default()
    };
    let mut t = welcomed_agent(cfg);
    for cid in (1..=3).map(Cid) {
        t.handle_message(
            now,
            &v2(&Frame::Open {
                cid,
                connector: "ldap".into(),
            }),
        );
    }
    let opens = events(&mut t)
        .into_iter()
        .filter(|e| matches!(e, TunnelEvent::Open { .. }))
        .count();
    assert_eq!(opens, 2);
    assert!(matches!(
        &transmits(&mut t)[..],
        [Frame::Rst {
            cid: Cid(3),
            code: ErrorCode::LimitExceeded,
            ..
        }]
    ));
}

#[test]
fn handshake_timeout_closes() {
    let now = origin();
    let mut t = Tunnel::hub(now, TunnelConfig::default());
    let (at, _) = t.poll_timeout().unwrap();
    t.handle_timeout(at - Duration::from_millis(1));
    assert!(!t.is_closed(), "fired early");
    t.handle_timeout(at);
    assert!(t.is_closed());
}

// ---- mesh link ----

fn mesh_pair(cfg: MeshLinkConfig) -> (MeshLink, MeshLink) {
    let now = origin();
    let mut a = MeshLink::outbound(now, cfg.clone(), "hub-b", Rng::new(1));
    assert_eq!(a.poll_event(), Some(MeshEvent::Connect));
    a.on_connected(now, Codec::V2);
    let mut b = MeshLink::inbound(now, cfg, "hub-a", Codec::V2, Rng::new(2));
    shuttle(&mut a, &mut b);
    while a.poll_event().is_some() {}
    while b.poll_event().is_some() {}
    assert_eq!(
        (a.state(), b.state()),
        (LinkState::Established, LinkState::Established)
    );
    (a, b)
}

fn shuttle(a: &mut MeshLink, b: &mut MeshLink) {
    let now = origin();
    loop {
        let mut moved = false;
        while let Some(m) = a.poll_transmit() {
            b.handle_message(now, &m);
            moved = true;
        }
        while let Some(m) = b.poll_transmit() {
            a.handle_message(now, &m);
            moved = true;
        }
        if !moved {
            break;
        }
    }
}

#[test]
fn mesh_link_backs_off_with_growing_capped_delays_and_reconnects() {
    let now = origin();
    let cfg = MeshLinkConfig {
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        ..MeshLinkConfig::default()
    };
    let mut l = MeshLink::outbound(now, cfg, "hub-b", Rng::new(9));
    assert_eq!(l.poll_event(), Some(MeshEvent::Connect));
    let mut t = now;
    let mut delays = Vec::new();
    for _ in 0..8 {
        l.on_disconnected(t, "connection refused");
        assert_eq!(l.state(), LinkState::Backoff);
        let (at, _) = l.poll_timeout().unwrap();
        delays.push(at - t);
        t = at;
        l.handle_timeout(t);
        assert_eq!(l.state(), LinkState::Connecting);
        while let Some(e) = l.poll_event() {
            if e == MeshEvent::Connect {
                break;
            }
        }
    }
    assert!(delays[0] <= Duration::from_millis(100));
    assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
    assert!(delays[7] >= Duration::from_secs(1), "{delays:?}");
    assert_eq!(l.stats.reconnects, 8);
    l.close("shutdown");
    assert_eq!(l.state(), LinkState::Closed);
    assert!(l.poll_timeout().is_none());
}

#[test]
fn mesh_send_queue_and_inflight_caps_refuse_and_count() {
    let cfg = MeshLinkConfig {
        send_queue_depth: 4,
        max_inflight_bytes: 10_000,
        ..MeshLinkConfig::default()
    };
    let (mut a, _b) = mesh_pair(cfg);
    let cid = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    for _ in 0..4 {
        a.send_data(cid, Bytes::from(vec![1u8; 100])).unwrap();
    }
    assert!(a.send_data(cid, Bytes::from(vec![1u8; 100])).is_err());
    assert_eq!(a.stats.backpressure.get("queue_full"), Some(&1));
    assert_eq!(a.send_credit(cid), 0);
    // Control frames go first.
    let first =
        nowconnect_core::codec::decode(&a.poll_transmit().unwrap(), &Limits::default()).unwrap();
    assert!(matches!(first, Frame::MOpen { .. }));
    while a.poll_transmit().is_some() {}
    // Draining the queue wakes the blocked flow.
    let woke = std::iter::from_fn(|| a.poll_event())
        .any(|e| matches!(e, MeshEvent::Flow(FlowEvent::Writable { .. })));
    assert!(woke);
    // Inflight cap: 400 bytes outstanding, so 9,700 more would exceed 10,000.
    assert!(a.send_data(cid, Bytes::from(vec![1u8; 9_700])).is_err());
    assert_eq!(a.stats.backpressure.get("inflight_cap"), Some(&1));
    assert_eq!(a.inflight_bytes(), 400);
    assert_eq!(a.send_credit(cid), 9_600);
}

/// The queue is what the socket has not taken: `queue_len` and
/// `has_transmit` change only as `poll_transmit` hands frames out, and the
/// wire bytes each side counts are the messages it handed out or took.
#[test]
fn mesh_queue_counts_what_the_socket_has_not_taken_and_bytes_are_counted_both_ways() {
    let cfg = MeshLinkConfig {
        send_queue_depth: 8,
        ..MeshLinkConfig::default()
    };
    let (mut a, mut b) = mesh_pair(cfg);
    let hello_out = a.stats.bytes_out;
    assert!(hello_out > 0 && b.stats.bytes_in == hello_out);
    let cid = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    for _ in 0..8 {
        a.send_data(cid, Bytes::from(vec![1u8; 1000])).unwrap();
    }
    // One M_OPEN and eight M_DATA wait; the data queue is at its depth.
    assert_eq!(a.queue_len(), 9);
    assert!(a.has_transmit());
    assert!(a.send_data(cid, Bytes::from(vec![1u8; 1000])).is_err());
    assert_eq!(a.stats.backpressure.get("queue_full"), Some(&1));
    // A flow the relay holds back (credit of its own, the link full)
    // counts as the same backpressure, once while it waits.
    use nowconnect_core::mux::FlowLink;
    let other = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    a.note_blocked(other);
    a.note_blocked(other);
    assert_eq!(a.stats.backpressure.get("queue_full"), Some(&2));
    // Handed to the socket one at a time: the queue shrinks by one each.
    let total = a.queue_len();
    assert_eq!(total, 10);
    let mut sent = 0u64;
    let mut taken = Vec::new();
    while let Some(m) = a.poll_transmit() {
        sent += m.len() as u64;
        taken.push(m);
        assert_eq!(a.queue_len(), total - taken.len());
    }
    assert!(!a.has_transmit());
    assert_eq!(a.stats.bytes_out, hello_out + sent);
    assert!(sent >= 8 * 1000);
    let before = b.stats.bytes_in;
    for m in &taken {
        b.handle_message(origin(), m);
    }
    assert_eq!(b.stats.bytes_in - before, sent);
}

#[test]
fn a_flow_held_back_by_the_link_cap_counts_as_backpressure_once_per_wait() {
    use nowconnect_core::mux::FlowLink;
    let cfg = MeshLinkConfig {
        max_inflight_bytes: 1_000,
        ..MeshLinkConfig::default()
    };
    let (mut a, _b) = mesh_pair(cfg);
    let cid = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    a.send_data(cid, Bytes::from(vec![1u8; 1_000])).unwrap();
    // The relay asks for credit, finds none, and says the flow waits: the
    // flow has credit of its own, so the link's cap holds it back.
    assert_eq!(a.send_credit(cid), 0);
    FlowLink::note_blocked(&mut a, cid);
    FlowLink::note_blocked(&mut a, cid);
    assert_eq!(a.stats.backpressure.get("inflight_cap"), Some(&1));
    // A second flow held back by the same cap is a second wait.
    let other = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    assert_eq!(a.send_credit(other), 0);
    FlowLink::note_blocked(&mut a, other);
    assert_eq!(a.stats.backpressure.get("inflight_cap"), Some(&2));
}

#[test]
fn mesh_link_loss_resets_only_its_flows_and_rtt_is_measured() {
    let (mut a, mut b) = mesh_pair(MeshLinkConfig::default());
    let now = origin();
    let (at, _) = a.poll_timeout().unwrap();
    a.handle_timeout(at);
    shuttle(&mut a, &mut b);
    assert!(std::iter::from_fn(|| a.poll_event()).any(|e| matches!(e, MeshEvent::Rtt(_))));
    let c1 = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    let c2 = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    a.on_disconnected(now, "peer closed");
    let resets: Vec<_> = std::iter::from_fn(|| a.poll_event())
        .filter_map(|e| match e {
            MeshEvent::Flow(FlowEvent::Reset { cid, code, .. }) => Some((cid, code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        resets,
        vec![(c1, ErrorCode::LinkLost), (c2, ErrorCode::LinkLost)]
    );
}

#[test]
fn mesh_pings_are_spread_over_the_last_fifth_of_the_interval_and_never_late() {
    // Idle timeout just above the ping interval: a ping that came late
    // would let the peer's idle timer close the link.
    let cfg = MeshLinkConfig {
        ping_interval: Duration::from_secs(5),
        idle_timeout: Duration::from_millis(5_001),
        ..MeshLinkConfig::default()
    };
    let (mut a, mut b) = mesh_pair(cfg);
    let mut now = origin();
    let mut last_ping = [now, now];
    let mut gaps = Vec::new();
    for _ in 0..400 {
        let ta = a.poll_timeout().expect("a has a timer").0;
        let tb = b.poll_timeout().expect("b has a timer").0;
        let (link, other, side) = if ta <= tb {
            (&mut a, &mut b, 0)
        } else {
            (&mut b, &mut a, 1)
        };
        now = ta.min(tb);
        link.handle_timeout(now);
        let mut pinged = false;
        while let Some(m) = link.poll_transmit() {
            pinged |= matches!(
                nowconnect_core::codec::decode(&m, &Limits::default()),
                Ok(Frame::MPing { .. })
            );
            other.handle_message(now, &m);
        }
        while let Some(m) = other.poll_transmit() {
            link.handle_message(now, &m);
        }
        assert!(pinged, "every timer of an idle established link is a ping");
        gaps.push(now - last_ping[side]);
        last_ping[side] = now;
        assert_eq!(
            (a.state(), b.state()),
            (LinkState::Established, LinkState::Established),
            "the link stays up at {:?}",
            now - origin()
        );
    }
    let min = *gaps.iter().min().unwrap();
    let max = *gaps.iter().max().unwrap();
    assert!(
        min >= Duration::from_secs(4),
        "a ping came {min:?} after the last"
    );
    assert!(
        max <= Duration::from_secs(5),
        "a ping came {max:?} after the last"
    );
    let mut distinct = gaps.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() > gaps.len() / 2,
        "ping gaps are drawn, not fixed: {} distinct of {}",
        distinct.len(),
        gaps.len()
    );
    assert!(
        max - min > Duration::from_millis(800),
        "ping gaps cover the spread: {min:?}..{max:?}"
    );
}

#[test]
fn mesh_open_with_wrong_parity_is_refused() {
    let (mut a, mut b) = mesh_pair(MeshLinkConfig::default());
    // b is the acceptor: its flows are even. Forge an odd cid from b's side.
    let h = nowconnect_core::MeshHeader {
        cid: Cid(2),
        connector: "ldap".into(),
        agent_id: "x".into(),
        seq: 0,
        epoch: Epoch(1),
    };
    b.handle_message(origin(), &v2(&Frame::MOpen { h }));
    let ack =
        nowconnect_core::codec::decode(&b.poll_transmit().unwrap(), &Limits::default()).unwrap();
    assert!(matches!(
        ack,
        Frame::MOpenAck {
            ok: false,
            code: ErrorCode::ProtocolError,
            ..
        }
    ));
    let _ = &mut a;
}

/// A peer holding a mesh certificate reuses a cid on one connection: the
/// open is refused, so nothing still in flight for the old flow (an owner
/// hub's bridge join) can meet a new flow under that cid.
#[test]
fn mesh_open_with_a_cid_used_before_on_the_connection_is_refused() {
    let (_a, mut b) = mesh_pair(MeshLinkConfig::default());
    let open = |cid| {
        let h = nowconnect_core::MeshHeader {
            cid,
            connector: "ldap".into(),
            agent_id: "x".into(),
            seq: 0,
            epoch: Epoch(1),
        };
        v2(&Frame::MOpen { h })
    };
    b.handle_message(origin(), &open(Cid(3)));
    assert!(matches!(
        b.poll_event(),
        Some(MeshEvent::Open { cid: Cid(3), .. })
    ));
    assert!(b.poll_transmit().is_none(), "held for the owner's answer");
    // Lower than the last one (never opened, or ended since): refused.
    b.handle_message(origin(), &open(Cid(1)));
    let ack =
        nowconnect_core::codec::decode(&b.poll_transmit().unwrap(), &Limits::default()).unwrap();
    assert!(matches!(
        ack,
        Frame::MOpenAck {
            ok: false,
            code: ErrorCode::ProtocolError,
            ..
        }
    ));
    assert!(b.poll_event().is_none());
    // Higher: a new flow.
    b.handle_message(origin(), &open(Cid(5)));
    assert!(matches!(
        b.poll_event(),
        Some(MeshEvent::Open { cid: Cid(5), .. })
    ));
}

// ---- hub ----

fn run_registry(
    hub: &mut Hub,
    reg: &mut MemoryRegistry,
    now: std::time::Instant,
) -> Vec<HubOutput> {
    run_registry_keep_peers(hub, reg, now)
        .into_iter()
        .filter(|o| !matches!(o, HubOutput::Peers(_) | HubOutput::Announced))
        .collect()
}

/// A hub says once, when the registry first takes its announcement, that
/// peers will now admit it (the runtime dials its configured peers then,
/// not before, when they would refuse it as not registered); a registry
/// that refuses the announcement delays it.
#[test]
fn a_hub_says_once_when_its_announcement_was_taken() {
    let mut h = hub(Mode::Active);
    let mut reg = MemoryRegistry::default();
    let now = origin();
    assert!(!h.announced());
    h.handle_timeout(now);
    let announced = |outs: &[HubOutput]| {
        outs.iter()
            .filter(|o| matches!(o, HubOutput::Announced))
            .count()
    };
    // The registry fails the first announcement: nothing said yet.
    let mut fails = 0;
    while let Some(o) = h.poll_output() {
        match o {
            HubOutput::Registry { op, .. } => {
                fails += 1;
                h.registry_reply(now, op, Err(RegistryError::Unavailable("down".into())));
            }
            HubOutput::Announced => panic!("announced without the registry"),
            _ => {}
        }
    }
    assert!(fails > 0);
    assert!(!h.announced());
    // The next discovery gets through: said once, and never again.
    let later = now + Duration::from_secs(6);
    h.handle_timeout(later);
    assert_eq!(
        announced(&run_registry_keep_peers(&mut h, &mut reg, later)),
        1
    );
    assert!(h.announced());
    for i in 2..5 {
        let t = now + Duration::from_secs(6 * i);
        h.handle_timeout(t);
        assert_eq!(announced(&run_registry_keep_peers(&mut h, &mut reg, t)), 0);
    }
}

fn hub(mode: Mode) -> Hub {
    Hub::new(
        origin(),
        HubConfig {
            replica_id: "hub-a".into(),
            mode,
            ..HubConfig::default()
        },
        7,
    )
}

#[test]
fn hub_claims_then_accepts_and_routes_to_least_loaded_agent() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Off);
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    h.tunnel_hello(now, TunnelId(2), "a2", &["ldap".into()], None);
    let out = run_registry(&mut h, &mut reg, now);
    assert_eq!(
        out,
        vec![
            HubOutput::AcceptTunnel {
                tunnel: TunnelId(1),
                epoch: Epoch(1)
            },
            HubOutput::AcceptTunnel {
                tunnel: TunnelId(2),
                epoch: Epoch(1)
            }
        ]
    );
    h.flow_started(TunnelId(1));
    h.client_connected(now, 10, "ldap");
    assert_eq!(
        h.poll_output(),
        Some(HubOutput::Route {
            client: 10,
            route: Route::Local {
                tunnel: TunnelId(2),
                agent_id: "a2".into()
            }
        })
    );
    h.client_connected(now, 11, "nope");
    assert!(matches!(
        h.poll_output(),
        Some(HubOutput::Route {
            route: Route::Refuse {
                code: ErrorCode::NoAgent,
                ..
            },
            ..
        })
    ));
}

#[test]
fn hub_refuses_connectors_outside_the_token_scope() {
    let now = origin();
    let mut h = hub(Mode::Off);
    h.tunnel_hello(
        now,
        TunnelId(1),
        "a1",
        &["ldap".into(), "ssh".into()],
        Some(&["ldap".to_string()]),
    );
    match h.poll_output() {
        Some(HubOutput::CloseTunnel {
            tunnel: TunnelId(1),
            code: ErrorCode::Refused,
            reason,
        }) => {
            assert!(reason.contains("`ssh` is outside the token's scope"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.counters.tunnels_refused, 1);
}

#[test]
fn hub_that_lost_ownership_closes_the_tunnel_and_counts_it() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Active);
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    run_registry(&mut h, &mut reg, now);
    // Another hub claims the agent.
    reg.apply(
        now,
        &RegistryOp::Claim {
            slot: 0,
            agent_id: "a1".into(),
            replica_id: "hub-b".into(),
            lease: Duration::from_secs(15),
        },
    )
    .unwrap();
    let t = now + Duration::from_secs(5);
    h.handle_timeout(t);
    let out = run_registry(&mut h, &mut reg, t);
    match &out[..] {
        [
            HubOutput::CloseTunnel {
                tunnel: TunnelId(1),
                code: ErrorCode::StaleEpoch,
                reason,
            },
        ] => {
            assert!(reason.contains("lost to hub-b at epoch 2"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.counters.epoch_mismatch, 1);
    // A mesh open under the old epoch is refused.
    assert!(matches!(
        h.check_mesh_open("a1", "ldap", Epoch(1)),
        Err((ErrorCode::StaleEpoch, _))
    ));
}

#[test]
fn active_hub_routes_across_the_mesh_and_shadow_only_counts() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    {
        let (agent, owner) = ("a9", "hub-b");
        reg.apply(
            now,
            &RegistryOp::Claim {
                slot: 0,
                agent_id: agent.into(),
                replica_id: owner.into(),
                lease: Duration::from_secs(15),
            },
        )
        .unwrap();
        reg.apply(
            now,
            &RegistryOp::AddConnectors {
                agent_id: agent.into(),
                connectors: vec!["ldap".into()],
                lease: Duration::from_secs(15),
            },
        )
        .unwrap();
    }
    let mut active = hub(Mode::Active);
    active.client_connected(now, 1, "ldap");
    let out = run_registry(&mut active, &mut reg, now);
    assert!(matches!(
        &out[..],
        [HubOutput::Route {
            route: Route::Refuse {
                code: ErrorCode::MeshUnavailable,
                ..
            },
            ..
        }]
    ));
    active.mesh_link_up("hub-b", true);
    active.client_connected(now, 2, "ldap");
    let out = run_registry(&mut active, &mut reg, now);
    assert_eq!(
        out,
        vec![HubOutput::Route {
            client: 2,
            route: Route::Mesh {
                replica_id: "hub-b".into(),
                agent_id: "a9".into(),
                epoch: Epoch(1)
            }
        }]
    );
    let mut shadow = hub(Mode::Shadow);
    shadow.mesh_link_up("hub-b", true);
    shadow.client_connected(now, 3, "ldap");
    let out = run_registry(&mut shadow, &mut reg, now);
    match &out[..] {
        [
            HubOutput::Route {
                route:
                    Route::Refuse {
                        code: ErrorCode::NoAgent,
                        reason,
                    },
                ..
            },
        ] => {
            assert!(reason.contains("active would forward to hub-b"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(shadow.counters.shadow_would.get("mesh"), Some(&1));
}

#[test]
fn registry_timeout_degrades_readiness_and_refuses_remote_at_once() {
    let now = origin();
    let mut h = hub(Mode::Active);
    h.client_connected(now, 1, "ldap");
    let Some(HubOutput::Registry { op, .. }) = h.poll_output() else {
        panic!()
    };
    let _ = op; // never answered
    let t = now + Duration::from_secs(1);
    h.handle_timeout(t);
    let out: Vec<_> = std::iter::from_fn(|| h.poll_output()).collect();
    assert!(
        out.iter().any(|o| matches!(
            o,
            HubOutput::Route {
                client: 1,
                route: Route::Refuse {
                    code: ErrorCode::RegistryUnavailable,
                    ..
                }
            }
        )),
        "{out:?}"
    );
    assert!(!h.registry_healthy());
    let reasons = h.readiness(1);
    assert!(
        reasons.iter().any(|r| r.contains("registry unhealthy")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no mesh peer")),
        "{reasons:?}"
    );
    // While unhealthy, a remote route is refused without waiting.
    h.client_connected(t, 2, "ldap");
    let out: Vec<_> = std::iter::from_fn(|| h.poll_output()).collect();
    assert!(out.iter().any(|o| matches!(
        o,
        HubOutput::Route {
            client: 2,
            route: Route::Refuse {
                code: ErrorCode::RegistryUnavailable,
                ..
            }
        }
    )));
    // A health probe that succeeds restores it.
    let t2 = t + Duration::from_secs(2);
    h.handle_timeout(t2);
    let mut reg = MemoryRegistry::new();
    run_registry(&mut h, &mut reg, t2);
    assert!(h.registry_healthy());
    let e = RegistryError::Unavailable("connection refused".into());
    assert!(e.to_string().contains("connection refused"));
    let _ = RegistryReply::Healthy;
}

// ---- agent ----

#[test]
fn agent_rotates_hubs_with_backoff_and_times_out_target_dials() {
    let now = origin();
    let mut connectors = BTreeMap::new();
    connectors.insert("ldap".to_string(), "127.0.0.1:389".to_string());
    let cfg = AgentConfig {
        agent_id: "a1".into(),
        hubs: vec!["ws://h1/tunnel".into(), "ws://h2/tunnel".into()],
        connectors,
        ..AgentConfig::default()
    };
    let mut a = Agent::new(now, cfg, 3);
    assert_eq!(
        a.poll_output(),
        Some(AgentOutput::DialHub {
            attempt: AttemptId(1),
            url: "ws://h1/tunnel".into()
        })
    );
    a.hub_lost(now, AttemptId(1));
    let at = a.poll_timeout().unwrap();
    assert!(at > now && at <= now + Duration::from_millis(200));
    a.handle_timeout(at);
    assert_eq!(
        a.poll_output(),
        Some(AgentOutput::DialHub {
            attempt: AttemptId(2),
            url: "ws://h2/tunnel".into()
        })
    );
    a.hub_established(at, AttemptId(2));
    a.flow_opened(at, AttemptId(2), Cid(5), "ldap");
    assert_eq!(
        a.poll_output(),
        Some(AgentOutput::DialTarget {
            attempt: AttemptId(2),
            cid: Cid(5),
            target: "127.0.0.1:389".into()
        })
    );
    a.flow_opened(at, AttemptId(2), Cid(6), "ssh");
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::ResetFlow {
            cid: Cid(6),
            code: ErrorCode::UnknownConnector,
            ..
        })
    ));
    a.flow_opened(at, AttemptId(2), Cid(7), "ldap");
    a.poll_output();
    a.target_failed(at, AttemptId(2), Cid(7), "connection refused");
    assert!(
        matches!(a.poll_output(), Some(AgentOutput::ResetFlow { attempt: AttemptId(2), cid: Cid(7), code: ErrorCode::TargetUnreachable, reason }) if reason.contains("connection refused"))
    );
    a.handle_timeout(at + Duration::from_secs(5));
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::ResetFlow {
            cid: Cid(5),
            code: ErrorCode::ConnectTimeout,
            ..
        })
    ));
}

/// A peer that accepts and drops every connection at once gets the
/// growing delays of failed attempts; one that kept it up for
/// `STABLE_AFTER` gets the first delay again.
#[test]
fn backoff_starts_over_only_after_a_stable_connection() {
    use nowconnect_core::backoff::{Backoff, STABLE_AFTER};
    let mut rng = Rng::new(3);
    let base = Duration::from_millis(200);
    let mut b = Backoff::new(base, Duration::from_secs(30));
    let mut now = origin();
    for i in 0..8u32 {
        b.connected(now);
        now += STABLE_AFTER - Duration::from_millis(1);
        b.disconnected(now);
        let d = b.next_delay(&mut rng);
        let cap = base.saturating_mul(1 << i).min(Duration::from_secs(30));
        assert!(
            d >= cap / 2,
            "drop {i} after a short connection: {d:?} < {:?}",
            cap / 2
        );
        now += d;
    }
    b.connected(now);
    b.disconnected(now + STABLE_AFTER);
    assert!(b.next_delay(&mut rng) <= base);
    // A disconnect without a connection (a failed dial) never resets.
    let before = b.attempt();
    b.disconnected(now + STABLE_AFTER * 3);
    assert_eq!(b.attempt(), before);
}

/// A hub that sends WELCOME and then drops every tunnel at once (crashing,
/// hostile, or another agent claiming the same id) is redialed with the
/// growing delays of failed dials, not every 100–200 ms for ever; a tunnel
/// that stayed up for `STABLE_AFTER` starts the delays over.
#[test]
fn agent_backs_off_from_a_hub_that_drops_every_tunnel_after_welcome() {
    use nowconnect_core::backoff::STABLE_AFTER;
    let now = origin();
    let cfg = AgentConfig {
        agent_id: "a1".into(),
        hubs: vec!["ws://h1/tunnel".into()],
        ..AgentConfig::default()
    };
    let base = cfg.backoff_base;
    let mut a = Agent::new(now, cfg, 11);
    let mut t = now;
    let mut gaps = Vec::new();
    for _ in 0..8 {
        let Some(AgentOutput::DialHub { attempt, .. }) = a.poll_output() else {
            panic!("expected a dial");
        };
        a.hub_established(t, attempt);
        t += Duration::from_millis(50);
        a.hub_lost(t, attempt);
        let at = a.poll_timeout().unwrap();
        gaps.push(at - t);
        t = at;
        a.handle_timeout(t);
    }
    for (i, g) in gaps.iter().enumerate() {
        let floor = base.saturating_mul(1 << i) / 2;
        assert!(
            *g >= floor,
            "redial {i} after {g:?}, below the backoff's {floor:?}: {gaps:?}"
        );
    }
    assert!(gaps[7] >= Duration::from_secs(12), "{gaps:?}");
    // A tunnel that stays up long enough: the next redial is quick again.
    let Some(AgentOutput::DialHub { attempt, .. }) = a.poll_output() else {
        panic!("expected a dial");
    };
    a.hub_established(t, attempt);
    t += STABLE_AFTER;
    a.hub_lost(t, attempt);
    assert!(a.poll_timeout().unwrap() - t <= base);
}

#[test]
fn an_owner_whose_record_vanished_reclaims_instead_of_dropping_the_agent() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Active);
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    run_registry(&mut h, &mut reg, now);
    assert_eq!(h.owned_tunnel("a1"), Some((TunnelId(1), Epoch(1))));
    // The registry forgets everything (restart without persistence): the
    // lease lapses and a sweep removes it.
    let later = now + Duration::from_secs(16);
    reg.apply(later, &RegistryOp::Sweep).unwrap();
    h.handle_timeout(later);
    let out = run_registry(&mut h, &mut reg, later);
    assert!(
        out.iter()
            .all(|o| !matches!(o, HubOutput::CloseTunnel { .. })),
        "{out:?}"
    );
    let (t, e) = h.owned_tunnel("a1").unwrap();
    assert_eq!(t, TunnelId(1));
    assert!(e > Epoch(1));
    assert_eq!(h.counters.ownership_reclaimed, 1);
    assert_eq!(h.counters.ownership_lost, 0);
}

#[test]
fn hubs_announce_their_mesh_url_and_learn_each_other() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mk = |id: &str| {
        Hub::new(
            now,
            HubConfig {
                replica_id: id.into(),
                mode: Mode::Active,
                mesh_url: Some(format!("wss://{id}:9400/mesh")),
                ..HubConfig::default()
            },
            1,
        )
    };
    let (mut a, mut b) = (mk("hub-a"), mk("hub-b"));
    a.handle_timeout(now);
    run_registry(&mut a, &mut reg, now);
    b.handle_timeout(now);
    let out = run_registry_keep_peers(&mut b, &mut reg, now);
    assert!(
        out.contains(&HubOutput::Peers(vec![(
            "hub-a".into(),
            "wss://hub-a:9400/mesh".into()
        )])),
        "{out:?}"
    );
    let t = now + Duration::from_secs(5);
    a.handle_timeout(t);
    let out = run_registry_keep_peers(&mut a, &mut reg, t);
    assert!(
        out.contains(&HubOutput::Peers(vec![(
            "hub-b".into(),
            "wss://hub-b:9400/mesh".into()
        )])),
        "{out:?}"
    );
}

fn run_registry_keep_peers(
    hub: &mut Hub,
    reg: &mut MemoryRegistry,
    now: std::time::Instant,
) -> Vec<HubOutput> {
    let mut other = Vec::new();
    while let Some(o) = hub.poll_output() {
        match o {
            HubOutput::Registry { op, call } => {
                let r = reg.apply(now, &call);
                hub.registry_reply(now, op, r);
            }
            o => other.push(o),
        }
    }
    other
}

#[test]
fn a_flow_held_back_by_a_mesh_link_cap_is_woken_when_room_returns() {
    use nowconnect_core::mux::FlowLink;
    let cfg = MeshLinkConfig {
        max_inflight_bytes: 300_000,
        ..MeshLinkConfig::default()
    };
    let (mut a, mut b) = mesh_pair(cfg);
    let c1 = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    let c2 = a.open_flow("ldap", "agent-1", Epoch(1)).unwrap();
    shuttle(&mut a, &mut b);
    let opened: Vec<Cid> = std::iter::from_fn(|| b.poll_event())
        .filter_map(|e| match e {
            MeshEvent::Open { cid, .. } => Some(cid),
            _ => None,
        })
        .collect();
    for cid in &opened {
        b.accept_open(*cid);
    }
    shuttle(&mut a, &mut b);
    while a.poll_event().is_some() {}
    // Flow 1 fills the link's inflight cap; flow 2 has credit of its own but
    // the link has no room: the runtime sees 0 and says so.
    a.send_data(c1, Bytes::from(vec![1u8; 256 * 1024])).unwrap();
    assert!(a.send_credit(c2) < 256 * 1024);
    let room = a.send_credit(c2) as usize;
    a.send_data(c2, Bytes::from(vec![2u8; room])).unwrap();
    assert_eq!(a.send_credit(c2), 0);
    FlowLink::note_blocked(&mut a, c2);
    // The peer consumes flow 1's bytes and grants credit back: room returns.
    shuttle(&mut a, &mut b);
    for e in std::iter::from_fn(|| b.poll_event()).collect::<Vec<_>>() {
        if let MeshEvent::Flow(FlowEvent::Data { cid, payload }) = e {
            b.consumed(cid, payload.len());
        }
    }
    shuttle(&mut a, &mut b);
    let woke = std::iter::from_fn(|| a.poll_event())
        .any(|e| matches!(e, MeshEvent::Flow(FlowEvent::Writable { cid, .. }) if cid == c2));
    assert!(woke, "flow 2 was never told it may send again");
    assert!(a.send_credit(c2) > 0);
}

/// One claim per agent at a time: a newer connection supersedes an older one
/// still claiming, so an agent cannot pile up tunnels on a hub.
#[test]
fn a_second_hello_while_claiming_supersedes_the_first() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Off);
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    h.tunnel_hello(now, TunnelId(2), "a1", &["ldap".into()], None);
    assert_eq!(h.tunnel_count(), 1);
    let out = run_registry(&mut h, &mut reg, now);
    assert!(
        out.iter().any(|o| matches!(
            o,
            HubOutput::CloseTunnel {
                tunnel: TunnelId(1),
                code: ErrorCode::StaleEpoch,
                ..
            }
        )),
        "{out:?}"
    );
    assert!(
        out.iter().any(|o| matches!(
            o,
            HubOutput::AcceptTunnel {
                tunnel: TunnelId(2),
                ..
            }
        )),
        "{out:?}"
    );
    assert_eq!(h.owned_tunnel("a1").map(|(t, _)| t), Some(TunnelId(2)));
}

/// Found by the `agent` fuzz target: a flow id opened twice left its first
/// dial registered after the flow was reset.
#[test]
fn a_flow_opened_twice_is_reset_and_its_dial_abandoned() {
    let now = origin();
    let mut connectors = std::collections::BTreeMap::new();
    connectors.insert("ldap".to_string(), "ldap:389".to_string());
    let mut a = Agent::new(
        now,
        AgentConfig {
            agent_id: "a1".into(),
            hubs: vec!["wss://h1/tunnel".into()],
            connectors,
            ..AgentConfig::default()
        },
        1,
    );
    while a.poll_output().is_some() {}
    a.flow_opened(now, AttemptId(1), Cid(3), "ldap");
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::DialTarget { cid: Cid(3), .. })
    ));
    a.flow_opened(now, AttemptId(1), Cid(3), "ldap");
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::ResetFlow {
            cid: Cid(3),
            code: ErrorCode::ProtocolError,
            ..
        })
    ));
    assert_eq!(a.pending_dials(), 0);
    assert!(
        !a.target_connected(now, AttemptId(1), Cid(3)),
        "the abandoned dial is gone"
    );
}

/// DRAIN: the agent dials the next hub at once, keeps the draining tunnel's
/// flows (cids are per tunnel, so the same cid may live on both), and losing
/// the draining tunnel does not disturb the current one.
#[test]
fn a_drained_agent_moves_at_once_and_keeps_the_old_tunnels_flows() {
    let now = origin();
    let mut connectors = std::collections::BTreeMap::new();
    connectors.insert("ldap".to_string(), "ldap:389".to_string());
    let mut a = Agent::new(
        now,
        AgentConfig {
            agent_id: "a1".into(),
            hubs: vec!["wss://h1/tunnel".into(), "wss://h2/tunnel".into()],
            connectors,
            ..AgentConfig::default()
        },
        1,
    );
    while a.poll_output().is_some() {}
    a.hub_established(now, AttemptId(1));
    a.flow_opened(now, AttemptId(1), Cid(7), "ldap");
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::DialTarget {
            attempt: AttemptId(1),
            cid: Cid(7),
            ..
        })
    ));
    // DRAIN on a tunnel that is not the current one changes nothing.
    a.hub_draining(now, AttemptId(9));
    assert_eq!(a.poll_output(), None);
    a.hub_draining(now, AttemptId(1));
    assert_eq!(
        a.poll_output(),
        Some(AgentOutput::DialHub {
            attempt: AttemptId(2),
            url: "wss://h2/tunnel".into()
        }),
        "the next hub is dialed at once, without backoff"
    );
    assert_eq!(a.draining_tunnels().collect::<Vec<_>>(), vec![AttemptId(1)]);
    assert_eq!(a.counters.hub_drains, 1);
    // The old hub may still open flows until the agent is owned elsewhere.
    a.flow_opened(now, AttemptId(1), Cid(8), "ldap");
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::DialTarget {
            attempt: AttemptId(1),
            cid: Cid(8),
            ..
        })
    ));
    a.hub_established(now, AttemptId(2));
    assert_eq!(
        a.state(),
        &HubLinkState::Connected {
            attempt: AttemptId(2)
        }
    );
    // The same cid on the new tunnel is a different flow.
    a.flow_opened(now, AttemptId(2), Cid(7), "ldap");
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::DialTarget {
            attempt: AttemptId(2),
            cid: Cid(7),
            ..
        })
    ));
    assert_eq!(a.pending_dials(), 3);
    assert!(a.target_connected(now, AttemptId(1), Cid(7)));
    // The old hub closes its tunnel: only its flows go.
    a.hub_lost(now, AttemptId(1));
    assert_eq!(
        a.state(),
        &HubLinkState::Connected {
            attempt: AttemptId(2)
        }
    );
    assert_eq!(a.draining_tunnels().count(), 0);
    assert_eq!(a.pending_dials(), 1);
    assert!(
        !a.target_connected(now, AttemptId(1), Cid(8)),
        "the old tunnel's dial is gone"
    );
    assert!(a.target_connected(now, AttemptId(2), Cid(7)));
    assert_eq!(a.counters.hub_failures, 0, "a drain is not a failure");
}

/// A draining hub tells its agents to move, keeps serving their flows (local
/// and mesh) while it still owns them, and when a renewal finds the agent
/// owned elsewhere keeps the tunnel for its flows instead of closing it.
#[test]
fn a_draining_hub_hands_its_agents_over_without_cutting_flows() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Active);
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    run_registry(&mut h, &mut reg, now);
    let (_, epoch) = h.owned_tunnel("a1").expect("owned");
    while h.poll_output().is_some() {}
    h.drain(now);
    assert_eq!(
        h.poll_output(),
        Some(HubOutput::DrainTunnel {
            tunnel: TunnelId(1)
        })
    );
    assert_eq!(h.moves_pending(), 1);
    assert!(h.readiness(0).contains(&"draining".to_string()));
    // New tunnels are refused; flows are still served until the move.
    h.tunnel_hello(now, TunnelId(2), "a2", &["ldap".into()], None);
    assert!(matches!(
        h.poll_output(),
        Some(HubOutput::CloseTunnel {
            tunnel: TunnelId(2),
            code: ErrorCode::Shutdown,
            ..
        })
    ));
    assert_eq!(h.check_mesh_open("a1", "ldap", epoch), Ok(TunnelId(1)));
    h.client_connected(now, 10, "ldap");
    assert!(matches!(
        h.poll_output(),
        Some(HubOutput::Route {
            client: 10,
            route: Route::Local {
                tunnel: TunnelId(1),
                ..
            }
        })
    ));
    h.flow_started(TunnelId(1));
    // The agent is claimed by another hub; the renewal finds out.
    reg.apply(
        now,
        &RegistryOp::Claim {
            slot: 0,
            agent_id: "a1".into(),
            replica_id: "hub-b".into(),
            lease: Duration::from_secs(15),
        },
    )
    .unwrap();
    // Draining renews every drain_check_interval (100 ms), not every 5 s.
    let later = now + Duration::from_millis(100);
    h.handle_timeout(later);
    for o in run_registry(&mut h, &mut reg, later) {
        assert!(
            !matches!(o, HubOutput::CloseTunnel { .. }),
            "a draining hub closed a tunnel that still carries a flow: {o:?}"
        );
    }
    assert_eq!(h.owned_tunnel("a1"), None, "no new flows on the old tunnel");
    assert_eq!(h.moves_pending(), 0);
    assert_eq!(h.open_tunnel_flows(), 1);
    assert_eq!(h.counters.ownership_lost, 0);
    assert!(h.check_mesh_open("a1", "ldap", epoch).is_err());
    // Its last flow ends: the old tunnel is closed.
    h.flow_ended(TunnelId(1));
    assert!(matches!(
        h.poll_output(),
        Some(HubOutput::CloseTunnel {
            tunnel: TunnelId(1),
            code: ErrorCode::Shutdown,
            ..
        })
    ));
}

#[test]
fn drain_is_sent_on_v2_tunnels_only_and_reaches_the_agent_once() {
    let now = origin();
    let (mut v1_tunnel, _) = hub_tunnel(&[], 0);
    assert!(!v1_tunnel.send_drain(), "v1 has no DRAIN frame");
    assert!(transmits(&mut v1_tunnel).is_empty());
    let (mut hub_side, _) = hub_tunnel(&["v2"], 0);
    assert!(hub_side.send_drain());
    let sent: Vec<WsMessage> = std::iter::from_fn(|| hub_side.poll_transmit()).collect();
    assert_eq!(sent.len(), 1);
    assert!(matches!(sent[0], WsMessage::Binary(_)), "DRAIN goes in v2");
    // The agent side: establish, then receive DRAIN twice.
    let mut agent = Tunnel::agent(now, TunnelConfig::default(), "a1", &["ldap".into()]);
    transmits(&mut agent);
    agent.handle_message(
        now,
        &v1(&Frame::Welcome {
            replica_id: String::new(),
            epoch: Epoch(3),
            codec: "v2".into(),
            window: 0,
            max_frame: 1 << 20,
        }),
    );
    events(&mut agent);
    agent.handle_message(now, &sent[0]);
    agent.handle_message(now, &sent[0]);
    let evs = events(&mut agent);
    assert!(matches!(evs[..], [TunnelEvent::Drain]), "{evs:?}");
    assert!(agent.drain_seen() && !agent.is_closed());
    // DRAIN is hub → agent only.
    let (mut hub_side, _) = hub_tunnel(&["v2"], 0);
    hub_side.handle_message(now, &sent[0]);
    assert!(
        matches!(events(&mut hub_side).last(), Some(TunnelEvent::Closed { code: ErrorCode::ProtocolError, reason }) if reason.contains("DRAIN")),
    );
}

/// Without a mesh link a hub is degraded only if it holds no agent itself:
/// the survivor of a two-hub rolling restart stays ready.
#[test]
fn a_hub_without_mesh_links_is_ready_while_it_holds_agents() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Active);
    let reasons = h.readiness(1);
    assert!(
        reasons.iter().any(|r| r.contains("no mesh peer link")),
        "{reasons:?}"
    );
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    run_registry(&mut h, &mut reg, now);
    assert_eq!(h.readiness(1), Vec::<String>::new());
}

#[test]
fn hub_agent_limit_and_agent_dial_limit_refuse_at_the_edge() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = Hub::new(
        now,
        HubConfig {
            replica_id: "hub-a".into(),
            max_agents: 2,
            ..HubConfig::default()
        },
        7,
    );
    for (t, a) in [(1, "a1"), (2, "a2"), (3, "a3")] {
        h.tunnel_hello(now, TunnelId(t), a, &["ldap".into()], None);
    }
    let out = run_registry(&mut h, &mut reg, now);
    let refused: Vec<_> = out
        .iter()
        .filter(|o| matches!(o, HubOutput::CloseTunnel { code: ErrorCode::LimitExceeded, reason, .. } if reason.contains("limit of 2")))
        .collect();
    assert_eq!(refused.len(), 1, "{out:?}");
    assert_eq!(h.agent_count(), 2);

    let mut connectors = BTreeMap::new();
    connectors.insert("ldap".to_string(), "ldap:389".to_string());
    let mut a = Agent::new(
        now,
        AgentConfig {
            agent_id: "a1".into(),
            hubs: vec!["wss://h1/tunnel".into()],
            connectors,
            max_pending_dials: 2,
            ..AgentConfig::default()
        },
        1,
    );
    while a.poll_output().is_some() {}
    for cid in (1..=3).map(Cid) {
        a.flow_opened(now, AttemptId(1), cid, "ldap");
    }
    let out: Vec<_> = std::iter::from_fn(|| a.poll_output()).collect();
    assert!(
        matches!(
            out[..],
            [
                AgentOutput::DialTarget { cid: Cid(1), .. },
                AgentOutput::DialTarget { cid: Cid(2), .. },
                AgentOutput::ResetFlow {
                    cid: Cid(3),
                    code: ErrorCode::LimitExceeded,
                    ..
                },
            ]
        ),
        "{out:?}"
    );
    // A dial finishing makes room again.
    assert!(a.target_connected(now, AttemptId(1), Cid(1)));
    a.flow_opened(now, AttemptId(1), Cid(4), "ldap");
    assert!(matches!(
        a.poll_output(),
        Some(AgentOutput::DialTarget { cid: Cid(4), .. })
    ));
}

#[test]
fn a_drain_does_not_wait_for_v1_agents() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Active);
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    h.tunnel_hello(now, TunnelId(2), "a2", &["ldap".into()], None);
    run_registry(&mut h, &mut reg, now);
    h.tunnel_cannot_drain(TunnelId(2));
    while h.poll_output().is_some() {}
    h.drain(now);
    let out: Vec<_> = std::iter::from_fn(|| h.poll_output()).collect();
    assert_eq!(
        out,
        vec![HubOutput::DrainTunnel {
            tunnel: TunnelId(1)
        }]
    );
    assert_eq!(h.moves_pending(), 1);
}

/// A client looks up the registry while this hub's claim of the agent has
/// landed in Redis but its reply has not arrived: the registry names this
/// hub, which has no owned tunnel yet. The lookup is repeated instead of the
/// client being refused, and the client is served locally once the claim
/// reply is in.
#[test]
fn a_lookup_racing_a_local_claim_is_repeated_not_refused() {
    let now = origin();
    let mut reg = MemoryRegistry::new();
    let mut h = hub(Mode::Active);
    while h.poll_output().is_some() {}
    h.tunnel_hello(now, TunnelId(1), "a1", &["ldap".into()], None);
    let Some(HubOutput::Registry { op: claim_op, call }) = h.poll_output() else {
        panic!("claim expected")
    };
    let claim_reply = reg.apply(now, &call);
    // Connectors are added after the claim; the registry already lists a1.
    reg.apply(
        now,
        &RegistryOp::AddConnectors {
            agent_id: "a1".into(),
            connectors: vec!["ldap".into()],
            lease: Duration::from_secs(15),
        },
    )
    .unwrap();
    h.client_connected(now, 9, "ldap");
    let Some(HubOutput::Registry { op, call }) = h.poll_output() else {
        panic!("lookup expected")
    };
    let r = reg.apply(now, &call);
    h.registry_reply(now, op, r);
    let Some(HubOutput::Registry {
        op: retry,
        call: retry_call,
    }) = h.poll_output()
    else {
        panic!("the lookup is repeated, not refused")
    };
    assert!(matches!(retry_call, RegistryOp::ListAgents { .. }));
    h.registry_reply(now, claim_op, claim_reply);
    let out: Vec<_> = std::iter::from_fn(|| h.poll_output()).collect();
    assert!(
        out.iter().any(|o| matches!(
            o,
            HubOutput::AcceptTunnel {
                tunnel: TunnelId(1),
                ..
            }
        )),
        "{out:?}"
    );
    let r = reg.apply(now, &retry_call);
    h.registry_reply(now, retry, r);
    let out: Vec<_> = std::iter::from_fn(|| h.poll_output()).collect();
    assert!(
        out.iter().any(|o| matches!(
            o,
            HubOutput::Route {
                client: 9,
                route: Route::Local {
                    tunnel: TunnelId(1),
                    ..
                }
            }
        )),
        "{out:?}"
    );
}

#[test]
fn reauth_goes_agent_to_hub_on_v2_only_and_is_refused_the_other_way() {
    let now = origin();
    // The agent's side: not before WELCOME, not on v1.
    let mut agent = Tunnel::agent(now, TunnelConfig::default(), "a1", &["ldap".into()]);
    transmits(&mut agent);
    assert!(!agent.send_reauth("t"), "no REAUTH before the tunnel is up");
    let welcome = |codec: &str| Frame::Welcome {
        replica_id: String::new(),
        epoch: Epoch(3),
        codec: codec.into(),
        window: 0,
        max_frame: 1 << 20,
    };
    let mut v1_agent = Tunnel::agent(now, TunnelConfig::default(), "a1", &["ldap".into()]);
    transmits(&mut v1_agent);
    v1_agent.handle_message(now, &v1(&welcome("v1")));
    assert!(!v1_agent.send_reauth("t"), "v1 has no REAUTH frame");
    agent.handle_message(now, &v1(&welcome("v2")));
    events(&mut agent);
    assert!(agent.send_reauth("fresh.jwt.token"));
    let sent: Vec<WsMessage> = std::iter::from_fn(|| agent.poll_transmit()).collect();
    assert_eq!(sent.len(), 1);
    // The hub surfaces it, token intact, and keeps the tunnel.
    let (mut hub_side, _) = hub_tunnel(&["v2"], 0);
    hub_side.handle_message(now, &sent[0]);
    let evs = events(&mut hub_side);
    assert!(
        matches!(&evs[..], [TunnelEvent::Reauth { token }] if token == "fresh.jwt.token"),
        "{evs:?}"
    );
    assert!(!hub_side.is_closed());
    // A hub sending REAUTH to an agent is a protocol error.
    agent.handle_message(now, &sent[0]);
    assert!(matches!(
        events(&mut agent).last(),
        Some(TunnelEvent::Closed { code: ErrorCode::ProtocolError, reason }) if reason.contains("unexpected REAUTH")
    ));
}

/// A replica is served while the registry lists it; one missing from every
/// listing for a whole lease has left (its mesh links are to be closed),
/// while one missing for less (Redis restarted and lost its data, the
/// replica has not announced itself again yet) has not.
#[test]
fn a_replica_missing_from_listings_for_a_lease_has_departed() {
    let t0 = origin();
    let mut h = hub(Mode::Active);
    let lease = HubConfig::default().lease;
    let both = [
        ("hub-b".to_string(), "wss://b/mesh".to_string()),
        ("hub-c".to_string(), "wss://c/mesh".to_string()),
    ];
    h.replicas_listed(t0, &both);
    assert!(h.replica_registered("hub-b") && h.replica_registered("hub-c"));
    // Redis lost its data: an empty listing, then hub-b is back in time.
    h.replicas_listed(t0 + lease / 3, &[]);
    assert!(!h.replica_registered("hub-b"));
    h.replicas_listed(t0 + lease / 2, &both[..1]);
    assert!(h.replica_registered("hub-b"));
    assert_eq!(h.poll_output(), None, "nothing departs within the lease");
    // hub-c stays away for a whole lease: it has departed, once.
    h.replicas_listed(t0 + lease, &both[..1]);
    assert_eq!(
        h.poll_output(),
        Some(HubOutput::PeerDeparted {
            replica_id: "hub-c".into()
        })
    );
    h.replicas_listed(t0 + lease * 2, &both[..1]);
    assert_eq!(h.poll_output(), None);
    assert_eq!(h.counters.peers_departed, 1);
    // A replica id that comes back is served again.
    h.replicas_listed(t0 + lease * 3, &both);
    assert!(h.replica_registered("hub-c"));
    // This hub (hub-a) in a listing, then missing: it never departs from
    // itself.
    let own = ("hub-a".to_string(), "wss://a/mesh".to_string());
    h.replicas_listed(t0 + lease * 4, &[own]);
    h.replicas_listed(t0 + lease * 6, &[]);
    let departed: Vec<HubOutput> = std::iter::from_fn(|| h.poll_output()).collect();
    assert_eq!(
        departed,
        vec![
            HubOutput::PeerDeparted {
                replica_id: "hub-b".into()
            },
            HubOutput::PeerDeparted {
                replica_id: "hub-c".into()
            }
        ]
    );
}

/// A peer that sends PINGs and never reads: the PONGs it causes wait to be
/// sent, bounded by `max_control_backlog`; past it the tunnel closes with
/// `limit_exceeded` and the reason, and the backlog never grew past the
/// bound. DATA waiting for the socket (bounded by the peer's credit) does
/// not count.
#[test]
fn control_replies_a_peer_never_reads_are_bounded() {
    let now = origin();
    let (mut t, cids) = hub_tunnel(&["v2"], 1);
    // DATA queued first (the peer granted the credit): not a control reply.
    t.send_data(cids[0], Bytes::from(vec![7u8; 64 * 1024]))
        .unwrap();
    let max = TunnelConfig::default().max_control_backlog;
    let mut sent = 0;
    while !t.is_closed() {
        t.handle_message(now, &v2(&Frame::Ping { nonce: sent }));
        sent += 1;
        assert!(
            t.control_backlog() <= max,
            "backlog {} past {max}",
            t.control_backlog()
        );
        assert!(sent < 1_000_000, "the tunnel never closed");
    }
    assert!(sent > 10_000, "closed after only {sent} pings");
    assert_eq!(t.stats.control_backlog_closes, 1);
    let closed = events(&mut t).into_iter().find_map(|e| match e {
        TunnelEvent::Closed { code, reason } => Some((code, reason)),
        _ => None,
    });
    let (code, reason) = closed.expect("closed event");
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(reason.contains("output_budget"), "{reason}");
    // Draining what waits leaves no control backlog behind.
    while t.poll_transmit().is_some() {}
    assert_eq!(t.control_backlog(), 0);
}

/// PINGs among `frames`.
fn pings(frames: &[Frame]) -> usize {
    frames
        .iter()
        .filter(|f| matches!(f, Frame::Ping { .. }))
        .count()
}

/// A hub whose agent pings it every interval sends its own PING only with
/// every `HUB_PING_EVERY_WHILE_PINGED`-th of the agent's (the first one
/// always, on its timer, so it has a round trip for its flows' windows at
/// once), and no timer of its comes due between the agent's PINGs; a silent
/// agent is pinged every interval. At 10,000 idle agents this is a third of
/// the hub's keepalive frames and half of its wake-ups.
#[test]
fn a_hub_pings_an_agent_that_pings_it_only_every_few_intervals() {
    use nowconnect_core::tunnel::{FIRST_PING, HUB_PING_EVERY_WHILE_PINGED};
    let every = TunnelConfig::default().ping_interval;
    for agent_pings in [true, false] {
        let (mut t, _) = hub_tunnel(&["v2"], 0);
        let t0 = origin();
        let mut now = t0;
        let mut sent = 0;
        let mut nonce = 0;
        // 1 s: the first PING, answered at once (the round trip).
        now += FIRST_PING;
        t.handle_timeout(now);
        let out = transmits(&mut t);
        assert_eq!(pings(&out), 1, "the first PING, {agent_pings}");
        let Some(Frame::Ping { nonce: n }) =
            out.into_iter().find(|f| matches!(f, Frame::Ping { .. }))
        else {
            unreachable!()
        };
        t.handle_message(now, &v2(&Frame::Pong { nonce: n }));
        assert!(t.last_rtt().is_some());
        let intervals = 4 * HUB_PING_EVERY_WHILE_PINGED;
        for _ in 0..intervals {
            // The agent's PING lands a little before the hub's timer.
            if agent_pings {
                nonce += 1;
                let at = now + every / 2;
                t.handle_message(at, &v2(&Frame::Ping { nonce }));
                // Nothing comes due before the agent's next PING: an idle
                // tunnel wakes its hub once per agent PING, not again for
                // the hub's own timer.
                let (due, _) = t.poll_timeout().expect("timers armed");
                assert!(
                    due > at + every,
                    "a timer due {:?} after the agent's PING",
                    due - at
                );
            }
            now += every;
            t.handle_timeout(now);
            let out = transmits(&mut t);
            sent += pings(&out);
            // The agent answers each of the hub's PINGs.
            for f in &out {
                if let Frame::Ping { nonce } = f {
                    t.handle_message(now, &v2(&Frame::Pong { nonce: *nonce }));
                }
            }
            if agent_pings {
                let pongs = out
                    .iter()
                    .filter(|f| matches!(f, Frame::Pong { .. }))
                    .count();
                assert_eq!(pongs, 1, "every agent PING is answered");
            }
            assert!(!t.is_closed());
        }
        if agent_pings {
            assert_eq!(sent as u32, intervals / HUB_PING_EVERY_WHILE_PINGED);
        } else {
            assert_eq!(
                sent as u32, intervals,
                "a silent agent is pinged every interval"
            );
        }
    }
}

/// An agent pings every interval even while its hub pings it: the rule is
/// the hub's only.
#[test]
fn an_agent_pings_every_interval_even_when_its_hub_pings_it() {
    let now0 = origin();
    let mut t = welcomed_agent(TunnelConfig::default());
    let every = TunnelConfig::default().ping_interval;
    let mut now = now0 + nowconnect_core::tunnel::FIRST_PING;
    t.handle_timeout(now);
    let first = transmits(&mut t);
    assert_eq!(pings(&first), 1);
    if let Some(Frame::Ping { nonce }) = first.into_iter().find(|f| matches!(f, Frame::Ping { .. }))
    {
        t.handle_message(now, &v2(&Frame::Pong { nonce }));
    }
    let mut sent = 0;
    for i in 0..8 {
        t.handle_message(now + every / 2, &v2(&Frame::Ping { nonce: i }));
        now += every;
        t.handle_timeout(now);
        sent += pings(&transmits(&mut t));
    }
    assert_eq!(sent, 8);
}
