//! The agent runtime's side of token renewal: it reads `token_file` and
//! the wall clock, logs, and carries out what the core's [`TokenRenewal`]
//! decides (when to look, which tunnels get the token). See
//! `nowconnect_core::renewal`.

use std::time::{Duration, Instant};

use nowconnect_core::renewal::{Looked, Presented, RenewalConfig, TokenRenewal, TokenTimes};

/// The wall clock as the core's renewal takes it (a JWT's `exp` and `iat`
/// are whole seconds since the Unix epoch).
fn wall() -> Duration {
    Duration::from_secs(crate::jwt::unix_now())
}

/// `exp` of a token, or zero when it has none the agent can read.
pub fn token_exp(token: &str) -> Duration {
    TokenTimes::of_jwt(token).map_or(Duration::ZERO, |t| t.exp)
}

/// The agent's renewal: the core machine with the runtime's clocks.
#[derive(Debug)]
pub struct AgentRenewal {
    core: TokenRenewal,
}

impl AgentRenewal {
    pub fn new(token: &str) -> Self {
        let mut core = TokenRenewal::new(RenewalConfig::default());
        core.observe(token, TokenTimes::of_jwt(token));
        AgentRenewal { core }
    }

    /// The agent presents `token` (a dial): tracked when it lives longer.
    pub fn observe(&mut self, token: &str) {
        self.core.observe(token, TokenTimes::of_jwt(token));
    }

    /// When to call [`Self::renew`] next.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        self.core.deadline(now, wall())
    }

    /// The agent runtime's timer step: when due, read the token again
    /// (`read`: `token_file`), then hand the newest to every tunnel that
    /// holds an older one ([`Self::catch_up`]).
    pub fn renew<'a>(
        &mut self,
        now: Instant,
        read: impl FnOnce() -> Result<String, String>,
        tunnels: impl IntoIterator<Item = Presented<'a>>,
    ) {
        let wall = wall();
        if self.core.due(now, wall) {
            let got = read();
            let found = got
                .as_ref()
                .ok()
                .map(|t| (t.as_str(), TokenTimes::of_jwt(t)));
            match (self.core.looked(now, wall, found), &got) {
                (Looked::Fresh { expires }, _) => {
                    tracing::info!(expires_at = expires.as_secs(), "fresh token found")
                }
                (Looked::Nothing { warn: Some(left) }, Ok(_)) => tracing::warn!(
                    seconds_left = left.as_secs(),
                    "the agent's token expires soon and token_file holds no newer token; the hub closes its tunnels when it expires"
                ),
                (Looked::Nothing { warn: Some(_) }, Err(error)) => {
                    tracing::warn!(%error, "cannot read a fresh token")
                }
                (Looked::Nothing { warn: None }, _) => {}
            }
        }
        self.catch_up(tunnels);
    }

    /// Hand the newest token (REAUTH) to every established tunnel whose hub
    /// holds an older one (see the core's `TokenRenewal::catch_up`).
    pub fn catch_up<'a>(&mut self, tunnels: impl IntoIterator<Item = Presented<'a>>) {
        let done = self.core.catch_up(tunnels);
        if done.sent + done.v1 > 0 {
            tracing::info!(
                tunnels = done.sent,
                v1_tunnels = done.v1,
                expires_at = self.core.expires().unwrap_or_default().as_secs(),
                "renewed token sent to the hub"
            );
        }
    }
}
