//! The WebSocket close code and reason a link's close carries: decided in
//! core for every runtime.

use nowconnect_core::ErrorCode;
use nowconnect_core::frame::ws_close_reason;

/// The close code of every error code, written out (RFC 6455 §7.4.1): a
/// normal end, going away, a protocol error, a message too big, an internal
/// error, and a policy refusal for the rest.
#[test]
fn every_error_code_has_its_websocket_close_code() {
    let table = [
        (ErrorCode::Normal, 1000),
        (ErrorCode::ProtocolError, 1002),
        (ErrorCode::TargetUnreachable, 1008),
        (ErrorCode::ConnectTimeout, 1008),
        (ErrorCode::NoAgent, 1008),
        (ErrorCode::StaleEpoch, 1008),
        (ErrorCode::CreditOverrun, 1002),
        (ErrorCode::SequenceGap, 1002),
        (ErrorCode::FrameTooLarge, 1009),
        (ErrorCode::Shutdown, 1001),
        (ErrorCode::LinkLost, 1000),
        (ErrorCode::RegistryUnavailable, 1008),
        (ErrorCode::MeshUnavailable, 1008),
        (ErrorCode::Refused, 1008),
        (ErrorCode::Internal, 1011),
        (ErrorCode::IdleTimeout, 1000),
        (ErrorCode::LimitExceeded, 1008),
        (ErrorCode::ConnectionReset, 1008),
        (ErrorCode::UnknownConnector, 1008),
    ];
    assert_eq!(table.len(), ErrorCode::ALL.len(), "a code is missing here");
    for (code, want) in table {
        assert_eq!(code.ws_close_code(), want, "{code:?}");
    }
    // Never a code RFC 6455 reserves for the wire's own use.
    for code in ErrorCode::ALL {
        assert!(![1004, 1005, 1006, 1015].contains(&code.ws_close_code()));
    }
}

#[test]
fn close_reasons_are_cut_to_123_bytes_at_a_character_boundary() {
    assert_eq!(ws_close_reason("short"), "short");
    let long = "x".repeat(200);
    assert_eq!(ws_close_reason(&long).len(), 123);
    // 122 ASCII bytes then a 2-byte character: cut before it.
    let s = format!("{}é and more", "y".repeat(122));
    assert_eq!(ws_close_reason(&s), "y".repeat(122));
}
