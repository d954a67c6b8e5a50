//! The one timer table every machine uses (`nowconnect_core::timer`).

mod common;

use std::time::Duration;

use common::origin;
use nowconnect_core::timer::Timers;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum T {
    A,
    Op(u64),
    B,
}

#[test]
fn earliest_first_then_timer_order_and_rearming_replaces() {
    let t0 = origin();
    let s = Duration::from_secs(1);
    let mut ts = Timers::default();
    ts.set(T::B, t0 + s);
    ts.set(T::Op(2), t0 + s);
    ts.set(T::Op(1), t0 + 3 * s);
    ts.set(T::A, t0 + 2 * s);
    assert_eq!(ts.next(), Some((t0 + s, T::Op(2))));
    // Re-arming moves the one timer; it is never armed twice.
    ts.set(T::Op(1), t0 + s);
    assert_eq!(ts.len(), 4);
    assert_eq!(ts.get(T::Op(1)), Some(t0 + s));
    assert!(ts.expired(t0).is_empty(), "nothing fires early");
    // Equal deadlines fire in timer order.
    assert_eq!(ts.expired(t0 + s), vec![T::Op(1), T::Op(2), T::B]);
    assert_eq!(ts.next(), Some((t0 + 2 * s, T::A)));
    ts.clear(T::A);
    assert!(ts.is_empty());
    assert_eq!(ts.next(), None);
    assert_eq!(ts.pop_expired(t0 + 10 * s), None);
}

#[test]
fn pop_expired_sees_timers_armed_while_firing() {
    let t0 = origin();
    let s = Duration::from_secs(1);
    let mut ts = Timers::default();
    ts.set(T::A, t0);
    ts.set(T::B, t0 + s);
    assert_eq!(ts.pop_expired(t0 + s), Some(T::A));
    ts.set(T::Op(7), t0);
    ts.clear(T::B);
    assert_eq!(ts.pop_expired(t0 + s), Some(T::Op(7)));
    assert_eq!(ts.pop_expired(t0 + s), None);
}
