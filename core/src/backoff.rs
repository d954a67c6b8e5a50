//! Capped exponential backoff with jitter, for reconnecting tunnels and mesh
//! links. Jitter spreads reconnects so that many agents do not all return at
//! the same instant when a hub restarts.
//!
//! An agent's delays start over only after its tunnel has stayed up for
//! [`STABLE_AFTER`] (`connected`, `disconnected`): a hub that accepts every
//! tunnel and then drops it at once (a crashing hub, a hostile one, two
//! agents fighting over one id) sees the delays grow as if each dial had
//! failed, never a redial every few hundred milliseconds for ever. Mesh
//! links start over when they come up (`reset`).

use std::time::{Duration, Instant};

use crate::rng::Rng;

/// How long a connection must stay up before the backoff starts over.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    /// When the current connection came up, if one is up.
    up_since: Option<Instant>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base: base.max(Duration::from_millis(1)),
            max: max.max(base),
            attempt: 0,
            up_since: None,
        }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Start over at once: for mesh links, whose peers are the cluster's
    /// own replicas (authenticated by certificate), where relinking fast
    /// after any drop matters more than sparing the peer.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.up_since = None;
    }

    /// A connection came up at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// The connection (or the attempt) ended at `now`: the delays start over
    /// if a connection had stayed up for at least [`STABLE_AFTER`].
    pub fn disconnected(&mut self, now: Instant) {
        let stable = self.up_since.take();
        if stable.is_some_and(|t| now.saturating_duration_since(t) >= STABLE_AFTER) {
            self.attempt = 0;
        }
    }

    /// The delay before the next attempt: uniform in `[d/2, d]` where
    /// `d = min(max, base · 2^attempt)`.
    pub fn next_delay(&mut self, rng: &mut Rng) -> Duration {
        let exp = self.attempt.min(30);
        self.attempt = self.attempt.saturating_add(1);
        let d = self.base.saturating_mul(1u32 << exp).min(self.max);
        let half = d / 2;
        let span = (d - half).as_micros() as u64;
        half + Duration::from_micros(if span == 0 { 0 } else { rng.below(span + 1) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps_and_stays_in_range() {
        let mut rng = Rng::new(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last_cap = Duration::ZERO;
        for i in 0..20u32 {
            let d = b.next_delay(&mut rng);
            let cap = Duration::from_millis(100)
                .saturating_mul(1 << i.min(30))
                .min(Duration::from_secs(5));
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {i}: {d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            assert!(cap >= last_cap);
            last_cap = cap;
        }
        assert_eq!(last_cap, Duration::from_secs(5));
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_differs_between_seeds() {
        let mut a = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut b = a.clone();
        let (mut ra, mut rb) = (Rng::new(1), Rng::new(2));
        let da: Vec<_> = (0..5).map(|_| a.next_delay(&mut ra)).collect();
        let db: Vec<_> = (0..5).map(|_| b.next_delay(&mut rb)).collect();
        assert_ne!(da, db);
    }
}
