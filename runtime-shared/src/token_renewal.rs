//! The agent's side of token lifetime: the hub closes a tunnel when its
//! token expires, so before that the agent re-reads `token_file` and, once
//! it holds a token that lives longer, hands it to the hub on every open
//! tunnel (REAUTH). Flows never notice. The agent reads `exp` and `iat`
//! from the token without verifying it: only to know when to look; the hub
//! verifies.

use std::time::{Duration, Instant};

use base64::Engine;

/// When to look for a fresh token: this share of the token's lifetime
/// before it expires, within [`MIN_LEAD`, `MAX_LEAD`].
const LEAD_SHARE: u64 = 4;
const MIN_LEAD: u64 = 2;
const MAX_LEAD: u64 = 300;
/// While due and no newer token is found, look again this often.
const RETRY: Duration = Duration::from_secs(1);

/// `exp` and `iat` of a JWT, unverified.
pub fn token_times(token: &str) -> Option<(u64, Option<u64>)> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some((
        v.get("exp")?.as_u64()?,
        v.get("iat").and_then(|i| i.as_u64()),
    ))
}

#[derive(Debug, Default)]
pub struct TokenRenewal {
    /// `exp` and `iat` of the longest-lived token presented so far.
    times: Option<(u64, Option<u64>)>,
    /// That token: every tunnel that holds an older one gets it.
    newest: Option<String>,
    /// Due, and the last look found nothing newer: look again then.
    retry_at: Option<Instant>,
    warned: bool,
}

impl TokenRenewal {
    pub fn new(token: &str) -> Self {
        let mut r = TokenRenewal::default();
        r.observe(token);
        r
    }

    /// The agent presents `token` (a dial): track it when it lives longer.
    pub fn observe(&mut self, token: &str) -> bool {
        match token_times(token) {
            Some(t) if self.times.is_none_or(|(exp, _)| t.0 > exp) => {
                self.times = Some(t);
                self.newest = Some(token.to_string());
                self.retry_at = None;
                self.warned = false;
                true
            }
            _ => false,
        }
    }

    /// The unix time at which to look for a fresh token.
    fn due_unix(&self, unix_now: u64) -> Option<u64> {
        let (exp, iat) = self.times?;
        let lifetime = exp.saturating_sub(iat.unwrap_or(unix_now).min(exp));
        let lead = (lifetime / LEAD_SHARE).clamp(MIN_LEAD, MAX_LEAD);
        Some(exp.saturating_sub(lead))
    }

    /// When to call [`TokenRenewal::poll`] next.
    pub fn deadline(&self, now: Instant, unix_now: u64) -> Option<Instant> {
        if let Some(at) = self.retry_at {
            return Some(at);
        }
        let due = self.due_unix(unix_now)?;
        Some(now + Duration::from_secs(due.saturating_sub(unix_now)))
    }

    /// If due, read the current token (`read`: `token_file` again); a token
    /// that lives longer than the one presented is returned (and tracked),
    /// for the caller to send on every tunnel. Otherwise look again in a
    /// second, with one warning naming how long is left.
    pub fn poll(
        &mut self,
        now: Instant,
        unix_now: u64,
        read: impl FnOnce() -> Result<String, String>,
    ) -> Option<String> {
        let due = self.due_unix(unix_now)?;
        if unix_now < due || self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        match read() {
            Ok(t) if self.observe(&t) => return Some(t),
            Ok(_) => {
                if !self.warned {
                    let left = self
                        .times
                        .map_or(0, |(exp, _)| exp.saturating_sub(unix_now));
                    tracing::warn!(
                        seconds_left = left,
                        "the agent's token expires soon and token_file holds no newer token; the hub closes its tunnels when it expires"
                    );
                }
            }
            Err(error) => {
                if !self.warned {
                    tracing::warn!(%error, "cannot read a fresh token");
                }
            }
        }
        self.warned = true;
        self.retry_at = Some(now + RETRY);
        None
    }
}

/// `exp` of a token, or 0 when it has none the agent can read.
pub fn token_exp(token: &str) -> u64 {
    token_times(token).map_or(0, |(exp, _)| exp)
}

/// One of the agent's tunnels as renewal sees it: the `exp` of the token
/// its hub holds for it (the one it dialed with, or the last REAUTH).
pub struct Presented<'a> {
    pub exp: &'a mut u64,
    pub tunnel: &'a mut nowconnect_core::tunnel::Tunnel,
}

impl TokenRenewal {
    /// The agent runtime's timer step: look for a fresh token when due
    /// (see [`TokenRenewal::poll`]), then [`TokenRenewal::catch_up`].
    pub fn renew<'a>(
        &mut self,
        now: Instant,
        read: impl FnOnce() -> Result<String, String>,
        tunnels: impl IntoIterator<Item = Presented<'a>>,
    ) {
        if self.poll(now, crate::jwt::unix_now(), read).is_some() {
            tracing::info!(
                expires_at = self.times.map_or(0, |(exp, _)| exp),
                "fresh token found"
            );
        }
        self.catch_up(tunnels);
    }

    /// Hand the newest token (REAUTH) to every established tunnel whose
    /// hub holds an older one. Not only at renewal: a tunnel can be left
    /// with an older token when the agent dialed another hub with a newer
    /// one (a DRAIN keeps the old tunnel and its flows), or when a renewal
    /// went out while the tunnel was still in its handshake; without this
    /// the hub would close it at the old token's expiry, flows and all.
    /// v1 tunnels cannot take it and end with their token.
    pub fn catch_up<'a>(&mut self, tunnels: impl IntoIterator<Item = Presented<'a>>) {
        let (Some(token), Some((exp, _))) = (&self.newest, self.times) else {
            return;
        };
        let (mut sent, mut v1) = (0, 0);
        for p in tunnels {
            if *p.exp >= exp || !p.tunnel.is_established() {
                continue;
            }
            if p.tunnel.send_reauth(token) {
                sent += 1;
            } else {
                v1 += 1;
            }
            // A v1 tunnel is not asked again.
            *p.exp = exp;
        }
        if sent + v1 > 0 {
            tracing::info!(
                tunnels = sent,
                v1_tunnels = v1,
                expires_at = exp,
                "renewed token sent to the hub"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64, iat: u64) -> String {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b.encode(br#"{"alg":"HS256"}"#),
            b.encode(format!(r#"{{"exp":{exp},"iat":{iat}}}"#))
        )
    }

    #[test]
    fn renews_a_quarter_of_the_lifetime_before_expiry_and_only_to_a_longer_token() {
        let now = Instant::now();
        let t0 = 1_000_000;
        let mut r = TokenRenewal::new(&jwt(t0 + 400, t0));
        // Due 100 s before expiry.
        assert_eq!(r.deadline(now, t0), Some(now + Duration::from_secs(300)));
        assert_eq!(r.poll(now, t0 + 299, || panic!("not due yet")), None);
        // Due, but the file still holds the same token: look again in 1 s.
        assert_eq!(r.poll(now, t0 + 300, || Ok(jwt(t0 + 400, t0))), None);
        assert_eq!(r.deadline(now, t0 + 300), Some(now + RETRY));
        let later = now + RETRY;
        let fresh = jwt(t0 + 800, t0 + 301);
        assert_eq!(
            r.poll(later, t0 + 301, || Ok(fresh.clone())),
            Some(fresh.clone())
        );
        // The fresh token is now the one tracked.
        assert_eq!(
            r.deadline(later, t0 + 301),
            Some(later + Duration::from_secs(375))
        );
        // An older token never replaces it.
        assert!(!r.observe(&jwt(t0 + 500, t0)));
    }

    #[test]
    fn the_lead_is_bounded_and_garbage_is_ignored() {
        let now = Instant::now();
        let short = TokenRenewal::new(&jwt(1004, 1000));
        assert_eq!(
            short.deadline(now, 1000),
            Some(now + Duration::from_secs(2))
        );
        let long = TokenRenewal::new(&jwt(1_000_000 + 86_400 * 30, 1_000_000));
        assert_eq!(
            long.deadline(now, 1_000_000),
            Some(now + Duration::from_secs(86_400 * 30 - 300))
        );
        assert_eq!(token_times("not a token"), None);
        assert_eq!(TokenRenewal::new("x.y.z").deadline(now, 0), None);
    }

    use nowconnect_core::tunnel::{Tunnel, TunnelConfig, TunnelEvent};
    use nowconnect_core::{Epoch, WsMessage};

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
        d: &'a mut u64,
        dt: &'a mut Tunnel,
        c: &'a mut u64,
        ct: &'a mut Tunnel,
    ) -> [Presented<'a>; 2] {
        [
            Presented { exp: d, tunnel: dt },
            Presented { exp: c, tunnel: ct },
        ]
    }

    #[test]
    fn a_tunnel_left_with_an_older_token_gets_the_newest_once() {
        let now = Instant::now();
        let t0 = 1_000_000;
        let (old, new) = (jwt(t0 + 400, t0), jwt(t0 + 800, t0 + 300));
        // The draining tunnel was dialed with the old token; the agent then
        // dialed another hub with the new one (read at that dial).
        let (mut draining, mut draining_hub) = established(now);
        let (mut current, mut current_hub) = established(now);
        let mut r = TokenRenewal::new(&old);
        assert!(r.observe(&new));
        let (mut draining_exp, mut current_exp) = (t0 + 400, t0 + 800);
        r.catch_up(both(
            &mut draining_exp,
            &mut draining,
            &mut current_exp,
            &mut current,
        ));
        assert_eq!(reauths(&mut draining, &mut draining_hub, now), [new]);
        assert!(
            reauths(&mut current, &mut current_hub, now).is_empty(),
            "the hub already holds the new token"
        );
        assert_eq!(draining_exp, t0 + 800);
        // Nothing more to send the next time round.
        r.catch_up(both(
            &mut draining_exp,
            &mut draining,
            &mut current_exp,
            &mut current,
        ));
        assert!(reauths(&mut draining, &mut draining_hub, now).is_empty());
    }

    #[test]
    fn a_tunnel_still_in_its_handshake_gets_the_token_once_established() {
        let now = Instant::now();
        let t0 = 1_000_000;
        let mut r = TokenRenewal::new(&jwt(t0 + 800, t0));
        let cfg = TunnelConfig::default();
        let mut fresh = Tunnel::agent(now, cfg, "a", &["ldap".to_string()]);
        let mut exp = t0 + 400;
        r.catch_up([Presented {
            exp: &mut exp,
            tunnel: &mut fresh,
        }]);
        assert_eq!(exp, t0 + 400, "no REAUTH before the tunnel is established");
        let (mut agent, mut hub) = established(now);
        r.catch_up([Presented {
            exp: &mut exp,
            tunnel: &mut agent,
        }]);
        assert_eq!(reauths(&mut agent, &mut hub, now), [jwt(t0 + 800, t0)]);
    }
}
