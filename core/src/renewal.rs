//! [`TokenRenewal`]: the agent's side of token lifetime. The hub closes a
//! tunnel when its token expires, so before that the agent looks for a
//! fresh token and, once it holds one that lives longer, hands it to the
//! hub (REAUTH) on every established tunnel whose hub holds one that
//! expires earlier:
//! the tunnels open when it is found, a draining tunnel kept after the
//! agent dialed its next hub with a newer token, and a tunnel that finished
//! its handshake after the renewal went out. Flows never notice.
//!
//! Sans-IO: the caller reads the token (`token_file`) when told to
//! ([`TokenRenewal::due`]) and passes the result in, with both clocks: the
//! monotonic `now` for deadlines, and `wall`, the issuer's clock (time since
//! the Unix epoch in production) that a token's `exp` and `iat` are on. The
//! agent reads those from the token without verifying it, only to know when
//! to look; the hub verifies.

use std::time::{Duration, Instant};

use base64::Engine;

use crate::tunnel::Tunnel;

/// `exp` and `iat` of a token, on the issuer's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTimes {
    pub exp: Duration,
    pub iat: Option<Duration>,
}

impl TokenTimes {
    /// `exp` and `iat` of a JWT (seconds since the Unix epoch), unverified.
    pub fn of_jwt(token: &str) -> Option<TokenTimes> {
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        Some(TokenTimes {
            exp: Duration::from_secs(v.get("exp")?.as_u64()?),
            iat: v
                .get("iat")
                .and_then(|i| i.as_u64())
                .map(Duration::from_secs),
        })
    }
}

/// When to look for a fresh token.
#[derive(Clone, Debug)]
pub struct RenewalConfig {
    /// Look this share (1/n) of the token's lifetime before it expires…
    pub lead_share: u32,
    /// …but at least this long before…
    pub min_lead: Duration,
    /// …and at most this long before.
    pub max_lead: Duration,
    /// While due and no newer token is found, look again this often.
    pub retry: Duration,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        RenewalConfig {
            lead_share: 4,
            min_lead: Duration::from_secs(2),
            max_lead: Duration::from_secs(300),
            retry: Duration::from_secs(1),
        }
    }
}

/// What a look at the token found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Looked {
    /// A token that lives longer: it goes to every tunnel
    /// ([`TokenRenewal::catch_up`]).
    Fresh { expires: Duration },
    /// Nothing newer (or no token could be read): look again after the
    /// retry interval. `warn` on the first such look of a token: how long
    /// is left.
    Nothing { warn: Option<Duration> },
}

/// One of the agent's tunnels as renewal sees it: the `exp` of the token
/// its hub holds for it (the one it dialed with, or the last REAUTH).
pub struct Presented<'a> {
    pub exp: &'a mut Duration,
    pub tunnel: &'a mut Tunnel,
}

/// What [`TokenRenewal::catch_up`] sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaughtUp {
    /// Tunnels that got the newest token.
    pub sent: usize,
    /// v1 tunnels, which cannot take it and end with their token.
    pub v1: usize,
}

#[derive(Debug, Default)]
pub struct TokenRenewal {
    cfg: RenewalConfig,
    /// The token the agent holds now, and its times: the one it last dialed
    /// with, or a longer-lived one a look found since. Never an older one
    /// kept because it lives longer: after a key rotation that one no
    /// longer verifies.
    newest: Option<(String, TokenTimes)>,
    /// Due, and the last look found nothing newer: look again then.
    retry_at: Option<Instant>,
    warned: bool,
}

impl TokenRenewal {
    pub fn new(cfg: RenewalConfig) -> Self {
        TokenRenewal {
            cfg,
            ..TokenRenewal::default()
        }
    }

    /// The newest token's `exp`.
    pub fn expires(&self) -> Option<Duration> {
        self.newest.as_ref().map(|(_, t)| t.exp)
    }

    /// The agent dials with `token` (read from its file just now): it is
    /// the token it holds from now on, whatever it lived before. Whether it
    /// is another one.
    pub fn observe(&mut self, token: &str, times: Option<TokenTimes>) -> bool {
        if self.newest.as_ref().is_some_and(|(held, _)| held == token) {
            return false;
        }
        match times {
            Some(t) => self.take(token, t),
            // A token whose lifetime the agent cannot read: nothing to
            // renew it with or from (the hub judges it).
            None if self.newest.is_none() => return false,
            None => *self = TokenRenewal::new(self.cfg.clone()),
        }
        true
    }

    fn take(&mut self, token: &str, t: TokenTimes) {
        self.newest = Some((token.to_string(), t));
        self.retry_at = None;
        self.warned = false;
    }

    /// The issuer-clock time at which to look for a fresh token.
    fn due_wall(&self, wall: Duration) -> Option<Duration> {
        let (_, t) = self.newest.as_ref()?;
        let lifetime = t.exp.saturating_sub(t.iat.unwrap_or(wall).min(t.exp));
        let lead =
            (lifetime / self.cfg.lead_share.max(1)).clamp(self.cfg.min_lead, self.cfg.max_lead);
        Some(t.exp.saturating_sub(lead))
    }

    /// When to look next ([`Self::due`]).
    pub fn deadline(&self, now: Instant, wall: Duration) -> Option<Instant> {
        let due = self.due_wall(wall)?;
        // The retry only while due: a wall clock stepped back (an NTP step,
        // a resumed VM) must not leave a deadline in the past to spin on.
        if wall >= due
            && let Some(at) = self.retry_at
        {
            return Some(at);
        }
        Some(now + due.saturating_sub(wall))
    }

    /// Whether to read the token now.
    pub fn due(&self, now: Instant, wall: Duration) -> bool {
        match self.due_wall(wall) {
            Some(due) => wall >= due && self.retry_at.is_none_or(|at| now >= at),
            None => false,
        }
    }

    /// What the read found (`None`: it could not be read): a token that
    /// lives longer is tracked; otherwise look again after the retry.
    pub fn looked(
        &mut self,
        now: Instant,
        wall: Duration,
        read: Option<(&str, Option<TokenTimes>)>,
    ) -> Looked {
        if let Some((token, Some(t))) = read
            && self.expires().is_none_or(|exp| t.exp > exp)
        {
            self.take(token, t);
            return Looked::Fresh { expires: t.exp };
        }
        let warn = (!self.warned).then(|| self.expires().unwrap_or_default().saturating_sub(wall));
        self.warned = true;
        self.retry_at = Some(now + self.cfg.retry);
        Looked::Nothing { warn }
    }

    /// Hand the token the agent holds (REAUTH) to every established tunnel
    /// whose hub holds one that expires earlier, and note that it now holds
    /// this one. A tunnel is never handed a token that expires sooner than
    /// its own. A v1 tunnel cannot take it and is not asked again.
    pub fn catch_up<'a>(&self, tunnels: impl IntoIterator<Item = Presented<'a>>) -> CaughtUp {
        let mut done = CaughtUp::default();
        let Some((token, times)) = &self.newest else {
            return done;
        };
        for p in tunnels {
            if *p.exp >= times.exp || !p.tunnel.is_established() {
                continue;
            }
            if p.tunnel.send_reauth(token) {
                done.sent += 1;
            } else {
                done.v1 += 1;
            }
            *p.exp = times.exp;
        }
        done
    }
}
