//! The agent's token renewal: when it looks for a fresh token, that only a
//! longer-lived one replaces the tracked one, and which tunnels get it —
//! every established tunnel whose hub holds an older token, a draining one
//! kept after the agent dialed its next hub with a newer token included.

use std::time::{Duration, Instant};

use base64::Engine;
use nowconnect_core::renewal::{
    CaughtUp, Looked, Presented, RenewalConfig, TokenRenewal, TokenTimes,
};
use nowconnect_core::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
use nowconnect_core::{Epoch, WsMessage};

mod common;
use common::origin;

fn jwt(exp: u64, iat: u64) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        b.encode(br#"{"alg":"HS256"}"#),
        b.encode(format!(r#"{{"exp":{exp},"iat":{iat}}}"#))
    )
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A renewal that presented `token` (a dial).
fn presented(token: &str) -> TokenRenewal {
    let mut r = TokenRenewal::new(RenewalConfig::default());
    assert!(r.observe(token, TokenTimes::of_jwt(token)));
    r
}

fn read(token: &str) -> Option<(&str, Option<TokenTimes>)> {
    Some((token, TokenTimes::of_jwt(token)))
}

#[test]
fn looks_a_quarter_of_the_lifetime_before_expiry_and_takes_only_a_longer_token() {
    let now = origin();
    let t0 = 1_000_000;
    let mut r = presented(&jwt(t0 + 400, t0));
    // Due 100 s before expiry.
    assert_eq!(r.deadline(now, secs(t0)), Some(now + secs(300)));
    assert!(!r.due(now, secs(t0 + 299)));
    assert!(r.due(now, secs(t0 + 300)));
    // Due, but the file still holds the same token: one warning, and look
    // again after the retry.
    let same = jwt(t0 + 400, t0);
    assert_eq!(
        r.looked(now, secs(t0 + 300), read(&same)),
        Looked::Nothing {
            warn: Some(secs(100))
        }
    );
    assert_eq!(r.deadline(now, secs(t0 + 300)), Some(now + secs(1)));
    assert!(!r.due(now, secs(t0 + 300)), "not before the retry");
    let later = now + secs(1);
    assert_eq!(
        r.looked(later, secs(t0 + 301), None),
        Looked::Nothing { warn: None },
        "warned once"
    );
    let fresh = jwt(t0 + 800, t0 + 301);
    assert_eq!(
        r.looked(later, secs(t0 + 301), read(&fresh)),
        Looked::Fresh {
            expires: secs(t0 + 800)
        }
    );
    // A quarter of its 499 s lifetime (124.75 s) before it expires.
    assert_eq!(
        r.deadline(later, secs(t0 + 301)),
        Some(later + Duration::from_millis(374_250))
    );
    // A look that finds a token expiring sooner never takes it.
    let old = jwt(t0 + 500, t0);
    assert!(r.due(later + secs(100), secs(t0 + 700)));
    assert!(matches!(
        r.looked(later + secs(100), secs(t0 + 700), read(&old)),
        Looked::Nothing { .. }
    ));
    assert_eq!(r.expires(), Some(secs(t0 + 800)));
}

#[test]
fn after_a_key_rotation_the_token_dialed_with_is_the_one_held_even_if_it_expires_sooner() {
    // The old token (old key) lived an hour; the operator rotated the key
    // and wrote a ten-minute token; the agent dials with it. Handing the
    // old, longer-lived token back to that tunnel (REAUTH) would have the
    // hub refuse it (bad signature) and close the tunnel, again and again.
    let now = origin();
    let t0 = 1_000_000;
    let (old, rotated) = (jwt(t0 + 3600, t0), jwt(t0 + 610, t0 + 10));
    let mut r = presented(&old);
    assert!(r.observe(&rotated, TokenTimes::of_jwt(&rotated)));
    assert_eq!(r.expires(), Some(secs(t0 + 610)));
    let (mut agent, mut hub) = established(now);
    let mut exp = secs(t0 + 610);
    let done = r.catch_up([Presented {
        exp: &mut exp,
        tunnel: &mut agent,
    }]);
    assert_eq!(done, CaughtUp::default());
    assert!(reauths(&mut agent, &mut hub, now).is_empty());
    // Renewal is now timed by the token held: due 150 s before it expires.
    assert_eq!(r.deadline(now, secs(t0 + 10)), Some(now + secs(450)));
    // A dial with a token whose lifetime cannot be read leaves nothing to
    // renew with.
    assert!(r.observe("x.y.z", None));
    assert_eq!(r.deadline(now, secs(t0 + 10)), None);
}

#[test]
fn the_lead_is_bounded_and_garbage_is_ignored() {
    let now = origin();
    let short = presented(&jwt(1004, 1000));
    assert_eq!(short.deadline(now, secs(1000)), Some(now + secs(2)));
    let long = presented(&jwt(1_000_000 + 86_400 * 30, 1_000_000));
    assert_eq!(
        long.deadline(now, secs(1_000_000)),
        Some(now + secs(86_400 * 30 - 300))
    );
    assert_eq!(TokenTimes::of_jwt("not a token"), None);
    let mut none = TokenRenewal::new(RenewalConfig::default());
    assert!(!none.observe("x.y.z", TokenTimes::of_jwt("x.y.z")));
    assert_eq!(none.deadline(now, secs(0)), None);
    assert!(!none.due(now, secs(u64::MAX / 2)));
}

/// An agent tunnel and its hub side, with the handshake done.
fn established(now: Instant) -> (Tunnel, Tunnel) {
    let cfg = TunnelConfig::default();
    let mut agent = Tunnel::agent(now, cfg.clone(), "a", &["ldap".to_string()]);
    let mut hub = Tunnel::hub(now, cfg);
    for _ in 0..8 {
        let out: Vec<WsMessage> = std::iter::from_fn(|| agent.poll_transmit()).collect();
        for m in out {
            hub.handle_message(now, &m);
        }
        while let Some(ev) = hub.poll_event() {
            if matches!(ev, TunnelEvent::Hello { .. }) {
                hub.accept(now, Epoch(1));
            }
        }
        let back: Vec<WsMessage> = std::iter::from_fn(|| hub.poll_transmit()).collect();
        for m in back {
            agent.handle_message(now, &m);
        }
        while agent.poll_event().is_some() {}
    }
    assert!(agent.is_established());
    (agent, hub)
}

/// The tokens a hub side received by REAUTH.
fn reauths(agent: &mut Tunnel, hub: &mut Tunnel, now: Instant) -> Vec<String> {
    let out: Vec<WsMessage> = std::iter::from_fn(|| agent.poll_transmit()).collect();
    for m in out {
        hub.handle_message(now, &m);
    }
    std::iter::from_fn(|| hub.poll_event())
        .filter_map(|ev| match ev {
            TunnelEvent::Reauth { token } => Some(token),
            _ => None,
        })
        .collect()
}

fn both<'a>(
    d: &'a mut Duration,
    dt: &'a mut Tunnel,
    c: &'a mut Duration,
    ct: &'a mut Tunnel,
) -> [Presented<'a>; 2] {
    [
        Presented { exp: d, tunnel: dt },
        Presented { exp: c, tunnel: ct },
    ]
}

#[test]
fn a_tunnel_left_with_an_older_token_gets_the_newest_once() {
    let now = origin();
    let t0 = 1_000_000;
    let (old, new) = (jwt(t0 + 400, t0), jwt(t0 + 800, t0 + 300));
    // The draining tunnel was dialed with the old token; the agent then
    // dialed another hub with the new one (read at that dial).
    let (mut draining, mut draining_hub) = established(now);
    let (mut current, mut current_hub) = established(now);
    let mut r = presented(&old);
    assert!(r.observe(&new, TokenTimes::of_jwt(&new)));
    let (mut draining_exp, mut current_exp) = (secs(t0 + 400), secs(t0 + 800));
    let done = r.catch_up(both(
        &mut draining_exp,
        &mut draining,
        &mut current_exp,
        &mut current,
    ));
    assert_eq!(done, CaughtUp { sent: 1, v1: 0 });
    assert_eq!(reauths(&mut draining, &mut draining_hub, now), [new]);
    assert!(
        reauths(&mut current, &mut current_hub, now).is_empty(),
        "the hub already holds the new token"
    );
    assert_eq!(draining_exp, secs(t0 + 800));
    // Nothing more to send the next time round.
    let again = r.catch_up(both(
        &mut draining_exp,
        &mut draining,
        &mut current_exp,
        &mut current,
    ));
    assert_eq!(again, CaughtUp::default());
    assert!(reauths(&mut draining, &mut draining_hub, now).is_empty());
}

#[test]
fn a_tunnel_still_in_its_handshake_gets_the_token_once_established() {
    let now = origin();
    let t0 = 1_000_000;
    let r = presented(&jwt(t0 + 800, t0));
    let mut fresh = Tunnel::agent(now, TunnelConfig::default(), "a", &["ldap".to_string()]);
    let mut exp = secs(t0 + 400);
    r.catch_up([Presented {
        exp: &mut exp,
        tunnel: &mut fresh,
    }]);
    assert_eq!(
        exp,
        secs(t0 + 400),
        "no REAUTH before the tunnel is established"
    );
    let (mut agent, mut hub) = established(now);
    r.catch_up([Presented {
        exp: &mut exp,
        tunnel: &mut agent,
    }]);
    assert_eq!(reauths(&mut agent, &mut hub, now), [jwt(t0 + 800, t0)]);
}

#[test]
fn a_wall_clock_stepped_back_leaves_no_deadline_in_the_past() {
    let now = origin();
    let t0 = 1_000_000;
    let mut r = presented(&jwt(t0 + 400, t0));
    let same = jwt(t0 + 400, t0);
    assert!(matches!(
        r.looked(now, secs(t0 + 300), read(&same)),
        Looked::Nothing { .. }
    ));
    // The clock steps back a minute, past the due point, and time moves on.
    let later = now + secs(5);
    let deadline = r.deadline(later, secs(t0 + 245)).unwrap();
    assert!(
        deadline > later,
        "a deadline in the past would spin the agent"
    );
    assert_eq!(deadline, later + secs(55));
}
