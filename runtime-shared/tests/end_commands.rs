//! A link task that ends answers what was sent to it: a command queued in the
//! instant the link closed must not leave its sender waiting with neither an
//! answer nor a close (a client connection that hangs instead of being
//! refused).

use async_channel::TryRecvError;
use nowconnect_core::{Cid, Epoch, ErrorCode};
use nowconnect_shared::driver::{
    FlowEnd, LinkCmd, MeshCmd, OpenRefused, Peer, PeerMsg, TunnelCmd, end_commands, reply_channel,
    send_open,
};

fn open_flow(reply: async_channel::Sender<Result<FlowEnd, OpenRefused>>) -> TunnelCmd {
    TunnelCmd::OpenFlow {
        connector: "ldap".into(),
        reply,
    }
}

/// A client routed to a link that went away before its open was sent (the
/// tunnel closed, or the mesh link dropped, after the routing decision)
/// hears so at once.
#[test]
fn an_open_without_a_link_is_answered_at_once() {
    let answer = send_open::<TunnelCmd, _>(None, open_flow);
    assert!(matches!(answer.try_recv(), Err(TryRecvError::Closed)));
}

#[test]
fn an_open_to_an_ended_link_is_answered_at_once_and_a_live_one_waits() {
    let (tx, rx) = async_channel::unbounded();
    let waiting = send_open(Some(tx.clone()), open_flow);
    assert!(matches!(waiting.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(rx.len(), 1);
    end_commands(&rx, "the agent tunnel closed");
    assert!(matches!(waiting.try_recv(), Err(TryRecvError::Closed)));
    let late = send_open(Some(tx), open_flow);
    assert!(matches!(late.try_recv(), Err(TryRecvError::Closed)));
}

#[test]
fn queued_opens_are_answered_as_link_lost_and_later_sends_fail_at_once() {
    let (tx, rx) = async_channel::unbounded();
    let (mesh_tx, mesh_rx) = async_channel::unbounded();
    let (tunnel_reply, tunnel_answer) = reply_channel();
    let (mesh_reply, mesh_answer) = reply_channel();
    let (joined_reply, joined_answer) = reply_channel();
    let (other_tx, _other_rx) = async_channel::unbounded();
    tx.try_send(LinkCmd::Link(TunnelCmd::OpenFlow {
        connector: "ldap".into(),
        reply: tunnel_reply,
    }))
    .unwrap();
    mesh_tx
        .try_send(LinkCmd::Link(MeshCmd::OpenFlow {
            connector: "ldap".into(),
            agent_id: "agent-1".into(),
            epoch: Epoch(3),
            reply: mesh_reply,
        }))
        .unwrap();
    tx.try_send(LinkCmd::Link(TunnelCmd::OpenJoined {
        connector: "ldap".into(),
        peer: Peer {
            cmd: other_tx,
            cid: Cid(7),
        },
        reply: joined_reply,
    }))
    .unwrap();
    // The waiting side still holds a sender, as a client task does.
    let keep = tx.clone();
    end_commands(&rx, "the agent tunnel closed");
    end_commands(&mesh_rx, "the mesh link closed");
    // Every reply is gone: the waiters see the link went away.
    assert!(matches!(
        tunnel_answer.try_recv(),
        Err(TryRecvError::Closed)
    ));
    assert!(matches!(mesh_answer.try_recv(), Err(TryRecvError::Closed)));
    assert!(matches!(
        joined_answer.try_recv(),
        Err(TryRecvError::Closed)
    ));
    // A send after the end fails at once, and its reply goes with it.
    let (late_reply, late_answer) = reply_channel();
    assert!(
        keep.try_send(LinkCmd::Link(TunnelCmd::OpenFlow {
            connector: "ldap".into(),
            reply: late_reply,
        }))
        .is_err()
    );
    assert!(matches!(late_answer.try_recv(), Err(TryRecvError::Closed)));
}

#[test]
fn a_queued_join_resets_the_flow_on_the_other_link() {
    let (tx, rx) = async_channel::unbounded::<LinkCmd<MeshCmd>>();
    let (other_tx, other_rx) = async_channel::unbounded::<LinkCmd<TunnelCmd>>();
    tx.try_send(LinkCmd::Flow {
        cid: Cid(5),
        msg: PeerMsg::Data(bytes::Bytes::from_static(b"gone with its flow").into()),
    })
    .unwrap();
    tx.try_send(LinkCmd::Link(MeshCmd::Join {
        cid: Cid(5),
        peer: Peer {
            cmd: other_tx,
            cid: Cid(9),
        },
    }))
    .unwrap();
    end_commands(&rx, "the mesh link closed");
    match other_rx.try_recv() {
        Ok(LinkCmd::Flow {
            cid,
            msg: PeerMsg::Reset { code, reason },
        }) => {
            assert_eq!(cid, Cid(9));
            assert_eq!(code, ErrorCode::LinkLost);
            assert_eq!(reason, "the mesh link closed");
        }
        _ => panic!("the joined flow on the other link was not reset"),
    }
    assert!(other_rx.try_recv().is_err(), "one reset, nothing else");
    assert!(rx.is_empty());
}
