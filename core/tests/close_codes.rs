//! The WebSocket close code and reason a link's close carries: decided in
//! core for every runtime.

use nowconnect_core::ErrorCode;
use nowconnect_core::frame::ws_close_reason;

#[test]
fn every_error_code_has_its_websocket_close_code() {
    for code in ErrorCode::ALL {
        let want = match code {
            ErrorCode::Normal | ErrorCode::LinkLost | ErrorCode::IdleTimeout => 1000,
            ErrorCode::Shutdown => 1001,
            ErrorCode::ProtocolError | ErrorCode::SequenceGap | ErrorCode::CreditOverrun => 1002,
            ErrorCode::FrameTooLarge => 1009,
            ErrorCode::Internal => 1011,
            _ => 1008,
        };
        assert_eq!(code.ws_close_code(), want, "{code:?}");
        // Never a code RFC 6455 reserves for the wire's own use.
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
