//! A hub client's first-byte and idle timeouts: when each fires, which one
//! wins, and how long a watcher may sleep.

use std::time::Duration;

use nowconnect_core::ErrorCode;
use nowconnect_core::client_timeouts::{ClientTimeouts, Expired, Verdict};

const S: Duration = Duration::from_secs(1);

fn both() -> ClientTimeouts {
    ClientTimeouts {
        idle: Some(300 * S),
        first_byte: Some(10 * S),
    }
}

#[test]
fn no_limit_means_nothing_to_watch() {
    let t = ClientTimeouts::default();
    assert!(!t.any());
    assert_eq!(t.check(1000 * S, 1000 * S, false), Verdict::Done);
}

#[test]
fn a_silent_client_is_reset_at_its_first_byte_limit_and_not_before() {
    let t = both();
    assert_eq!(t.check(9 * S, 9 * S, false), Verdict::CheckIn(S));
    let e = Expired::FirstByte(10 * S);
    assert_eq!(t.check(10 * S, 10 * S, false), Verdict::Expired(e));
    assert_eq!(e.kind(), "first_byte");
    assert_eq!(e.code(), ErrorCode::IdleTimeout);
    assert!(e.reason().contains("listeners[].first_byte_timeout_sec"));
}

#[test]
fn a_client_that_spoke_is_held_to_the_idle_limit_only() {
    let t = both();
    // Spoke at once, then silence: no first-byte reset at 10 s.
    assert_eq!(t.check(10 * S, 10 * S, true), Verdict::CheckIn(290 * S));
    assert_eq!(
        t.check(400 * S, 300 * S, true),
        Verdict::Expired(Expired::Idle(300 * S))
    );
    // Bytes keep moving: never idle, however old the flow.
    assert_eq!(t.check(10_000 * S, S, true), Verdict::CheckIn(299 * S));
}

#[test]
fn the_watcher_sleeps_until_the_nearer_limit() {
    let t = ClientTimeouts {
        idle: Some(5 * S),
        first_byte: Some(10 * S),
    };
    // Silent client: the idle limit (5 s) comes first and fires first.
    assert_eq!(t.check(2 * S, 2 * S, false), Verdict::CheckIn(3 * S));
    assert_eq!(
        t.check(5 * S, 5 * S, false),
        Verdict::Expired(Expired::Idle(5 * S))
    );
}

#[test]
fn with_only_a_first_byte_limit_a_client_that_spoke_is_left_alone() {
    let t = ClientTimeouts {
        idle: None,
        first_byte: Some(10 * S),
    };
    assert_eq!(t.check(3 * S, 3 * S, false), Verdict::CheckIn(7 * S));
    assert_eq!(t.check(3 * S, 3 * S, true), Verdict::Done);
}
