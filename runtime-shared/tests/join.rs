//! The owner hub's link-to-link join of a mesh flow and a tunnel flow, on
//! two `FlowPipes` over recording links: what arrives while the mesh flow is
//! held reaches the tunnel flow in order once joined, credit goes back to
//! the side whose bytes were taken, and a flow that ends on one side resets
//! the other. (`FlowPipes` carries out what the core's `FlowRelay` decides:
//! these check that it carries it out across real channels.)

use std::sync::Arc;

use async_channel::{Receiver, Sender};
use bytes::Bytes;
use nowconnect_core::flow::SendError;
use nowconnect_core::mux::{FlowEvent, FlowLink};
use nowconnect_core::{Cid, ErrorCode, Payload};
use nowconnect_shared::driver::{
    FlowPipes, LinkCmd, LinkKind, MeshCmd, OpenLink, Peer, PeerMsg, TunnelCmd,
};
use nowconnect_shared::metrics::Metrics;

/// A core link that takes whatever it has credit for and records it.
#[derive(Default)]
struct Recorder {
    sent: Vec<(Cid, Bytes)>,
    fins: Vec<Cid>,
    resets: Vec<(Cid, ErrorCode)>,
    consumed: Vec<(Cid, usize)>,
    accepted: Vec<Cid>,
    refused: Vec<(Cid, ErrorCode)>,
    credit: u64,
}

impl OpenLink for Recorder {
    fn accept_open(&mut self, cid: Cid) {
        self.accepted.push(cid);
    }
    fn refuse_open(&mut self, cid: Cid, code: ErrorCode, _: &str) {
        self.refused.push((cid, code));
    }
}

impl FlowLink for Recorder {
    fn send_credit(&self, _: Cid) -> u64 {
        self.credit
    }
    fn send_data(&mut self, cid: Cid, payload: Payload) -> Result<(), SendError> {
        self.credit -= payload.len() as u64;
        self.sent.push((cid, payload.into_bytes()));
        Ok(())
    }
    fn send_fin(&mut self, cid: Cid) -> Result<(), SendError> {
        self.fins.push(cid);
        Ok(())
    }
    fn reset_flow(&mut self, cid: Cid, code: ErrorCode, _: &str) {
        self.resets.push((cid, code));
    }
    fn consumed(&mut self, cid: Cid, n: usize) {
        self.consumed.push((cid, n));
    }
}

/// One link of kind `K`: a mesh link or a tunnel.
struct Side<K: LinkKind> {
    pipes: FlowPipes<K>,
    link: Recorder,
    rx: Receiver<LinkCmd<K>>,
    tx: Sender<LinkCmd<K>>,
}

impl<K: LinkKind> Side<K> {
    fn new(credit: u64) -> Self {
        let (tx, rx) = async_channel::unbounded();
        Side {
            pipes: FlowPipes::new(tx.clone(), Arc::new(Metrics::new())),
            link: Recorder {
                credit,
                ..Recorder::default()
            },
            rx,
            tx,
        }
    }

    fn peer(&self, cid: Cid) -> Peer<K> {
        Peer {
            cmd: self.tx.clone(),
            cid,
        }
    }

    /// Apply every command queued for this side (what the link task does):
    /// flow commands only, from the joined flows.
    fn run(&mut self) {
        while let Ok(cmd) = self.rx.try_recv() {
            let LinkCmd::Flow { cid, msg } = cmd else {
                panic!("not a flow command");
            };
            self.pipes.on_flow(&mut self.link, cid, msg);
        }
    }

    fn queued(&self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(cmd) = self.rx.try_recv() {
            v.push(match cmd {
                LinkCmd::Flow { cid, msg } => match msg {
                    PeerMsg::Data(payload) => {
                        format!("data {cid} {}", String::from_utf8_lossy(&payload))
                    }
                    PeerMsg::Fin => format!("fin {cid}"),
                    PeerMsg::Reset { code, .. } => format!("reset {cid} {code}"),
                    PeerMsg::Consumed(n) => format!("consumed {cid} {n}"),
                },
                _ => "other".into(),
            });
        }
        v
    }
}

fn data(cid: Cid, s: &'static str) -> FlowEvent {
    FlowEvent::Data {
        cid,
        payload: Bytes::from_static(s.as_bytes()),
    }
}

#[test]
fn what_arrives_while_held_reaches_the_tunnel_flow_in_order_and_credit_flows_back() {
    let (mut mesh, mut tunnel) = (
        Side::<MeshCmd>::new(1 << 20),
        Side::<TunnelCmd>::new(1 << 20),
    );
    mesh.pipes.hold_open(&mut mesh.link, Cid(1), "ldap");
    // The client's first bytes cross the mesh before the tunnel flow exists.
    mesh.pipes.on_event(&mut mesh.link, data(Cid(1), "bind"));
    mesh.pipes.on_event(&mut mesh.link, data(Cid(1), "search"));
    // The tunnel flow opens joined to the mesh flow; the target answers at
    // once, before the mesh flow is joined back.
    tunnel
        .pipes
        .attach_joined(&mut tunnel.link, Cid(7), "ldap", mesh.peer(Cid(1)));
    tunnel
        .pipes
        .on_event(&mut tunnel.link, data(Cid(7), "banner"));
    mesh.run();
    assert_eq!(
        mesh.link.sent,
        vec![(Cid(1), Bytes::from_static(b"banner"))]
    );
    // Nobody to credit yet: the mesh flow is still held.
    assert!(tunnel.rx.is_empty());

    mesh.pipes.join(&mut mesh.link, Cid(1), tunnel.peer(Cid(7)));
    assert_eq!(mesh.link.accepted, [Cid(1)], "accepted on the join");
    assert_eq!(
        tunnel.queued(),
        ["data 7 bind", "data 7 search", "consumed 7 6"],
        "held data in order, then the credit for what the mesh core took"
    );

    // Joined: deliveries go straight across, and each side's take is
    // credited to the other.
    mesh.pipes.on_event(&mut mesh.link, data(Cid(1), "unbind"));
    mesh.pipes
        .on_event(&mut mesh.link, FlowEvent::Fin { cid: Cid(1) });
    for payload in [b"bind".as_slice(), b"search"] {
        let msg = PeerMsg::Data(Bytes::from_static(payload).into());
        tunnel.pipes.on_flow(&mut tunnel.link, Cid(7), msg);
    }
    tunnel.run();
    assert_eq!(
        tunnel
            .link
            .sent
            .iter()
            .map(|(c, b)| format!("{c} {}", String::from_utf8_lossy(b)))
            .collect::<Vec<_>>(),
        ["7 bind", "7 search", "7 unbind"]
    );
    assert_eq!(tunnel.link.fins, [Cid(7)]);
    assert_eq!(
        mesh.queued(),
        ["consumed 1 4", "consumed 1 6", "consumed 1 6"],
        "the mesh flow is credited as the tunnel core takes its bytes"
    );
}

#[test]
fn credit_is_returned_only_as_the_other_core_takes_the_bytes() {
    let (mut mesh, mut tunnel) = (Side::<MeshCmd>::new(1 << 20), Side::<TunnelCmd>::new(3));
    mesh.pipes.hold_open(&mut mesh.link, Cid(1), "ldap");
    tunnel
        .pipes
        .attach_joined(&mut tunnel.link, Cid(7), "ldap", mesh.peer(Cid(1)));
    mesh.pipes.join(&mut mesh.link, Cid(1), tunnel.peer(Cid(7)));
    mesh.pipes
        .on_event(&mut mesh.link, data(Cid(1), "abcdefgh"));
    tunnel.run();
    // The agent's window had room for 3 bytes: 3 are sent and credited.
    assert_eq!(tunnel.link.sent, vec![(Cid(7), Bytes::from_static(b"abc"))]);
    assert_eq!(mesh.queued(), ["consumed 1 3"]);
    // More window: the rest goes, and is credited.
    tunnel.link.credit = 100;
    tunnel.pipes.on_event(
        &mut tunnel.link,
        FlowEvent::Writable {
            cid: Cid(7),
            credit: 100,
        },
    );
    assert_eq!(tunnel.link.sent[1], (Cid(7), Bytes::from_static(b"defgh")));
    assert_eq!(mesh.queued(), ["consumed 1 5"]);
}

#[test]
fn an_end_on_either_side_resets_the_other() {
    // The mesh flow is reset while held: joining it resets the tunnel flow.
    let (mut mesh, mut tunnel) = (
        Side::<MeshCmd>::new(1 << 20),
        Side::<TunnelCmd>::new(1 << 20),
    );
    mesh.pipes.hold_open(&mut mesh.link, Cid(2), "ldap");
    mesh.pipes.on_event(
        &mut mesh.link,
        FlowEvent::Reset {
            cid: Cid(2),
            code: ErrorCode::ConnectionReset,
            reason: "client went away".into(),
        },
    );
    tunnel
        .pipes
        .attach_joined(&mut tunnel.link, Cid(8), "ldap", mesh.peer(Cid(2)));
    mesh.pipes.join(&mut mesh.link, Cid(2), tunnel.peer(Cid(8)));
    tunnel.run();
    assert_eq!(tunnel.link.resets, [(Cid(8), ErrorCode::ConnectionReset)]);
    assert_eq!(tunnel.pipes.take_bridged_ends(), 1);

    // The target resets a joined flow: the mesh flow is reset with its code.
    mesh.pipes.hold_open(&mut mesh.link, Cid(3), "ldap");
    tunnel
        .pipes
        .attach_joined(&mut tunnel.link, Cid(9), "ldap", mesh.peer(Cid(3)));
    mesh.pipes.join(&mut mesh.link, Cid(3), tunnel.peer(Cid(9)));
    tunnel.pipes.on_event(
        &mut tunnel.link,
        FlowEvent::Reset {
            cid: Cid(9),
            code: ErrorCode::TargetUnreachable,
            reason: "refused".into(),
        },
    );
    mesh.run();
    assert_eq!(mesh.link.resets, [(Cid(3), ErrorCode::TargetUnreachable)]);

    // The tunnel goes away with a joined flow open: the mesh flow is reset.
    mesh.pipes.hold_open(&mut mesh.link, Cid(4), "ldap");
    tunnel
        .pipes
        .attach_joined(&mut tunnel.link, Cid(10), "ldap", mesh.peer(Cid(4)));
    assert_eq!(tunnel.pipes.bridged_open(), 1);
    drop(tunnel.pipes);
    mesh.run();
    // Not joined yet: the mesh open is refused (never accepted, then reset).
    assert_eq!(mesh.link.refused, [(Cid(4), ErrorCode::LinkLost)]);
    assert_eq!(mesh.link.accepted, [Cid(3)]);
}
