//! Why a link refused to open a flow, as the core decides it from its
//! `SendError`: the reset code, the label the client's refusal is counted
//! under, and the reason, whichever runtime asked.

use nowconnect_core::flow::SendError;
use nowconnect_core::{Cid, ErrorCode};

#[test]
fn open_refusals_keep_their_cause() {
    let share = SendError::ShareExceeded {
        connector: "idle".into(),
        open: 12,
        reserved: 4,
    }
    .refusal("agent flow");
    assert_eq!(
        (share.code, share.label),
        (ErrorCode::LimitExceeded, "connector_share")
    );
    assert_eq!(
        share.reason,
        "connector `idle` holds 12 of the agent's flows; the other 4 free flows are kept for its other connectors"
    );
    assert_eq!(share.to_string(), share.reason);
    let full = SendError::QueueFull(4096).refusal("agent flow");
    assert_eq!(
        (full.code, full.label, full.reason.as_str()),
        (
            ErrorCode::LimitExceeded,
            "limit_exceeded",
            "agent flow limit of 4096 reached"
        )
    );
    let mesh_full = SendError::QueueFull(64).refusal("mesh link flow");
    assert_eq!(mesh_full.reason, "mesh link flow limit of 64 reached");
    let gone = SendError::NotEstablished.refusal("mesh link flow");
    assert_eq!(
        (gone.code, gone.label, gone.reason.as_str()),
        (
            ErrorCode::LinkLost,
            "link_lost",
            "the link is not established"
        )
    );
    // Anything else a link says about an open counts as its limit.
    let other = SendError::UnknownFlow(Cid(7)).refusal("agent flow");
    assert_eq!(
        (other.code, other.label, other.reason.as_str()),
        (
            ErrorCode::LimitExceeded,
            "limit_exceeded",
            "flow 7 is not open"
        )
    );
}
