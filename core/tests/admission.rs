//! Client admission at a listener: connection limits and rates, in all and
//! per client, with virtual time.

use std::net::IpAddr;
use std::time::Duration;

use nowconnect_core::admission::{
    Admission, AdmissionLimits, MAX_TRACKED_CLIENTS, Refusal, client_key,
};

mod common;
use common::origin;

fn limits() -> AdmissionLimits {
    AdmissionLimits {
        max_connections: 10,
        max_connections_per_client: 4,
        max_new_per_sec: 8,
        max_new_per_sec_per_client: 3,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_client_is_held_to_its_rate_and_others_are_not() {
    let t0 = origin();
    let mut a = Admission::new(limits(), t0);
    for _ in 0..3 {
        a.admit(t0, ip("10.0.0.1")).unwrap();
        a.release(ip("10.0.0.1"));
    }
    assert_eq!(a.admit(t0, ip("10.0.0.1")), Err(Refusal::ClientRate));
    a.admit(t0, ip("10.0.0.2")).unwrap();
    // A third of a second later one more token has come back.
    let t1 = t0 + Duration::from_millis(334);
    a.admit(t1, ip("10.0.0.1")).unwrap();
    assert_eq!(a.admit(t1, ip("10.0.0.1")), Err(Refusal::ClientRate));
}

#[test]
fn the_listener_rate_binds_every_client_together() {
    let t0 = origin();
    let mut a = Admission::new(limits(), t0);
    for i in 0..8 {
        a.admit(t0, ip(&format!("10.0.1.{i}"))).unwrap();
    }
    assert_eq!(a.admit(t0, ip("10.0.2.1")), Err(Refusal::ListenerRate));
    let t1 = t0 + Duration::from_secs(1);
    a.admit(t1, ip("10.0.2.1")).unwrap();
}

#[test]
fn open_connections_are_bounded_in_all_and_per_client_and_released() {
    let t0 = origin();
    let mut a = Admission::new(
        AdmissionLimits {
            max_new_per_sec: 1000,
            max_new_per_sec_per_client: 1000,
            ..limits()
        },
        t0,
    );
    for _ in 0..4 {
        a.admit(t0, ip("10.0.0.1")).unwrap();
    }
    assert_eq!(a.admit(t0, ip("10.0.0.1")), Err(Refusal::ClientLimit));
    for i in 0..6 {
        a.admit(t0, ip(&format!("10.0.3.{i}"))).unwrap();
    }
    assert_eq!(a.admit(t0, ip("10.0.4.1")), Err(Refusal::ListenerLimit));
    a.release(ip("10.0.0.1"));
    assert_eq!(a.open(), 9);
    a.admit(t0, ip("10.0.0.1")).unwrap();
    // Releasing an address never admitted changes nothing.
    a.release(ip("192.0.2.1"));
    assert_eq!(a.open(), 10);
}

#[test]
fn a_refusal_takes_no_token() {
    let t0 = origin();
    let mut a = Admission::new(
        AdmissionLimits {
            max_connections_per_client: 1,
            ..limits()
        },
        t0,
    );
    a.admit(t0, ip("10.0.0.1")).unwrap();
    for _ in 0..20 {
        assert_eq!(a.admit(t0, ip("10.0.0.1")), Err(Refusal::ClientLimit));
    }
    a.release(ip("10.0.0.1"));
    a.admit(t0, ip("10.0.0.1")).unwrap();
}

#[test]
fn ipv6_clients_are_counted_by_their_64_and_mapped_v4_as_v4() {
    let t0 = origin();
    let mut a = Admission::new(limits(), t0);
    for i in 1..=3 {
        a.admit(t0, ip(&format!("2001:db8:1:2::{i}"))).unwrap();
    }
    assert_eq!(
        a.admit(t0, ip("2001:db8:1:2:ffff::9")),
        Err(Refusal::ClientRate)
    );
    a.admit(t0, ip("2001:db8:1:3::1")).unwrap();
    assert_eq!(client_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
}

#[test]
fn the_rate_table_is_bounded_and_a_full_table_refuses_no_one() {
    let t0 = origin();
    let mut a = Admission::new(
        AdmissionLimits {
            max_connections: usize::MAX,
            max_connections_per_client: usize::MAX,
            max_new_per_sec: u32::MAX,
            max_new_per_sec_per_client: 1,
        },
        t0,
    );
    let addr = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000_u32.wrapping_add(i)));
    for i in 0..MAX_TRACKED_CLIENTS as u32 {
        a.admit(t0, addr(i)).unwrap();
    }
    assert_eq!(a.tracked_clients(), MAX_TRACKED_CLIENTS);
    // Full, and nothing has refilled: the next client is not tracked but
    // admitted (the listener's rate still applies).
    a.admit(t0, addr(MAX_TRACKED_CLIENTS as u32)).unwrap();
    assert_eq!(a.untracked, 1);
    assert_eq!(a.tracked_clients(), MAX_TRACKED_CLIENTS);
    // A second later every bucket has refilled and is forgotten for room.
    let t1 = t0 + Duration::from_secs(1);
    a.admit(t1, addr(u32::MAX - 1)).unwrap();
    assert_eq!(a.tracked_clients(), 1);
}
