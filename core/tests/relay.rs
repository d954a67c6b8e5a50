//! The flow relay: what a link's flows do with their consumers, the held
//! mesh open accepted only once its tunnel flow exists, the credit relay
//! between bridged flows, and a link lost under its bridges.

use std::collections::BTreeMap;

use bytes::Bytes;
use nowconnect_core::flow::SendError;
use nowconnect_core::mux::{FlowEvent, FlowLink};
use nowconnect_core::relay::{Delivery, FlowRelay, PeerMsg, RelayOutput};
use nowconnect_core::{Cid, ErrorCode, Payload};

/// A link with set credit per flow that records what it was asked.
#[derive(Default)]
struct FakeLink {
    credit: BTreeMap<Cid, u64>,
    sent: Vec<(Cid, Vec<u8>)>,
    fins: Vec<Cid>,
    resets: Vec<(Cid, ErrorCode, String)>,
    consumed: Vec<(Cid, usize)>,
    blocked: Vec<Cid>,
}

impl FlowLink for FakeLink {
    fn send_credit(&self, cid: Cid) -> u64 {
        self.credit.get(&cid).copied().unwrap_or(0)
    }
    fn send_data(&mut self, cid: Cid, payload: Payload) -> Result<(), SendError> {
        let c = self.credit.entry(cid).or_default();
        *c -= payload.len() as u64;
        self.sent.push((cid, payload.as_slice().to_vec()));
        Ok(())
    }
    fn send_fin(&mut self, cid: Cid) -> Result<(), SendError> {
        self.fins.push(cid);
        Ok(())
    }
    fn reset_flow(&mut self, cid: Cid, code: ErrorCode, reason: &str) {
        self.resets.push((cid, code, reason.to_string()));
    }
    fn consumed(&mut self, cid: Cid, n: usize) {
        self.consumed.push((cid, n));
    }
    fn note_blocked(&mut self, cid: Cid) {
        self.blocked.push(cid);
    }
}

/// The other link's flow, as a peer address.
type Peer = (u8, Cid);
const TUNNEL: Peer = (1, Cid(70));

fn outputs(r: &mut FlowRelay<Peer>) -> Vec<RelayOutput<Peer>> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

fn data(b: &'static [u8]) -> Payload {
    Payload::from(b)
}

fn ended(cid: Cid, bridged: bool, reset: Option<ErrorCode>) -> RelayOutput<Peer> {
    RelayOutput::Ended {
        cid,
        connector: "ldap".into(),
        bridged,
        reset,
    }
}

#[test]
fn a_local_chunk_waits_for_credit_and_frees_its_permit_once_all_taken() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    link.credit.insert(Cid(5), 3);
    r.attach(Cid(5), "ldap");
    r.data(&mut link, Cid(5), data(b"abcdef"));
    r.fin(&mut link, Cid(5));
    assert_eq!(link.sent, vec![(Cid(5), b"abc".to_vec())]);
    assert!(link.blocked.iter().all(|c| *c == Cid(5)) && !link.blocked.is_empty());
    assert!(link.fins.is_empty(), "FIN before the data it follows");
    assert!(
        outputs(&mut r).is_empty(),
        "a chunk half taken frees no permit"
    );

    link.credit.insert(Cid(5), 10);
    r.handle_event(
        &mut link,
        FlowEvent::Writable {
            cid: Cid(5),
            credit: 10,
        },
    );
    assert_eq!(link.sent[1], (Cid(5), b"def".to_vec()));
    assert_eq!(link.fins, vec![Cid(5)]);
    assert_eq!(
        outputs(&mut r),
        vec![RelayOutput::ChunkTaken { cid: Cid(5) }]
    );
}

#[test]
fn deliveries_go_to_the_local_consumer_and_a_closed_flow_ends_in_order() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    r.attach(Cid(5), "ldap");
    let bytes = Bytes::from_static(b"hello");
    let fe = FlowEvent::Data {
        cid: Cid(5),
        payload: bytes.clone(),
    };
    r.handle_event(&mut link, fe);
    r.handle_event(&mut link, FlowEvent::Fin { cid: Cid(5) });
    r.handle_event(&mut link, FlowEvent::Closed { cid: Cid(5) });
    assert_eq!(
        outputs(&mut r),
        vec![
            RelayOutput::Deliver {
                cid: Cid(5),
                delivery: Delivery::Data(bytes)
            },
            RelayOutput::Deliver {
                cid: Cid(5),
                delivery: Delivery::Fin
            },
            ended(Cid(5), false, None),
        ]
    );
    assert!(r.is_empty());
}

#[test]
fn a_held_open_is_accepted_on_its_join_before_anything_reaches_the_tunnel_flow() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    link.credit.insert(Cid(9), 100);
    r.hold_open(Cid(9), "ldap");
    assert!(r.is_held_open(Cid(9)));
    // The client's first bytes and its FIN arrive before the bridge is up.
    let fe = FlowEvent::Data {
        cid: Cid(9),
        payload: Bytes::from_static(b"bind"),
    };
    r.handle_event(&mut link, fe);
    r.handle_event(&mut link, FlowEvent::Fin { cid: Cid(9) });
    assert!(outputs(&mut r).is_empty(), "nothing leaves a held flow");

    r.join(Cid(9), TUNNEL);
    assert!(!r.is_held_open(Cid(9)));
    assert_eq!(
        outputs(&mut r),
        vec![
            RelayOutput::AcceptOpen { cid: Cid(9) },
            RelayOutput::ToPeer {
                cid: Cid(9),
                peer: TUNNEL,
                msg: PeerMsg::Data(data(b"bind"))
            },
            RelayOutput::ToPeer {
                cid: Cid(9),
                peer: TUNNEL,
                msg: PeerMsg::Fin
            },
        ]
    );
}

#[test]
fn a_held_open_whose_tunnel_flow_failed_is_refused_with_the_tunnels_reason() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    r.hold_open(Cid(9), "ldap");
    r.reset(
        &mut link,
        Cid(9),
        ErrorCode::LimitExceeded,
        "agent flow limit of 1",
    );
    assert!(link.resets.is_empty(), "a refused open is not also reset");
    assert_eq!(
        outputs(&mut r),
        vec![
            RelayOutput::RefuseOpen {
                cid: Cid(9),
                code: ErrorCode::LimitExceeded,
                reason: "agent flow limit of 1".into()
            },
            ended(Cid(9), false, Some(ErrorCode::LimitExceeded)),
        ]
    );
    // A join that comes late finds no flow and resets the tunnel's.
    r.join(Cid(9), TUNNEL);
    assert_eq!(
        outputs(&mut r),
        vec![RelayOutput::ToPeer {
            cid: Cid(9),
            peer: TUNNEL,
            msg: PeerMsg::Reset {
                code: ErrorCode::ConnectionReset,
                reason: "the mesh flow ended before it was bridged".into()
            }
        }]
    );
}

#[test]
fn what_the_link_takes_of_a_peers_data_is_credited_back_even_across_the_join() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    link.credit.insert(Cid(9), 4);
    r.hold_open(Cid(9), "ldap");
    // The tunnel side's data reaches the held mesh flow first (the tunnel
    // joined at once; the mesh side's join is still on its way).
    r.data(&mut link, Cid(9), data(b"result"));
    assert_eq!(link.sent, vec![(Cid(9), b"resu".to_vec())]);
    assert!(outputs(&mut r).is_empty());

    r.join(Cid(9), TUNNEL);
    let credit = RelayOutput::ToPeer {
        cid: Cid(9),
        peer: TUNNEL,
        msg: PeerMsg::Consumed(4),
    };
    assert_eq!(
        outputs(&mut r),
        vec![RelayOutput::AcceptOpen { cid: Cid(9) }, credit]
    );
    link.credit.insert(Cid(9), 10);
    r.handle_event(
        &mut link,
        FlowEvent::Writable {
            cid: Cid(9),
            credit: 10,
        },
    );
    assert_eq!(
        outputs(&mut r),
        vec![RelayOutput::ToPeer {
            cid: Cid(9),
            peer: TUNNEL,
            msg: PeerMsg::Consumed(2)
        }]
    );
}

#[test]
fn a_joined_flow_relays_deliveries_and_credit_to_its_peer() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    link.credit.insert(Cid(70), 8);
    r.attach_joined(Cid(70), "ldap", (2, Cid(9)));
    assert_eq!(r.bridged_open(), 1);
    r.from_peer(&mut link, Cid(70), PeerMsg::Data(data(b"search")));
    r.from_peer(&mut link, Cid(70), PeerMsg::Consumed(3));
    let fe = FlowEvent::Data {
        cid: Cid(70),
        payload: Bytes::from_static(b"entry"),
    };
    r.handle_event(&mut link, fe);
    assert_eq!(link.sent, vec![(Cid(70), b"search".to_vec())]);
    assert_eq!(link.consumed, vec![(Cid(70), 3)]);
    assert_eq!(
        outputs(&mut r),
        vec![
            RelayOutput::ToPeer {
                cid: Cid(70),
                peer: (2, Cid(9)),
                msg: PeerMsg::Consumed(6)
            },
            RelayOutput::ToPeer {
                cid: Cid(70),
                peer: (2, Cid(9)),
                msg: PeerMsg::Data(data(b"entry"))
            },
        ]
    );
}

#[test]
fn a_peer_link_gone_fails_the_flow_here() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    r.attach_joined(Cid(70), "ldap", (2, Cid(9)));
    r.peer_gone(&mut link, Cid(70));
    assert_eq!(link.resets[0].0, Cid(70));
    assert_eq!(link.resets[0].1, ErrorCode::LinkLost);
    let out = outputs(&mut r);
    assert_eq!(
        out.last(),
        Some(&ended(Cid(70), true, Some(ErrorCode::LinkLost)))
    );
}

#[test]
fn a_lost_link_resets_every_joined_peer_and_tells_every_socket() {
    let (mut r, link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    r.attach(Cid(1), "ldap");
    r.attach_joined(Cid(70), "ldap", (2, Cid(9)));
    r.hold_open(Cid(3), "ldap");
    r.link_lost("mesh link down");
    let reset = |cid, to: Option<Peer>| match to {
        Some(peer) => RelayOutput::ToPeer {
            cid,
            peer,
            msg: PeerMsg::Reset {
                code: ErrorCode::LinkLost,
                reason: "mesh link down".into(),
            },
        },
        None => RelayOutput::Deliver {
            cid,
            delivery: Delivery::Reset {
                code: ErrorCode::LinkLost,
                reason: "mesh link down".into(),
            },
        },
    };
    assert_eq!(
        outputs(&mut r),
        vec![
            reset(Cid(1), None),
            ended(Cid(1), false, Some(ErrorCode::LinkLost)),
            ended(Cid(3), false, Some(ErrorCode::LinkLost)),
            reset(Cid(70), Some((2, Cid(9)))),
            ended(Cid(70), true, Some(ErrorCode::LinkLost)),
        ]
    );
    assert!(r.is_empty());
    assert!(
        link.resets.is_empty(),
        "the link is gone: nothing is asked of it"
    );
}

#[test]
fn a_reused_cid_never_reaches_the_old_flows_consumer() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    r.attach_joined(Cid(70), "ldap", (2, Cid(9)));
    r.attach(Cid(70), "ldap");
    let out = outputs(&mut r);
    assert!(matches!(
        &out[0],
        RelayOutput::ToPeer {
            peer: (2, Cid(9)),
            msg: PeerMsg::Reset { .. },
            ..
        }
    ));
    assert_eq!(
        out[1],
        ended(Cid(70), true, Some(ErrorCode::ConnectionReset))
    );
    let fe = FlowEvent::Data {
        cid: Cid(70),
        payload: Bytes::from_static(b"x"),
    };
    r.handle_event(&mut link, fe);
    assert!(matches!(
        outputs(&mut r).as_slice(),
        [RelayOutput::Deliver { cid: Cid(70), .. }]
    ));
}

#[test]
fn commands_for_unknown_flows_touch_nothing() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    link.credit.insert(Cid(4), 100);
    r.data(&mut link, Cid(4), data(b"stray"));
    r.fin(&mut link, Cid(4));
    r.reset(&mut link, Cid(4), ErrorCode::ConnectionReset, "x");
    r.fail(&mut link, Cid(4), ErrorCode::ConnectionReset, "x");
    r.handle_event(&mut link, FlowEvent::Fin { cid: Cid(4) });
    assert!(link.sent.is_empty() && link.fins.is_empty() && link.resets.is_empty());
    assert!(outputs(&mut r).is_empty());
}

#[test]
fn a_held_open_sends_no_fin_before_it_is_accepted_so_nothing_held_is_lost() {
    let (mut r, mut link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    link.credit.insert(Cid(9), 100);
    r.hold_open(Cid(9), "ldap");
    // The client's bytes and FIN wait in the held slot…
    let fe = FlowEvent::Data {
        cid: Cid(9),
        payload: Bytes::from_static(b"bind"),
    };
    r.handle_event(&mut link, fe);
    r.handle_event(&mut link, FlowEvent::Fin { cid: Cid(9) });
    // …while the target answers and closes before the join arrives.
    r.data(&mut link, Cid(9), data(b"banner"));
    r.fin(&mut link, Cid(9));
    assert_eq!(link.sent, vec![(Cid(9), b"banner".to_vec())]);
    assert!(
        link.fins.is_empty(),
        "a FIN now would end the flow and drop the held bytes"
    );
    r.join(Cid(9), TUNNEL);
    let out = outputs(&mut r);
    assert_eq!(out[0], RelayOutput::AcceptOpen { cid: Cid(9) });
    assert!(out.contains(&RelayOutput::ToPeer {
        cid: Cid(9),
        peer: TUNNEL,
        msg: PeerMsg::Data(data(b"bind"))
    }));
    assert!(link.fins.is_empty(), "not before the open is accepted");
    r.accepted(&mut link, Cid(9));
    assert_eq!(link.fins, vec![Cid(9)]);
}

#[test]
fn a_second_join_resets_the_second_peers_flow() {
    let (mut r, _link) = (FlowRelay::<Peer>::new(), FakeLink::default());
    r.hold_open(Cid(9), "ldap");
    r.join(Cid(9), TUNNEL);
    let _ = outputs(&mut r);
    r.join(Cid(9), (1, Cid(71)));
    assert_eq!(
        outputs(&mut r),
        vec![RelayOutput::ToPeer {
            cid: Cid(9),
            peer: (1, Cid(71)),
            msg: PeerMsg::Reset {
                code: ErrorCode::ProtocolError,
                reason: "the mesh flow is bridged already".into()
            }
        }]
    );
}
